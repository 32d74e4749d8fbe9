"""Loading and saving in the Hugging Face layout: round trips, sharding, the Hub cache,
MLX-quantized checkpoints (written by mlx-lm itself), overrides, and every bad input
giving one line of our own exception type."""

import importlib
import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from conftest import random_model, small_config
from mlx.utils import tree_flatten

import mozgach_mlx as mz
from mozgach_mlx.errors import CheckpointError, ConfigError, MozgachError
from mozgach_mlx.models import Model, ModelArgs
from mozgach_mlx.quant import QuantizedLinear
from mozgach_mlx.tokenizer import ByteTokenizer

X = mx.array([[256, 104, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100]], dtype=mx.int32)


def write_hf_dir(d: Path, cfg: dict, weights: dict, dtype=mx.bfloat16):
    """A directory as transformers would write it (bf16, rotary buffers, PyTorch metadata)."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    mx.save_safetensors(str(d / "model.safetensors"), {k: v.astype(dtype) for k, v in weights.items()},
                        metadata={"format": "pt"})
    ByteTokenizer().save(d)
    return d


def one_line(excinfo):
    assert isinstance(excinfo.value, MozgachError)
    assert "\n" not in str(excinfo.value), str(excinfo.value)


def test_tiny_round_trip(tmp_path):
    m, tok = mz.load("tiny")
    mz.save(m, tok, tmp_path / "t")
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == [
        "config.json", "model.safetensors", "mozgach_byte_tokenizer.json"]
    m2, tok2 = mz.load(tmp_path / "t")
    assert isinstance(tok2, ByteTokenizer)
    assert m2.args == m.args
    assert mx.array_equal(m(X), m2(X))


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_round_trip_loads_in_mlx_lm_too(tmp_path, model_type):
    m = random_model(small_config(model_type, tie_word_embeddings=model_type == "qwen2"))
    mz.save(m, ByteTokenizer(), tmp_path / "m")
    m2, _ = mz.load(tmp_path / "m")
    assert mx.array_equal(m(X), m2(X))
    from mlx_lm.utils import load_model

    theirs, _ = load_model(tmp_path / "m")
    assert float(mx.abs(theirs(X) - m(X)).max()) <= 1e-4


def test_sharded_save_and_load(tmp_path):
    m = random_model(small_config())
    mz.save(m, ByteTokenizer(), tmp_path / "s", max_shard_bytes=100_000)
    shards = sorted(p.name for p in (tmp_path / "s").glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    m2, _ = mz.load(tmp_path / "s")
    assert mx.array_equal(m(X), m2(X))
    # saving again unsharded removes the old shards and index
    mz.save(m2, ByteTokenizer(), tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s").glob("*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "s" / "model.safetensors.index.json").exists()
    assert mx.array_equal(m(X), mz.load(tmp_path / "s")[0](X))


def test_hf_bf16_checkpoint_loads_as_fp32_on_cpu(tmp_path):
    cfg = small_config(tie_word_embeddings=True)
    m = random_model(cfg)
    w = dict(tree_flatten(m.parameters()))
    w["model.layers.0.self_attn.rotary_emb.inv_freq"] = mx.ones((8,))
    w["lm_head.weight"] = w["model.embed_tokens.weight"]  # some exports duplicate the tied head
    d = write_hf_dir(tmp_path / "hf", cfg, w)
    m2, _ = mz.load(d)
    assert all(v.dtype == mx.float32 for _, v in tree_flatten(m2.parameters()))
    assert "lm_head" not in m2
    ref = Model(ModelArgs.from_dict(cfg))
    ref.load_weights([(k, v.astype(mx.bfloat16).astype(mx.float32)) for k, v in tree_flatten(m.parameters())])
    assert mx.array_equal(ref(X), m2(X))
    m3, _ = mz.load(d, dtype="bfloat16")
    assert m3.model.embed_tokens.weight.dtype == mx.bfloat16


def test_tie_word_embeddings_inferred_when_config_omits_it(tmp_path):
    cfg = small_config()
    del cfg["tie_word_embeddings"]
    untied = random_model({**cfg, "tie_word_embeddings": False})
    d = write_hf_dir(tmp_path / "u", cfg, dict(tree_flatten(untied.parameters())), dtype=mx.float32)
    assert mz.load(d)[0].args.tie_word_embeddings is False
    tied = random_model({**cfg, "tie_word_embeddings": True})
    d = write_hf_dir(tmp_path / "t", cfg, dict(tree_flatten(tied.parameters())), dtype=mx.float32)
    assert mz.load(d)[0].args.tie_word_embeddings is True


def test_mlx_quantized_checkpoint_written_by_mlx_lm(tmp_path):
    from mlx_lm.utils import load_model, quantize_model, save_config, save_model

    cfg = small_config()
    d = tmp_path / "q"
    mz.save(random_model(cfg), ByteTokenizer(), d)
    theirs, config = load_model(d)
    theirs, config = quantize_model(theirs, config, group_size=32, bits=4)
    save_model(d, theirs)
    save_config(config, d / "config.json")
    ours, _ = mz.load(d)
    assert isinstance(ours.layers[0].self_attn.q_proj, QuantizedLinear)
    assert ours.layers[1].mlp.down_proj.bits == 4 and ours.layers[1].mlp.down_proj.group_size == 32
    assert float(mx.abs(ours(X) - theirs(X)).max()) <= 1e-4
    # and our save of it loads back identically, with the quantization entry
    mz.save(ours, ByteTokenizer(), tmp_path / "q2")
    assert json.loads((tmp_path / "q2" / "config.json").read_text())["quantization"]["bits"] == 4
    assert mx.array_equal(mz.load(tmp_path / "q2")[0](X), ours(X))


def test_load_with_quantize(tmp_path):
    m, _ = mz.load("tiny", quantize=8, group_size=32)
    assert isinstance(m.layers[0].mlp.up_proj, QuantizedLinear) and m.layers[0].mlp.up_proj.bits == 8
    assert isinstance(m.model.embed_tokens, nn.Embedding)
    m4, _ = mz.load("tiny", quantize=4, quantize_embeddings=True)
    assert isinstance(m4.model.embed_tokens, nn.QuantizedEmbedding)
    with pytest.raises(ConfigError, match="bits must be one of") as e:
        mz.load("tiny", quantize=3)
    one_line(e)
    with pytest.raises(ConfigError, match="group_size must be one of"):
        mz.load("tiny", quantize=4, group_size=48)


def test_rope_overrides_apply_before_build(tmp_path):
    m, tok = mz.load("tiny", rope_scaling={"type": "linear", "factor": 4.0}, max_position_embeddings=8192)
    assert m.args.rope_scaling == {"type": "linear", "factor": 4.0} and m.args.max_position_embeddings == 8192
    assert all(layer.self_attn.rope.rope_type == "linear" for layer in m.layers)
    mz.save(m, tok, tmp_path / "lin")
    m2, _ = mz.load(tmp_path / "lin")  # the scaling travels in config.json
    assert m2.args.rope_scaling["type"] == "linear" and mx.array_equal(m(X), m2(X))
    m3, _ = mz.load(tmp_path / "lin", rope_scaling={"rope_type": "none"})
    assert m3.layers[0].self_attn.rope.rope_type == "default"
    m4, _ = mz.load(tmp_path / "lin", rope_scaling={"rope_type": "dynamic", "factor": 2.0},
                    max_position_embeddings=2048)
    assert m4.layers[0].self_attn.rope.rope_type == "dynamic"


def fake_hub_cache(root: Path, repo: str, src: Path) -> None:
    """The huggingface_hub cache layout: models--org--name/{refs/main, snapshots/<sha>/...}."""
    base = root / ("models--" + repo.replace("/", "--"))
    sha = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(src, base / "snapshots" / sha)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(sha)


def test_hub_repo_from_cache_and_offline_error(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    m, tok = mz.load("tiny")
    mz.save(m, tok, tmp_path / "src")
    fake_hub_cache(tmp_path / "hub", "mozgach/tiny-test", tmp_path / "src")
    m2, _ = mz.load("mozgach/tiny-test")
    assert mx.array_equal(m(X), m2(X))
    with pytest.raises(CheckpointError, match="'?meta-llama/Nope-7B'?: not in the Hugging Face cache") as e:
        mz.load("meta-llama/Nope-7B")
    one_line(e)


@pytest.fixture
def good_dir(tmp_path):
    m, tok = mz.load("tiny")
    return mz.save(m, tok, tmp_path / "good")


def edit_config(d: Path, **changes):
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


# Each bad input, the exception type and the words that must name the problem.
def _missing_config(d):
    (d / "config.json").unlink()


def _invalid_json(d):
    (d / "config.json").write_text("{oops")


def _missing_weights(d):
    (d / "model.safetensors").unlink()


def _only_pytorch_bin(d):
    (d / "model.safetensors").rename(d / "pytorch_model.bin")


def _unsupported_model_type(d):
    edit_config(d, model_type="gpt_neox")


def _missing_required_field(d):
    edit_config(d, hidden_size=None)


def _truncated(d):
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _garbage(d):
    (d / "model.safetensors").write_bytes(b"\x07")


def _wrong_shapes(d):
    edit_config(d, intermediate_size=512)


def _missing_tensor(d):
    w = mx.load(str(d / "model.safetensors"))
    del w["model.layers.1.mlp.up_proj.weight"]
    mx.save_safetensors(str(d / "model.safetensors"), w)


def _unexpected_tensor(d):
    w = mx.load(str(d / "model.safetensors"))
    w["model.layers.9.mlp.up_proj.weight"] = mx.zeros((2, 2))
    mx.save_safetensors(str(d / "model.safetensors"), w)


def _missing_shard(d):
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))


def _unknown_rope_type(d):
    edit_config(d, rope_scaling={"type": "ntk-by-magic", "factor": 2.0})


def _bad_factor(d):
    edit_config(d, rope_scaling={"rope_type": "linear", "factor": "four"})


def _bad_quantization(d):
    edit_config(d, quantization={"bits": 4})


BAD = [
    (_missing_config, CheckpointError, "no config.json"),
    (_invalid_json, CheckpointError, "config.json: invalid JSON"),
    (_missing_weights, CheckpointError, "no model.*safetensors weights"),
    (_only_pytorch_bin, CheckpointError, "found PyTorch weights"),
    (_unsupported_model_type, ConfigError, "model_type 'gpt_neox' is not supported"),
    (_missing_required_field, ConfigError, "missing required field.*hidden_size"),
    (_truncated, CheckpointError, "model.safetensors: truncated"),
    (_garbage, CheckpointError, "not a valid safetensors file"),
    (_wrong_shapes, CheckpointError, r"has shape \(768, 256\), config.json implies \(512, 256\)"),
    (_missing_tensor, CheckpointError, "1 tensor.*missing, e.g. model.layers.1.mlp.up_proj.weight"),
    (_unexpected_tensor, CheckpointError, "unexpected tensor.*model.layers.9.mlp.up_proj.weight"),
    (_missing_shard, CheckpointError, "missing: model-00002-of-00002.safetensors"),
    (_unknown_rope_type, ConfigError, "type 'ntk-by-magic' is not supported"),
    (_bad_factor, ConfigError, r"rope_scaling\['factor'\] must be a finite number"),
    (_bad_quantization, ConfigError, "'quantization' must be"),
]


@pytest.mark.parametrize("breaker, exc, match", BAD, ids=[b[0].__name__.strip("_") for b in BAD])
def test_bad_checkpoints_give_one_line_errors(good_dir, breaker, exc, match):
    breaker(good_dir)
    with pytest.raises(exc, match=match) as e:
        mz.load(good_dir)
    one_line(e)


def test_bad_paths_and_overrides(good_dir, tmp_path):
    with pytest.raises(CheckpointError, match="no such model directory") as e:
        mz.load(tmp_path / "does" / "not" / "exist")
    one_line(e)
    with pytest.raises(CheckpointError, match="is a file"):
        mz.load(good_dir / "config.json")
    with pytest.raises(ConfigError, match="not supported") as e:
        mz.load(good_dir, rope_scaling={"type": "longrope-ish", "factor": 2.0})
    one_line(e)
    with pytest.raises(ConfigError, match="must be >= 1"):
        mz.load("tiny", rope_scaling={"type": "linear", "factor": 0.25})


def test_save_refuses_a_model_with_lora_applied(tmp_path):
    m, tok = mz.load("tiny")
    q = m.layers[0].self_attn.q_proj

    class Wrapped(nn.Module):  # the shape of lora.LoRALinear (linear, lora_a, lora_b)
        def __init__(self):
            super().__init__()
            self.linear = q
            self.lora_a = mx.zeros((256, 4))
            self.lora_b = mx.zeros((4, 256))

    m.layers[0].self_attn.q_proj = Wrapped()
    with pytest.raises(CheckpointError, match="LoRA adapters applied"):
        mz.save(m, tok, tmp_path / "x")


def test_public_api_reexports():
    assert mz.load is importlib.import_module("mozgach_mlx.models").load
    assert mz.ModelArgs is ModelArgs and callable(mz.save)
