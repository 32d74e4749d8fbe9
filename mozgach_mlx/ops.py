"""Fast elementwise math for the CPU backend: exp, sigmoid, SiLU.

On the CPU, MLX's own ``exp`` runs ~25-40 M elements/s on the dev machine (the x86 wheel
is built without FMA, so its polynomial calls a software fma per term), 20-80x slower
than a multiply or an add, and it dominates attention, the SwiGLU MLP and the loss of a
small model. Here ``2**y`` is the same Cephes polynomial MLX uses, written as plain
multiplies/adds that MLX's compiled CPU kernels vectorise, with ``2**round(y)`` made by
writing the float exponent bits (relative error ~2e-7 in fp32). MLX's CPU compiler splits
graphs deeper than ~11 ops and multi-output kernels measured ~4x slower, so the pieces
are separate single-output compiled functions. On Metal/CUDA everything is MLX's own op.

These functions are not differentiable through their internals (the exponent-bit trick
has no gradient): use them in forward code with an explicit VJP (attention, loss) or
through :func:`silu`, which carries its own.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
_EXP2_C = (1.0, 6.931472028550421e-1, 2.402264791363012e-1, 5.550332471162809e-2,
           9.618437357674640e-3, 1.339887440266574e-3, 1.535336188319500e-4)


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


@mx.compile
def _exp2_frac(y):
    return y - (y - 0.5).astype(mx.int32).astype(mx.float32)  # in (-0.5, 0.5]


@mx.compile
def _exp2_bits(y):
    # IEEE-754 bits of 2**n, n = round(y) (-127 <= n <= 0: 2**n normal, or 0 at n = -127).
    n = (y - 0.5).astype(mx.int32).astype(mx.float32)
    return ((n + 127.0) * 8388608.0).astype(mx.int32)


@mx.compile
def _exp2_poly(f, pow2n):
    c0, c1, c2, c3, c4, c5, c6 = _EXP2_C
    f2 = f * f
    lo = (c0 + c1 * f) + f2 * (c2 + c3 * f)
    hi = (c4 + c5 * f) + c6 * f2
    return (lo + (f2 * f2) * hi) * pow2n


def exp2(y: mx.array) -> mx.array:
    """``2**y`` in fp32 for ``y <= 0`` (the softmax case); exactly 0 for ``y <= -127``
    (a masked score), and at most subnormal between."""
    if not on_cpu():
        return mx.exp(y * LN2)
    # The clamp stays outside the compiled kernels: min/max/where inside MLX's generated
    # CPU loops measured 3-5x slower (not vectorised); a separate maximum is not. At
    # y = -127, n = -127 writes exponent bits 0: 2**n is 0, not a tiny normal that later
    # products would turn into slow subnormals (see fpenv.py).
    y = mx.maximum(y, -127.0)
    return _exp2_poly(_exp2_frac(y), _exp2_bits(y).view(mx.float32))


def exp_neg(x: mx.array) -> mx.array:
    """``exp(x)`` for ``x <= 0`` (shifted logits, scores minus their maximum)."""
    if not on_cpu():
        return mx.exp(x)
    return exp2(x * LOG2E)


def exp_pow(x: mx.array) -> mx.array:
    """``exp(x)`` as ``2 ** (x log2 e)``: ~2x faster than MLX's CPU exp (max relative
    difference 1.2e-7) with one temporary, where :func:`exp_neg` is ~5x faster but holds
    ~3 more temporaries of the input's size. For big buffers (the loss's (B, c, vocab)
    chunk) memory wins; for attention tiles and MLP chunks, speed."""
    if not on_cpu():
        return mx.exp(x)
    return mx.power(2.0, x * LOG2E)


@mx.compile
def _sigmoid_from(x, e):
    # e = exp(-|x|) in (0, 1]: sigmoid(x) = 1/(1+e) for x >= 0 and e/(1+e) below, with no
    # overflow on either side; the branch is arithmetic (where() is not vectorised).
    pos = (x >= 0).astype(x.dtype)
    return (e + pos * (1.0 - e)) / (1.0 + e)


def sigmoid(x: mx.array) -> mx.array:
    """Logistic sigmoid (forward only on the CPU; see :func:`silu` for a differentiable use)."""
    if not on_cpu() or x.dtype != mx.float32:
        return mx.sigmoid(x)
    return _sigmoid_from(x, exp2(-mx.abs(x) * LOG2E))


@mx.compile
def _silu_grad(x, y, g):
    # s = sigmoid(x) recovered from the saved output y = x * s (s(0) = 1/2): no second
    # exponential pass and no extra temporaries in the backward.
    s = mx.where(x == 0, 0.5, y / x)
    return g * (s * (1.0 + x * (1.0 - s)))


@mx.custom_function
def _silu_cpu(x):
    return x * sigmoid(x)


@_silu_cpu.vjp
def _silu_cpu_vjp(x, cotangent, output):
    # one input, one output: MLX passes and expects bare arrays, not tuples
    return _silu_grad(x, output, cotangent)


def silu(x: mx.array) -> mx.array:
    """``x * sigmoid(x)`` (SwiGLU's gate). On the CPU in fp32 the fast sigmoid with an
    explicit derivative ``s (1 + x (1 - s))``, ``s = y / x`` from the saved output;
    elsewhere ``nn.silu``."""
    if not on_cpu() or x.dtype != mx.float32:
        return nn.silu(x)
    return _silu_cpu(x)
