"""Subnormals flushed on MLX's CPU threads, not on the user's (mozgach_mlx/fpenv.py).

The independent check is IEEE arithmetic itself: 1e-39 (subnormal in fp32) times 0.5 is
5e-40 where subnormals are kept and exactly 0 where they are flushed; NumPy on the main
thread is the control.
"""

from __future__ import annotations

import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

import mozgach_mlx  # noqa: F401  (installs the flags)
from mozgach_mlx import fpenv

pytestmark = pytest.mark.skipif(not fpenv.supported(), reason="x86-64 Linux only (fpenv.supported())")

TINY = np.float32(1e-39)


def _product_on(stream) -> float:
    out = mx.multiply(mx.array(np.array([TINY])), mx.array(np.array([0.5], np.float32)), stream=stream)
    mx.eval(out)
    return out.item()


def test_mlx_cpu_stream_flushes_and_the_main_thread_keeps_subnormals():
    assert fpenv.status() in ("flushing", "fresh default CPU stream")
    assert _product_on(mx.default_stream(mx.cpu)) == 0.0
    assert _product_on(mx.cpu) == 0.0
    assert fpenv.stream_flushes()
    # the user's NumPy in the main thread is untouched
    assert TINY * np.float32(0.5) > 0
    assert fpenv.mxcsr() & fpenv.FTZ_DAZ == 0


def test_new_cpu_stream_flushes_and_flushing_restores():
    assert _product_on(fpenv.new_cpu_stream()) == 0.0
    before = fpenv.mxcsr()
    with fpenv.flushing():
        assert fpenv.mxcsr() & fpenv.FTZ_DAZ == fpenv.FTZ_DAZ
        assert np.float32(1e-39) * np.float32(0.5) == 0  # the main thread flushes inside
    assert fpenv.mxcsr() == before


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("MOZGACH_")} | env
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=120)


PROBE = """
import numpy as np
import mlx.core as mx
{before}
import mozgach_mlx
from mozgach_mlx import fpenv
a = mx.array(np.full((256, 256), 1e-39, np.float32))
print(fpenv.status(), "|", fpenv.stream_flushes(), "|", float(np.abs(np.array(a @ mx.ones((256, 256)))).max()))
"""


def test_mlx_used_before_import_gets_a_fresh_flushing_stream():
    out = _run(PROBE.format(before="mx.eval(mx.ones((4,)) * 2)  # starts MLX's CPU thread without the flags"))
    assert out.returncode == 0, out.stderr
    status, flushes, gemm = out.stdout.strip().split(" | ")
    assert status == "fresh default CPU stream" and flushes == "True" and float(gemm) == 0.0


def test_openblas_worker_threads_flush_too():
    # DAZ reads subnormal inputs as 0: the product of 1e-39s is exactly 0 on every thread
    out = _run(PROBE.format(before=""), MOZGACH_BLAS_THREADS="2")
    assert out.returncode == 0, out.stderr
    status, flushes, gemm = out.stdout.strip().split(" | ")
    assert status == "flushing" and flushes == "True" and float(gemm) == 0.0


def test_disabled_keeps_subnormals_and_a_bad_value_warns_once():
    out = _run(PROBE.format(before=""), MOZGACH_FLUSH_DENORMALS="0")
    assert out.returncode == 0, out.stderr
    status, flushes, gemm = out.stdout.strip().split(" | ")
    assert status.startswith("disabled") and flushes == "False"
    assert float(gemm) == pytest.approx(256 * 1e-39, rel=1e-3)  # subnormal results kept
    bad = _run(PROBE.format(before=""), MOZGACH_FLUSH_DENORMALS="yes")
    assert bad.returncode == 0, bad.stderr
    assert bad.stderr.count("MOZGACH_FLUSH_DENORMALS='yes' must be 0 or 1") == 1
    assert bad.stdout.startswith("disabled")
