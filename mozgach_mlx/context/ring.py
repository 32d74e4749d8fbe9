"""Ring attention: exact attention of a rank's queries over the keys every rank holds.

Rank r holds the queries, keys and values of its positions (:class:`.layout.Layout`).
The K/V of each rank travel round the ring (r -> r+1), one rank's block per step; at
step s rank r holds origin ``(r - s) mod N``'s block and attends its own queries to it
with the blockwise kernel (:func:`~mozgach_mlx.attention.blockwise.blockwise_forward`,
global positions in the block plan), and the partial results are combined by their
logsumexp (:func:`~mozgach_mlx.attention.blockwise.merge_partials`): the online softmax
across blocks that live on different machines.

Backward (exact, FlashAttention-2 split by key blocks): with the final output O and
logsumexp, each (query piece, key piece) pair gives its exact share of dQ and its own
dK, dV. The K/V travel round the ring again, now with an accumulator of their dK/dV that
each rank adds its share to; after N hops the accumulator is home and is added to the
owner's own share.

What a mask hides is neither computed nor sent. Every rank knows every rank's positions
and the batch's segment ids, so all ranks derive the same ``need[o][d]`` (do rank d's
queries see any key of rank o, by the block plans) and the same routes: origin o's K/V
go from rank o+s-1 to o+s only while some rank further along needs them, its dK/dV
accumulator only once some rank has added to it. E.g. a contiguous causal split never
sends the last rank's K/V at all; a zig-zag split over two ranks sends all of rank 0's
K/V but only the needed blocks are computed.

S²-Attn groups run as two rings (the two halves of the heads, each with its own groups).
"""

from __future__ import annotations

from functools import cached_property

import mlx.core as mx
import numpy as np

from ..attention.blockwise import (
    blockwise_backward,
    blockwise_forward,
    check_inputs,
    default_block_sizes,
    merge_partials,
    s2_heads,
)
from ..attention.masks import SKIP, BlockPlan, MaskSpec, host_segments, s2_halves
from .layout import Layout
from .transport import Slot, drive

F32 = mx.float32


class RingPlan:
    """The block plans and routes of one ring attention call (one S² half), the same on
    every rank: ``plan(d, p, o, pk)`` is rank d's query piece p against origin o's key
    piece pk, in global positions."""

    def __init__(self, layout: Layout, spec: MaskSpec, block: tuple[int, int], segments: np.ndarray | None,
                 known: bool) -> None:
        self.layout, self.spec, self.block = layout, spec, block
        self.segments, self.known = segments, known
        self._plans: dict[tuple, BlockPlan | None] = {}

    def plan(self, d: int, p: int, o: int, pk: int) -> BlockPlan | None:
        """None when the pair has nothing to compute."""
        key = (d, p, o, pk)
        if key not in self._plans:
            (qa, qb), (ka, kb) = self.layout.pieces(d)[p], self.layout.pieces(o)[pk]
            bp = BlockPlan(self.spec, qb - qa, *self.block, self.segments, self.known, q_start=qa, k_start=ka,
                           k_length=kb - ka)
            self._plans[key] = bp if (bp.kind != SKIP).any() else None
        return self._plans[key]

    @cached_property
    def need(self) -> np.ndarray:
        """(N, N) bool: ``need[o, d]`` -- rank d's queries see some key of rank o."""
        n = self.layout.ranks
        out = np.zeros((n, n), bool)
        for o in range(n):
            for d in range(n):
                out[o, d] = any(self.plan(d, p, o, pk) is not None for p in range(len(self.layout.pieces(d)))
                                for pk in range(len(self.layout.pieces(o))))
        return out

    def kv_hop(self, s: int, o: int) -> bool:
        """Does origin o's K/V go from rank o+s-1 to o+s (1 <= s < N)?"""
        n = self.layout.ranks
        return s < n and any(self.need[o, (o + t) % n] for t in range(s, n))

    def acc_hop(self, s: int, o: int) -> bool:
        """Does origin o's dK/dV accumulator go from rank o+s-1 to o+s (1 <= s <= N)?"""
        n = self.layout.ranks
        return any(self.need[o, (o + t) % n] for t in range(1, min(s, n)))

    def largest(self, s: int, hop, per_position: int) -> int:
        """Elements of the largest message any rank sends at step s on route ``hop``."""
        n = self.layout.ranks
        sizes = [self.layout.local_length((x - s + 1) % n) for x in range(n) if hop(s, (x - s + 1) % n)]
        return max(sizes, default=0) * per_position

    def pairs(self, d: int, o: int):
        """(p, pk, plan) of rank d's queries against origin o's keys that compute something."""
        for p in range(len(self.layout.pieces(d))):
            for pk in range(len(self.layout.pieces(o))):
                bp = self.plan(d, p, o, pk)
                if bp is not None:
                    yield p, pk, bp


def _piece(x: mx.array, layout: Layout, rank: int, p: int, axis: int) -> mx.array:
    a, b = layout.pieces(rank)[p]
    off = layout.offsets(rank)[p]
    idx = [slice(None)] * x.ndim
    idx[axis] = slice(off, off + b - a)
    return x[tuple(idx)]


def forward_steps(rp: RingPlan, rank: int, q: mx.array, k: mx.array, v: mx.array, scale: float, seg):
    """Generator of rank ``rank``'s ring forward: yields ``(sends, recvs)`` per step and
    returns ``(o (B, H, Lr, D) float32, lse2 (B, H, Lr) float32)``."""
    lay, n = rp.layout, rp.layout.ranks
    B, H, _, D = q.shape
    Hkv = k.shape[1]
    parts: list = [None] * len(lay.pieces(rank))
    held = mx.stack([k, v])  # (2, B, Hkv, Lr, D): origin `rank`
    per = 2 * B * Hkv * D
    done: list = []  # the previous step's results: the next exchange waits for them
    for s in range(n):
        o = (rank - s) % n
        if s > 0:
            prev = (rank - s + 1) % n
            slot = Slot(held if rp.kv_hop(s, prev) else None,
                        ((2, B, Hkv, lay.local_length(o), D), k.dtype) if rp.kv_hop(s, o) else None,
                        k.dtype, rp.largest(s, rp.kv_hop, per))
            (held,) = yield [slot], done
        if not rp.need[o, rank]:
            continue
        for p, pk, bp in rp.pairs(rank, o):
            qp = _piece(q, lay, rank, p, 2)
            kp, vp = _piece(held[0], lay, o, pk, 2), _piece(held[1], lay, o, pk, 2)
            oc, lc = blockwise_forward(qp, kp, vp, scale, bp, seg if bp.uses_segments else None, dtype=F32)
            lc = lc.reshape(B, H, -1)
            parts[p] = (oc, lc) if parts[p] is None else merge_partials(*parts[p], oc, lc)
        done = [x for pt in parts if pt is not None for x in pt]  # this block is used up before the next comes
    o_all = mx.concatenate([pt[0] for pt in parts], axis=2) if len(parts) > 1 else parts[0][0]
    lse = mx.concatenate([pt[1] for pt in parts], axis=2) if len(parts) > 1 else parts[0][1]
    return o_all, lse


def backward_steps(rp: RingPlan, rank: int, q, k, v, o, lse, do, scale: float, seg):
    """Generator of rank ``rank``'s ring backward: yields ``(sends, recvs)`` per step and
    returns ``(dq, dk, dv)`` float32 of its local q, k, v."""
    lay, n = rp.layout, rp.layout.ranks
    B, H, _, D = q.shape
    Hkv = k.shape[1]
    rep = H // Hkv
    dq: list = [None] * len(lay.pieces(rank))
    own = None  # dK/dV of this rank's keys, (2, B, Hkv, Lr, D)
    held, acc = mx.stack([k, v]), None
    per = 2 * B * Hkv * D
    done: list = [do]
    for s in range(n + 1):
        org = (rank - s) % n
        if s > 0:
            prev = (rank - s + 1) % n
            shape = (2, B, Hkv, lay.local_length(org), D)
            kv = Slot(held if rp.kv_hop(s, prev) else None, (shape, k.dtype) if rp.kv_hop(s, org) else None,
                      k.dtype, rp.largest(s, rp.kv_hop, per))
            ac = Slot(acc if rp.acc_hop(s, prev) else None, (shape, F32) if rp.acc_hop(s, org) else None,
                      F32, rp.largest(s, rp.acc_hop, per))
            held, acc = yield [kv, ac], done
        if s == n:  # home: what the other ranks added to this rank's dK/dV
            if acc is not None:
                own = acc if own is None else own + acc
            break
        if not rp.need[org, rank]:
            continue
        grads: dict[int, list] = {}
        for p, pk, bp in rp.pairs(rank, org):
            qp = _piece(q, lay, rank, p, 2)
            kp, vp = _piece(held[0], lay, org, pk, 2), _piece(held[1], lay, org, pk, 2)
            op, dop = _piece(o, lay, rank, p, 2), _piece(do, lay, rank, p, 2)
            lp = _piece(lse, lay, rank, p, 2).reshape(B, Hkv, rep, -1)
            dqc, dkc, dvc = blockwise_backward(qp, kp, vp, op, lp, dop, scale, bp,
                                               seg if bp.uses_segments else None, dtypes=(F32, F32, F32))
            dq[p] = dqc if dq[p] is None else dq[p] + dqc
            g = mx.stack([dkc, dvc])
            grads[pk] = g if pk not in grads else grads[pk] + g
        contrib = mx.concatenate([grads[pk] if pk in grads else mx.zeros((2, B, Hkv, b - a, D), F32)
                                  for pk, (a, b) in enumerate(lay.pieces(org))], axis=3)
        if s == 0:
            own = contrib
        else:
            acc = contrib if acc is None else acc + contrib
        done = [x for x in (*dq, own, acc) if x is not None]
    dq_all = [x if x is not None else mx.zeros((B, H, b - a, D), F32)
              for x, (a, b) in zip(dq, lay.pieces(rank), strict=True)]
    dq_all = mx.concatenate(dq_all, axis=2) if len(dq_all) > 1 else dq_all[0]
    if own is None:
        own = mx.zeros((2, *k.shape), F32)
    return dq_all, own[0], own[1]


class RingCall:
    """Everything one ring attention call of one S² half needs, on one rank."""

    def __init__(self, layout: Layout, rank: int, spec: MaskSpec, scale: float, block: tuple[int, int],
                 segment_ids: mx.array | None) -> None:
        seg_np, known = host_segments(segment_ids)
        self.rp = RingPlan(layout, spec, block, seg_np, known)
        self.rank, self.scale = rank, scale
        self.seg = None if segment_ids is None else segment_ids.astype(mx.int32)

    def forward(self, q, k, v):
        return forward_steps(self.rp, self.rank, q, k, v, self.scale, self.seg)

    def backward(self, q, k, v, o, lse, do):
        return backward_steps(self.rp, self.rank, q, k, v, o, lse, do, self.scale, self.seg)


def _differentiable(call: RingCall, transport):
    @mx.custom_function
    def attn(q, k, v):
        o, lse = transport.settle(list(drive(call.forward(q, k, v), transport)))
        return o.astype(q.dtype), lse

    @attn.vjp
    def attn_vjp(primals, cotangents, outputs):
        q, k, v = primals
        dq, dk, dv = transport.settle(list(drive(call.backward(q, k, v, *outputs, cotangents[0]), transport)))
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)

    return attn


def ring_calls(layout: Layout, rank: int, H: int, D: int, *, scale: float | None = None, causal: bool = True,
               window: int | None = None, segment_ids: mx.array | None = None, s2_group: int | None = None,
               block_size: tuple[int, int] | None = None) -> list[RingCall]:
    """The ring call of each head group (one, or the two S² halves) for ``H`` query heads."""
    scale = 1.0 / D ** 0.5 if scale is None else float(scale)
    block = block_size or default_block_sizes(layout.length)
    halves = s2_halves(s2_group, layout.length)
    specs = [MaskSpec(bool(causal), window)] if halves is None else [MaskSpec(bool(causal), window, g)
                                                                      for g in halves]
    if halves is not None and H // 2 == 0:
        specs = specs[1:]
    return [RingCall(layout, rank, sp, scale, block, segment_ids) for sp in specs]


def ring_attention(q: mx.array, k: mx.array, v: mx.array, layout: Layout, rank: int, transport, *,
                   scale: float | None = None, causal: bool = True, window: int | None = None,
                   segment_ids: mx.array | None = None, s2_group: int | None = None,
                   block_size: tuple[int, int] | None = None) -> mx.array:
    """Attention of this rank's queries over the whole sequence, differentiable (custom VJP).

    Shapes: q (B, H, Lr, D), k, v (B, Hkv, Lr, D): this rank's positions
    (``layout.positions(rank)``) -> (B, H, Lr, D). The mask is that of
    :func:`~mozgach_mlx.attention.blockwise_attention` over the whole sequence:
    ``segment_ids`` (B, L) are the *whole* sequence's ids, ``s2_group`` tokens of it.
    ``transport``: a :class:`~.transport.RingTransport` (every rank of the group calls
    this in the same order with the same layout and mask).
    """
    B, H, Lr, D = q.shape
    if Lr != layout.local_length(rank):
        raise ValueError(f"ring attention: {Lr} local positions, the layout gives rank {rank} "
                         f"{layout.local_length(rank)}")
    if segment_ids is not None and tuple(segment_ids.shape) != (B, layout.length):
        raise ValueError(f"ring attention: segment_ids must be the whole sequence's, (B, L) = {(B, layout.length)}, "
                         f"got {tuple(segment_ids.shape)}")
    check_inputs(q, k, v, scale, window, None, s2_group)
    calls = ring_calls(layout, rank, H, D, scale=scale, causal=causal, window=window, segment_ids=segment_ids,
                       s2_group=s2_group, block_size=block_size)
    if len(calls) == 1:
        return _differentiable(calls[0], transport)(q, k, v)[0]
    outs = [_differentiable(c, transport)(qh, kh, vh)[0]
            for c, (qh, kh, vh) in zip(calls, [h for h in s2_heads(q, k, v) if h[0].shape[1]], strict=True)]
    return mx.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]
