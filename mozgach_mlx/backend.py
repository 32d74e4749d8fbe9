"""Which backend MLX runs on, the fast CPU BLAS, and which attention kernels exist.

Importing this module must not import ``mlx.core`` before :func:`load_fast_blas` ran:
the ``mlx[cpu]`` wheel links a slow reference BLAS (~3-5 GFLOP/s fp32 GEMM measured on
the 2-core dev machine) and the dynamic linker binds ``cblas_sgemm`` to the first
library that exports it. Loading an optimized CBLAS (OpenBLAS) with ``RTLD_GLOBAL``
*before* ``mlx.core`` makes MLX use it (~130-180 GFLOP/s on the same machine; see
benchmarks/RESULTS.md).

Environment (read by :mod:`mozgach_mlx.settings`): ``MOZGACH_BLAS`` (path of a CBLAS
shared library to load, or ``none`` to keep MLX's own), ``MOZGACH_MALLOC`` (``default``
keeps glibc's malloc thresholds, see :func:`tune_malloc`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import warnings
from functools import lru_cache
from pathlib import Path

from . import settings

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


def _find_blas() -> str | None:
    env = settings.blas()
    if env:
        return None if env == "none" else env
    for cand in _BLAS_CANDIDATES:
        if Path(cand).exists():
            return cand
    name = ctypes.util.find_library("openblas")
    return name


def load_fast_blas() -> str | None:
    """Load an optimized CBLAS globally so MLX's CPU GEMM uses it. Idempotent.

    Returns the path loaded, or None (not Linux, none installed, disabled, or
    ``mlx.core`` was imported first). Never raises: the slow BLAS is still correct.
    """
    global _blas_path, _blas_reason
    if _blas_path is not None or _blas_reason != "not attempted":
        return _blas_path
    if not sys.platform.startswith("linux"):
        _blas_reason = "not Linux (macOS uses Accelerate/Metal)"
        return None
    path = _find_blas()
    if path is None:
        _blas_reason = ("no OpenBLAS found; install it (Debian/Ubuntu: apt install "
                        "libopenblas0-pthread) or set MOZGACH_BLAS=/path/libopenblas.so")
        return None
    if "mlx.core" in sys.modules:
        _blas_reason = "mlx.core was imported before mozgach_mlx; import mozgach_mlx first"
        warnings.warn(f"mozgach_mlx: fast BLAS not loaded: {_blas_reason}", stacklevel=3)
        return None
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        _blas_reason = f"could not load {path}: {e}"
        warnings.warn(f"mozgach_mlx: {_blas_reason}", stacklevel=3)
        return None
    _blas_path = path
    _blas_reason = "loaded"
    return path


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_malloc_tuned = False


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
        "malloc_tuned": _malloc_tuned,
        "kernels": kernels_available(),
    }
