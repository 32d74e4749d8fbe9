import os
import subprocess
import sys

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
def test_fast_blas_bound_when_installed():
    path, reason = backend.blas_status()
    expected = backend.pip_blas() or backend.system_blas()
    if expected is None:
        pytest.skip("no OpenBLAS installed here: " + reason)
    assert (path, reason) == (expected, "bound")
    assert backend.info()["cpu_blas"] == path


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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fast BLAS loading is Linux-only")
def test_blas_threads_auto_by_default_and_overridable():
    """The count is read back from the library itself (openblas_get_num_threads)."""
    if backend.pip_blas() is None:
        pytest.skip("scipy-openblas32 is not installed")
    code = ("import os, mozgach_mlx.backend as b, mozgach_mlx; "
            "print(b.info()['cpu_blas_threads'], b.auto_blas_threads(load=os.getloadavg()[0]))")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOZGACH_", "OPENBLAS_NUM"))}
    for extra, want in (({"MOZGACH_BLAS_THREADS": "1"}, "1"), ({"MOZGACH_BLAS_THREADS": "2"}, "2"),
                        ({"MOZGACH_BLAS_THREADS": "x"}, "1"), ({}, None), ({"MOZGACH_BLAS_THREADS": "auto"}, None)):
        res = subprocess.run([sys.executable, "-c", code], env=env | {"MOZGACH_BLAS": "pip"} | extra,
                             capture_output=True, text=True, check=True)
        got, auto_now = res.stdout.split()
        assert got == (want or auto_now) or (want is None and got in ("1", "2")), (extra, res.stdout)
        assert ("MOZGACH_BLAS_THREADS='x'" in res.stderr) == (extra.get("MOZGACH_BLAS_THREADS") == "x")


def test_auto_blas_threads_uses_two_cores_only_when_they_are_free():
    assert backend.auto_blas_threads(cores=2, load=0.1) == 2
    assert backend.auto_blas_threads(cores=2, load=1.2) == 1  # another process on one of the two cores
    assert backend.auto_blas_threads(cores=1, load=0.0) == 1
    assert backend.auto_blas_threads(cores=16, load=6.0) == 2  # 10 idle cores
    assert backend.auto_blas_threads(cores=16, load=15.0) == 1


def test_mlx_imported_first_gives_no_warning():
    if backend.pip_blas() is None and backend.system_blas() is None:
        pytest.skip("no OpenBLAS installed here")
    code = "import mlx.core\nimport mozgach_mlx.backend as b, mozgach_mlx\nprint(b.blas_status()[1])"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOZGACH_")}
    out = subprocess.run([sys.executable, "-W", "error", "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "bound"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_malloc_thresholds_raised_unless_disabled():
    assert backend.info()["malloc_tuned"] is True
    code = "import mozgach_mlx, mozgach_mlx.backend as b; print(b.info()['malloc_tuned'])"
    out = subprocess.run([sys.executable, "-c", code], env={"MOZGACH_MALLOC": "default", "PATH": "/usr/bin"},
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
