"""The mask vocabulary of attention and the block plan that skips what a mask hides.

A query at position ``i`` sees a key at position ``j`` when every condition of the mask
holds (positions are 0-based along the sequence, per batch row ``b``):

    causal    j <= i
    window    i - j < window              (and j - i < window when not causal)
    segments  seg[b, i] == seg[b, j]      packed documents: int32 (B, L) segment ids
    groups    grp(i) == grp(j)            S²-Attn: grp(p) = (p + size - shift) // size

S²-Attn (LongLoRA, arXiv 2309.12307): tokens attend within groups of ``size`` tokens;
the first ``H // 2`` query heads use groups starting at 0, the others groups shifted by
``shift = ceil(size / 2)`` tokens (LongLoRA's ``roll(-group_size // 2)`` of half the
heads). Unlike LongLoRA's roll, the shifted groups do not wrap around the sequence end:
the rolled last group would let the first ``shift`` tokens of the shifted heads see the
last tokens of the sequence -- the future, in a causal LM. Here the shifted heads' first
group is ``[0, shift)`` and the last group is whatever remains, so a group size that does
not divide L is handled the same way (the last group of either half is shorter). A group
of ``size >= L`` tokens is the whole sequence: no grouping (:func:`s2_halves`).

Block plan: the sequence is cut into query blocks and key blocks; for every pair each
condition says SKIP (no pair visible), FULL (every pair visible) or MASK (some visible).
The pair is skipped if any condition says SKIP (neither forward nor backward computes
it), computed unmasked if all say FULL, and otherwise masked elementwise by the
conditions that said MASK only. Causal, window and groups are position arithmetic.
Segment ids are data: the plan reads them on the host (``np.asarray``; they come
straight from the batch, so this is a copy of B*L int32, not a sync of pending work) and
uses per-block min/max. For ids that are non-decreasing along the sequence (what
packing produces) that test is exact; for any other ids it is conservative (may compute
a block that turns out fully masked, never skips a visible pair). Inside a function
transformation that cannot read arrays (``mx.compile``, ``mx.vmap``) the segments say
MASK everywhere: correct, with no skipping from segments. With B > 1 a block is skipped
only if it is skipped in every row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..errors import ConfigError

SKIP, FULL, MASK = 0, 1, 2


def spans(n: int, size: int) -> list[tuple[int, int]]:
    """[start, end) of consecutive blocks of ``size`` covering ``range(n)``."""
    return [(a, min(a + size, n)) for a in range(0, n, size)]


@dataclass(frozen=True)
class Groups:
    """S²-Attn groups: positions ``p`` and ``q`` share a group iff ``ids(p) == ids(q)``."""

    size: int
    shift: int = 0

    def ids(self, pos):
        """Group index of positions (NumPy or MLX integer array, or int); never negative."""
        return (pos + (self.size - self.shift)) // self.size


def s2_group_tokens(group: int | float | None, length: int) -> int | None:
    """The S² group size in tokens for a sequence of ``length``: an int is tokens, a
    float in (0, 1) a fraction of the sequence (LongLoRA: 1/4); None stays None."""
    if group is None:
        return None
    if isinstance(group, bool) or not isinstance(group, (int, float)) or not group > 0:
        raise ConfigError(f"s2_group must be a positive number of tokens or a fraction in (0, 1), got {group!r}.")
    if group < 1:
        return max(1, int(length * group))
    if group != int(group):
        raise ConfigError(f"s2_group={group!r} tokens is not a whole number; use an int or a fraction in (0, 1).")
    return int(group)


def s2_halves(group: int | None, length: int) -> tuple[Groups, Groups] | None:
    """(groups of the first ``H // 2`` heads, groups of the shifted rest), or None when
    there is no grouping (``group`` None, or ``>= length``: one group is the sequence)."""
    if group is None or group >= length:
        return None
    return Groups(group, 0), Groups(group, math.ceil(group / 2))


@dataclass(frozen=True)
class MaskSpec:
    """The position-only part of a mask (the segments are data, passed apart)."""

    causal: bool = True
    window: int | None = None
    groups: Groups | None = None


def _combine(kinds: list[np.ndarray]) -> np.ndarray:
    skip = np.zeros(kinds[0].shape, bool)
    full = np.ones(kinds[0].shape, bool)
    for k in kinds:
        skip |= k == SKIP
        full &= k == FULL
    return np.where(skip, SKIP, np.where(full, FULL, MASK)).astype(np.int8)


def _kind(skip: np.ndarray, full: np.ndarray) -> np.ndarray:
    return np.where(skip, SKIP, np.where(full, FULL, MASK)).astype(np.int8)


def _position_kinds(spec: MaskSpec, qa, qb, ka, kb) -> dict[str, np.ndarray]:
    """Per condition, (nq, nk) kinds from block bounds qa, qb (nq, 1) and ka, kb (1, nk)."""
    out = {}
    dmin, dmax = qa - (kb - 1), (qb - 1) - ka  # range of i - j over the block pair
    if spec.causal:
        out["causal"] = _kind(dmax < 0, dmin >= 0)
    if spec.window is not None:
        w = spec.window
        kinds = [_kind(dmin >= w, dmax < w)]
        if not spec.causal:
            kinds.append(_kind(dmax <= -w, dmin > -w))
        out["window"] = _combine(kinds)
    if spec.groups is not None:
        g = spec.groups
        q0, q1, k0, k1 = g.ids(qa), g.ids(qb - 1), g.ids(ka), g.ids(kb - 1)
        out["groups"] = _kind((q1 < k0) | (k1 < q0), (q0 == q1) & (k0 == k1) & (q0 == k0))
    return out


def host_segments(segment_ids: mx.array | None) -> tuple[np.ndarray | None, bool]:
    """(segment ids as a (B, L) int64 NumPy array or None, whether they could be read).

    Under ``mx.compile`` / ``mx.vmap`` arrays cannot be read: (None, False).
    """
    if segment_ids is None:
        return None, True
    try:
        return np.asarray(segment_ids).astype(np.int64), True
    except ValueError:  # "[eval] Attempting to eval an array during function transformations"
        return None, False


def _block_minmax(seg: np.ndarray, blocks) -> tuple[np.ndarray, np.ndarray]:
    """(B, n) min and max of the ids over each [start, end) block of positions."""
    starts = [a for a, _ in blocks]
    if blocks[-1][1] == seg.shape[1] and all(blocks[i][1] == blocks[i + 1][0] for i in range(len(blocks) - 1)):
        return np.minimum.reduceat(seg, starts, axis=1), np.maximum.reduceat(seg, starts, axis=1)
    lo = np.stack([seg[:, a:b].min(axis=1) for a, b in blocks], axis=1)
    hi = np.stack([seg[:, a:b].max(axis=1) for a, b in blocks], axis=1)
    return lo, hi


def _segment_kinds(seg: np.ndarray, qspans, kspans) -> np.ndarray:
    """(nq, nk) kinds from per-block min/max of the ids, reduced over the batch rows."""
    qmin, qmax = _block_minmax(seg, qspans)  # (B, nq)
    kmin, kmax = _block_minmax(seg, kspans)  # (B, nk)
    skip = (qmax[:, :, None] < kmin[:, None, :]) | (kmax[:, None, :] < qmin[:, :, None])  # (B, nq, nk)
    full = ((qmin == qmax)[:, :, None] & (kmin == kmax)[:, None, :]
            & (qmin[:, :, None] == kmin[:, None, :]))
    return _kind(skip.all(axis=0), full.all(axis=0))


class BlockPlan:
    """Which (query block, key block) pairs an attention call computes, and how.

    ``qspans`` / ``kspans``: [start, end) of the blocks, in sequence positions;
    ``kinds[name]`` (nq, nk) per condition; ``kind`` (nq, nk) combined (SKIP / FULL / MASK).

    By default queries and keys are the same ``length`` positions from 0. A piece of a
    longer sequence against another piece (context parallelism: a rank's queries against
    the keys another rank holds) passes ``q_start`` (its queries are positions
    ``q_start .. q_start + length - 1``), ``k_start`` and ``k_length``; ``q0`` / ``k0``
    are then subtracted from a span to index the piece's arrays, and ``segments`` are the
    whole sequence's ids (indexed by position).
    """

    def __init__(self, spec: MaskSpec, length: int, block_q: int, block_k: int,
                 segments: np.ndarray | None = None, segments_known: bool = True, *,
                 q_start: int = 0, k_start: int = 0, k_length: int | None = None) -> None:
        self.spec = spec
        self.q0, self.k0 = q_start, k_start
        self.qspans = [(a + q_start, b + q_start) for a, b in spans(length, block_q)]
        self.kspans = [(a + k_start, b + k_start) for a, b in spans(length if k_length is None else k_length, block_k)]
        qa = np.array([a for a, _ in self.qspans])[:, None]
        qb = np.array([b for _, b in self.qspans])[:, None]
        ka = np.array([a for a, _ in self.kspans])[None, :]
        kb = np.array([b for _, b in self.kspans])[None, :]
        self.kinds = _position_kinds(spec, qa, qb, ka, kb)
        shape = (len(self.qspans), len(self.kspans))
        if not segments_known:
            self.kinds["segments"] = np.full(shape, MASK, np.int8)
        elif segments is not None and (segments != segments[:, :1]).any():  # one segment per row adds nothing
            self.kinds["segments"] = _segment_kinds(segments, self.qspans, self.kspans)
        self.kind = _combine(list(self.kinds.values())) if self.kinds else np.full(shape, FULL, np.int8)
        self._kind_rows = self.kind.tolist()  # Python ints: the block loops read these
        self._masks: dict[tuple, mx.array] = {}

    @property
    def uses_segments(self) -> bool:
        return "segments" in self.kinds

    def at(self, i: int, j: int) -> int:
        return self._kind_rows[i][j]

    def partial(self, i: int, j: int) -> tuple[str, ...]:
        """The conditions that mask block pair (i, j) elementwise."""
        return tuple(name for name, k in self.kinds.items() if k[i, j] == MASK)

    def mask(self, i: int, j: int, rep: int, segment_ids: mx.array | None) -> mx.array:
        """:func:`visible` of block pair (i, j) for its partial conditions. Causal and
        window masks depend only on the offset between the blocks, so the forward and
        backward of every diagonal block share one array (built once per plan)."""
        (qa, qb), (ka, kb) = self.qspans[i], self.kspans[j]
        conds = self.partial(i, j)
        if "groups" in conds or "segments" in conds:
            return visible(conds, self.spec, qa, qb, ka, kb, rep, segment_ids)
        key = (conds, qa - ka, qb - qa, kb - ka, rep)
        if key not in self._masks:
            self._masks[key] = visible(conds, self.spec, qa - ka, qb - ka, 0, kb - ka, rep, None)
        return self._masks[key]

    def bias(self, i: int, j: int, rep: int, segment_ids: mx.array | None, neg: float) -> mx.array:
        """:meth:`mask` as an additive float32 bias, 0 where visible and ``neg`` where
        hidden, cached as the mask is. ``s + bias`` is one add, where ``mx.where(mask, s,
        neg)`` measured ~10x slower on MLX's CPU (its select is not vectorised)."""
        (qa, qb), (ka, kb) = self.qspans[i], self.kspans[j]
        conds = self.partial(i, j)
        if "groups" in conds or "segments" in conds:
            return mx.where(self.mask(i, j, rep, segment_ids), 0.0, neg).astype(mx.float32)
        key = (conds, qa - ka, qb - qa, kb - ka, rep, neg)
        if key not in self._masks:
            self._masks[key] = mx.where(self.mask(i, j, rep, None), 0.0, neg).astype(mx.float32)
        return self._masks[key]

    def pairs(self) -> int:
        """(query, key) score entries computed per batch row and head: the work the plan leaves."""
        rows = np.array([b - a for a, b in self.qspans])[:, None]
        cols = np.array([b - a for a, b in self.kspans])[None, :]
        return int(((self.kind != SKIP) * rows * cols).sum())


def visible(conds: tuple[str, ...], spec: MaskSpec, qa: int, qb: int, ka: int, kb: int, rep: int,
            segment_ids: mx.array | None) -> mx.array:
    """Boolean visibility of query rows [qa, qb) (``rep`` heads stacked, head-major: R =
    rep * (qb - qa) rows) against key columns [ka, kb), for the conditions ``conds``.

    Shape (R, C), or (B, 1, R, C) when the segments take part.
    """
    qpos = mx.tile(mx.arange(qa, qb, dtype=mx.int32), (rep,))[:, None]  # (R, 1)
    kpos = mx.arange(ka, kb, dtype=mx.int32)[None, :]  # (1, C)
    vis = None

    def both(a, b):
        return b if a is None else a & b

    if "causal" in conds:
        vis = both(vis, kpos <= qpos)
    if "window" in conds:
        w = (qpos - kpos) < spec.window
        vis = both(vis, w if spec.causal else w & ((kpos - qpos) < spec.window))
    if "groups" in conds:
        vis = both(vis, spec.groups.ids(qpos) == spec.groups.ids(kpos))
    if "segments" in conds:
        sq = mx.tile(segment_ids[:, qa:qb], (1, rep))[:, None, :, None]  # (B, 1, R, 1)
        sk = segment_ids[:, None, None, ka:kb]  # (B, 1, 1, C)
        vis = both(vis, sq == sk)
    return vis
