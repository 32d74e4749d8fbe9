"""Which backend MLX runs on, the fast CPU BLAS, and which attention kernels exist.

The ``mlx[cpu]`` wheel links a slow reference BLAS (~3-5 GFLOP/s fp32 GEMM measured on
the 2-core dev machine). :func:`load_fast_blas` rebinds MLX's GEMM imports to an
optimized OpenBLAS (:mod:`mozgach_mlx.blasbind`), after ``mlx.core`` is loaded, so the
import order does not matter. By default it uses the ``scipy-openblas32`` pip wheel (a
Linux dependency of this package), else a system OpenBLAS (Debian/Ubuntu, Fedora).

Environment (read by :mod:`mozgach_mlx.settings`): ``MOZGACH_BLAS`` (``pip``,
``system``, a library path, or ``none`` to keep MLX's own), ``MOZGACH_BLAS_THREADS``
(default 1, see :func:`blasbind.set_threads`), ``MOZGACH_MALLOC``
(``default`` keeps glibc's malloc thresholds, see :func:`tune_malloc`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import sys
import warnings
from functools import lru_cache
from pathlib import Path

from . import blasbind, settings
from .errors import ConfigError

# Debian/Ubuntu (libopenblas0-pthread / -openmp / -serial), Fedora, Homebrew-on-Linux.
_BLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/openblas-openmp/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
)

_blas_path: str | None = None
_blas_reason: str = "not attempted"
_binding: blasbind.Binding | None = None


def pip_blas() -> str | None:
    """Path of the ``scipy-openblas32`` wheel's library, or None if it is not installed.

    Found without importing the package (its ``__init__`` loads the library globally).
    """
    spec = importlib.util.find_spec("scipy_openblas32")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        libs = sorted((Path(folder) / "lib").glob("libscipy_openblas*.so*"))
        if libs:
            return str(libs[0])
    return None


def system_blas() -> str | None:
    """Path of a system OpenBLAS (apt/dnf), or None."""
    for cand in _BLAS_CANDIDATES:
        if Path(cand).exists():
            return cand
    return ctypes.util.find_library("openblas")


def _candidates(choice: str | None) -> list[str]:
    if choice == "pip":
        return [p for p in (pip_blas(),) if p]
    if choice == "system":
        return [p for p in (system_blas(),) if p]
    if choice is not None:
        return [choice]
    return [p for p in (pip_blas(), system_blas()) if p]


def load_fast_blas() -> str | None:
    """Point MLX's CPU GEMM at an optimized OpenBLAS. Idempotent; any import order.

    Returns the library bound, or None (not Linux, disabled, none found, or the
    binding's self-check failed: one warning, and MLX's own BLAS stays, still correct).
    """
    global _blas_path, _blas_reason, _binding
    if _blas_reason != "not attempted":
        return _blas_path
    if not sys.platform.startswith("linux"):
        _blas_reason = "not Linux (macOS uses Accelerate/Metal)"
        return None
    choice = settings.blas()
    if choice == "none":
        _blas_reason = "disabled by MOZGACH_BLAS=none"
        return None
    candidates = _candidates(choice)
    if not candidates:
        _blas_reason = ("no OpenBLAS found; `pip install scipy-openblas32` (a dependency of "
                        "mozgach-mlx on Linux) or set MOZGACH_BLAS=/path/libopenblas.so")
        warnings.warn(f"mozgach_mlx: MLX keeps its slow bundled BLAS: {_blas_reason}", stacklevel=3)
        return None
    try:
        threads = settings.blas_threads() or auto_blas_threads()
    except ConfigError as e:  # a bad value must not break `import mozgach_mlx`
        warnings.warn(f"mozgach_mlx: {e} Using 1.", stacklevel=3)
        threads = 1
    import mlx.core  # noqa: F401  (libmlx.so must be loaded before its slots are rebound)

    failures = []
    for path in candidates:
        try:
            _binding = blasbind.bind(path, threads=threads)
        except blasbind.BindError as e:
            failures.append(str(e))
            continue
        _blas_path, _blas_reason = path, "bound"
        return path
    _blas_reason = "; ".join(failures)
    warnings.warn(f"mozgach_mlx: MLX keeps its slow bundled BLAS: {_blas_reason}", stacklevel=3)
    return None


def blas_binding() -> blasbind.Binding | None:
    """The GOT slots rewritten by :func:`load_fast_blas` and their targets, or None."""
    return _binding


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_malloc_tuned = False


# MOZGACH_BLAS_THREADS=auto: 2 threads only when the machine is idle at import. On a loaded
# machine 2-thread OpenBLAS GEMMs were erratic here (a waiting caller whose worker thread
# the scheduler does not run; README "Backends"); on an idle one they pay (RESULTS.md).
AUTO_BLAS_MAX_THREADS = 2
AUTO_BLAS_IDLE_LOAD = 0.5  # 1-minute load average per spare core below which the machine counts as idle


def auto_blas_threads(cores: int | None = None, load: float | None = None) -> int:
    """Threads for the bound OpenBLAS: min(AUTO_BLAS_MAX_THREADS, this process's cores) when
    the 1-minute load average leaves that many cores free, else 1."""
    try:
        cores = cores if cores is not None else len(os.sched_getaffinity(0))
        load = load if load is not None else os.getloadavg()[0]
    except (AttributeError, OSError):
        return 1
    n = min(AUTO_BLAS_MAX_THREADS, cores)
    return n if n > 1 and load <= (cores - n) + AUTO_BLAS_IDLE_LOAD else 1


def tune_malloc() -> bool:
    """Keep glibc from mmap/munmap-ing every large temporary MLX allocates.

    MLX's CPU backend allocates its big buffers with malloc; glibc serves anything over
    128 KiB with a fresh mmap and returns it on free, so every step page-faults its
    temporaries in again (measured: ~900K page faults and 7.8 s of system time for a
    12-adapter evaluation, 44K and 2.2 s with these thresholds raised to 1 GiB). Linux
    glibc only; ``MOZGACH_MALLOC=default`` leaves malloc alone. Returns whether it applied.
    """
    global _malloc_tuned
    if _malloc_tuned or settings.malloc_default():
        return _malloc_tuned
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
    except (OSError, AttributeError):
        return False
    _malloc_tuned = ok
    return ok


def blas_status() -> tuple[str | None, str]:
    """(path of the loaded fast BLAS or None, why)."""
    return _blas_path, _blas_reason


@lru_cache(maxsize=1)
def backend() -> str:
    """``"metal"``, ``"cuda"`` or ``"cpu"``: where MLX's default GPU stream runs."""
    import mlx.core as mx

    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return "cpu"


def kernels_available() -> dict[str, bool]:
    """Which attention implementations can run here (the GPU ones still self-check)."""
    b = backend()
    return {"reference": True, "blockwise": True, "metal": b == "metal", "cuda": b == "cuda"}


def info() -> dict:
    """Everything a bug report needs about the compute backend."""
    import mlx.core as mx

    path, reason = blas_status()
    return {
        "backend": backend(),
        "mlx_version": mx.__version__,
        "default_device": str(mx.default_device()),
        "cpu_blas": path or f"bundled reference BLAS ({reason})",
        "cpu_blas_threads": blasbind.set_threads(_binding) if _binding else None,
        "malloc_tuned": _malloc_tuned,
        "kernels": kernels_available(),
    }
