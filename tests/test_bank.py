"""AdapterBank: switching, mixing, per-row adapters, routing and cached generation.

References are independent of the bank: a fresh tiny model with the one adapter loaded
by ``lora.load`` (switching, per-row), the base weights with the weighted deltas fused
in numpy (mixing), and greedy decoding that recomputes the whole sequence every step
(generation).
"""

import dataclasses
import inspect

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import fp32_tol
from mlx.utils import tree_flatten

import mozgach_mlx as mz
from mozgach_mlx import lora, synthetic
from mozgach_mlx.bank import AdapterBank, BankLinear, GenerationConfig
from mozgach_mlx.bank.layer import stack_deltas
from mozgach_mlx.bank.scoring import batch_spans
from mozgach_mlx.errors import AdapterError
from mozgach_mlx.models import paths

TEXT = "the quick brown fox jumps over the lazy dog"

# name: (rank, targets, format, rslora) -- different ranks, targets and layouts in one bank
SPECS = {
    "a": (4, ("q_proj", "k_proj", "v_proj", "o_proj"), "mlx-lm", False),
    "b": (8, ("q_proj", "v_proj"), "peft", False),
    "c": (4, ("o_proj", "down_proj"), "both", True),
}


def make_adapter(path, seed, r=4, targets=("q_proj", "v_proj"), fmt="both", rslora=False, sigma=0.3,
                 rope=None):
    """Save an adapter with random A (LoRA init) and random nonzero B over the tiny base."""
    model, _ = mz.load("tiny", rope_scaling=rope)
    lora.apply(model, lora.LoRAConfig(r=r, alpha=2.0 * r, dropout=0.0, targets=targets, rslora=rslora),
               seed=seed)
    flat = [(k, v) for k, v in tree_flatten(model.trainable_parameters()) if k.endswith("lora_b")]
    keys = mx.random.split(mx.random.key(seed + 1000), len(flat))
    model.load_weights([(k, sigma * mx.random.normal(v.shape, key=kk)) for (k, v), kk in zip(flat, keys, strict=True)],
                       strict=False)
    lora.save(model, path, format=fmt)
    return path


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {n: make_adapter(root / n, seed=i + 1, r=r, targets=t, fmt=f, rslora=rs)
            for i, (n, (r, t, f, rs)) in enumerate(SPECS.items())}


@pytest.fixture
def bank(adapters):
    model, tok = mz.load("tiny")
    with AdapterBank(model, tok, list(adapters.values())) as b:
        yield b


def ids_of(tok, text):
    return mx.array([tok.encode(text)])


def logits_tol(model, logits):
    """How far the model's logits computed two ways (same sums in other orders or groupings:
    BLAS blocking, batch shape, gathered vs. concatenated adapter matmuls, fused vs. separate
    deltas) may differ in fp32: :func:`conftest.fp32_tol` at the logits' magnitude, one
    d-length reduction per block (to first order the blocks' rounding adds up). ~8e-4 for
    the tiny model; measured differences are 1e-5 .. 5e-5, and a mixing weight off by 2e-4
    (0.5001 for 0.5) already moves the logits by 4e-3."""
    return fp32_tol(mx.abs(logits).max().item(), model.args.hidden_size * model.args.num_hidden_layers)


def reference_model(adapter_dir=None, **kw):
    model, tok = mz.load("tiny", **kw)
    if adapter_dir is not None:
        lora.load(model, adapter_dir)
    model.eval()
    return model, tok


def test_switching_equals_lora_load(bank, adapters):
    x = ids_of(bank.tok, TEXT)
    for name, d in adapters.items():
        ref, _ = reference_model(d)
        with bank.use(name):
            got = bank.model(x)
        assert mx.abs(got - ref(x)).max().item() <= 1e-5, name
    base, _ = reference_model()
    with bank.use(None):
        assert mx.abs(bank.model(x) - base(x)).max().item() == 0.0
    # the model outside any `use` block is the base
    assert mx.abs(bank.model(x) - base(x)).max().item() == 0.0


def test_stacks_are_padded_to_the_largest_rank(bank):
    layer = bank.model.layers[0].self_attn.q_proj
    assert isinstance(layer, BankLinear)
    assert layer.lora_a.shape == (3, 256, 8) and layer.lora_b.shape == (3, 8, 256)
    np.testing.assert_array_equal(np.array(layer.lora_a[0, :, 4:]), 0)  # "a": r=4, padded
    np.testing.assert_array_equal(np.array(layer.lora_a[2]), 0)  # "c" does not adapt q_proj
    assert bank.ranks == [4, 8, 4]
    np.testing.assert_allclose(bank.scales, [2.0, 2.0, 8.0 / 2.0])  # alpha/r, alpha/r, alpha/sqrt(r)


def test_close_restores_the_model(adapters):
    model, tok = mz.load("tiny")
    before = {p: type(m) for p, m in model.named_modules()}
    x = ids_of(tok, TEXT)
    y0 = model(x)
    bank = AdapterBank(model, tok, list(adapters.values()))
    bank.close()
    assert {p: type(m) for p, m in model.named_modules()} == before
    assert mx.abs(model(x) - y0).max().item() == 0.0
    with pytest.raises(AdapterError, match="closed"):
        bank.loss(TEXT, adapter="a")
    # an empty bank is the base model (what `mozgach generate` without --adapter uses)
    model.train()
    with AdapterBank(model, tok, []) as empty:
        assert not model.training
        assert empty.generate("ab", max_tokens=5, return_ids=True) == _greedy_recompute(model, tok.encode("ab"), 5)
        assert empty.loss(TEXT) == pytest.approx(bank_free_loss(model, tok, TEXT), abs=1e-5)
    assert model.training


def test_bank_over_a_model_with_lora_layers_uses_their_base(adapters):
    model, tok = reference_model(adapters["b"])  # q/v are LoRALinear now
    x = ids_of(tok, TEXT)
    with AdapterBank(model, tok, [adapters["a"]]) as bank:
        ref, _ = reference_model(adapters["a"])
        with bank.use("a"):
            assert mx.abs(model(x) - ref(x)).max().item() <= 1e-5
    assert isinstance(model.layers[0].self_attn.q_proj, lora.LoRALinear)


def bank_free_loss(model, tok, text):
    ids = mx.array([tok.encode(text) + [tok.eos_token_id]])
    logits = model(ids[:, :-1])
    return nn.losses.cross_entropy(logits, ids[:, 1:]).mean().item()


def _fused_reference(adapters, weights):
    """A plain model whose adapted weights are W + sum_i w_i s_i B_i^T A_i^T (numpy)."""
    model, tok = mz.load("tiny")
    model.eval()
    deltas = {}
    for name, w in weights.items():
        cfg, tensors, _ = lora.read(model, adapters[name])
        for k, v in tensors.items():
            if k.endswith(".lora_a"):
                path = k[: -len(".lora_a")]
                a, b = np.array(v, np.float64), np.array(tensors[path + ".lora_b"], np.float64)
                deltas[path] = deltas.get(path, 0.0) + w * cfg.scale * (b.T @ a.T)  # (out, in)
    updates = []
    for path, d in deltas.items():
        layer = paths.get_module(model, path)
        updates.append((path + ".weight", mx.array((np.array(layer.weight, np.float64) + d).astype(np.float32))))
    model.load_weights(updates, strict=False)
    return model


def test_mix_is_the_exact_weighted_sum_of_deltas(bank, adapters):
    weights = {"a": 0.5, "b": -1.25, "c": 2.0}
    x = ids_of(bank.tok, TEXT)
    ref = _fused_reference(adapters, weights)
    m = bank.mix(weights)
    with bank.use(m):
        got = bank.model(x)
    # W x + sum_i w_i s_i (x A_i) B_i against (W + sum_i ...) x with the fused weight rounded
    # to fp32: the same sums, grouped differently (was a fixed 1e-4; 5e-5 measured)
    assert mx.abs(got - ref(x)).max().item() <= logits_tol(bank.model, got)
    with m:  # the handle is also a context
        assert mx.abs(bank.model(x) - got).max().item() == 0.0
    # a mix of one adapter with weight 1 is that adapter
    with bank.use({"b": 1.0}):
        one = bank.model(x)
    with bank.use("b"):
        assert mx.abs(one - bank.model(x)).max().item() <= 1e-5
    # and it is not the model of averaged A and B matrices
    avg = {"a": 0.5, "b": 0.5}
    with bank.use(bank.mix(avg)):
        mixed = bank.model(x)
    assert mx.abs(mixed - _fused_reference(adapters, avg)(x)).max().item() <= logits_tol(bank.model, mixed)


def test_mix_at_the_layer_level_against_numpy(bank):
    layer = bank.model.layers[1].self_attn.v_proj
    x = mx.random.normal((2, 5, 256))
    w = {"a": 0.3, "c": 0.7, "b": -0.2}
    with bank.use(bank.mix(w)):
        got = np.array(layer(x))
    xn = np.array(x, np.float64)
    want = np.array(layer.linear(x), np.float64)
    for name, wi in w.items():
        i = bank.index(name)
        a, b = np.array(layer.lora_a[i], np.float64), np.array(layer.lora_b[i], np.float64)
        want = want + wi * bank.scales[i] * (xn @ a) @ b
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_per_row_adapters_equal_one_at_a_time(bank):
    tok = bank.tok
    x = mx.concatenate([ids_of(tok, TEXT)] * 4)  # (4, L)
    rows = ["c", None, "a", {"a": 0.5, "b": 0.5}]
    with bank.use(rows):
        batched = bank.model(x)
    # The per-row path (gathered A/B, padded ranks, a (B, K) sum) and the single-selection
    # paths (unpadded A/B; a concatenated (in, K*r) matmul for a mix) are the same sums in
    # other orders, on another batch shape: equal up to fp32 rounding (logits_tol; 1.5e-5
    # measured for the mix, 0 for the others on one CPU, so no measured error of the base
    # can stand in for the bound).
    tol = logits_tol(bank.model, batched)
    for r, adapter in enumerate(rows):
        with bank.use(adapter):
            single = bank.model(x[r : r + 1])
        assert mx.abs(batched[r : r + 1] - single).max().item() <= tol, adapter
    # losses: the batched matrix equals separate calls
    texts = [TEXT, "hello there", "x"]
    L = bank.losses(texts, adapters=[None, "a", "b", "c"], batch_tokens=64)
    for t, text in enumerate(texts):
        for k, adapter in enumerate([None, "a", "b", "c"]):
            assert L[t, k] == pytest.approx(bank.loss(text, adapter=adapter), abs=1e-4)


def test_loss_equals_reference_cross_entropy(bank, adapters):
    ref, tok = reference_model(adapters["c"])
    ids = np.array(tok.encode(TEXT) + [tok.eos_token_id])
    logits = np.array(ref(mx.array(ids[None, :-1]))[0], np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(
        1, keepdims=True)
    want = -logp[np.arange(len(ids) - 1), ids[1:]].mean()
    assert bank.loss(TEXT, adapter="c") == pytest.approx(want, abs=1e-4)
    # a list of texts: the token-weighted mean
    assert bank.loss([TEXT, TEXT], adapter=["c", "c"]) == pytest.approx(want, abs=1e-4)


def test_route_by_loss_picks_the_adapter_that_wrote_the_text(bank):
    # Each adapter's "domain" is text sampled from the model with that adapter: its own
    # adapter gives it the lowest loss (by construction, with a clear margin).
    tok = bank.tok
    names = [n for n in bank.names for _ in range(3)]
    gen = bank.generate("", adapter=names, max_tokens=32, temperature=1.0, seed=0, return_ids=True)
    seqs = [(np.array([tok.bos_token_id, *g], np.int32), np.array([False] + [True] * len(g))) for g in gen]
    keep = [i for i, g in enumerate(gen) if len(g) >= 16]
    assert len(keep) >= 6
    routed = bank.route([seqs[i] for i in keep])
    assert [r[0] for r in routed] == [names[i] for i in keep]
    top3 = bank.route(seqs[keep[0]], top_k=3)
    assert top3[0] == names[keep[0]] and sorted(top3) == sorted(bank.names)


def test_route_by_signature_separates_domains_with_different_alphabets(bank):
    corpus = synthetic.default_corpus(n_domains=3, n_train=8, n_valid=6)
    bank.fit_signatures({n: d.train for n, d in zip(bank.names, corpus, strict=True)})
    for name, dom in zip(bank.names, corpus, strict=True):
        assert [r[0] for r in bank.route(dom.valid, method="signature")] == [name] * len(dom.valid)
    with pytest.raises(AdapterError, match="no samples"):
        bank.fit_signatures({"a": ["x"]})


def _greedy_recompute(model, ids, n):
    out = []
    for _ in range(n):
        nxt = int(mx.argmax(model(mx.array([ids + out]))[0, -1]).item())
        if nxt == 257:
            break
        out.append(nxt)
    return out


def test_generate_with_cache_equals_full_recompute(bank):
    prompt = "abc"
    ids = bank.tok.encode(prompt)
    for adapter in ("a", None, bank.mix({"b": 1.0, "c": 0.5})):
        got = bank.generate(prompt, adapter=adapter, max_tokens=12, return_ids=True)
        with bank.use(adapter):
            want = _greedy_recompute(bank.model, ids, 12)
        assert got == want, adapter
    # batched rows with one adapter each equal one at a time
    rows = bank.generate(prompt, adapter=["a", "b", None], max_tokens=8, return_ids=True)
    assert rows == [bank.generate(prompt, adapter=a, max_tokens=8, return_ids=True) for a in ("a", "b", None)]
    assert isinstance(bank.generate(prompt, adapter="a", max_tokens=4), str)
    # sampling is reproducible with a seed
    s1 = bank.generate(prompt, adapter="a", max_tokens=8, temperature=0.8, seed=3, return_ids=True)
    assert s1 == bank.generate(prompt, adapter="a", max_tokens=8, temperature=0.8, seed=3, return_ids=True)


def test_quantized_base(adapters):
    model, tok = mz.load("tiny", quantize=4)
    x = ids_of(tok, TEXT)
    ref, _ = mz.load("tiny", quantize=4)
    lora.load(ref, adapters["a"])
    with AdapterBank(model, tok, [adapters["a"]]) as bank:
        assert isinstance(bank.model.layers[0].self_attn.q_proj.linear, nn.QuantizedLinear)
        with bank.use("a"):
            assert mx.abs(model(x) - ref(x)).max().item() <= 1e-5


def test_rope_scaling_travels_and_must_agree(tmp_path, adapters):
    rope = {"type": "linear", "factor": 2.0}
    d1 = make_adapter(tmp_path / "long1", seed=7, rope=rope)
    d2 = make_adapter(tmp_path / "long2", seed=8, rope=rope)
    d3 = make_adapter(tmp_path / "long4", seed=9, rope={"type": "linear", "factor": 4.0})
    model, tok = mz.load("tiny")
    x = ids_of(tok, TEXT)
    y0 = model(x)
    with AdapterBank(model, tok, [d1, d2]) as bank:
        assert model.args.rope_scaling == rope
        ref, _ = reference_model(d1)  # lora.load sets the same scaling
        with bank.use("long1"):
            assert mx.abs(model(x) - ref(x)).max().item() <= 1e-5
    assert model.args.rope_scaling is None
    assert mx.abs(model(x) - y0).max().item() == 0.0
    with pytest.raises(AdapterError, match="RoPE"):
        AdapterBank(model, tok, [d1, d3])
    with pytest.raises(AdapterError, match="RoPE"):  # also against one trained without scaling
        AdapterBank(model, tok, [adapters["a"], d1])
    assert type(model.layers[0].self_attn.q_proj) is nn.Linear  # nothing installed on error


def test_errors(tmp_path, adapters):
    model, tok = mz.load("tiny")
    with pytest.raises(AdapterError, match="duplicate"):
        AdapterBank(model, tok, [adapters["a"], adapters["a"]])
    # an adapter made for a different base shape
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((adapters["a"] / "adapter_config.json").read_text())
    w = mx.load(str(adapters["a"] / "adapters.safetensors"))
    w = {k: (mx.zeros((128, v.shape[1])) if k.endswith("lora_a") else v) for k, v in w.items()}
    mx.save_safetensors(str(bad / "adapters.safetensors"), w)
    with pytest.raises(AdapterError, match="shape"):
        AdapterBank(model, tok, [adapters["a"], bad])
    with AdapterBank(model, tok, [adapters["a"]]) as bank:
        with pytest.raises(AdapterError, match="no adapter named"):
            bank.loss(TEXT, adapter="zzz")
        with pytest.raises(AdapterError, match="open AdapterBank"):
            AdapterBank(model, tok, [adapters["b"]])
        with pytest.raises(AdapterError, match="signature"):
            bank.route(TEXT, method="signature")


def test_generate_defaults_are_the_generation_config():
    params = inspect.signature(AdapterBank.generate).parameters
    cfg = GenerationConfig()
    assert (params["max_tokens"].default, params["temperature"].default) == (cfg.max_tokens, cfg.temperature)
    assert (cfg.max_tokens, cfg.temperature) == (64, 0.0)
    assert all(f.metadata.get("help") for f in dataclasses.fields(GenerationConfig))


def test_stack_deltas_pads_ranks_and_fills_missing_adapters_with_zeros():
    rng = np.random.default_rng(0)
    a0, b0 = rng.normal(size=(5, 2)).astype(np.float32), rng.normal(size=(2, 3)).astype(np.float32)
    a2, b2 = rng.normal(size=(5, 4)).astype(np.float32), rng.normal(size=(4, 3)).astype(np.float32)
    a, b = stack_deltas({0: (mx.array(a0), mx.array(b0)), 2: [mx.array(a2), mx.array(b2)]}, 3, 4, 5, 3)
    assert a.shape == (3, 5, 4) and b.shape == (3, 4, 3)
    want_a = np.zeros((3, 5, 4), np.float32)
    want_b = np.zeros((3, 4, 3), np.float32)
    want_a[0, :, :2], want_b[0, :2], want_a[2], want_b[2] = a0, b0, a2, b2
    np.testing.assert_array_equal(np.array(a), want_a)
    np.testing.assert_array_equal(np.array(b), want_b)
    for i, (ai, bi) in enumerate([(a0, b0), (None, None), (a2, b2)]):  # the padded delta is exact
        delta = np.zeros((5, 3)) if ai is None else ai @ bi
        np.testing.assert_allclose(np.array(a[i] @ b[i]), delta, atol=1e-6)
    assert stack_deltas({}, 1, 2, 5, 3, mx.float16)[0].dtype == mx.float16


def test_batch_spans_bound_rows_times_longest():
    lengths = [3, 9, 2, 2, 2, 2, 40, 1]
    spans = batch_spans(lengths, 12)
    assert spans == [(0, 1), (1, 2), (2, 6), (6, 7), (7, 8)]
    # Independent check: consecutive, covering, within budget (or a single row), and greedy
    # (adding the next row would break the budget).
    assert [s for s, _ in spans[1:]] == [e for _, e in spans[:-1]] and spans[0][0] == 0 and spans[-1][1] == 8
    for s, e in spans:
        assert e - s == 1 or (e - s) * max(lengths[s:e]) <= 12
        if e < len(lengths):
            assert (e - s + 1) * max(lengths[s : e + 1]) > 12
    assert batch_spans([], 12) == []
