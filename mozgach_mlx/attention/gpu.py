"""GPU flash-attention kernels (Metal, CUDA) with the blockwise path's signature.

Sources: ``mozgach_mlx/kernels/attention.metal`` and ``attention.cu`` (package data
of ``mozgach_mlx.kernels``), each split into sections ``header``, ``forward``,
``backward_dq``, ``backward_dkdv`` (see the comment at the top of the .metal file for the
algorithm and layout). This module wraps them in ``mx.fast.metal_kernel`` /
``mx.fast.cuda_kernel`` and ``mx.custom_function`` (forward saves O and the logsumexp;
the backward is two kernels: dQ per query row, dK/dV per key row).

Hardware status (keep README in sync): the Metal kernel has never been compiled or run;
the CUDA kernel is compile-checked with nvcc when available but has not been run on a
GPU from this repository. The dispatcher (:mod:`mozgach_mlx.attention.dispatch`)
therefore uses a kernel only after its first-use self-check agrees with the blockwise
path on a small input.
"""

from __future__ import annotations

import math
import re
from functools import cache, lru_cache
from importlib import resources

import mlx.core as mx

from .. import backend

SUPPORTED_HEAD_DIMS = (64, 80, 96, 128)
_FLOAT_TYPES = (mx.float32, mx.float16, mx.bfloat16)
_ROWS_PER_GROUP = 4  # rows (32-lane groups) per threadgroup / CUDA block
_SECTION = re.compile(r"^//== (\w+) ==$", re.M)


def kernel_source(kind: str) -> dict[str, str]:
    """Sections of ``mozgach_mlx/kernels/attention.{metal,cu}`` by name."""
    fname = {"metal": "attention.metal", "cuda": "attention.cu"}[kind]
    text = resources.files("mozgach_mlx.kernels").joinpath(fname).read_text()
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


def supports(q: mx.array, k: mx.array, v: mx.array, *, causal: bool = True, window: int | None = None,
             segment_ids: mx.array | None = None, s2_group: int | None = None) -> bool:
    """Whether the kernels compute this call exactly; everything else goes to the blockwise path.

    Patterns: causal or bidirectional, with or without a sliding window (each covered by
    the dispatcher's first-use self-check). Not in the kernels: segment ids and S²-Attn
    groups (a segment-aware kernel needs per-row key ranges; see mozgach_mlx/kernels/attention.metal).
    """
    if segment_ids is not None or (s2_group is not None and s2_group < q.shape[2]):
        return False  # causal and window (any combination) are in the kernels
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
        kind = backend.backend()
    if kind not in ("metal", "cuda"):
        raise ValueError(f"no GPU attention kernel for backend {kind!r}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    o, _ = _kernel_fn(kind, scale, bool(causal), window)(q, k, v)
    return o
