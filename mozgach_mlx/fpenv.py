"""Subnormal floats flushed to zero on the threads that run MLX's CPU work (x86-64 Linux).

Training makes subnormal fp32 numbers (below 1.2e-38) all the time: a probability of a
nearly masked score times a small gradient, an Adam moment decaying. x86 CPUs compute
with them by microcode, 20-100x slower per operation: on the dev machine a 512x512 GEMM
takes 4.45 s instead of 0.043 s when its inputs are subnormal, and the default run's
backward pass took 2.2x its time with them (``benchmarks/profile_step.py``). GPUs and
Apple's CPUs do not pay this; XLA and PyTorch's ``torch.set_flush_denormal`` set the
same two SSE flags (MXCSR FTZ: results flush to zero; DAZ: inputs read as zero).

MLX runs each CPU stream's work on its own thread, started lazily by the first task
sent to the stream; a thread starts with its creator's floating-point environment
(POSIX). So the flags are set on the calling (main) thread only around the moment a
worker thread starts (:func:`flushing`) and restored after it: the user's own Python,
NumPy and PyTorch code in the main thread keeps IEEE subnormals (NumPy warns about
"the smallest subnormal is zero" when they are gone). :func:`install` makes sure the
default CPU stream's thread flushes, with a probe; if that thread already existed
without the flags (MLX computed before ``import mozgach_mlx``), a fresh CPU stream
becomes the default one. OpenBLAS's worker threads start inside :func:`flushing` too
(``mozgach_mlx/__init__.py``).

``MOZGACH_FLUSH_DENORMALS=0`` leaves every thread as it is. Other platforms: nothing to
do (Apple silicon handles subnormals at full speed; Metal and CUDA flush them).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import platform
import sys
import warnings

from . import settings
from .errors import ConfigError

FTZ_DAZ = 0x8000 | 0x0040  # MXCSR bits 15 (flush to zero) and 6 (denormals are zero)
_MXCSR_WORD = 7  # glibc's and musl's x86-64 fenv_t: 32 bytes, __mxcsr the last 4

_libm = None
_status = "not attempted"
_warned = False


def supported() -> bool:
    """x86-64 Linux (glibc or musl: the fenv_t layout this module writes)."""
    return sys.platform.startswith("linux") and platform.machine().lower() in ("x86_64", "amd64")


def enabled() -> bool:
    """``MOZGACH_FLUSH_DENORMALS`` allows it (a bad value: one warning, and off)."""
    try:
        return settings.flush_denormals()
    except ConfigError as e:  # must not break `import mozgach_mlx`
        global _warned
        if not _warned:
            warnings.warn(f"mozgach_mlx: {e} Subnormals are not flushed.", stacklevel=4)
            _warned = True
        return False


def _lib():
    global _libm
    if _libm is None:
        _libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
    return _libm


def mxcsr() -> int:
    """This thread's MXCSR register (x86-64 Linux only)."""
    env = (ctypes.c_uint32 * 8)()
    if _lib().fegetenv(env) != 0:
        raise OSError("fegetenv failed")
    return env[_MXCSR_WORD]


def _set_mxcsr(value: int) -> None:
    env = (ctypes.c_uint32 * 8)()
    lib = _lib()
    if lib.fegetenv(env) != 0:
        raise OSError("fegetenv failed")
    env[_MXCSR_WORD] = value
    if lib.fesetenv(env) != 0:
        raise OSError("fesetenv failed")


@contextlib.contextmanager
def flushing():
    """Within: this thread flushes subnormals, and so does every thread started inside
    (MLX stream threads, OpenBLAS's pool). The old flags are restored on exit. A no-op
    where unsupported or disabled by ``MOZGACH_FLUSH_DENORMALS=0``."""
    if not supported() or not enabled():
        yield
        return
    old = mxcsr()
    _set_mxcsr(old | FTZ_DAZ)
    try:
        yield
    finally:
        _set_mxcsr(old)


def stream_flushes(stream=None) -> bool:
    """Whether ``stream`` (default: the default CPU stream) flushes subnormals: 1e-39 * 0.5
    computed there is 0. Call it outside :func:`flushing` (MLX computes some operations
    with a Python scalar on the calling thread)."""
    import mlx.core as mx

    tiny, half = mx.array([1e-39], dtype=mx.float32), mx.array([0.5], dtype=mx.float32)
    out = mx.multiply(tiny, half, stream=stream if stream is not None else mx.default_stream(mx.cpu))
    mx.eval(out)
    return out.item() == 0.0


def _start_thread(stream) -> None:
    """Send ``stream`` one task, which starts its thread if MLX has not yet."""
    import mlx.core as mx

    mx.eval(mx.add(mx.array([0.0]), mx.array([1.0]), stream=stream))


def new_cpu_stream():
    """``mx.new_stream(mx.cpu)`` whose thread flushes subnormals (where supported)."""
    import mlx.core as mx

    with flushing():
        s = mx.new_stream(mx.cpu)
        _start_thread(s)  # the stream's thread starts here, inside flushing()
    return s


def install() -> str:
    """Make MLX's default CPU stream flush subnormals. Idempotent. Returns the status:
    ``"flushing"``, ``"fresh default CPU stream"``, or why nothing was done."""
    global _status
    if _status != "not attempted":
        return _status
    if not supported():
        _status = "not x86-64 Linux (nothing to do)"
        return _status
    if not enabled():
        _status = "disabled by MOZGACH_FLUSH_DENORMALS"
        return _status
    import mlx.core as mx

    with flushing():
        _start_thread(mx.default_stream(mx.cpu))  # if MLX has not started it yet, it inherits the flags
    if stream_flushes():
        _status = "flushing"
    else:
        mx.set_default_stream(new_cpu_stream())
        _status = "fresh default CPU stream" if stream_flushes() else "failed: the CPU stream keeps subnormals"
    return _status


def status() -> str:
    return _status
