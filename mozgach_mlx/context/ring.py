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
    every rank.

    What travels is *units*: local ranges [la, lb) of an origin rank's keys. Without
    ``chunk`` a rank's unit is its whole slice (all its pieces: one message per hop);
    with ``chunk = c`` every piece is cut into units of at most c positions, and the ring
    runs unit by unit (unit j of every origin goes all the way round before unit j + 1
    starts), so only O(c) keys and dK/dV accumulators are in flight instead of O(L / N).
    ``plan(d, p, o, j, i)`` is rank d's query piece p against sub-range i of origin o's
    unit j (the part of the unit inside one of o's pieces), in global positions."""

    def __init__(self, layout: Layout, spec: MaskSpec, block: tuple[int, int], segments: np.ndarray | None,
                 known: bool, chunk: int | None = None) -> None:
        if chunk is not None and chunk < 1:
            raise ValueError(f"ring attention: kv_chunk={chunk} must be >= 1 or None")
        self.layout, self.spec, self.block = layout, spec, block
        self.segments, self.known, self.chunk = segments, known, chunk
        self._plans: dict[tuple, BlockPlan | None] = {}
        self._masks: dict = {}  # shared by all the pairs' block plans (BlockPlan.mask / bias)
        self._units: dict[int, list] = {}

    def units(self, o: int) -> list[list[tuple[int, int, int]]]:
        """Origin o's units, each a list of (piece, global start, global end) in local order."""
        if o not in self._units:
            pieces = list(enumerate(self.layout.pieces(o)))
            if self.chunk is None:
                self._units[o] = [[(pk, a, b) for pk, (a, b) in pieces]]
            else:
                self._units[o] = [[(pk, s, min(s + self.chunk, b))] for pk, (a, b) in pieces
                                  for s in range(a, b, self.chunk)]
        return self._units[o]

    @cached_property
    def n_units(self) -> int:
        return max(len(self.units(o)) for o in range(self.layout.ranks))

    def unit(self, o: int, j: int) -> list[tuple[int, int, int]] | None:
        u = self.units(o)
        return u[j] if j < len(u) else None

    def unit_span(self, o: int, j: int) -> tuple[int, int]:
        """[la, lb) of unit j in origin o's local arrays."""
        u = self.units(o)
        la = sum(b - a for v in u[:j] for _, a, b in v)
        return la, la + sum(b - a for _, a, b in u[j])

    def unit_length(self, o: int, j: int) -> int:
        u = self.unit(o, j)
        return 0 if u is None else sum(b - a for _, a, b in u)

    def plan(self, d: int, p: int, o: int, j: int, i: int) -> BlockPlan | None:
        """None when the pair has nothing to compute."""
        key = (d, p, o, j, i)
        if key not in self._plans:
            (qa, qb), (_, ka, kb) = self.layout.pieces(d)[p], self.units(o)[j][i]
            bp = BlockPlan(self.spec, qb - qa, *self.block, self.segments, self.known, q_start=qa, k_start=ka,
                           k_length=kb - ka)
            # one cache of the causal / window masks for every pair (they depend on block offsets
            # only): per plan, each of the L / (N c) units kept its own copies (measured +80% peak)
            bp._masks = self._masks
            self._plans[key] = bp if (bp.kind != SKIP).any() else None
        return self._plans[key]

    def needs(self, o: int, j: int, d: int) -> bool:
        """Do rank d's queries see some key of origin o's unit j?"""
        return self._need_units[o][j][d] if j < len(self._need_units[o]) else False

    @cached_property
    def _need_units(self) -> list[list[list[bool]]]:
        n = self.layout.ranks
        return [[[any(self.plan(d, p, o, j, i) is not None for p in range(len(self.layout.pieces(d)))
                      for i in range(len(self.units(o)[j]))) for d in range(n)]
                 for j in range(len(self.units(o)))] for o in range(n)]

    @cached_property
    def need(self) -> np.ndarray:
        """(N, N) bool: ``need[o, d]`` -- rank d's queries see some key of rank o."""
        n = self.layout.ranks
        return np.array([[any(self.needs(o, j, d) for j in range(len(self.units(o)))) for d in range(n)]
                         for o in range(n)], bool).reshape(n, n)

    def kv_hop(self, s: int, o: int, j: int | None = None) -> bool:
        """Does origin o's unit j (None: any unit) go from rank o+s-1 to o+s (1 <= s < N)?"""
        n = self.layout.ranks
        js = range(len(self.units(o))) if j is None else [j]
        return s < n and any(self.needs(o, u, (o + t) % n) for u in js for t in range(s, n))

    def acc_hop(self, s: int, o: int, j: int | None = None) -> bool:
        """Does the dK/dV accumulator of origin o's unit j go from rank o+s-1 to o+s (1 <= s <= N)?"""
        n = self.layout.ranks
        js = range(len(self.units(o))) if j is None else [j]
        return any(self.needs(o, u, (o + t) % n) for u in js for t in range(1, min(s, n)))

    def largest(self, s: int, hop, j: int, per_position: int) -> int:
        """Elements of the largest message any rank sends at step s of unit j on route ``hop``."""
        n = self.layout.ranks
        sizes = [self.unit_length((x - s + 1) % n, j) for x in range(n) if hop(s, (x - s + 1) % n, j)]
        return max(sizes, default=0) * per_position

    def pairs(self, d: int, o: int, j: int):
        """(p, i, plan) of rank d's query pieces against origin o's unit j that compute something."""
        for p in range(len(self.layout.pieces(d))):
            for i in range(len(self.units(o)[j])):
                bp = self.plan(d, p, o, j, i)
                if bp is not None:
                    yield p, i, bp


def _piece(x: mx.array, layout: Layout, rank: int, p: int, axis: int) -> mx.array:
    a, b = layout.pieces(rank)[p]
    off = layout.offsets(rank)[p]
    idx = [slice(None)] * x.ndim
    idx[axis] = slice(off, off + b - a)
    return x[tuple(idx)]


def _join_blocks(blocks: list | None, B: int, H: int, Hkv: int, n: int, D: int, block_q: int) -> mx.array:
    """(B, H, n, D) float32 from per-query-block dQ parts ((B, Hkv, rep, m, D) or None: zeros)."""
    if blocks is None:
        return mx.zeros((B, H, n, D), F32)
    parts = [x if x is not None else mx.zeros((B, Hkv, H // Hkv, min(block_q, n - i * block_q), D), F32)
             for i, x in enumerate(blocks)]
    out = mx.concatenate(parts, axis=3) if len(parts) > 1 else parts[0]
    return out.reshape(B, H, n, D)


def _sub(unit: list[tuple[int, int, int]], i: int) -> tuple[int, int]:
    """[start, end) of sub-range i within its unit's arrays."""
    off = sum(b - a for _, a, b in unit[:i])
    return off, off + unit[i][2] - unit[i][1]


def forward_steps(rp: RingPlan, rank: int, q: mx.array, k: mx.array, v: mx.array, scale: float, seg):
    """Generator of rank ``rank``'s ring forward: yields ``(sends, recvs)`` per step and
    returns ``(o (B, H, Lr, D) float32, lse2 (B, H, Lr) float32)``."""
    lay, n = rp.layout, rp.layout.ranks
    B, H, _, D = q.shape
    Hkv = k.shape[1]
    parts: list = [None] * len(lay.pieces(rank))
    per = 2 * B * Hkv * D
    done: list = []  # the previous step's results: the next exchange waits for them
    for j in range(rp.n_units):
        held = None
        if rp.unit(rank, j) is not None:
            la, lb = rp.unit_span(rank, j)
            held = mx.stack([k[:, :, la:lb], v[:, :, la:lb]])  # (2, B, Hkv, unit, D): origin `rank`
            if done:  # computed after the previous unit (else a lazy graph may run every unit's blocks at once)
                (held,) = mx.depends([held], done)
        for s in range(n):
            o = (rank - s) % n
            if s > 0:
                prev = (rank - s + 1) % n
                slot = Slot(held if rp.kv_hop(s, prev, j) else None,
                            ((2, B, Hkv, rp.unit_length(o, j), D), k.dtype) if rp.kv_hop(s, o, j) else None,
                            k.dtype, rp.largest(s, rp.kv_hop, j, per))
                (held,) = yield [slot], done
            if not rp.needs(o, j, rank):
                continue
            unit = rp.unit(o, j)
            for p, i, bp in rp.pairs(rank, o, j):
                a, b = _sub(unit, i)
                qp = _piece(q, lay, rank, p, 2)
                oc, lc = blockwise_forward(qp, held[0][:, :, a:b], held[1][:, :, a:b], scale, bp,
                                           seg if bp.uses_segments else None, dtype=F32)
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
    # dQ of each query piece, block by block (the block plan's query spans, the same for
    # every key unit): each unit adds only to the blocks that see it, so no piece-sized
    # zero-padded dQ is ever summed (one fp32 width of the queries, not three)
    dq: list = [None] * len(lay.pieces(rank))
    own: list = [None] * len(rp.units(rank))  # dK/dV of this rank's units, (2, B, Hkv, unit, D)
    per = 2 * B * Hkv * D
    done: list = [do]
    for j in range(rp.n_units):
        held, acc = None, None
        if rp.unit(rank, j) is not None:
            la, lb = rp.unit_span(rank, j)
            held = mx.stack([k[:, :, la:lb], v[:, :, la:lb]])
            if done:
                (held,) = mx.depends([held], done)
        for s in range(n + 1):
            org = (rank - s) % n
            if s > 0:
                prev = (rank - s + 1) % n
                shape = (2, B, Hkv, rp.unit_length(org, j), D)
                kv = Slot(held if rp.kv_hop(s, prev, j) else None,
                          (shape, k.dtype) if rp.kv_hop(s, org, j) else None,
                          k.dtype, rp.largest(s, rp.kv_hop, j, per))
                ac = Slot(acc if rp.acc_hop(s, prev, j) else None,
                          (shape, F32) if rp.acc_hop(s, org, j) else None,
                          F32, rp.largest(s, rp.acc_hop, j, per))
                held, acc = yield [kv, ac], done
            if s == n:  # home: what the other ranks added to this unit's dK/dV
                if acc is not None:
                    own[j] = acc if own[j] is None else own[j] + acc
                break
            if not rp.needs(org, j, rank):
                continue
            unit = rp.unit(org, j)
            grads: dict[int, mx.array] = {}
            for p, i, bp in rp.pairs(rank, org, j):
                a, b = _sub(unit, i)
                qp = _piece(q, lay, rank, p, 2)
                op, dop = _piece(o, lay, rank, p, 2), _piece(do, lay, rank, p, 2)
                lp = _piece(lse, lay, rank, p, 2).reshape(B, Hkv, rep, -1)
                dqc, dkc, dvc = blockwise_backward(qp, held[0][:, :, a:b], held[1][:, :, a:b], op, lp, dop, scale,
                                                   bp, seg if bp.uses_segments else None, dtypes=(F32, F32, F32),
                                                   dq_blocks=True)
                if dq[p] is None:
                    dq[p] = [None] * len(dqc)
                dq[p] = [x if c is None else c if x is None else x + c for x, c in zip(dq[p], dqc, strict=True)]
                g = mx.stack([dkc, dvc])
                grads[i] = g if i not in grads else grads[i] + g
            contrib = [grads[i] if i in grads else mx.zeros((2, B, Hkv, b - a, D), F32)
                       for i, (_, a, b) in enumerate(unit)]
            contrib = mx.concatenate(contrib, axis=3) if len(contrib) > 1 else contrib[0]
            if s == 0:
                own[j] = contrib
            else:
                acc = contrib if acc is None else acc + contrib
            done = [x for x in (*(b for blocks in dq if blocks for b in blocks), *own, acc) if x is not None]
    dq_all = [_join_blocks(x, B, H, Hkv, b - a, D, rp.block[0]) for x, (a, b) in zip(dq, lay.pieces(rank), strict=True)]
    dq_all = mx.concatenate(dq_all, axis=2) if len(dq_all) > 1 else dq_all[0]
    own = [x if x is not None else mx.zeros((2, B, Hkv, rp.unit_length(rank, j), D), F32)
           for j, x in enumerate(own)]
    own = mx.concatenate(own, axis=3) if len(own) > 1 else own[0]
    return dq_all, own[0], own[1]


class RingCall:
    """Everything one ring attention call of one S² half needs, on one rank."""

    def __init__(self, layout: Layout, rank: int, spec: MaskSpec, scale: float, block: tuple[int, int],
                 segment_ids: mx.array | None, kv_chunk: int | None = None) -> None:
        seg_np, known = host_segments(segment_ids)
        self.rp = RingPlan(layout, spec, block, seg_np, known, kv_chunk)
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
               block_size: tuple[int, int] | None = None, kv_chunk: int | None = None) -> list[RingCall]:
    """The ring call of each head group (one, or the two S² halves) for ``H`` query heads
    (``kv_chunk``: stream the keys round the ring in units of this many positions)."""
    scale = 1.0 / D ** 0.5 if scale is None else float(scale)
    block = block_size or default_block_sizes(layout.length)
    halves = s2_halves(s2_group, layout.length)
    specs = [MaskSpec(bool(causal), window)] if halves is None else [MaskSpec(bool(causal), window, g)
                                                                      for g in halves]
    if halves is not None and H // 2 == 0:
        specs = specs[1:]
    return [RingCall(layout, rank, sp, scale, block, segment_ids, kv_chunk) for sp in specs]


def ring_attention(q: mx.array, k: mx.array, v: mx.array, layout: Layout, rank: int, transport, *,
                   scale: float | None = None, causal: bool = True, window: int | None = None,
                   segment_ids: mx.array | None = None, s2_group: int | None = None,
                   block_size: tuple[int, int] | None = None, kv_chunk: int | None = None) -> mx.array:
    """Attention of this rank's queries over the whole sequence, differentiable (custom VJP).

    Shapes: q (B, H, Lr, D), k, v (B, Hkv, Lr, D): this rank's positions
    (``layout.positions(rank)``) -> (B, H, Lr, D). The mask is that of
    :func:`~mozgach_mlx.attention.blockwise_attention` over the whole sequence:
    ``segment_ids`` (B, L) are the *whole* sequence's ids, ``s2_group`` tokens of it.
    ``transport``: a :class:`~.transport.RingTransport` (every rank of the group calls
    this in the same order with the same layout and mask). ``kv_chunk``: K/V and their
    dK/dV accumulators travel in units of at most this many positions (:class:`RingPlan`;
    None: one rank's whole slice per message).
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
                       s2_group=s2_group, block_size=block_size, kv_chunk=kv_chunk)
    if len(calls) == 1:
        return _differentiable(calls[0], transport)(q, k, v)[0]
    outs = [_differentiable(c, transport)(qh, kh, vh)[0]
            for c, (qh, kh, vh) in zip(calls, [h for h in s2_heads(q, k, v) if h[0].shape[1]], strict=True)]
    return mx.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]
