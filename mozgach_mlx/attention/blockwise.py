"""The pure-MLX blockwise (flash-style) attention: O(L) memory forward and backward.

Runs on every backend. The algorithm, the memory argument (the ``mx.depends`` chain) and
the numerics are described in the package docstring (:mod:`mozgach_mlx.attention`).
:func:`blockwise_attention` is differentiable through one ``mx.custom_function`` per
call, built around that call's :class:`~.masks.BlockPlan` (which key blocks each query
block computes, which it masks elementwise; the mask vocabulary is in :mod:`.masks`).
:func:`check_inputs` is the argument check the dispatcher shares with it;
:func:`computed_pairs` counts the work a mask leaves (the planner's FLOPs).
"""

from __future__ import annotations

import contextlib
import math
from functools import lru_cache

import mlx.core as mx
import numpy as np

from .. import fpenv, ops, settings
from ..errors import ConfigError
from .masks import MASK, SKIP, BlockPlan, MaskSpec, host_segments, s2_halves

# A finite "-inf" for masked scores: exp(_NEG - m) == 0 for any real row max m, and a
# row that is fully masked inside one key block (windows, segments, groups) cannot produce
# inf - inf = nan; its pollution is cancelled by the exp(m_old - m_new) == 0 rescale
# once a block with a visible key arrives (every row sees at least its own key).
_NEG = -1e30

# Default block sizes for the pure-MLX path, measured on the 2-core CPU box (CPU time of
# fwd+bwd at L=4K, H=8, Hkv=2, D=64/128, among 64..512 x 256..2048): 128 x 512 was
# fastest -- the (rep*128, 512) score blocks of each KV head stay cache-sized, while
# blocks much smaller pay MLX's per-op overhead. Working set O(block_q * rep * block_k).
# Short sequences want smaller blocks (:func:`default_block_sizes`): with one 512-key
# block, a causal query block computes every masked score of its row; measured (CPU time,
# compiled fwd+bwd, subnormals flushed) 38 -> 19.5 ms at L=256 with 64 x 64, 47 -> 22-28
# ms at 512 with 64-128 x 128, 120 -> 88 ms at 1K with 64 x 256 (benchmarks/RESULTS.md).
DEFAULT_BLOCK_Q = 128
DEFAULT_BLOCK_K = 512


def default_block_sizes(length: int) -> tuple[int, int]:
    """(block_q, block_k) for a sequence of ``length``: 64 x L/4 (at least 64) up to 2K
    tokens, DEFAULT_BLOCK_Q x DEFAULT_BLOCK_K beyond."""
    if length > 2048:
        return DEFAULT_BLOCK_Q, DEFAULT_BLOCK_K
    return 64, min(DEFAULT_BLOCK_K, max(64, 1 << max(0, (length // 4).bit_length() - 1)))


# Elementwise parts: MLX's CPU exp is the dominant cost of attention there, so scores are
# kept in base 2 (pre-multiplied by log2(e)) and exponentiated with ops.exp2, a
# vectorised polynomial ~10x faster than MLX's CPU exp (see ops.py).

@mx.compile
def _dscores(p, dp, delta):
    return p * (dp - delta)


@mx.compile
def _finish(acc, m, lsum):
    return acc / lsum, m + mx.log2(lsum)


def _fwd_query_block(qi, kf, vf, i, plan, rep, seg, dep):
    """Online softmax of query block ``i`` over the key blocks the plan computes.

    qi (B, Hkv, R, D) base-2-scaled queries, R = rep * (qb - qa) -> (o (B, Hkv, R, D),
    lse2 (B, Hkv, R, 1)). ``dep``: arrays the first K/V slice must wait for.
    """
    m = lsum = acc = None
    for j, (ka, kb) in enumerate(plan.kspans):
        kind = plan.at(i, j)
        if kind == SKIP:
            continue
        kj, vj = kf[:, :, ka - plan.k0:kb - plan.k0], vf[:, :, ka - plan.k0:kb - plan.k0]
        if dep:
            kj, vj = mx.depends([kj, vj], dep)
        s = qi @ kj.swapaxes(-1, -2)  # (B, Hkv, R, C)
        if kind == MASK:
            s = s + plan.bias(i, j, rep, seg, _NEG)  # hidden scores -> _NEG (exactly)
        m_new = s.max(axis=-1, keepdims=True)  # (B, Hkv, R, 1)
        if m is not None:
            m_new = mx.maximum(m, m_new)
        p = ops.exp2(s - m_new)
        if m is None:
            lsum = p.sum(axis=-1, keepdims=True)
            acc = p @ vj  # (B, Hkv, R, D)
        else:
            alpha = ops.exp2(m - m_new)
            lsum = lsum * alpha + p.sum(axis=-1, keepdims=True)
            acc = acc * alpha + p @ vj
        m = m_new
        dep = [m, lsum, acc]
    if acc is None:  # no key block visible (a piece of the keys only: context parallelism)
        return mx.zeros(qi.shape, mx.float32), mx.full((*qi.shape[:-1], 1), _NEG, mx.float32)
    return _finish(acc, m, lsum)


def blockwise_forward(q, k, v, scale: float, plan: BlockPlan, seg: mx.array | None, dtype=None):
    """(o (B, H, L, D) in ``dtype`` (default q.dtype), lse2 (B, Hkv, rep, L) float32: the
    logsumexp in base 2, log2(sum_j 2**s2_j), of the base-2 scores s2 = log2(e) * scale *
    q.k) of the queries ``q`` against the keys ``k`` / values ``v`` that ``plan`` places
    (its ``q0`` / ``k0`` are the positions of their first rows). A query that sees no key
    of the plan gets o = 0 and lse2 = -1e30 (:func:`merge_partials` weights it 0)."""
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    rep = H // Hkv
    q5 = q.reshape(B, Hkv, rep, L, D)
    kf = k.astype(mx.float32)
    vf = v.astype(mx.float32)
    o_parts, lse_parts = [], []
    lanes = _lanes()
    deps: list[list[mx.array]] = [[] for _ in lanes]
    for bi, (qa, qb) in enumerate(plan.qspans):
        lane, n = bi % len(lanes), qb - qa
        with _on(lanes[lane]):
            # (B, Hkv, rep, n, D) -> (B, Hkv, rep*n, D): the group's heads stacked as rows;
            # base-2 scores s2 = log2(e) * scale * q k^T, so exp(s - m) == 2**(s2 - m2).
            q_i = q5[:, :, :, qa - plan.q0:qb - plan.q0]
            qi = (q_i.astype(mx.float32) * (scale * ops.LOG2E)).reshape(B, Hkv, rep * n, D)
            o_i, lse_i = _fwd_query_block(qi, kf, vf, bi, plan, rep, seg, deps[lane])
            o_parts.append(o_i.reshape(B, Hkv, rep, n, D).astype(dtype or q.dtype))
            lse_parts.append(lse_i.reshape(B, Hkv, rep, n))
        deps[lane] = [o_parts[-1], lse_parts[-1]]
    o = mx.concatenate(o_parts, axis=3) if len(o_parts) > 1 else o_parts[0]
    lse = mx.concatenate(lse_parts, axis=3) if len(lse_parts) > 1 else lse_parts[0]
    return o.reshape(B, H, L, D), lse


def merge_partials(o1: mx.array, l1: mx.array, o2: mx.array, l2: mx.array) -> tuple[mx.array, mx.array]:
    """Attention over the union of two disjoint key sets from the attention over each:
    o (..., n, D) float32 and lse2 (..., n) as :func:`blockwise_forward` returns them."""
    m = mx.maximum(l1, l2)
    w1, w2 = ops.exp2(l1 - m), ops.exp2(l2 - m)
    total = w1 + w2
    o = (o1 * (w1 / total)[..., None]) + (o2 * (w2 / total)[..., None])
    return o, m + mx.log2(total)


def _bwd_query_block(qs, doi, delta, lse_i, kf, vf, i, plan, rep, seg, dka, dva, dep):
    """dQ of query block ``i`` (scaled queries ``qs``; (B, Hkv, R, D)); adds its dK/dV
    contributions to the per-key-block accumulators ``dka`` / ``dva`` in place."""
    qi = qs * ops.LOG2E  # base-2 scores, as in the forward
    dqi = None
    for j, (ka, kb) in enumerate(plan.kspans):
        kind = plan.at(i, j)
        if kind == SKIP:
            continue
        kj, vj = kf[:, :, ka - plan.k0:kb - plan.k0], vf[:, :, ka - plan.k0:kb - plan.k0]
        if dep:
            kj, vj = mx.depends([kj, vj], dep)
        s = qi @ kj.swapaxes(-1, -2)  # (B, Hkv, R, C)
        if kind == MASK:
            s = s + plan.bias(i, j, rep, seg, _NEG)  # exp2 of a hidden score is exactly 0
        p = ops.exp2(s - lse_i)  # P = exp(S - lse), recomputed
        dvj = p.swapaxes(-1, -2) @ doi  # (B, Hkv, C, D)
        dp = doi @ vj.swapaxes(-1, -2)  # (B, Hkv, R, C)
        ds = _dscores(p, dp, delta)
        dqc = ds @ kj  # (B, Hkv, R, D)
        dkj = ds.swapaxes(-1, -2) @ qs  # (B, Hkv, C, D); qs carries the scale
        dqi = dqc if dqi is None else dqi + dqc
        dka[j] = dkj if dka[j] is None else dka[j] + dkj
        dva[j] = dvj if dva[j] is None else dva[j] + dvj
        dep = [dqi, dka[j], dva[j]]
    return dqi, dep


def blockwise_backward(q, k, v, o, lse, do, scale: float, plan: BlockPlan, seg: mx.array | None, dtypes=None,
                       dq_blocks: bool = False):
    """(dq, dk, dv) of :func:`blockwise_forward` for the output cotangent ``do``, in
    ``dtypes`` (default those of q, k, v). ``o`` and ``lse`` are the attention's output
    and base-2 logsumexp over *all* its keys: with the keys split into pieces, each
    piece's call gives its exact share of dq and its own dk, dv (FlashAttention-2).
    ``dq_blocks``: dq as a list over the plan's query blocks, each (B, Hkv, rep, n, D) or
    None where the block sees no key (a caller summing many key pieces then adds only
    what each piece touches, block by block, instead of whole zero-padded dq arrays)."""
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    rep = H // Hkv
    q5 = q.reshape(B, Hkv, rep, L, D)
    o5 = o.reshape(B, Hkv, rep, L, D)
    do5 = do.reshape(B, Hkv, rep, L, D)
    kf = k.astype(mx.float32)
    vf = v.astype(mx.float32)
    kspans = plan.kspans
    lanes = _lanes()
    # Per lane (stream) dK/dV accumulators, summed at the end: no cross-stream chains.
    dk_acc: list[list[mx.array | None]] = [[None] * len(kspans) for _ in lanes]
    dv_acc: list[list[mx.array | None]] = [[None] * len(kspans) for _ in lanes]
    dq_parts = []
    deps: list[list[mx.array]] = [[] for _ in lanes]
    for bi, (qa, qb) in enumerate(plan.qspans):
        lane, n = bi % len(lanes), qb - qa
        with _on(lanes[lane]):
            R = rep * n
            a, b = qa - plan.q0, qb - plan.q0
            qs = (q5[:, :, :, a:b].astype(mx.float32) * scale).reshape(B, Hkv, R, D)
            doi = do5[:, :, :, a:b].astype(mx.float32)
            delta = (doi * o5[:, :, :, a:b].astype(mx.float32)).sum(axis=-1)  # (B, Hkv, rep, n)
            lse_i = lse[:, :, :, a:b].reshape(B, Hkv, R, 1)
            dqi, dep = _bwd_query_block(qs, doi.reshape(B, Hkv, R, D), delta.reshape(B, Hkv, R, 1), lse_i,
                                        kf, vf, bi, plan, rep, seg, dk_acc[lane], dv_acc[lane], deps[lane])
            if dqi is None and dq_blocks:
                dq_parts.append(None)
                continue
            dqi = mx.zeros((B, Hkv, R, D), mx.float32) if dqi is None else dqi  # no key visible (a piece)
            dq_parts.append((dqi * scale).reshape(B, Hkv, rep, n, D).astype(dtypes[0] if dtypes else q.dtype))
        deps[lane] = [dq_parts[-1]] + [a for a in dep if a is not dqi]
    dk_parts, dv_parts = [], []
    for j, (ka, kb) in enumerate(kspans):
        dks = [acc[j] for acc in dk_acc if acc[j] is not None]
        dvs = [acc[j] for acc in dv_acc if acc[j] is not None]
        if not dks:  # keys no query can see (only possible with odd windows)
            dks = dvs = [mx.zeros((B, Hkv, kb - ka, D), mx.float32)]
        dk_parts.append(sum(dks[1:], dks[0]))
        dv_parts.append(sum(dvs[1:], dvs[0]))
    dk = mx.concatenate(dk_parts, axis=2) if len(dk_parts) > 1 else dk_parts[0]
    dv = mx.concatenate(dv_parts, axis=2) if len(dv_parts) > 1 else dv_parts[0]
    dt = dtypes or (q.dtype, k.dtype, v.dtype)
    if dq_blocks:
        return dq_parts, dk.astype(dt[1]), dv.astype(dt[2])
    dq = mx.concatenate(dq_parts, axis=3) if len(dq_parts) > 1 else dq_parts[0]
    return dq.reshape(B, H, L, D), dk.astype(dt[1]), dv.astype(dt[2])


# CPU streams the query blocks are spread over (env MOZGACH_ATTENTION_CPU_STREAMS). MLX
# runs each stream's ops on its own thread and its CPU elementwise kernels are
# single-threaded, so >1 lets the elementwise work of several query blocks use several
# cores. Default 1: on the shared 2-core dev box 2 streams once measured ~1.6x *slower*
# (loaded, before subnormals were flushed); idle, with one BLAS thread, 2 streams are
# 1.41x faster at 2K-4K for no more CPU, and no faster with 2 BLAS threads
# (benchmarks/RESULTS.md, issue 23).


@lru_cache(maxsize=1)
def _extra_cpu_streams(n: int) -> tuple:
    return tuple(fpenv.new_cpu_stream() for _ in range(n))


def _lanes() -> list:
    n = settings.attention_cpu_streams()
    if n < 2 or mx.default_device() != mx.cpu:
        return [None]
    return [mx.default_stream(mx.cpu), *_extra_cpu_streams(n - 1)]


def _on(stream):
    return contextlib.nullcontext() if stream is None else mx.stream(stream)


def _blockwise_fn(scale: float, plan: BlockPlan, seg: mx.array | None):
    """The differentiable attention of one call (its plan depends on the segment ids)."""

    @mx.custom_function
    def attn(q, k, v):
        return blockwise_forward(q, k, v, scale, plan, seg)

    @attn.vjp
    def attn_vjp(primals, cotangents, outputs):
        q, k, v = primals
        do = cotangents[0]
        o, lse = outputs
        return blockwise_backward(q, k, v, o, lse, do, scale, plan, seg)

    return attn


def plan_for(q: mx.array, k: mx.array, spec: MaskSpec, segment_ids: mx.array | None,
             block_size: int | tuple[int, int] | None = None) -> BlockPlan:
    """The block plan :func:`blockwise_attention` follows for q (B, H, L, D), k (B, Hkv, L, D)."""
    bq, bk = _block_sizes(block_size, q.shape[2])
    seg, known = host_segments(segment_ids)
    return BlockPlan(spec, q.shape[2], bq, bk, seg, known)


def _attend(q, k, v, scale, spec, segment_ids, block_size):
    plan = plan_for(q, k, spec, segment_ids, block_size)
    seg = segment_ids.astype(mx.int32) if plan.uses_segments else None
    o, _ = _blockwise_fn(scale, plan, seg)(q, k, v)
    return o


def s2_heads(q: mx.array, k: mx.array, v: mx.array) -> list[tuple[mx.array, mx.array, mx.array]]:
    """Split q (B, H, L, D), k, v (B, Hkv, L, D) into the S² halves: query heads
    [0, H // 2) and [H // 2, H), each with the KV heads it reads (an empty first half for
    H = 1). When the split falls inside a GQA group (H // 2 not a multiple of H // Hkv),
    K and V are repeated per query head first (their gradients sum back through it)."""
    H, Hkv = q.shape[1], k.shape[1]
    h, rep = H // 2, H // Hkv
    if h % rep:
        k, v, rep = mx.repeat(k, rep, axis=1), mx.repeat(v, rep, axis=1), 1
    hk = h // rep
    return [(q[:, :h], k[:, :hk], v[:, :hk]), (q[:, h:], k[:, hk:], v[:, hk:])]


def blockwise_attention(q: mx.array, k: mx.array, v: mx.array, *, scale: float | None = None,
                        causal: bool = True, block_size: int | tuple[int, int] | None = None,
                        window: int | None = None, segment_ids: mx.array | None = None,
                        s2_group: int | None = None) -> mx.array:
    """Pure-MLX flash attention, O(L) memory in forward and backward. Runs on every backend.

    Shapes: q (B, H, L, D); k, v (B, Hkv, L, D), H % Hkv == 0 -> (B, H, L, D), q.dtype.
    The mask (see :mod:`.masks`): ``causal``; ``window`` positions (itself included);
    ``segment_ids`` (B, L) integers, a token sees only its own segment; ``s2_group``
    tokens, S²-Attn groups with the last ``H - H // 2`` heads shifted by half a group
    (no grouping when ``s2_group >= L``). Key blocks a query block cannot see are never
    computed, forward or backward. ``block_size``: query-block rows (int) or
    ``(block_q, block_k)``; default :func:`default_block_sizes` of the length.
    """
    scale = check_inputs(q, k, v, scale, window, segment_ids, s2_group)
    halves = s2_halves(s2_group, q.shape[2])
    if halves is None:
        return _attend(q, k, v, scale, MaskSpec(bool(causal), window), segment_ids, block_size)
    outs = [_attend(qh, kh, vh, scale, MaskSpec(bool(causal), window, groups), segment_ids, block_size)
            for (qh, kh, vh), groups in zip(s2_heads(q, k, v), halves, strict=True) if qh.shape[1]]
    return mx.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]


def computed_pairs(length: int, *, heads: int = 1, causal: bool = True, window: int | None = None,
                   segment_ids=None, s2_group: int | None = None,
                   block_size: int | tuple[int, int] | None = None) -> int:
    """(query, key) score entries :func:`blockwise_attention` computes for one sequence of
    ``length`` over ``heads`` query heads, skipped blocks excluded: the attention work of
    a mask (the planner's FLOPs). ``segment_ids``: (L,) or (1, L) ids (NumPy or MLX)."""
    bq, bk = _block_sizes(block_size, length)
    seg = None if segment_ids is None else np.asarray(segment_ids).reshape(1, -1).astype(np.int64)
    if seg is not None and seg.shape[1] != length:
        raise ConfigError(f"segment_ids has {seg.shape[1]} positions for a sequence of {length}.")
    halves = s2_halves(s2_group, length)
    if halves is None:
        return heads * BlockPlan(MaskSpec(causal, window), length, bq, bk, seg).pairs()
    n = (heads // 2, heads - heads // 2)
    return sum(h * BlockPlan(MaskSpec(causal, window, g), length, bq, bk, seg).pairs()
               for h, g in zip(n, halves, strict=True) if h)


def _block_sizes(block_size: int | tuple[int, int] | None, length: int) -> tuple[int, int]:
    if block_size is None:
        return default_block_sizes(length)
    if isinstance(block_size, int):
        bq, bk = block_size, max(block_size, DEFAULT_BLOCK_K)
    else:
        bq, bk = (int(x) for x in block_size)
    if bq < 1 or bk < 1:
        raise ConfigError(f"attention block_size must be positive, got {block_size!r}.")
    return bq, bk


def check_inputs(q: mx.array, k: mx.array, v: mx.array, scale: float | None, window: int | None,
                 segment_ids: mx.array | None = None, s2_group: int | None = None) -> float:
    """Raise :class:`ConfigError` unless q (B, H, L, D), k and v (B, Hkv, L, D) with H % Hkv == 0,
    ``window`` is None or >= 1, ``segment_ids`` None or (B, L) integers and ``s2_group``
    None or an int >= 1; return the softmax scale (default 1/sqrt(D))."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ConfigError(f"attention expects q, k, v of shape (B, H, L, D); got {q.shape}, "
                          f"{k.shape}, {v.shape}.")
    B, H, L, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2] != L or k.shape[3] != D:
        raise ConfigError(f"attention: k {k.shape} and v {v.shape} must be (B, Hkv, L, D) "
                          f"matching q {q.shape}.")
    if H % k.shape[1] != 0:
        raise ConfigError(f"attention: query heads {H} must be a multiple of KV heads {k.shape[1]}.")
    if window is not None and window < 1:
        raise ConfigError(f"attention window must be >= 1 or None, got {window}.")
    if segment_ids is not None and (tuple(segment_ids.shape) != (B, L)
                                    or not mx.issubdtype(segment_ids.dtype, mx.integer)):
        raise ConfigError(f"attention segment_ids must be integers of shape (B, L) = {(B, L)}, got "
                          f"{segment_ids.dtype} {tuple(segment_ids.shape)}; pass the batch's segment ids.")
    if s2_group is not None and (isinstance(s2_group, bool) or not isinstance(s2_group, int) or s2_group < 1):
        raise ConfigError(f"attention s2_group must be a whole number of tokens >= 1 or None, got {s2_group!r}.")
    return 1.0 / math.sqrt(D) if scale is None else float(scale)
