import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mozgach_mlx import backend


def test_info_reports_backend_and_kernels():
    info = backend.info()
    assert info["backend"] in ("cpu", "metal", "cuda")
    assert info["kernels"]["blockwise"] is True
    gpu = {"metal", "cuda"} & {k for k, ok in info["kernels"].items() if ok}
    assert gpu == ({info["backend"]} & {"metal", "cuda"})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fast BLAS loading is Linux-only")
def test_fast_blas_loaded_when_installed():
    path, reason = backend.blas_status()
    installed = [c for c in backend._BLAS_CANDIDATES if Path(c).exists()]
    if not installed:
        pytest.skip("no OpenBLAS installed here: " + reason)
    assert path in installed, reason


def test_gemm_matches_numpy_with_loaded_blas():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((130, 257)).astype(np.float32)
    b = rng.standard_normal((257, 65)).astype(np.float32)
    got = np.array(mx.array(a) @ mx.array(b))
    np.testing.assert_allclose(got, a.astype(np.float64) @ b.astype(np.float64), rtol=1e-4, atol=1e-4)


def test_blas_can_be_disabled_by_env():
    code = "import mozgach_mlx.backend as b, mozgach_mlx; print(b.blas_status()[0])"
    out = subprocess.run([sys.executable, "-c", code], env={"MOZGACH_BLAS": "none", "PATH": "/usr/bin"},
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "None"


def test_warns_when_mlx_imported_first():
    code = ("import warnings; warnings.simplefilter('error');\n"
            "import mlx.core\n"
            "try:\n    import mozgach_mlx\nexcept UserWarning as e:\n    print('warned:', e)\n")
    installed = [c for c in backend._BLAS_CANDIDATES if Path(c).exists()]
    if not installed:
        pytest.skip("no OpenBLAS installed here")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "import mozgach_mlx first" in out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_malloc_thresholds_raised_unless_disabled():
    assert backend.info()["malloc_tuned"] is True
    code = "import mozgach_mlx, mozgach_mlx.backend as b; print(b.info()['malloc_tuned'])"
    out = subprocess.run([sys.executable, "-c", code], env={"MOZGACH_MALLOC": "default", "PATH": "/usr/bin"},
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
