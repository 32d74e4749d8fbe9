"""GPU flash-attention kernels (Metal, CUDA) with the blockwise path's signature.

Sources: ``kernels/attention.metal`` and ``kernels/attention.cu`` (package data
``mozgach_mlx.kernels``), each split into sections ``header``, ``forward``,
``backward_dq``, ``backward_dkdv`` (see the comment at the top of the .metal file for the
algorithm and layout). This module wraps them in ``mx.fast.metal_kernel`` /
``mx.fast.cuda_kernel`` and ``mx.custom_function`` (forward saves O and the logsumexp;
the backward is two kernels: dQ per query row, dK/dV per key row).

Hardware status (keep README in sync): the Metal kernel has never been compiled or run;
the CUDA kernel is compile-checked with nvcc when available but has not been run on a
GPU from this repository. :mod:`mozgach_mlx.attention` therefore uses a kernel only after
:func:`self_check` agrees with the blockwise path on a small input.
"""

from __future__ import annotations

import math
import re
from functools import cache, lru_cache
from importlib import resources
from pathlib import Path

import mlx.core as mx

SUPPORTED_HEAD_DIMS = (64, 80, 96, 128)
_FLOAT_TYPES = (mx.float32, mx.float16, mx.bfloat16)
_ROWS_PER_GROUP = 4  # rows (32-lane groups) per threadgroup / CUDA block
_SECTION = re.compile(r"^//== (\w+) ==$", re.M)


def kernel_source(kind: str) -> dict[str, str]:
    """Sections of ``kernels/attention.{metal,cu}`` by name."""
    fname = {"metal": "attention.metal", "cuda": "attention.cu"}[kind]
    try:
        text = resources.files("mozgach_mlx.kernels").joinpath(fname).read_text()
    except (ModuleNotFoundError, FileNotFoundError):
        text = (Path(__file__).resolve().parent.parent / "kernels" / fname).read_text()
    parts = _SECTION.split(text)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


@cache
def _kernels(kind: str):
    src = kernel_source(kind)
    make = mx.fast.metal_kernel if kind == "metal" else mx.fast.cuda_kernel
    fwd = make(name="mozgach_flash_fwd", input_names=["q", "k", "v", "params"],
               output_names=["o", "lse"], source=src["forward"], header=src["header"])
    dq = make(name="mozgach_flash_bwd_dq",
              input_names=["q", "k", "v", "dout", "lse", "delta", "params"],
              output_names=["dq_out"], source=src["backward_dq"], header=src["header"])
    dkdv = make(name="mozgach_flash_bwd_dkdv",
                input_names=["q", "k", "v", "dout", "lse", "delta", "params"],
                output_names=["dk_out", "dv_out"], source=src["backward_dkdv"], header=src["header"])
    return fwd, dq, dkdv


def supports(q: mx.array, k: mx.array, v: mx.array, window: int | None) -> bool:
    """Shapes/dtypes the kernels handle (everything else goes to the blockwise path)."""
    return (q.shape[-1] in SUPPORTED_HEAD_DIMS and q.dtype in _FLOAT_TYPES
            and k.dtype == q.dtype and v.dtype == q.dtype and q.shape[2] == k.shape[2]
            # CUDA grids: rows go on grid.y (< 65536 blocks of _ROWS_PER_GROUP rows).
            and q.shape[2] < 65535 * _ROWS_PER_GROUP)


def _template(q, k, causal, window):
    B, H, L, D = q.shape
    return [("T", q.dtype), ("D", D), ("L", L), ("H", H), ("HKV", k.shape[1]),
            ("CAUSAL", bool(causal)), ("WINDOW", int(window or 0))]


def _launch(kind, q, k, v, scale, causal, window):
    """Forward: (o (B, H, L, D) q.dtype, lse (B, H, L) float32)."""
    fwd, _, _ = _kernels(kind)
    B, H, L, D = q.shape
    params = mx.array([scale], mx.float32)
    o, lse = fwd(inputs=[q, k, v, params], template=_template(q, k, causal, window),
                 grid=(32, L, B * H), threadgroup=(32, _ROWS_PER_GROUP, 1),
                 output_shapes=[q.shape, (B, H, L)], output_dtypes=[q.dtype, mx.float32])
    return o, lse


def _launch_bwd(kind, q, k, v, o, lse, do, scale, causal, window):
    _, dq_k, dkdv_k = _kernels(kind)
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    params = mx.array([scale], mx.float32)
    do = do.astype(q.dtype)
    delta = (do.astype(mx.float32) * o.astype(mx.float32)).sum(axis=-1)  # (B, H, L)
    inputs = [q, k, v, do, lse, delta, params]
    tmpl = _template(q, k, causal, window)
    (dq,) = dq_k(inputs=inputs, template=tmpl, grid=(32, L, B * H),
                 threadgroup=(32, _ROWS_PER_GROUP, 1), output_shapes=[q.shape],
                 output_dtypes=[q.dtype])
    dk, dv = dkdv_k(inputs=inputs, template=tmpl, grid=(32, L, B * Hkv),
                    threadgroup=(32, _ROWS_PER_GROUP, 1), output_shapes=[k.shape, v.shape],
                    output_dtypes=[k.dtype, v.dtype])
    return dq, dk, dv


@lru_cache(maxsize=64)
def _kernel_fn(kind: str, scale: float, causal: bool, window: int | None):
    @mx.custom_function
    def attn(q, k, v):
        return _launch(kind, q, k, v, scale, causal, window)

    @attn.vjp
    def attn_vjp(primals, cotangents, outputs):
        q, k, v = primals
        o, lse = outputs
        return _launch_bwd(kind, q, k, v, o, lse, cotangents[0], scale, causal, window)

    return attn


def attention(q: mx.array, k: mx.array, v: mx.array, *, scale: float | None = None,
              causal: bool = True, window: int | None = None, kind: str | None = None) -> mx.array:
    """GPU flash attention. q (B, H, L, D); k, v (B, Hkv, L, D) -> (B, H, L, D), q.dtype.

    ``kind`` is ``"metal"`` or ``"cuda"`` (default: the current backend's).
    """
    if kind is None:
        from .backend import backend

        kind = backend()
    if kind not in ("metal", "cuda"):
        raise ValueError(f"no GPU attention kernel for backend {kind!r}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    o, _ = _kernel_fn(kind, scale, bool(causal), window)(q, k, v)
    return o


def speed_check(kind: str, L: int = 2048) -> tuple[float, float]:
    """Seconds for one fwd+bwd step (B=1, H=8, Hkv=2, D=128, bf16) of (kernel, blockwise).

    The kernels are simple (one SIMD-group per row, no query tiling) and have never been
    timed on hardware; the dispatcher uses this once to keep the faster path.
    """
    import time

    from .attention import blockwise_attention

    keys = mx.random.split(mx.random.key(7), 4)
    q = mx.random.normal((1, 8, L, 128), key=keys[0]).astype(mx.bfloat16)
    k = mx.random.normal((1, 2, L, 128), key=keys[1]).astype(mx.bfloat16)
    v = mx.random.normal((1, 2, L, 128), key=keys[2]).astype(mx.bfloat16)
    w = mx.random.normal((1, 8, L, 128), key=keys[3]).astype(mx.bfloat16)
    times = []
    for fn in (lambda q, k, v: attention(q, k, v, kind=kind), blockwise_attention):
        step = mx.grad(lambda q, k, v, fn=fn: (fn(q, k, v) * w).astype(mx.float32).sum(),
                       argnums=(0, 1, 2))
        mx.eval(step(q, k, v))  # warm-up / compile
        t0 = time.perf_counter()
        for _ in range(3):
            mx.eval(step(q, k, v))
        times.append((time.perf_counter() - t0) / 3)
    return times[0], times[1]


def self_check(kind: str) -> tuple[bool, str]:
    """Compare the kernel with the blockwise path (values and dq/dk/dv) on small inputs.

    Returns (ok, reason). Never raises: a kernel that fails to compile is reported here.
    """
    from .attention import blockwise_attention

    try:
        for (H, Hkv, L, D, causal, window) in [(4, 2, 67, 64, True, None), (2, 2, 33, 80, False, None),
                                                (4, 1, 40, 128, True, 9)]:
            keys = mx.random.split(mx.random.key(1234), 4)
            q = mx.random.normal((1, H, L, D), key=keys[0])
            k = mx.random.normal((1, Hkv, L, D), key=keys[1])
            v = mx.random.normal((1, Hkv, L, D), key=keys[2])
            w = mx.random.normal((1, H, L, D), key=keys[3])

            def run(fn, q, k, v, causal=causal, window=window, w=w):
                def loss(q, k, v):
                    return (fn(q, k, v, causal=causal, window=window) * w).sum()

                o = fn(q, k, v, causal=causal, window=window)
                return (o, *mx.grad(loss, argnums=(0, 1, 2))(q, k, v))

            got = run(lambda *a, **kw: attention(*a, kind=kind, **kw), q, k, v)
            ref = run(blockwise_attention, q, k, v)
            mx.eval(got, ref)
            for name, a, b in zip(("o", "dq", "dk", "dv"), got, ref, strict=True):
                err = float(mx.abs(a - b).max())
                if not err <= 1e-3 * max(1.0, float(mx.abs(b).max())):  # also catches nan
                    return False, f"{name} differs by {err:.3g} (H={H} Hkv={Hkv} L={L} D={D})"
    except Exception as e:  # compile errors, missing backend: reported, never fatal
        return False, f"{type(e).__name__}: {e}"
    return True, "ok"
