"""Chunked cross-entropy: value and gradients against the naive full-logits CE, and memory
that grows with the chunk, not with L * vocab.

The reference is ``mlx.nn.losses.cross_entropy`` on the whole (B, L, V) logits
(``loss.cross_entropy_reference``), differentiated by ``mx.grad``: independent of the
hand-written softmax gradient under test.
"""

import mlx.core as mx
import mlx.nn as nn
import pytest
from conftest import fp32_tol
from mlx.utils import tree_flatten

from mozgach_mlx import loss
from mozgach_mlx.errors import ConfigError


class Head(nn.Module):
    """Just an output head: ``logits(h)`` like our models (untied lm_head or tied embedding)."""

    def __init__(self, d: int, vocab: int, tied: bool = False, quantized: bool = False):
        super().__init__()
        self.tied = tied
        if tied:
            self.model = nn.Module()
            self.model.embed_tokens = nn.Embedding(vocab, d)
        else:
            self.lm_head = nn.Linear(d, vocab, bias=False)
            if quantized:
                self.lm_head = nn.QuantizedLinear.from_linear(self.lm_head, group_size=32, bits=4)

    def logits(self, h):
        return self.model.embed_tokens.as_linear(h) if self.tied else self.lm_head(h)


def _batch(B, L, d, V, seed=1):
    k1, k2, k3 = mx.random.split(mx.random.key(seed), 3)
    h = mx.random.normal((B, L, d), key=k1)
    t = mx.random.randint(0, V, (B, L), key=k2)
    m = mx.random.uniform(shape=(B, L), key=k3) > 0.3
    t = mx.where(m, t, -100)  # ignored positions may hold HF's ignore index
    return h, t, m


@pytest.mark.parametrize("chunk", [1, 8, 37, 1000])
def test_value_and_grad_equal_naive(chunk):
    model = Head(32, 97)
    model.freeze()
    h, t, m = _batch(2, 37, 32, 97)  # L=37 is not a multiple of the chunk

    def chunked(h):
        return loss.chunked_cross_entropy(model, h, t, m, chunk=chunk)[0]

    def naive(h):
        return loss.cross_entropy_reference(model, h, t, m)[0]

    v, g = mx.value_and_grad(chunked)(h)
    v_ref, g_ref = mx.value_and_grad(naive)(h)
    n = loss.chunked_cross_entropy(model, h, t, m, chunk=chunk)[1]
    assert n.item() == m.sum().item()
    assert abs(v.item() - v_ref.item()) < 1e-4 * abs(v_ref.item())
    assert mx.allclose(g, g_ref, rtol=1e-4, atol=1e-6).item()
    v_eval, _ = loss.chunked_cross_entropy(model, h, t, m, chunk=chunk, with_grad=False)
    assert abs(v_eval.item() - v_ref.item()) < 1e-4 * abs(v_ref.item())


def test_grad_flows_to_trainable_tied_embedding():
    # train_embeddings with tied weights: the head's weight is trainable and must get
    # the same gradient as with full logits.
    model = Head(16, 50, tied=True)
    h, t, m = _batch(1, 29, 16, 50, seed=3)

    def chunked(model, h):
        return loss.chunked_cross_entropy(model, h, t, m, chunk=7)[0]

    def naive(model, h):
        return loss.cross_entropy_reference(model, h, t, m)[0]

    v, g = nn.value_and_grad(model, chunked)(model, h)
    v_ref, g_ref = nn.value_and_grad(model, naive)(model, h)
    assert abs(v.item() - v_ref.item()) < 1e-4 * abs(v_ref.item())
    (name, gw), (_, gw_ref) = tree_flatten(g)[0], tree_flatten(g_ref)[0]
    assert name == "model.embed_tokens.weight"
    assert mx.allclose(gw, gw_ref, rtol=1e-4, atol=1e-6).item()
    # the model's parameters are the caller's again after the call
    assert tree_flatten(model.parameters())[0][1] is model.model.embed_tokens.weight


def test_quantized_head_grad():
    model = Head(64, 40, quantized=True)
    h, t, m = _batch(1, 19, 64, 40, seed=5)
    g = mx.grad(lambda h: loss.chunked_cross_entropy(model, h, t, m, chunk=5)[0])(h)
    g_ref = mx.grad(lambda h: loss.cross_entropy_reference(model, h, t, m)[0])(h)
    assert mx.allclose(g, g_ref, rtol=1e-3, atol=1e-5).item()


def test_sequence_loss_on_mlx_lm_model():
    from mlx_lm.models import llama

    args = llama.ModelArgs(
        model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=61,
        tie_word_embeddings=False,
    )  # fmt: skip
    model = llama.Model(args)
    ids = mx.random.randint(0, 61, (2, 24))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    mask = mx.ones(targets.shape, dtype=mx.bool_)
    v, n = loss.sequence_loss(model, inputs, targets, mask, chunk=5)
    ref = nn.losses.cross_entropy(model(inputs).astype(mx.float32), targets, reduction="sum")
    assert n.item() == targets.size
    assert abs(v.item() - ref.item()) < 1e-4 * ref.item()


def test_auto_chunk_keeps_one_buffer_near_64_mib():
    assert loss.auto_chunk(32000) == 512 and loss.auto_chunk(128256) == 128
    assert loss.auto_chunk(152064) == 64 and loss.auto_chunk(128256, batch=4) == 64
    assert loss.auto_chunk(259) == 1024
    model = Head(16, 50)
    h, t, m = _batch(2, 9, 16, 50)
    v, _ = loss.chunked_cross_entropy(model, h, t, m)  # default chunk
    assert abs(v.item() - loss.cross_entropy_reference(model, h, t, m)[0].item()) < 1e-4


@pytest.mark.parametrize("chunk", [None, 1, 4, 37])
def test_row_losses_equal_naive_per_row(chunk):
    # Reference: the full-logits CE of each row on its own (B = 1), weights as given.
    model = Head(24, 53)
    h, t, m = _batch(3, 23, 24, 53, seed=9)
    w = m.astype(mx.float32) * mx.random.uniform(0.5, 2.0, m.shape, key=mx.random.key(2))  # weighted tokens
    sums, counts = loss.row_losses(model, h, t, w, chunk=chunk)
    assert sums.shape == (3,) and counts.shape == (3,)
    for b in range(3):
        ref_sum, ref_n = loss.cross_entropy_reference(model, h[b : b + 1], t[b : b + 1], w[b : b + 1])
        assert abs(sums[b].item() - ref_sum.item()) < 1e-4 * abs(ref_sum.item())
        # token counts are fp32 sums of positive weights (a row reduction here, a full one in
        # the reference; one row sum plus 3 row sums for the total): other orders of one sum,
        # so equal up to fp32_tol over the number of terms (was rel=1e-6, ~8 eps: tighter
        # than what reordering a 69-term sum may give)
        assert counts[b].item() == pytest.approx(ref_n.item(), abs=fp32_tol(ref_n.item(), w.shape[1]))
    # the rows add up to the scalar loss of the whole batch
    total, n = loss.chunked_cross_entropy(model, h, t, w, chunk=chunk, with_grad=False)
    assert abs(sums.sum().item() - total.item()) < 1e-5 * abs(total.item())
    assert counts.sum().item() == pytest.approx(n.item(), abs=fp32_tol(n.item(), w.size))
    with pytest.raises(ConfigError):
        loss.row_losses(model, h, t, w, chunk=0)


@pytest.mark.parametrize("chunk", [None, 1, 5, 37])
def test_token_losses_equal_naive_per_position(chunk):
    # Reference: the full-logits CE of each single position (mask one-hot at it).
    model = Head(24, 53, tied=True)
    h, t, _ = _batch(2, 11, 24, 53, seed=4)
    t = mx.abs(t) % 53  # every position scored
    got = loss.token_losses(model, h, t, chunk=chunk)
    assert got.shape == (2, 11)
    for b in range(2):
        for i in range(11):
            onehot = (mx.arange(11) == i)[None]
            ref, _ = loss.cross_entropy_reference(model, h[b : b + 1], t[b : b + 1], onehot)
            assert got[b, i].item() == pytest.approx(ref.item(), rel=1e-5)
    with pytest.raises(ConfigError):
        loss.token_losses(model, h, t, chunk=0)


def test_auto_chunk_minimum_bounds_the_buffer_for_many_rows():
    # 128K vocab x 64 rows: 64 positions would be a 2 GiB buffer; floor 1 keeps it at 64 MiB.
    assert loss.auto_chunk(131072, batch=64) == 64
    assert loss.auto_chunk(131072, batch=64, minimum=1) == 2
    assert loss.auto_chunk(131072, batch=4, minimum=1) == 32  # under 64: not rounded down to 0
    assert loss.auto_chunk(32000, minimum=1) == loss.auto_chunk(32000) == 512  # large enough: unchanged
    assert loss.auto_chunk(2**24, batch=4, minimum=1) == 1


def test_bad_chunk():
    model = Head(8, 10)
    h, t, m = _batch(1, 4, 8, 10)
    with pytest.raises(ConfigError):
        loss.chunked_cross_entropy(model, h, t, m, chunk=0)
    with pytest.raises(ConfigError):
        loss.chunked_cross_entropy(model, h, t, m, chunk=2.5)


def _peak_of_step(model, L, chunk, d, V):
    h, t, m = _batch(1, L, d, V, seed=7)
    mx.eval(h, t, m)
    step = mx.value_and_grad(lambda h: loss.chunked_cross_entropy(model, h, t, m, chunk=chunk)[0])
    mx.synchronize()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    v, g = step(h)
    mx.eval(v, g)
    return mx.get_peak_memory() - base


def test_peak_memory_grows_with_chunk_not_with_L_times_vocab():
    # 32K vocab: full fp32 logits at L=2048 are 250 MiB (and the naive VJP holds ~4 such
    # buffers); one chunk of 64 positions is 8 MiB.
    d, V = 64, 32000
    model = Head(d, V)
    model.freeze()
    mx.eval(model.parameters())
    full_logits = 2048 * V * 4
    p_short = _peak_of_step(model, 512, 64, d, V)
    p_long = _peak_of_step(model, 2048, 64, d, V)
    p_big_chunk = _peak_of_step(model, 1024, 256, d, V)
    # L x4: only the O(L * d) hidden-gradient part may grow (2048*64*4 B = 0.5 MiB per copy).
    assert p_long < p_short + 8 * 2048 * d * 4, (p_short, p_long)
    assert p_long < 0.5 * full_logits, (p_long, full_logits)
    # chunk x4: the (chunk, V) buffers dominate, so the peak grows with the chunk.
    assert p_big_chunk > 2 * p_long, (p_long, p_big_chunk)
