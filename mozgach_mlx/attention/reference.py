"""The naive attention: the independent reference the fast paths are tested against."""

from __future__ import annotations

import math

import mlx.core as mx


def reference_attention(q: mx.array, k: mx.array, v: mx.array, *, scale: float | None = None,
                        causal: bool = True, block_size: int | None = None,
                        window: int | None = None) -> mx.array:
    """Naive softmax(q k^T * scale) v in fp32. Tests only: materialises (B, H, L, L).

    Shapes: q (B, H, Lq, D); k, v (B, Hkv, Lk, D) with H % Hkv == 0. With ``causal`` and
    Lq < Lk the queries are the last Lq positions (bottom-right aligned mask).
    ``window`` (sliding window, in positions): query i sees key j only if
    ``i - j < window`` (and ``j - i < window`` when not causal). ``block_size`` is
    accepted for signature compatibility and ignored.
    """
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    rep = H // Hkv
    qf = q.astype(mx.float32).reshape(B, Hkv, rep, Lq, D)
    kf = k.astype(mx.float32)[:, :, None]  # (B, Hkv, 1, Lk, D)
    vf = v.astype(mx.float32)[:, :, None]
    s = (qf * scale) @ kf.swapaxes(-1, -2)  # (B, Hkv, rep, Lq, Lk)
    qi = mx.arange(Lk - Lq, Lk)[:, None]
    ki = mx.arange(Lk)[None, :]
    if causal:
        s = mx.where(ki <= qi, s, -mx.inf)
    if window is not None:
        visible = (qi - ki) < window
        if not causal:
            visible = visible & ((ki - qi) < window)
        s = mx.where(visible, s, -mx.inf)
    p = mx.softmax(s, axis=-1)
    o = p @ vf  # (B, Hkv, rep, Lq, D)
    return o.reshape(B, H, Lq, D).astype(q.dtype)
