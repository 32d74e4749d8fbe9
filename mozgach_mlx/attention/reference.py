"""The naive attention: the independent reference the fast paths are tested against.

It builds the whole (B, H, Lq, Lk) mask from the definitions (``mozgach_mlx.attention``
docs) with none of the block machinery of :mod:`.masks`.
"""

from __future__ import annotations

import math

import mlx.core as mx


def _s2_mask(H: int, qi: mx.array, ki: mx.array, group: int) -> mx.array:
    """(H, Lq, Lk): head h sees key j from query i iff both lie in the same group of
    ``group`` tokens; heads h >= H // 2 use groups shifted right by ceil(group / 2)
    (the first shifted group is [0, ceil(group / 2)), nothing wraps around)."""
    masks = []
    for h in range(H):
        shift = 0 if h < H // 2 else -(-group // 2)
        masks.append(mx.floor_divide(qi - shift, group) == mx.floor_divide(ki - shift, group))
    return mx.stack(masks)


def reference_attention(q: mx.array, k: mx.array, v: mx.array, *, scale: float | None = None,
                        causal: bool = True, block_size: int | None = None,
                        window: int | None = None, segment_ids: mx.array | None = None,
                        s2_group: int | None = None) -> mx.array:
    """Naive softmax(q k^T * scale + mask) v in fp32. Tests only: materialises (B, H, L, L).

    Shapes: q (B, H, Lq, D); k, v (B, Hkv, Lk, D) with H % Hkv == 0. With ``causal`` and
    Lq < Lk the queries are the last Lq positions (bottom-right aligned mask).
    ``window`` (sliding window, in positions): query i sees key j only if
    ``i - j < window`` (and ``j - i < window`` when not causal). ``segment_ids`` (B, Lk):
    query i sees key j only if their ids are equal. ``s2_group`` (S²-Attn, used only when
    smaller than Lk): query i sees key j only if they share a group of that many tokens,
    the groups of heads ``H // 2 ..`` shifted by half a group. ``block_size`` is accepted
    for signature compatibility and ignored.
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
    vis = mx.ones((1, 1, Lq, Lk), mx.bool_)  # (B or 1, H or 1, Lq, Lk)
    if causal:
        vis = vis & (ki <= qi)
    if window is not None:
        vis = vis & ((qi - ki) < window)
        if not causal:
            vis = vis & ((ki - qi) < window)
    if segment_ids is not None:
        seg = segment_ids.astype(mx.int32)
        vis = vis & (seg[:, None, Lk - Lq:, None] == seg[:, None, None, :])
    if s2_group is not None and s2_group < Lk:
        vis = vis & _s2_mask(H, qi, ki, s2_group)[None]
    vis = mx.broadcast_to(vis, (vis.shape[0], H, Lq, Lk)).reshape(vis.shape[0], Hkv, rep, Lq, Lk)
    s = mx.where(vis, s, -mx.inf)
    p = mx.softmax(s, axis=-1)
    o = p @ vf  # (B, Hkv, rep, Lq, D)
    return o.reshape(B, H, Lq, D).astype(q.dtype)
