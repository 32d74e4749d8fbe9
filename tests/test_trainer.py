import json
import math

import mlx.core as mx
import numpy as np
import pytest
from conftest import measured_peak

import mozgach_mlx as mz
from mozgach_mlx import lora, trainer
from mozgach_mlx.errors import ConfigError, TrainingError
from mozgach_mlx.trainer import TrainConfig, lr_at, train_adapter


def _seqs(texts, tok, L):
    out = []
    for t in texts:
        ids = np.array(tok.encode(t)[: L + 1], dtype=np.int32)
        out.append((ids, np.ones(len(ids), dtype=bool)))
    return out


def _task(tok, n, L=64, seed=0):
    """A small learnable task: words drawn from a 4-word vocabulary in a fixed cycle."""
    rng = np.random.default_rng(seed)
    words = ["lion", "tiger", "bear", "wolf"]
    texts = []
    for _ in range(n):
        s = int(rng.integers(0, 4))
        texts.append(" ".join(words[(s + i) % 4] for i in range(L // 4)))
    return _seqs(texts, tok, L)


def _cfg(**kw):
    base = dict(
        learning_rate=3e-3,
        warmup_steps=2,
        max_steps=6,
        grad_accumulation=2,
        batch_size=2,
        max_seq_length=64,
        eval_every=0,
        save_every=2,
        grad_checkpoint=True,
        progress=False,
        lora=lora.LoRAConfig(r=4, alpha=8, dropout=0.1),
    )
    base.update(kw)
    return TrainConfig(**base)


def test_lr_schedule_matches_formula():
    cfg = TrainConfig(learning_rate=1.0, warmup_steps=4, lr_schedule="cosine", min_lr_ratio=0.1)
    total = 14
    # warmup: (step+1)/(warmup+1); then 0.1 + 0.9 * 0.5 * (1 + cos(pi * t)), t = (step-4)/10
    assert lr_at(0, cfg, total) == pytest.approx(1 / 5)
    assert lr_at(3, cfg, total) == pytest.approx(4 / 5)
    assert lr_at(4, cfg, total) == pytest.approx(1.0)
    assert lr_at(9, cfg, total) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(14, cfg, total) == pytest.approx(0.1)
    lin = TrainConfig(learning_rate=2.0, warmup_steps=0, lr_schedule="linear")
    assert lr_at(5, lin, 10) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "field,value", [("learning_rate", 0.0), ("grad_accumulation", 0), ("lr_schedule", "step"), ("max_grad_norm", -1.0)]
)
def test_bad_config_is_a_one_line_config_error(field, value):
    with pytest.raises(ConfigError, match=f"TrainConfig.{field}"):
        TrainConfig(**{field: value})


def test_defaults_are_the_seeds():
    c = TrainConfig()
    assert (c.learning_rate, c.warmup_steps, c.grad_accumulation, c.batch_size, c.max_grad_norm, c.epochs) == (
        2e-4,
        100,
        4,
        1,
        0.3,
        3,
    )
    assert (c.lora.r, c.lora.alpha, c.lora.dropout) == (16, 32, 0.1)


def test_tiny_model_learns_and_beats_base(tmp_path):
    model, tok = mz.load("tiny")
    train, valid = _task(tok, 32, seed=0), _task(tok, 8, seed=1)
    cfg = _cfg(
        max_steps=40,
        grad_accumulation=1,
        batch_size=4,
        learning_rate=5e-3,
        warmup_steps=4,
        save_every=0,
        lora=lora.LoRAConfig(r=8, alpha=16, dropout=0.0),
    )
    lora.apply(model, cfg.lora)
    base_loss, _ = trainer.evaluate(model, valid, cfg)  # B = 0: this is the base model
    res = train_adapter(model, tok, {"train": train, "valid": valid}, cfg, tmp_path / "a")
    first, last = np.mean(res.losses[:3]), np.mean(res.losses[-3:])
    assert last < 0.5 * first, (first, last)
    assert res.valid_loss < 0.5 * base_loss, (base_loss, res.valid_loss)
    assert (tmp_path / "a" / "adapter_model.safetensors").exists()
    assert (tmp_path / "a" / "adapters.safetensors").exists()
    logged = [json.loads(x) for x in (tmp_path / "a" / trainer.LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, 41))


def _run(tmp_path, name, callback=None, resume=True):
    model, tok = mz.load("tiny")
    data = {"train": _task(tok, 10, seed=0), "valid": _task(tok, 3, seed=1)}
    return train_adapter(model, tok, data, _cfg(), tmp_path / name, callback=callback, resume=resume)


class _Stop(Exception):
    pass


def test_resume_reproduces_uninterrupted_run(tmp_path):
    full = _run(tmp_path, "full")

    def stop_at_4(rec):
        if rec["step"] == 4:
            raise _Stop

    with pytest.raises(_Stop):
        _run(tmp_path, "cut", callback=stop_at_4)
    state = trainer.load_checkpoint_state(tmp_path / "cut")
    assert state["step"] == 4
    resumed = _run(tmp_path, "cut")
    assert resumed.resumed_from == 4
    # 10 sequences, batch 2, accumulation 2: the data position crosses an epoch boundary
    # mid-step, and dropout is on: both must replay exactly.
    np.testing.assert_allclose(resumed.losses, full.losses, rtol=1e-6, atol=1e-6)
    a = mx.load(str(tmp_path / "full" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "cut" / "adapters.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), rtol=1e-6, atol=1e-7)
    steps = [json.loads(x)["step"] for x in (tmp_path / "cut" / trainer.LOG_FILE).read_text().splitlines()]
    assert steps == list(range(1, 7))


def test_resume_with_other_config_is_refused(tmp_path):
    def stop_at_2(rec):
        if rec["step"] == 2:
            raise _Stop

    with pytest.raises(_Stop):
        _run(tmp_path, "x", callback=stop_at_2)
    model, tok = mz.load("tiny")
    data = {"train": _task(tok, 10), "valid": None}
    with pytest.raises(TrainingError, match="different configuration"):
        train_adapter(model, tok, data, _cfg(learning_rate=1e-3), tmp_path / "x")


def test_accumulation_equals_bigger_batch(tmp_path):
    """Token-weighted accumulation: 2 micro-batches of 1 == 1 batch of 2 (equal lengths)."""
    model, tok = mz.load("tiny")
    data = {"train": _task(tok, 4, seed=3), "valid": None}
    common = dict(max_steps=2, save_every=0, lora=lora.LoRAConfig(r=4, alpha=8, dropout=0.0))
    a = train_adapter(model, tok, data, _cfg(batch_size=1, grad_accumulation=2, **common), tmp_path / "a")
    wa = mx.load(str(tmp_path / "a" / "adapters.safetensors"))
    model, tok = mz.load("tiny")
    b = train_adapter(model, tok, data, _cfg(batch_size=2, grad_accumulation=1, **common), tmp_path / "b")
    wb = mx.load(str(tmp_path / "b" / "adapters.safetensors"))
    np.testing.assert_allclose(a.losses, b.losses, rtol=1e-5)
    # Adam's m / sqrt(v) turns fp32 rounding of near-zero gradients into O(lr * 1e-3)
    # differences; the updates themselves are O(lr) = 3e-3 per step.
    for k in wa:
        np.testing.assert_allclose(np.array(wa[k]), np.array(wb[k]), rtol=1e-3, atol=2e-5)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    calls = {"n": 0}

    def loss_fn(model, x, y, m, cfg):
        calls["n"] += 1
        s, n = trainer.default_loss(model, x, y, m, cfg)
        return (s * mx.array(float("nan")) if calls["n"] > 8 else s), n  # step 5 = micro 9

    model, tok = mz.load("tiny")
    data = {"train": _task(tok, 10), "valid": None}
    with pytest.raises(TrainingError, match="non-finite loss .* step 5"):
        train_adapter(model, tok, data, _cfg(), tmp_path / "nan", loss_fn=loss_fn)
    assert trainer.load_checkpoint_state(tmp_path / "nan")["step"] == 4


def _step_peak(L: int) -> int:
    import mlx.nn as nn

    model, _ = mz.load("tiny", quantize=4, max_position_embeddings=32768)
    lora.apply(model, lora.LoRAConfig())
    model.grad_checkpoint, model.mlp_chunk = True, 2048
    cfg = TrainConfig()
    x = mx.random.randint(0, 250, (1, L))
    m = mx.ones((1, L))
    vg = nn.value_and_grad(model, lambda a, b, c: trainer.default_loss(model, a, b, c, cfg))
    return measured_peak(lambda: vg(x, x, m))


@pytest.mark.slow
def test_training_step_memory_is_linear_from_8k_to_16k():
    p8, p16 = _step_peak(8192), _step_peak(16384)
    assert p16 < 2.2 * p8, (p8, p16)


def test_train_adapter_owns_the_lifecycle_measures_the_base_and_restores_the_model(tmp_path, monkeypatch):
    model, tok = mz.load("tiny")
    data = {"train": _task(tok, 8, seed=0), "valid": _task(tok, 3, seed=1)}
    cfg = _cfg(max_steps=2, grad_checkpoint=True, mlp_chunk=16, lora=lora.LoRAConfig(r=4, alpha=8, dropout=0.0))
    # an independent base loss: the same data through a plain model without adapters
    ref_model, _ = mz.load("tiny")
    ref_loss, _ = trainer.evaluate(ref_model, data["valid"], cfg)
    resets = []
    real_reset = lora.reset
    monkeypatch.setattr(lora, "reset", lambda m, seed=None: resets.append(seed) or real_reset(m, seed=seed))
    model.grad_checkpoint, model.mlp_chunk = False, None
    model.eval()
    res = train_adapter(model, tok, data, cfg, tmp_path / "a", base_loss=True)
    assert resets == [cfg.seed]  # one fresh adapter, seeded by the config
    assert res.base_valid_loss == pytest.approx(ref_loss, rel=1e-6)
    assert res.valid_loss < res.base_valid_loss
    assert (model.grad_checkpoint, model.mlp_chunk, model.training) == (False, None, False)
    assert model.lora_config == cfg.lora
    # without base_loss nothing is measured
    assert train_adapter(model, tok, data, cfg, tmp_path / "b").base_valid_loss is None


# ---------------------------------------------------------------------------- attention masks

def _docs(tok, n, seed):
    """Short documents of 2-12 words, to pack several per sequence."""
    rng = np.random.default_rng(seed)
    words = ["lion", "tiger", "bear", "wolf"]
    texts = [" ".join(words[(int(rng.integers(0, 4)) + i) % 4] for i in range(int(rng.integers(2, 13))))
             for _ in range(n)]
    return [mz.data.encode_record({"text": t}, tok) for t in texts]


def test_document_mask_scores_each_packed_document_alone():
    """The valid loss of packed documents (attention_mask='document') equals their loss
    one document per sequence; plain causal attention over the pack does not."""
    model, tok = mz.load("tiny")
    docs = _docs(tok, 12, seed=0)
    packed = mz.data.pack(docs, 128, tok.eos_token_id)
    alone = mz.data.pack(docs, 128, tok.eos_token_id, pack=False)
    assert len(packed) < len(alone) and max(int(s.segments.max()) for s in packed) >= 2
    loss_packed, n_packed = trainer.evaluate(model, packed, _cfg(max_seq_length=128))
    loss_alone, n_alone = trainer.evaluate(model, alone, _cfg(max_seq_length=128))
    assert n_packed == n_alone and loss_packed == pytest.approx(loss_alone, abs=1e-5)
    loss_causal, _ = trainer.evaluate(model, packed, _cfg(max_seq_length=128, attention_mask="causal"))
    assert abs(loss_causal - loss_alone) > 1e-3


def test_custom_loss_without_segment_ids_is_told_what_to_do(tmp_path):
    model, tok = mz.load("tiny")
    train = mz.data.pack(_docs(tok, 12, seed=0), 128, tok.eos_token_id)
    assert all(s.segments.max() > 0 for s in train[:-1])

    def loss_fn(model, x, y, m, cfg):
        return trainer.default_loss(model, x, y, m, cfg)

    with pytest.raises(ConfigError, match="segment_ids"):
        train_adapter(model, tok, {"train": train}, _cfg(max_steps=1, max_seq_length=128), tmp_path / "a",
                      loss_fn=loss_fn)
    res = train_adapter(model, tok, {"train": train}, _cfg(max_steps=1, max_seq_length=128, attention_mask="causal"),
                        tmp_path / "b", loss_fn=loss_fn)
    assert res.steps == 1


@pytest.mark.parametrize("kw,field", [({"attention_mask": "documents"}, "attention_mask"),
                                      ({"s2_attn_group": 0}, "s2_attn_group"),
                                      ({"s2_attn_group": 1.5}, "s2_attn_group"),
                                      ({"s2_attn_group": "8k"}, "s2_attn_group")])
def test_attention_fields_are_checked(kw, field):
    with pytest.raises(ConfigError, match=f"TrainConfig.{field}"):
        TrainConfig(**kw)
    assert TrainConfig(s2_attn_group=8192.0).s2_attn_group == 8192  # the CLI's float for tokens
    assert TrainConfig(s2_attn_group=0.25).s2_attn_group == 0.25


def test_s2_with_trainable_embeddings_and_norms(tmp_path, monkeypatch):
    """LongLoRA's recipe: S²-Attn in the training steps only (validation uses full
    attention), embeddings and norms trained with LoRA, packed documents; the adapter
    records it, reloads exactly, and mlx-lm still loads its low-rank part."""
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model

    from mozgach_mlx import attention

    seen = []
    real = attention.flash_attention

    def spy(q, k, v, **kw):
        seen.append((kw.get("s2_group"), kw.get("segment_ids") is not None, model.training))
        return real(q, k, v, **kw)

    monkeypatch.setattr(attention, "flash_attention", spy)
    model, tok = mz.load("tiny")
    embed0 = np.array(model.model.embed_tokens.weight)
    train = mz.data.pack(_docs(tok, 40, seed=0), 64, tok.eos_token_id)
    valid = mz.data.pack(_docs(tok, 8, seed=1), 64, tok.eos_token_id)
    cfg = _cfg(max_steps=6, s2_attn_group=0.25, save_every=0, learning_rate=5e-3,
               lora=lora.LoRAConfig(r=4, alpha=8, dropout=0.0, train_embeddings=True, train_norms=True))
    with pytest.warns(UserWarning, match="adapter_extra"):
        res = train_adapter(model, tok, {"train": train, "valid": valid}, cfg, tmp_path / "a")
    assert res.losses[-1] < res.losses[0]
    in_training = {(g, s) for g, s, t in seen if t}
    assert in_training and all(g is not None and g < 64 for g, _ in in_training)  # 0.25 of the batch
    assert any(s for _, s in in_training)  # document masks in the same steps
    assert all(g is None for g, _, t in seen if not t)  # validation: full attention
    assert model.s2_group is None  # restored

    assert np.abs(np.array(model.model.embed_tokens.weight) - embed0).max() > 0
    block = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["mozgach"]
    assert block["training"] == {"max_seq_length": 64, "pack": True, "attention_mask": "document",
                                 "s2_attn_group": 0.25}
    assert block["lora"]["train_embeddings"] and block["lora"]["train_norms"]

    x = mx.array(train[0].ids[None, :-1])
    want = model(x)
    fresh, _ = mz.load("tiny")
    lora.load(fresh, tmp_path / "a")
    assert float(mx.abs(fresh(x) - want).max()) < 1e-5
    base, _ = mz.load("tiny")
    mz.save(base, tok, tmp_path / "base")
    theirs, _ = load_model(tmp_path / "base")
    load_adapters(theirs, str(tmp_path / "a"))
    assert {k for k, _ in tree_flatten(theirs.parameters()) if ".lora_" in k} == set(
        k for k in lora.trainable(model) if ".lora_" in k)


@pytest.mark.parametrize("attention_mask", ["document", "causal"])
def test_compiled_step_gives_the_uncompiled_losses(tmp_path, monkeypatch, attention_mask):
    """TrainConfig.compile (mx.compile of value-and-grad with the model and random state as
    its inputs and outputs) changes no loss beyond fp32 rounding: dropout on (the random
    state passes through the graph), packed documents (segment ids) or plain causal
    windows, gradient accumulation, 4-bit base; and the compiled function is what runs."""
    calls = []
    real = trainer.compiled
    monkeypatch.setattr(trainer, "compiled", lambda m, vg: calls.append(1) or real(m, vg))
    runs = {}
    for flag in (False, True):
        model, tok = mz.load("tiny-stdlib")
        data = {"train": _task(tok, 12, L=96), "valid": None}
        cfg = _cfg(compile=flag, attention_mask=attention_mask, grad_checkpoint=False, mlp_chunk=None)
        runs[flag] = train_adapter(model, tok, data, cfg, tmp_path / f"c{flag}").losses
    assert calls == [1]
    a, b = np.array(runs[False]), np.array(runs[True])
    assert len(a) == 6 and a[-1] < a[0]
    np.testing.assert_allclose(b, a, rtol=1e-5)  # sums of ~1e3 fp32 terms in another order
