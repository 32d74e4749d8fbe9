"""Attention: a naive reference and the public ``flash_attention`` entry point.

PLACEHOLDER until the blockwise implementation lands (issue 3): ``flash_attention``
currently calls the O(L^2) reference.
"""

from __future__ import annotations

import math

import mlx.core as mx


def reference_attention(q: mx.array, k: mx.array, v: mx.array, *, scale: float | None = None,
                        causal: bool = True) -> mx.array:
    """Naive softmax(q k^T * scale) v in fp32. Tests only: materialises (B, H, L, L).

    Shapes: q (B, H, Lq, D); k, v (B, Hkv, Lk, D) with H % Hkv == 0. With ``causal`` and
    Lq < Lk the queries are the last Lq positions (bottom-right aligned mask).
    """
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    rep = H // Hkv
    qf = q.astype(mx.float32).reshape(B, Hkv, rep, Lq, D)
    kf = k.astype(mx.float32)[:, :, None]  # (B, Hkv, 1, Lk, D)
    vf = v.astype(mx.float32)[:, :, None]
    s = (qf * scale) @ kf.swapaxes(-1, -2)  # (B, Hkv, rep, Lq, Lk)
    if causal:
        qi = mx.arange(Lk - Lq, Lk)[:, None]
        ki = mx.arange(Lk)[None, :]
        s = mx.where(ki <= qi, s, -mx.inf)
    p = mx.softmax(s, axis=-1)
    o = p @ vf  # (B, Hkv, rep, Lq, D)
    return o.reshape(B, H, Lq, D).astype(q.dtype)


def flash_attention(q: mx.array, k: mx.array, v: mx.array, *, scale: float | None = None,
                    causal: bool = True, block_size: int | None = None) -> mx.array:
    """Public attention entry point. q (B, H, L, D); k, v (B, Hkv, L, D)."""
    return reference_attention(q, k, v, scale=scale, causal=causal)
