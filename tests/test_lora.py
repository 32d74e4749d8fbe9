"""LoRA layers, apply/reset/remove/fuse, and the PEFT / mlx-lm adapter files.

Independent references: a numpy LoRA forward (``x W^T + s x A B``), mlx-lm's own
``linear_to_lora_layers`` / ``load_adapters`` / ``LoRALinear.fuse`` on a twin mlx-lm model,
and the PEFT key layout written out by hand.
"""

import dataclasses
import json
import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import random_model
from conftest import small_config as shared_config
from mlx.utils import tree_flatten

import mozgach_mlx as mz
from mozgach_mlx import lora, quant
from mozgach_mlx.errors import AdapterError, ConfigError
from mozgach_mlx.lora import LoRAConfig, LoRALinear, formats
from mozgach_mlx.models import Model, ModelArgs
from mozgach_mlx.tokenizer import ByteTokenizer

X = mx.array([[1, 5, 9, 200, 17, 3, 3, 250, 41, 7, 0, 100]])


def small_config(**kw) -> dict:
    """The shared small config with 3 blocks (so num_layers < all is testable)."""
    return shared_config(**{"num_hidden_layers": 3, **kw})


def small_model(seed=0, **kw) -> Model:
    """A seeded random model; norm weights random too, so training them is visible."""
    m = random_model(small_config(**kw), seed, std=0.1, norm_mean=1.0)
    m.eval()
    return m


def randomize_adapters(model, seed=1):
    """Give every trainable tensor a random value (an 'trained' adapter with B != 0)."""
    rng = np.random.default_rng(seed)
    model.load_weights(
        [(k, mx.array(rng.normal(0, 0.05, v.shape).astype(np.float32)) + v) for k, v in lora.trainable(model).items()],
        strict=False,
    )


def maxdiff(a, b) -> float:
    return float(mx.abs(a - b).max())


# ----------------------------------------------------------------------------- config


def test_config_defaults_are_the_seed():
    c = LoRAConfig()
    assert (c.r, c.alpha, c.dropout, c.targets) == (16, 32.0, 0.1, ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert c.scale == 2.0
    assert LoRAConfig(r=16, alpha=32, rslora=True).scale == 32 / 4
    assert LoRAConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"r": 0}, "r"),
        ({"r": 2.5}, "r"),
        ({"alpha": -1}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"targets": ()}, "targets"),
        ({"targets": ("q_proj", "q_proj")}, "targets"),
        ({"targets": ("q proj",)}, "targets"),
        ({"rslora": "yes"}, "rslora"),
        ({"num_layers": 0}, "num_layers"),
    ],
)
def test_config_validation(kw, field):
    with pytest.raises(ConfigError, match=f"LoRAConfig.{field}"):
        LoRAConfig(**kw)


def test_config_from_dict_rejects_typos():
    with pytest.raises(ConfigError, match="rank"):
        LoRAConfig.from_dict({"rank": 8})


# ----------------------------------------------------------------------------- layer


def test_lora_linear_matches_numpy_reference():
    base = nn.Linear(24, 40, bias=True)
    layer = LoRALinear(base, r=4, alpha=12, dropout=0.0)
    layer.lora_b = mx.random.normal((4, 40)) * 0.1
    x = mx.random.normal((2, 5, 24))
    xn, w, b = np.array(x), np.array(base.weight), np.array(base.bias)
    a, bb = np.array(layer.lora_a), np.array(layer.lora_b)
    ref = xn @ w.T + b + (12 / 4) * (xn @ a @ bb)
    assert np.abs(np.array(layer(x)) - ref).max() < 1e-5
    # rsLoRA: alpha / sqrt(r)
    rs = LoRALinear(base, r=4, alpha=12, rslora=True)
    assert rs.scale == 12 / math.sqrt(4)
    assert layer.lora_a.shape == (24, 4) and layer.lora_b.shape == (4, 40)
    assert float(mx.abs(rs.lora_a).max()) <= 1 / math.sqrt(24)
    assert not mx.any(rs.lora_b).item()


def test_lora_linear_defaults_are_the_config_defaults():
    # One source of defaults: a bare LoRALinear is the layer LoRAConfig() would build.
    layer = LoRALinear(nn.Linear(8, 8))
    c = LoRAConfig()
    assert (layer.r, layer.alpha, layer.rslora, layer.scale) == (c.r, c.alpha, c.rslora, c.scale)
    x = mx.ones((4000, 8))
    zeroed = (layer.dropout(x) == 0).mean().item()  # training mode: a fraction p of inputs dropped
    assert zeroed == pytest.approx(c.dropout, abs=0.02)


@pytest.mark.parametrize("cls", [nn.QuantizedLinear, quant.QuantizedLinear])
def test_lora_wraps_quantized_and_fuses(cls):
    dense = nn.Linear(64, 32)
    q = cls.from_linear(dense, 32, 4)
    layer = LoRALinear(q, r=4, alpha=8, dropout=0.0)
    assert (layer.input_dims, layer.output_dims) == (64, 32)
    x = mx.random.normal((3, 64))
    assert maxdiff(layer(x), q(x)) == 0.0  # B = 0
    layer.lora_b = mx.random.normal((4, 32)) * 0.1
    wq = mx.dequantize(q.weight, q.scales, q.biases, group_size=32, bits=4)
    ref = x @ wq.T + q.bias + 2.0 * (x @ layer.lora_a @ layer.lora_b)
    assert maxdiff(layer(x), ref) < 1e-4
    dq = layer.fuse(dequantize=True)
    assert type(dq) is nn.Linear and maxdiff(dq(x), ref) < 1e-4
    rq = layer.fuse()
    assert type(rq) is cls and rq.bits == 4 and rq.group_size == 32
    assert maxdiff(rq(x), ref) < 0.1 * float(mx.abs(ref).max())  # re-quantization error only


# ----------------------------------------------------------------------------- apply


def test_untrained_adapter_changes_nothing():
    m = small_model()
    before = m(X)
    lora.apply(m, LoRAConfig(targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")))
    m.train()  # dropout active: still exact, because B = 0
    assert mx.array_equal(m(X), before).item()


def test_trainable_paths_equal_mlx_lm():
    from mlx_lm.models import llama
    from mlx_lm.tuner.utils import linear_to_lora_layers

    cfg = small_config()
    ours = small_model()
    theirs = llama.Model(llama.ModelArgs.from_dict(cfg))
    theirs.freeze()
    keys = ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]
    linear_to_lora_layers(theirs, 2, {"rank": 8, "scale": 2.0, "dropout": 0.0, "keys": keys})
    lora.apply(ours, LoRAConfig(r=8, alpha=16, targets=("q_proj", "v_proj", "down_proj"), num_layers=2))
    want = {k: v.shape for k, v in tree_flatten(theirs.trainable_parameters())}
    got = {k: v.shape for k, v in lora.trainable(ours).items()}
    assert got == want
    assert "model.layers.2.mlp.down_proj.lora_a" in got and "model.layers.0.self_attn.q_proj.lora_a" not in got
    assert ours.model.layers[2].self_attn.q_proj.scale == 2.0


def test_all_linear_and_bad_targets():
    m = small_model()
    lora.apply(m, LoRAConfig(targets=("all-linear",), r=2))
    assert len(lora.trainable(m)) == 3 * 7 * 2
    with pytest.raises(ConfigError, match="already has LoRA"):
        lora.apply(m, LoRAConfig())
    m2 = small_model()
    with pytest.raises(ConfigError, match="qq_proj.*available"):
        lora.apply(m2, LoRAConfig(targets=("q_proj", "qq_proj")))
    with pytest.raises(ConfigError, match="num_layers is 9"):
        lora.apply(m2, LoRAConfig(num_layers=9))
    assert not lora.trainable(m2) or len(lora.trainable(m2)) == sum(1 for _ in tree_flatten(m2.parameters()))


def test_norms_and_embeddings_train_and_reset():
    m = small_model(tie_word_embeddings=True)
    base_logits = m(X)
    lora.apply(m, LoRAConfig(train_embeddings=True, train_norms=True, num_layers=1), seed=3)
    names = set(lora.trainable(m))
    assert "model.embed_tokens.weight" in names and "model.norm.weight" in names
    assert "model.layers.2.input_layernorm.weight" in names
    assert "model.layers.1.input_layernorm.weight" not in names  # outside the last 1 block
    a0 = m.model.layers[2].self_attn.q_proj.lora_a
    randomize_adapters(m)
    assert maxdiff(m(X), base_logits) > 1e-3
    lora.reset(m, seed=3)
    assert mx.array_equal(m(X), base_logits).item()
    assert mx.array_equal(m.model.layers[2].self_attn.q_proj.lora_a, a0).item()  # same seed, same init
    randomize_adapters(m)
    lora.remove(m)
    assert not lora.trainable(m) and not hasattr(m, "lora_config")
    assert mx.array_equal(m(X), base_logits).item()


def test_quantized_embedding_cannot_train():
    m = small_model(tie_word_embeddings=True)
    quant.quantize_model(m, 4, 32, quantize_embeddings=True)
    with pytest.raises(ConfigError, match="train_embeddings"):
        lora.apply(m, LoRAConfig(train_embeddings=True))


def test_gradients_reach_adapters_through_checkpointed_blocks():
    from mozgach_mlx.loss import sequence_loss

    m = small_model()
    lora.apply(m, LoRAConfig(dropout=0.0), seed=0)
    m.grad_checkpoint = True
    inputs, targets = X[:, :-1], X[:, 1:]
    mask = mx.ones(targets.shape)

    def f(model):
        s, n = sequence_loss(model, inputs, targets, mask, chunk=4)
        return s / n

    _, grads = nn.value_and_grad(m, f)(m)
    g = dict(tree_flatten(grads))
    assert set(g) == set(lora.trainable(m))
    assert all(float(mx.abs(v).max()) > 0 for k, v in g.items() if k.endswith("lora_b"))


def test_adapter_gradients_equal_naive_full_logits():
    # Tied head + trained embeddings/norms: the embedding gets gradient from both the
    # input lookup and the chunked head. Reference: mx full logits + nn.losses CE.
    from mozgach_mlx.loss import sequence_loss

    m = small_model(tie_word_embeddings=True)
    lora.apply(m, LoRAConfig(dropout=0.0, train_embeddings=True, train_norms=True, targets=("q_proj", "up_proj")))
    randomize_adapters(m)
    inputs, targets = X[:, :-1], X[:, 1:]
    mask = mx.array([[0, 0, 1, 1, 1, 1, 1, 0, 1, 1, 1]])

    def chunked(model):
        return sequence_loss(model, inputs, targets, mask, chunk=3)[0]

    def naive(model):
        ce = nn.losses.cross_entropy(model(inputs), targets, reduction="none")
        return (ce * mask).sum()

    m.grad_checkpoint, m.mlp_chunk = True, 4
    v, g = nn.value_and_grad(m, chunked)(m)
    m.grad_checkpoint, m.mlp_chunk = False, None
    v_ref, g_ref = nn.value_and_grad(m, naive)(m)
    assert abs(v.item() - v_ref.item()) < 1e-4 * v_ref.item()
    g, g_ref = dict(tree_flatten(g)), dict(tree_flatten(g_ref))
    assert set(g) == set(g_ref) == set(lora.trainable(m))
    for k in g:
        assert maxdiff(g[k], g_ref[k]) < 1e-4 * max(float(mx.abs(g_ref[k]).max()), 1e-3), k


def test_fuse_equals_adapter_and_saves_standalone(tmp_path):
    m = small_model()
    lora.apply(m, LoRAConfig(targets=("q_proj", "v_proj", "up_proj")))
    randomize_adapters(m)
    with_adapter = m(X)
    lora.fuse(m, out_dir=tmp_path / "fused", tokenizer=ByteTokenizer())
    assert not any(isinstance(x, LoRALinear) for _, x in m.named_modules())
    assert maxdiff(m(X), with_adapter) < 1e-4
    m2, _ = mz.load(tmp_path / "fused")
    assert maxdiff(m2(X), with_adapter) < 1e-4


def test_fuse_quantized_base_equals_mlx_lm_fuse():
    from mlx_lm.tuner.lora import LoRALinear as TheirLoRA

    m = small_model()
    quant.quantize_model(m, 4, 32)
    lora.apply(m, LoRAConfig(r=4, alpha=8, targets=("q_proj",)))
    randomize_adapters(m)
    ours = m.model.layers[0].self_attn.q_proj
    theirs = TheirLoRA.from_base(ours.linear, r=4, scale=2.0)
    theirs.lora_a, theirs.lora_b = ours.lora_a, ours.lora_b
    for dq in (False, True):
        a, b = ours.fuse(dequantize=dq), theirs.fuse(dequantize=dq)
        assert mx.array_equal(a.weight, b.weight).item()
    with_adapter = m(X)
    lora.fuse(m, dequantize=True)
    assert not any(isinstance(x, nn.QuantizedLinear) for _, x in m.named_modules())
    assert maxdiff(m(X), with_adapter) < 1e-4


# ----------------------------------------------------------------------------- files


def trained(seed=1, **cfg_kw):
    m = small_model()
    lora.apply(m, LoRAConfig(**cfg_kw))
    randomize_adapters(m, seed)
    return m


def test_peft_layout_keys_shapes_and_config(tmp_path):
    m = trained(r=4, alpha=8, dropout=0.05, targets=("q_proj", "down_proj"), num_layers=2)
    lora.save(m, tmp_path, format="peft", base_model="org/base")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["use_rslora"]) == (4, 8.0, 0.05, False)
    assert cfg["target_modules"] == ["down_proj", "q_proj"] and cfg["base_model_name_or_path"] == "org/base"
    assert cfg["layers_to_transform"] == [1, 2] and cfg["modules_to_save"] is None
    w = mx.load(str(tmp_path / "adapter_model.safetensors"))
    a = w["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
    b = w["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    assert a.shape == (4, 64) and b.shape == (64, 4)  # A (r, in), B (out, r)
    assert w["base_model.model.model.layers.2.mlp.down_proj.lora_A.weight"].shape == (4, 128)
    assert mx.array_equal(a, m.model.layers[1].self_attn.q_proj.lora_a.T).item()
    assert len(w) == 2 * 2 * 2


@pytest.mark.parametrize("fmt", ["peft", "mlx-lm", "both"])
@pytest.mark.parametrize("extras", [False, True])
def test_round_trip(tmp_path, fmt, extras):
    m = trained(r=4, alpha=12, rslora=True, targets=("q_proj", "gate_proj"), train_norms=extras,
                train_embeddings=extras)  # fmt: skip
    want = m(X)
    if extras and fmt != "peft":
        with pytest.warns(UserWarning, match="mlx-lm ignores"):
            lora.save(m, tmp_path, format=fmt)
    else:
        lora.save(m, tmp_path, format=fmt)
    fresh = small_model()
    lora.load(fresh, tmp_path)
    assert fresh.lora_config == m.lora_config
    assert maxdiff(fresh(X), want) < 1e-5
    # loading again over the same adapter, and over different adapter weights, is exact
    randomize_adapters(fresh, seed=9)
    lora.load(fresh, tmp_path)
    assert maxdiff(fresh(X), want) < 1e-5
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temp files


def test_saving_again_in_another_layout_leaves_no_stale_weights(tmp_path):
    m = trained(r=4, train_norms=True)
    with pytest.warns(UserWarning):
        lora.save(m, tmp_path, format="both")
    stale = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    randomize_adapters(m, seed=5)
    want = m(X)
    lora.save(m, tmp_path, format="peft")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    # as if a crash had kept the old mlx-lm files: the config's file list still wins
    for name in ("adapters.safetensors", "adapter_extra.safetensors"):
        (tmp_path / name).write_bytes(stale[name])
    fresh = small_model()
    lora.load(fresh, tmp_path)
    assert maxdiff(fresh(X), want) < 1e-5


def test_both_layout_is_readable_by_each_config_reader(tmp_path):
    m = trained(r=8, alpha=16, targets=("q_proj", "v_proj"))
    lora.save(m, tmp_path, format="both")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["fine_tune_type"] == "lora"
    assert cfg["lora_parameters"] == {"rank": 8, "scale": 2.0, "dropout": 0.1,
                                      "keys": ["self_attn.q_proj", "self_attn.v_proj"]}  # fmt: skip


@pytest.mark.parametrize("rslora", [False, True])
def test_foreign_configs_without_our_block_convert_scale(tmp_path, rslora):
    # Adapters written by PEFT or mlx-lm themselves carry no "mozgach" block: the scale
    # must come from their own fields (PEFT alpha/r or alpha/sqrt(r); mlx-lm scale as is).
    m = trained(r=4, alpha=6, rslora=rslora, targets=("k_proj", "o_proj"))
    want = m(X)
    for fmt in ("peft", "mlx-lm"):
        d = tmp_path / fmt
        lora.save(m, d, format=fmt)
        cfg = json.loads((d / "adapter_config.json").read_text())
        del cfg["mozgach"]
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        fresh = small_model()
        lora.load(fresh, d)
        assert fresh.model.layers[0].self_attn.k_proj.scale == pytest.approx(6 / (2 if rslora else 4))
        assert maxdiff(fresh(X), want) < 1e-5


def _hf_tokenizer(d):
    """A minimal tokenizer.json so that mlx_lm.load (which needs an HF tokenizer) runs."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<unk>").save_pretrained(d)


@pytest.mark.parametrize("fmt", ["mlx-lm", "both"])
def test_mlx_lm_loads_our_adapter_with_same_logits(tmp_path, fmt):
    import mlx_lm
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model

    m = trained(r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"), num_layers=2)
    mz.save(small_model(), ByteTokenizer(), tmp_path / "base")
    lora.save(m, tmp_path / "ad", format=fmt)
    theirs, _ = load_model(tmp_path / "base")
    load_adapters(theirs, str(tmp_path / "ad"))
    theirs.eval()
    assert maxdiff(theirs(X), m(X)) < 1e-4
    theirs_lora = {k for k, _ in tree_flatten(theirs.parameters()) if ".lora_" in k}
    assert theirs_lora == set(lora.trainable(m))
    # the public entry point: mlx_lm.load(path, adapter_path=...)
    _hf_tokenizer(tmp_path / "base")
    theirs2, _ = mlx_lm.load(str(tmp_path / "base"), adapter_path=str(tmp_path / "ad"))
    assert maxdiff(theirs2(X), m(X)) < 1e-4


@pytest.mark.parametrize("num_layers", [2, 0])  # mlx-lm: 0 means every block
def test_adapter_written_by_mlx_lm_loads_in_ours(tmp_path, num_layers):
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model, save_config

    mz.save(small_model(), ByteTokenizer(), tmp_path / "base")
    theirs, _ = load_model(tmp_path / "base")
    theirs.freeze()
    params = {"rank": 4, "scale": 20.0, "dropout": 0.0, "keys": None}  # keys None: every linear layer
    linear_to_lora_layers(theirs, num_layers, params)
    randomize_adapters(theirs)
    theirs.eval()
    d = tmp_path / "theirs"
    d.mkdir()
    mx.save_safetensors(str(d / "adapters.safetensors"), dict(tree_flatten(theirs.trainable_parameters())))
    # as mlx_lm.lora writes it: all its training arguments
    save_config({"model": str(tmp_path / "base"), "fine_tune_type": "lora", "num_layers": num_layers,
                 "lora_parameters": params, "learning_rate": 1e-5, "iters": 10, "seed": 0},
                d / "adapter_config.json")  # fmt: skip
    ours = small_model()
    lora.load(ours, d)
    assert ours.lora_config.r == 4 and ours.lora_config.scale == 20.0
    assert maxdiff(ours(X), theirs(X)) < 1e-4


def test_hand_written_peft_adapter_equals_merged_weights(tmp_path):
    # A PEFT directory built by hand from PEFT's documented layout; the reference is the
    # merged model W' = W + (lora_alpha / r) * B @ A (PEFT's merge rule) with no LoRA at all.
    rng = np.random.default_rng(4)
    r, alpha = 2, 4
    merged = small_model()
    tensors = {}
    for i in range(3):
        lin = merged.model.layers[i].self_attn.v_proj
        A = rng.normal(0, 0.2, (r, 64)).astype(np.float32)  # (r, in)
        B = rng.normal(0, 0.2, (lin.weight.shape[0], r)).astype(np.float32)  # (out, r)
        tensors[f"base_model.model.model.layers.{i}.self_attn.v_proj.lora_A.weight"] = mx.array(A)
        tensors[f"base_model.model.model.layers.{i}.self_attn.v_proj.lora_B.weight"] = mx.array(B)
        lin.weight = mx.array(np.array(lin.weight) + (alpha / r) * B @ A)
    mx.save_safetensors(str(tmp_path / "adapter_model.safetensors"), tensors, metadata={"format": "pt"})
    (tmp_path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "x", "r": r,
        "lora_alpha": alpha, "lora_dropout": 0.05, "target_modules": ["v_proj"], "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": None, "use_rslora": False,
        "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False,
    }))  # fmt: skip
    ours = small_model()
    lora.load(ours, tmp_path)
    assert ours.lora_config == LoRAConfig(r=2, alpha=4, dropout=0.05, targets=("v_proj",))
    assert maxdiff(ours(X), merged(X)) < 1e-4


# ----------------------------------------------------------------------------- formats (pure dicts)


def test_peft_tensor_layout_both_ways():
    # Expected keys and layouts written out from PEFT's documented naming by hand.
    a, b = mx.arange(6.0).reshape(3, 2), mx.arange(8.0).reshape(2, 4)  # ours: A (in=3, r=2), B (r=2, out=4)
    norm = mx.ones((3,))
    ours = {"model.layers.0.self_attn.q_proj.lora_a": a, "model.layers.0.self_attn.q_proj.lora_b": b}
    peft = formats.weights_to_peft(ours, {"model.norm.weight": norm})
    assert sorted(peft) == ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
                            "base_model.model.model.norm.weight"]  # fmt: skip
    np.testing.assert_array_equal(np.array(peft["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]),
                                  np.array(a).T)  # (r, in)
    np.testing.assert_array_equal(np.array(peft["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]),
                                  np.array(b).T)  # (out, r)
    # back, including PEFT's adapter-named keys and modules_to_save copies
    peft["base_model.model.model.layers.1.mlp.up_proj.lora_A.default.weight"] = mx.zeros((2, 3))
    peft["base_model.model.model.embed_tokens.modules_to_save.default.weight"] = mx.zeros((5, 3))
    back = formats.weights_from_peft(peft)
    assert sorted(back) == ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.lora_a",
                            "model.layers.0.self_attn.q_proj.lora_b", "model.layers.1.mlp.up_proj.lora_a",
                            "model.norm.weight"]  # fmt: skip
    assert back["model.layers.1.mlp.up_proj.lora_a"].shape == (3, 2)
    for k, v in ours.items():
        assert mx.array_equal(back[k], v).item()
    assert formats.split_weights(back)[1].keys() == {"model.embed_tokens.weight", "model.norm.weight"}


@pytest.mark.parametrize("rslora", [False, True])
def test_configs_both_ways_without_our_block(rslora):
    cfg = LoRAConfig(r=4, alpha=6, dropout=0.05, targets=("q_proj", "down_proj"), rslora=rslora, num_layers=2)
    paths = ["model.layers.2.self_attn.q_proj", "model.layers.3.mlp.down_proj"]
    peft = formats.peft_config(cfg, paths, [2, 3], 4, ["model.layers.2.input_layernorm.weight"], "org/base")
    assert (peft["r"], peft["lora_alpha"], peft["use_rslora"], peft["layers_to_transform"]) == (4, 6, rslora, [2, 3])
    assert peft["target_modules"] == ["down_proj", "q_proj"] and peft["modules_to_save"] == ["input_layernorm"]
    back = formats.config_from_peft(peft, 4, Path("x"))
    assert back == dataclasses.replace(cfg, targets=("down_proj", "q_proj"), train_norms=True)
    mlx = formats.mlx_config(cfg, paths, [2, 3], "org/base")
    # mlx-lm multiplies by scale as is: alpha / r, or alpha / sqrt(r) with rsLoRA
    assert mlx["lora_parameters"] == {"rank": 4, "scale": 6 / (2 if rslora else 4), "dropout": 0.05,
                                      "keys": ["mlp.down_proj", "self_attn.q_proj"]}  # fmt: skip
    back = formats.config_from_mlx(mlx, 4, Path("x"))
    assert (back.r, back.scale, back.num_layers, back.rslora) == (4, pytest.approx(cfg.scale), 2, False)
    # our own record wins over either format's keys
    assert formats.adapter_config({**peft, "mozgach": {"lora": cfg.to_dict()}}, "peft", 4, Path("x")) == cfg
    with pytest.raises(AdapterError, match="use_dora"):
        formats.config_from_peft({**peft, "use_dora": True}, 4, Path("x"))


def test_rope_scaling_travels_with_the_adapter(tmp_path):
    scaling = {"type": "linear", "factor": 4.0}
    m = small_model(rope_scaling=scaling, max_position_embeddings=1024)
    lora.apply(m, LoRAConfig(r=4))
    randomize_adapters(m)
    want = m(X)
    lora.save(m, tmp_path, format="mlx-lm")
    block = json.loads((tmp_path / "adapter_config.json").read_text())["mozgach"]
    assert block["rope_scaling"] == scaling and block["max_position_embeddings"] == 1024
    fresh = small_model()  # unscaled base
    assert maxdiff(fresh(X), small_model(rope_scaling=scaling)(X)) > 1e-3
    lora.load(fresh, tmp_path)
    assert fresh.args.rope_scaling == scaling and fresh.args.max_position_embeddings == 1024
    assert maxdiff(fresh(X), want) < 1e-5


@pytest.mark.parametrize("fmt", ["peft", "mlx-lm"])
def test_adapter_for_another_base_is_refused(tmp_path, fmt):
    other = Model(ModelArgs.from_dict(small_config(hidden_size=32, intermediate_size=64)))
    lora.apply(other, LoRAConfig(r=4))
    lora.save(other, tmp_path, format=fmt)
    m = small_model()
    before = m(X)
    with pytest.raises(AdapterError, match=r"model\.layers\.0\.self_attn\.k_proj\.lora_a has shape \(32, 4\) "
                                           r"but this base model needs \(64, 4\)"):  # fmt: skip
        lora.load(m, tmp_path)
    assert not hasattr(m, "lora_config") and mx.array_equal(m(X), before).item()  # nothing changed
    deeper = Model(ModelArgs.from_dict(small_config(num_hidden_layers=5)))
    lora.apply(deeper, LoRAConfig(r=4, targets=("q_proj",)))
    lora.save(deeper, tmp_path / "deep", format=fmt)
    with pytest.raises(AdapterError, match="layers.3.self_attn.q_proj.lora_a has no place"):
        lora.load(m, tmp_path / "deep")


def test_bad_adapter_dirs(tmp_path):
    m = small_model()
    with pytest.raises(AdapterError, match="does not exist"):
        lora.load(m, tmp_path / "nope")
    (tmp_path / "a").mkdir()
    with pytest.raises(AdapterError, match="adapter_config.json not found"):
        lora.load(m, tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        lora.load(m, tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    with pytest.raises(AdapterError, match="neither"):
        lora.load(m, tmp_path / "a")
    (tmp_path / "a" / "adapter_model.bin").write_bytes(b"x")
    with pytest.raises(AdapterError, match="safetensors"):
        lora.load(m, tmp_path / "a")
    with pytest.raises(AdapterError, match="no LoRA adapters"):
        lora.save(m, tmp_path / "b")
    lora.apply(m, LoRAConfig())
    with pytest.raises(ConfigError, match="format"):
        lora.save(m, tmp_path / "b", format="gguf")


def test_qlora_on_the_4bit_tiny_model(tmp_path):
    # The product's setting: adapters over a 4-bit base (our quant.QuantizedLinear).
    from mozgach_mlx.loss import sequence_loss

    model, tok = mz.load("tiny", quantize=4, group_size=64)
    model.eval()
    base = model(X)
    lora.apply(model, LoRAConfig(), seed=0)
    assert isinstance(model.model.layers[0].self_attn.q_proj.linear, quant.QuantizedLinear)
    assert mx.array_equal(model(X), base).item()
    _, g = nn.value_and_grad(model, lambda m: sequence_loss(m, X[:, :-1], X[:, 1:], mx.ones((1, 11)))[0])(model)
    assert set(dict(tree_flatten(g))) == set(lora.trainable(model))
    randomize_adapters(model)
    want = model(X)
    lora.save(model, tmp_path / "ad", format="both")
    fresh, _ = mz.load("tiny", quantize=4, group_size=64)
    lora.load(fresh, tmp_path / "ad")
    assert maxdiff(fresh(X), want) < 1e-5
    lora.fuse(fresh, out_dir=tmp_path / "fused", tokenizer=tok)  # re-quantized, saved with its config
    reloaded, _ = mz.load(tmp_path / "fused")
    assert isinstance(reloaded.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert mx.array_equal(reloaded(X), fresh(X)).item()
    # exact up to fp32 rounding when dequantized (re-quantizing adds 4-bit rounding, which on
    # this random tiny model is as large as quantizing the base itself)
    again, _ = mz.load("tiny", quantize=4, group_size=64)
    lora.load(again, tmp_path / "ad")
    lora.fuse(again, dequantize=True)
    assert not any(isinstance(x, nn.QuantizedLinear) for _, x in again.named_modules())
    assert maxdiff(again(X), want) < 1e-4


def test_loaded_base_name_is_recorded_in_the_adapter(tmp_path):
    model, _ = mz.load("tiny")
    lora.apply(model, lora.LoRAConfig(r=2, alpha=4))
    lora.save(model, tmp_path / "a", format="both")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "tiny" and cfg["model"] == "tiny"


def test_ensure_keeps_same_config_and_replaces_another():
    model, _ = mz.load("tiny")
    a = lora.LoRAConfig(r=2, alpha=4)
    lora.ensure(model, a)
    first = model.layers[0].self_attn.q_proj
    lora.ensure(model, lora.LoRAConfig(r=2, alpha=4))
    assert model.layers[0].self_attn.q_proj is first  # same config: untouched
    lora.ensure(model, lora.LoRAConfig(r=4, alpha=8, targets=("v_proj",)))
    assert isinstance(model.layers[0].self_attn.q_proj, nn.Linear)  # replaced, base kept
    assert model.layers[0].self_attn.v_proj.lora_a.shape == (256, 4)
