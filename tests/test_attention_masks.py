"""Masks of the blockwise attention: segment ids (packed documents), sliding windows,
S²-Attn groups, and their combinations, against independent references; block skipping.

Expected values come from ``reference_attention`` (naive fp32, the whole (B, H, L, L)
mask built from the definitions) differentiated by MLX's autograd, and, for S²-Attn, from
a float64 NumPy transcription of LongLoRA's shift-and-group procedure (below). Bound:
fp32 relative error ``max|ours - ref| <= 1e-5 * max|ref|``, values and gradients (with
``max|ref|`` floored at 1: with groups of one token dQ is exactly 0 in the reference and
~1e-6 in ours, the rounding of p = 1 - O(1e-7) times O(1) values).

Block skipping is checked on the lazy graph itself: one fwd+bwd holds exactly 7 matmuls
per computed (query block, key block) pair (2 forward, 5 backward), so counting the
Matmul nodes of ``mx.export_to_dot`` counts the blocks actually computed.
"""

from __future__ import annotations

import io

import mlx.core as mx  # conftest imported mozgach_mlx first (fast BLAS)
import numpy as np
import pytest

from mozgach_mlx import attention as A
from mozgach_mlx.attention import blockwise, masks
from mozgach_mlx.errors import ConfigError

SMALL_BLOCKS = (32, 64)
REL = 1e-5


def _inputs(B, H, Hkv, L, D=64, seed=0):
    kq, kk, kv, kw = mx.random.split(mx.random.key(seed), 4)
    q = mx.random.normal((B, H, L, D), key=kq)
    k = mx.random.normal((B, Hkv, L, D), key=kk)
    v = mx.random.normal((B, Hkv, L, D), key=kv)
    w = mx.random.normal((B, H, L, D), key=kw)  # the upstream gradient dO
    return q, k, v, w


def _value_and_grads(fn, q, k, v, w, **kw):
    def loss(q, k, v):
        return (fn(q, k, v, **kw) * w).sum()

    o = fn(q, k, v, **kw)
    grads = mx.grad(loss, argnums=(0, 1, 2))(q, k, v)
    mx.eval(o, grads)
    return (o, *grads)


def _assert_close(ours, ref, what=""):
    for name, a, b in zip(("o", "dq", "dk", "dv"), ours, ref, strict=True):
        assert a.shape == b.shape, (what, name)
        err = float(mx.abs(a - b).max())
        assert err <= REL * max(1.0, float(mx.abs(b).max())), (what, name, err)


def _segments(lengths, B=1):
    """(B, sum(lengths)) int32: document d (of length lengths[d]) has id d."""
    row = np.repeat(np.arange(len(lengths)), lengths)
    return mx.array(np.tile(row, (B, 1)).astype(np.int32))


# Segment borders inside blocks, single-token segments, a segment longer than a block.
ODD_DOCS = [1, 60, 3, 1, 1, 100, 90, 1, 43]  # L = 300, not a multiple of 32 or 64


# ------------------------------------------------------------------ values and gradients


@pytest.mark.parametrize("H,Hkv", [(1, 1), (4, 1), (8, 2), (6, 3)])
@pytest.mark.parametrize("causal", [True, False])
def test_segments_match_reference(H, Hkv, causal):
    seg = _segments(ODD_DOCS)
    q, k, v, w = _inputs(1, H, Hkv, seg.shape[1])
    kw = dict(causal=causal, segment_ids=seg)
    ours = _value_and_grads(A.blockwise_attention, q, k, v, w, block_size=SMALL_BLOCKS, **kw)
    _assert_close(ours, _value_and_grads(A.reference_attention, q, k, v, w, **kw))


def test_segments_batch_rows_differ_and_ids_need_not_be_sorted():
    """Two rows with different layouts (one of them arbitrary, repeating labels) and the
    default block sizes."""
    rng = np.random.default_rng(3)
    L = 700
    row0 = np.repeat(np.arange(7), [100, 1, 299, 50, 50, 1, 199])
    row1 = rng.integers(0, 3, L)  # labels, not runs: a token sees every earlier token of its label
    seg = mx.array(np.stack([row0, row1]).astype(np.int32))
    q, k, v, w = _inputs(2, 4, 2, L)
    for block in (None, SMALL_BLOCKS):
        ours = _value_and_grads(A.blockwise_attention, q, k, v, w, segment_ids=seg, block_size=block)
        _assert_close(ours, _value_and_grads(A.reference_attention, q, k, v, w, segment_ids=seg), block)


@pytest.mark.parametrize("L,group", [(301, 70), (256, 64), (300, 7), (300, 1), (300, 299), (300, 300)])
@pytest.mark.parametrize("H,Hkv", [(8, 2), (6, 3), (3, 1), (1, 1)])
def test_s2_matches_reference(L, group, H, Hkv):
    """Group sizes that do not divide L, odd groups (odd half-shift), GQA where the head
    split falls between KV heads (8/2) and inside a KV group (6/3, 3/1), one head."""
    q, k, v, w = _inputs(1, H, Hkv, L, D=32)
    ours = _value_and_grads(A.blockwise_attention, q, k, v, w, s2_group=group, block_size=SMALL_BLOCKS)
    _assert_close(ours, _value_and_grads(A.reference_attention, q, k, v, w, s2_group=group))


@pytest.mark.parametrize("kw", [
    dict(window=37, segment_ids=_segments(ODD_DOCS)),
    dict(s2_group=70, segment_ids=_segments(ODD_DOCS)),
    dict(s2_group=70, window=50),
    dict(s2_group=64, window=20, segment_ids=_segments(ODD_DOCS), causal=False),
])
def test_combined_patterns_match_reference(kw):
    q, k, v, w = _inputs(1, 8, 2, 300)
    ours = _value_and_grads(A.blockwise_attention, q, k, v, w, block_size=SMALL_BLOCKS, **kw)
    _assert_close(ours, _value_and_grads(A.reference_attention, q, k, v, w, **kw), sorted(kw))


def test_flash_attention_passes_the_mask_through():
    seg = _segments(ODD_DOCS)
    q, k, v, w = _inputs(1, 4, 2, 300)
    kw = dict(segment_ids=seg, s2_group=64, window=100)
    _assert_close(_value_and_grads(A.flash_attention, q, k, v, w, **kw),
                  _value_and_grads(A.reference_attention, q, k, v, w, **kw))


def test_single_segment_and_whole_sequence_group_equal_causal():
    q, k, v, w = _inputs(1, 4, 2, 200)
    causal = _value_and_grads(A.reference_attention, q, k, v, w)
    one = mx.full((1, 200), 5, mx.int32)
    _assert_close(_value_and_grads(A.blockwise_attention, q, k, v, w, segment_ids=one), causal)
    _assert_close(_value_and_grads(A.blockwise_attention, q, k, v, w, s2_group=200), causal)


# ------------------------------------------------------------------ documents alone


def _each_document_alone(q, k, v, w, lengths, block=None):
    """Values and grads of causal attention run on each document's slice separately."""
    parts = []
    a = 0
    for n in lengths:
        sl = slice(a, a + n)
        parts.append(_value_and_grads(A.blockwise_attention, q[:, :, sl], k[:, :, sl], v[:, :, sl],
                                      w[:, :, sl], block_size=block))
        a += n
    return [mx.concatenate([p[i] for p in parts], axis=2) for i in range(4)]


def test_packed_documents_equal_each_document_alone():
    q, k, v, w = _inputs(1, 8, 2, sum(ODD_DOCS))
    ours = _value_and_grads(A.blockwise_attention, q, k, v, w, segment_ids=_segments(ODD_DOCS),
                            block_size=SMALL_BLOCKS)
    _assert_close(ours, _each_document_alone(q, k, v, w, ODD_DOCS, SMALL_BLOCKS))


def test_32_documents_of_1k_equal_each_document_alone():
    """The benchmark's packing (32K tokens from 32 documents of 1K), fewer heads."""
    lengths = [1024] * 32
    q, k, v, w = _inputs(1, 2, 1, 32768, D=32)
    ours = _value_and_grads(A.blockwise_attention, q, k, v, w, segment_ids=_segments(lengths))
    _assert_close(ours, _each_document_alone(q, k, v, w, lengths))


# ------------------------------------------------------------------ S² as LongLoRA defines it


def _np_causal(q, k, v):
    """float64 causal softmax attention over the last two axes of (..., n, D)."""
    s = q @ k.swapaxes(-1, -2) / np.sqrt(q.shape[-1])
    n = s.shape[-1]
    s = np.where(np.tril(np.ones((n, n), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def _longlora_s2(q, k, v, group):
    """LongLoRA's S²-Attn (arXiv 2309.12307, its llama_attn_replace.py), transcribed in NumPy:
    repeat KV heads, roll the last H // 2 heads by ``-group // 2`` along the sequence,
    split into L // group groups, causal attention per group, roll back.
    Shapes: q (H, L, D), k, v (Hkv, L, D) -> (H, L, D)."""
    H, L, D = q.shape
    k, v = np.repeat(k, H // k.shape[0], axis=0), np.repeat(v, H // v.shape[0], axis=0)
    shift = -group // 2
    qkv = [np.concatenate([x[: H // 2], np.roll(x[H // 2:], shift, axis=1)]) for x in (q, k, v)]
    grouped = [x.reshape(H, L // group, group, D) for x in qkv]
    out = _np_causal(*grouped).reshape(H, L, D)
    return np.concatenate([out[: H // 2], np.roll(out[H // 2:], -shift, axis=1)])


@pytest.mark.parametrize("H,Hkv,group", [(4, 2, 64), (8, 2, 50), (4, 4, 31)])
def test_s2_is_longloras_shift_without_the_wrap_around(H, Hkv, group):
    """Equal to LongLoRA's roll everywhere except where its roll wraps: the shifted heads'
    first ceil(group/2) and last group - ceil(group/2) positions, which LongLoRA puts in
    one group (so, causally, the sequence's first tokens would see its last ones)."""
    L = 4 * group
    q, k, v, _ = _inputs(1, H, Hkv, L, D=32)
    ours = np.array(A.blockwise_attention(q, k, v, s2_group=group, block_size=SMALL_BLOCKS))[0]
    theirs = _longlora_s2(*(np.array(x, np.float64)[0] for x in (q, k, v)), group)
    half = -(-group // 2)
    np.testing.assert_allclose(ours[: H // 2], theirs[: H // 2], rtol=0, atol=1e-5)
    inner = slice(half, L - (group - half))
    np.testing.assert_allclose(ours[H // 2:, inner], theirs[H // 2:, inner], rtol=0, atol=1e-5)
    assert np.abs(ours[H // 2:, :half] - theirs[H // 2:, :half]).max() > 1e-2  # the wrap differs


# ------------------------------------------------------------------ block skipping


def _matmuls_of_fwd_bwd(L, H=2, Hkv=1, **kw):
    q, k, v, _ = _inputs(1, H, Hkv, L, D=32)
    grads = mx.grad(lambda q, k, v: A.blockwise_attention(q, k, v, **kw).sum(), argnums=(0, 1, 2))(q, k, v)
    f = io.StringIO()
    mx.export_to_dot(f, *grads)
    return f.getvalue().count('"Matmul"')


def _computed_blocks(L, spec, seg=None, block=(blockwise.DEFAULT_BLOCK_Q, blockwise.DEFAULT_BLOCK_K)):
    plan = masks.BlockPlan(spec, L, *block, None if seg is None else np.asarray(seg))
    return int((plan.kind != masks.SKIP).sum())


def test_graph_computes_only_the_planned_blocks():
    L = 4096
    nq, nk = L // blockwise.DEFAULT_BLOCK_Q, L // blockwise.DEFAULT_BLOCK_K
    causal = _matmuls_of_fwd_bwd(L)
    assert causal == 7 * _computed_blocks(L, masks.MaskSpec()) < 7 * nq * nk * 0.6
    # Sliding window of 256: each query block reaches at most two key blocks.
    window = _matmuls_of_fwd_bwd(L, window=256)
    assert window == 7 * _computed_blocks(L, masks.MaskSpec(window=256)) <= 7 * 2 * nq
    # 8 documents of 512: a query block computes only its own document's key block.
    seg = _segments([512] * 8)
    docs = _matmuls_of_fwd_bwd(L, segment_ids=seg)
    assert docs == 7 * nq == 7 * _computed_blocks(L, masks.MaskSpec(), seg)
    # S² group 1024 over two heads: each half (one head, half-size matmuls) computes its
    # groups only, a third of the causal blocks.
    s2 = _matmuls_of_fwd_bwd(L, s2_group=1024)
    halves = masks.s2_halves(1024, L)
    assert s2 == 7 * sum(_computed_blocks(L, masks.MaskSpec(groups=g)) for g in halves)
    assert s2 / 2 < causal * 0.35


def test_computed_pairs_counts_what_the_masks_leave():
    L = 32768
    causal = A.computed_pairs(L, heads=8)
    assert 8 * L * L / 2 < causal < 8 * L * L / 2 * 1.02  # diagonal blocks are computed whole
    docs = A.computed_pairs(L, heads=8, segment_ids=np.repeat(np.arange(32), 1024))
    assert causal / docs > 20  # 32 documents: ~1/32 of the pairs, plus diagonal blocks
    s2 = A.computed_pairs(L, heads=8, s2_group=8192)
    assert 4.0 < causal / s2 < 4.5  # groups of L/4: 1/4, a little more for the shifted half
    window = A.computed_pairs(L, heads=8, window=4096)
    assert 4096 * L * 8 <= window < (4096 + 2 * 512) * L * 8


def test_segments_under_compile_are_correct_without_skipping():
    """mx.compile cannot read the ids on the host: every block is masked, none skipped."""
    seg = _segments(ODD_DOCS)
    q, k, v, w = _inputs(1, 4, 2, 300)

    def loss(q, k, v, seg):
        return (A.flash_attention(q, k, v, segment_ids=seg, block_size=SMALL_BLOCKS) * w).sum()

    got = mx.compile(mx.grad(loss, argnums=(0, 1, 2)))(q, k, v, seg)
    ref = _value_and_grads(A.reference_attention, q, k, v, w, segment_ids=seg)
    _assert_close([ref[0], *got], ref)


# ------------------------------------------------------------------ arguments


def test_s2_group_tokens():
    assert A.s2_group_tokens(None, 1000) is None
    assert A.s2_group_tokens(0.25, 32768) == 8192
    assert A.s2_group_tokens(0.25, 3) == 1
    assert A.s2_group_tokens(8192, 1000) == 8192
    assert A.s2_group_tokens(512.0, 1000) == 512
    for bad in (0, -1, 1.5, True, "8k"):
        with pytest.raises(ConfigError, match="s2_group"):
            A.s2_group_tokens(bad, 1000)


def test_bad_mask_arguments_raise_config_error():
    q, k, v, _ = _inputs(1, 4, 2, 16)
    with pytest.raises(ConfigError, match="segment_ids"):
        A.flash_attention(q, k, v, segment_ids=mx.zeros((1, 15), mx.int32))
    with pytest.raises(ConfigError, match="segment_ids"):
        A.flash_attention(q, k, v, segment_ids=mx.zeros((1, 16), mx.float32))
    for bad in (0, 2.0, True):
        with pytest.raises(ConfigError, match="s2_group"):
            A.flash_attention(q, k, v, s2_group=bad)
