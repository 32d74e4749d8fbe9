"""blasbind.py: MLX's GEMM imports rebound to OpenBLAS, whatever the import order.

The facts checked do not come from blasbind itself: the GOT slot offsets are compared
with binutils' ``readelf -r``; "bound" means the pointer in the slot lies inside the
OpenBLAS file's mapping in ``/proc/self/maps`` and equals ``dlsym`` of its
``cblas_sgemm``; products are compared with numpy's float64 ones.
"""

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest

from mozgach_mlx import backend, blasbind

ROOT = Path(__file__).resolve().parent.parent
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the binding is Linux-only")

# Run in a fresh interpreter: import mlx.core FIRST, run a matmul (so the lazy PLT slot is
# resolved to the bundled BLAS), then import mozgach_mlx, and report who owns each slot.
CHECK = r"""
import ctypes, importlib.util, json, sys
from pathlib import Path
import mlx.core as mx
import numpy as np

# blasbind.py alone (importing the mozgach_mlx package would already bind)
origin = Path(importlib.util.find_spec("mozgach_mlx").origin).parent / "blasbind.py"
spec = importlib.util.spec_from_file_location("blasbind_alone", origin)
bb = sys.modules["blasbind_alone"] = importlib.util.module_from_spec(spec); spec.loader.exec_module(bb)
mlx_path, bias = bb.loaded_libmlx()
slots = {n: [bias + r for r in offs] for n, offs in bb.gemm_slots(mlx_path).items()}
mx.eval(mx.ones((4, 4)) @ mx.ones((4, 4)))

def maps():
    rows = []
    for line in open("/proc/self/maps"):
        p = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in p[0].split("-"))
        rows.append((lo, hi, p[5].strip() if len(p) > 5 else ""))
    return rows

def owners():
    m = maps()
    out = {}
    for n, addrs in slots.items():
        vals = [ctypes.c_uint64.from_address(a).value for a in addrs]
        out[n] = [[v, next((p for lo, hi, p in m if lo <= v < hi), "")] for v in vals]
    return out

before = owners()
import mozgach_mlx
from mozgach_mlx import backend
after = owners()
lib_path = backend.blas_status()[0]
dlsym = {}
if lib_path:
    lib = ctypes.CDLL(lib_path)
    for n in slots:
        f = getattr(lib, n, None) or getattr(lib, "scipy_" + n)
        dlsym[n] = ctypes.cast(f, ctypes.c_void_p).value
rng = np.random.default_rng(0)
a = rng.standard_normal((70, 129)).astype(np.float32)
b = rng.standard_normal((129, 33)).astype(np.float32)
got = np.array(mx.array(a) @ mx.array(b)), np.array(mx.array(a.T.copy()).T @ mx.array(b))
err = max(float(np.abs(g - a.astype(np.float64) @ b).max()) for g in got)
print(json.dumps({"mlx": str(Path(mlx_path).resolve()), "lib": lib_path, "before": before, "after": after,
                  "dlsym": dlsym, "err": err, "status": backend.blas_status()}))
"""


def clean_env(*drop: str) -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith(("MOZGACH_",) + drop)}


def run_check(python: str, fresh: bool = False, **env) -> dict:
    full = clean_env(*(("PYTHON", "VIRTUAL_ENV") if fresh else ())) | env
    res = subprocess.run([python, "-c", CHECK], env=full, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def assert_bound(out: dict, library: str | None = None) -> None:
    assert out["status"][1] == "bound", out["status"]
    lib = str(Path(out["lib"]).resolve())
    if library is not None:
        assert lib == str(Path(library).resolve())
    for name, rows in out["before"].items():
        for _value, owner in rows:  # bundled libblas-*.so, or libmlx.so's own PLT stub (not yet called)
            assert "mlx_cpu.libs/libblas" in owner or Path(owner).resolve() == Path(out["mlx"]), (name, owner)
    for name, rows in out["after"].items():
        for value, owner in rows:
            assert str(Path(owner).resolve()) == lib, (name, owner)
            assert value == out["dlsym"][name], name
    assert out["err"] < 1e-3


@linux
def test_slots_match_readelf():
    path, _bias = blasbind.loaded_libmlx()
    ours = blasbind.gemm_slots(path)
    if shutil.which("readelf") is None:
        pytest.skip("binutils' readelf is not installed")
    text = subprocess.run(["readelf", "-rW", path], capture_output=True, text=True, check=True).stdout
    theirs: dict[str, list[int]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[4] in blasbind.GEMMS:
            theirs.setdefault(parts[4], []).append(int(parts[0], 16))
    assert {k: sorted(v) for k, v in ours.items()} == {k: sorted(v) for k, v in theirs.items()}
    assert set(ours) == set(blasbind.GEMMS)


def test_gemm_slots_rejects_a_file_that_is_not_elf(tmp_path):
    bad = tmp_path / "libfake.so"
    bad.write_bytes(b"#!/bin/sh\n" + b"\0" * 100)
    with pytest.raises(blasbind.BindError, match="not a little-endian ELF64"):
        blasbind.gemm_slots(bad)


@linux
def test_gemm_slots_names_a_symbol_libmlx_does_not_import():
    path, _bias = blasbind.loaded_libmlx()
    with pytest.raises(blasbind.BindError, match="imports no cblas_ssymm"):
        blasbind.gemm_slots(path, ("cblas_ssymm", "cblas_sgemm"))
    assert set(blasbind.gemm_slots(path, ("cblas_sgemm", "cblas_ssymm"))) == {"cblas_sgemm"}


@linux
def test_mlx_imported_first_is_bound_to_pip_openblas():
    """(a) of issue 13: import mlx.core first, then mozgach_mlx; the GEMM slots point into
    the scipy-openblas32 wheel's library and products equal numpy's."""
    if backend.pip_blas() is None:
        pytest.skip("scipy-openblas32 is not installed (a Linux dependency: pip install -e .)")
    assert_bound(run_check(sys.executable), backend.pip_blas())


@linux
def test_system_openblas_route():
    if backend.system_blas() is None:
        pytest.skip("no system OpenBLAS here")
    assert_bound(run_check(sys.executable, MOZGACH_BLAS="system"))


@linux
def test_disabled_keeps_bundled_blas():
    out = run_check(sys.executable, MOZGACH_BLAS="none")
    assert out["status"] == [None, "disabled by MOZGACH_BLAS=none"]
    assert out["after"] == out["before"] and out["err"] < 1e-3


RESTORE = r"""
import warnings
import mlx.core as mx, numpy as np
from mozgach_mlx import backend, blasbind as bb
lib = backend.pip_blas() or backend.system_blas()
real = bb.open_library
def wrong(path):  # dgemm's slot -> sgemm: memory-safe (reads/writes half the bytes), wrong values
    l, t, p = real(path)
    return l, dict(t, cblas_dgemm=t["cblas_sgemm"]), p
bb.open_library = wrong
mlx_path, bias = bb.loaded_libmlx()
slots = [bias + r for offs in bb.gemm_slots(mlx_path).values() for r in offs]
old = [bb.read_slot(a) for a in slots]
try:
    bb.bind(lib)
    print("bound")
except bb.BindError as e:
    print("refused:", e)
a = np.random.default_rng(0).standard_normal((9, 31))
ok = np.allclose(np.array(mx.array(a, dtype=mx.float64) @ mx.array(a.T, dtype=mx.float64)), a @ a.T, rtol=1e-12)
print("restored", [bb.read_slot(a) for a in slots] == old, "float64 ok", ok)
"""


@linux
def test_failed_self_check_restores_the_bundled_blas():
    if backend.pip_blas() is None and backend.system_blas() is None:
        pytest.skip("no OpenBLAS to bind")
    env = clean_env() | {"MOZGACH_BLAS": "none"}
    out = subprocess.run([sys.executable, "-c", RESTORE], env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    assert "refused: self-check after binding" in out and "float64" in out, out
    assert "restored True float64 ok True" in out, out


@linux
def test_missing_library_warns_once_and_stays_correct():
    code = ("import warnings\nwith warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always'); import mozgach_mlx\n"
            "from mozgach_mlx import backend; import mlx.core as mx\n"
            "print(len(w), backend.blas_status()[0], float((mx.ones((3, 5)) @ mx.ones((5, 2)))[0, 0]))\n"
            "print(w[0].message)")
    env = clean_env() | {"MOZGACH_BLAS": "/no/libx.so"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout.splitlines()
    assert out[0] == "1 None 5.0"
    assert "slow bundled BLAS" in out[1] and "/no/libx.so" in out[1]


@linux
def test_write_slot_on_a_read_only_page_restores_its_protection():
    """The RELRO / BIND_NOW case: the GOT page is read-only after relocation."""
    import ctypes
    import mmap

    buf = mmap.mmap(-1, mmap.PAGESIZE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    libc = ctypes.CDLL(None)
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    assert libc.mprotect(addr, mmap.PAGESIZE, 1) == 0  # PROT_READ

    def perms():
        return next(m[2] for m in blasbind.mappings() if m[0] <= addr < m[1])

    assert perms().startswith("r--")
    blasbind.write_slot(addr + 8, 0x1234_5678_9ABC)
    assert blasbind.read_slot(addr + 8) == 0x1234_5678_9ABC
    assert perms().startswith("r--")
    libc.mprotect(addr, mmap.PAGESIZE, 3)  # writable again, so the buffer can be released


def test_self_check_passes_in_this_process():
    blasbind.self_check()  # whatever BLAS is bound here, MLX's products equal numpy's


@pytest.mark.slow
@linux
def test_fresh_venv_pip_only(tmp_path):
    """(b) of issue 13: a new venv, ``pip install`` of this checkout (pip only, no apt),
    then the same check: mlx.core imported first, GEMMs bound to the pip OpenBLAS."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = str(env_dir / "bin" / "python")
    res = subprocess.run([py, "-m", "pip", "install", "-q", str(ROOT)], env=clean_env("PYTHON", "VIRTUAL_ENV"),
                         capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    out = run_check(py, fresh=True)
    assert "scipy_openblas32" in out["lib"] and str(env_dir) in out["lib"], out["lib"]
    assert_bound(out)
    assert np.isfinite(out["err"])


@linux
def test_bind_refuses_slots_that_do_not_hold_code_pointers(monkeypatch):
    """A parse that points at the wrong place (here: libmlx.so's ELF header, and an address
    past its end) is refused before anything is written."""
    lib = backend.pip_blas() or backend.system_blas()
    if lib is None:
        pytest.skip("no OpenBLAS to bind")
    path, bias = blasbind.loaded_libmlx()
    header = blasbind.read_slot(bias)
    monkeypatch.setattr(blasbind, "gemm_slots", lambda p: {"cblas_sgemm": [0]})
    with pytest.raises(blasbind.BindError, match="not a code address"):
        blasbind.bind(lib)
    assert blasbind.read_slot(bias) == header
    monkeypatch.setattr(blasbind, "gemm_slots", lambda p: {"cblas_sgemm": [1 << 40]})
    with pytest.raises(blasbind.BindError, match="not inside"):
        blasbind.bind(lib)
