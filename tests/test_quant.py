"""Base quantization: bytes, bounded logit error, our CPU dequantize path against
``mx.quantized_matmul``, and compatibility of the saved format with mlx-lm."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mozgach_mlx as mz
from mozgach_mlx import quant
from mozgach_mlx.errors import ConfigError
from mozgach_mlx.models import TINY_CONFIG, tiny_model
from mozgach_mlx.quant import QuantizedEmbedding, QuantizedLinear

TEXT = "QLoRA keeps the base in 4 bits and trains small adapters on top."


def rel_err(a, b) -> float:
    return float(mx.linalg.norm(a - b) / mx.linalg.norm(b))


@pytest.mark.parametrize("bits, bound", [(8, 0.03), (4, 0.4)])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_quantized_logits_close_to_full_precision(bits, bound, group_size):
    # Weight std 0.02 (the usual LLM init, close to trained Llama weight statistics): the
    # tiny model's own 0.1 init (chosen for LoRA learnability) makes the random network
    # far more sensitive to any perturbation (4-bit: 0.55-0.65 relative error there).
    m, tok = tiny_model(init_std=0.02)
    x = mx.array([tok.encode(TEXT)], dtype=mx.int32)
    ref = m(x)
    report = quant.quantize_model(m, bits=bits, group_size=group_size)
    assert report.n_quantized == 4 * 7  # q, k, v, o, gate, up, down per layer; embeddings kept
    # measured on the random-init tiny model: 8-bit 0.011-0.018, 4-bit 0.24-0.31
    assert rel_err(m(x), ref) < bound


def test_per_layer_error_matches_quantization_step():
    # affine b-bit quantization of N(0, s) over groups of 64: step ~ range/(2^b - 1),
    # uniform rounding error step/sqrt(12); range of 64 normals ~ 4.7 s -> 4-bit ~ 9% of s
    rng = np.random.default_rng(0)
    lin = nn.Linear(512, 256, bias=False)
    lin.weight = mx.array(rng.normal(0, 0.02, (256, 512)).astype(np.float32))
    x = mx.array(rng.normal(size=(64, 512)).astype(np.float32))
    for bits, bound in ((4, 0.12), (8, 0.01)):
        q = QuantizedLinear.from_linear(lin, 64, bits)
        assert rel_err(q(x), lin(x)) < bound
        assert rel_err(q(x), lin(x)) > bound / 20  # and it really is quantized


def test_bytes_before_and_after():
    m, _ = tiny_model()
    c = TINY_CONFIG
    d, f, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * c["head_dim"]
    shapes = [(d, d), (kv, d), (kv, d), (d, d), (f, d), (f, d), (d, f)]  # (out, in) per layer
    linear = c["num_hidden_layers"] * sum(o * i for o, i in shapes)
    other = c["vocab_size"] * d + (2 * c["num_hidden_layers"] + 1) * d  # embeddings + norms
    report = quant.quantize_model(m, bits=4, group_size=64)
    assert report.bytes_before == 4 * (linear + other)
    # 4 bits per weight + an fp32 scale and bias per group of 64
    packed = c["num_hidden_layers"] * sum(o * i // 2 + 2 * 4 * o * (i // 64) for o, i in shapes)
    assert report.bytes_after == packed + 4 * other
    assert report.ratio > 5
    assert "MiB ->" in str(report)


def test_dequant_path_equals_quantized_matmul(monkeypatch):
    rng = np.random.default_rng(1)
    lin = nn.Linear(256, 96, bias=True)
    lin.update({"weight": mx.array(rng.normal(0, 0.05, (96, 256)).astype(np.float32)),
                "bias": mx.array(rng.normal(0, 0.1, (96,)).astype(np.float32))})
    q = QuantizedLinear.from_linear(lin, 32, 4)
    calls = []
    real = mx.quantized_matmul
    monkeypatch.setattr(mx, "quantized_matmul", lambda *a, **k: calls.append(1) or real(*a, **k))
    for shape in [(1, 1, 256), (2, 37, 256)]:
        x = mx.array(rng.normal(size=shape).astype(np.float32))
        monkeypatch.setenv("MOZGACH_QMATMUL", "quantized")
        n0 = len(calls)
        y_q = q(x)
        assert len(calls) == n0 + 1
        monkeypatch.setenv("MOZGACH_QMATMUL", "dequant")
        y_d = q(x)
        assert len(calls) == n0 + 1  # no quantized_matmul on this path
        np.testing.assert_allclose(np.array(y_d), np.array(y_q), atol=1e-5, rtol=1e-4)
        # gradients w.r.t. the input (what LoRA training needs) agree too
        gq = mx.grad(lambda x: (q(x) ** 2).sum())(x)
        monkeypatch.setenv("MOZGACH_QMATMUL", "quantized")
        gd = mx.grad(lambda x: (q(x) ** 2).sum())(x)
        np.testing.assert_allclose(np.array(gd), np.array(gq), atol=1e-4, rtol=1e-4)
    # auto on CPU: one decoding row -> quantized_matmul, a training batch -> dequantize
    monkeypatch.setenv("MOZGACH_QMATMUL", "auto")
    n0 = len(calls)
    q(mx.zeros((1, 1, 256)))
    assert len(calls) == n0 + 1
    q(mx.zeros((1, quant.DEQUANT_MIN_ROWS, 256)))
    assert len(calls) == n0 + 1


def test_quantized_embeddings_and_tied_head(monkeypatch):
    m, tok = tiny_model(init_std=0.02)  # see test_quantized_logits_close_to_full_precision
    x = mx.array([tok.encode(TEXT)], dtype=mx.int32)
    ref = m(x)
    quant.quantize_model(m, bits=8, group_size=64, quantize_embeddings=True)
    assert isinstance(m.model.embed_tokens, QuantizedEmbedding)
    y = m(x)
    assert rel_err(y, ref) < 0.03
    monkeypatch.setenv("MOZGACH_QMATMUL", "quantized")
    np.testing.assert_allclose(np.array(m(x)), np.array(y), atol=1e-4)


def test_layers_with_indivisible_width_stay_full_precision():
    m, _ = mz.load("tiny")
    m.layers[0].mlp.down_proj = nn.Linear(100, 256, bias=False)  # 100 % 64 != 0
    quant.quantize_model(m, bits=4, group_size=64)
    assert type(m.layers[0].mlp.down_proj) is nn.Linear
    assert isinstance(m.layers[1].mlp.down_proj, QuantizedLinear)


def test_quantization_config_and_mlx_lm_reads_our_quantized_save(tmp_path):
    from mlx_lm.utils import load_model

    m, tok = mz.load("tiny", quantize=4, group_size=32)
    assert quant.quantization_config(m) == {"group_size": 32, "bits": 4, "mode": "affine"}
    mz.save(m, tok, tmp_path / "q")
    theirs, config = load_model(tmp_path / "q")
    assert config["quantization"]["bits"] == 4
    x = mx.array([tok.encode(TEXT)], dtype=mx.int32)
    assert float(mx.abs(theirs(x) - m(x)).max()) <= 1e-4
    names = {k for k, _ in tree_flatten(m.parameters())}
    assert "model.layers.0.self_attn.q_proj.scales" in names and "model.layers.0.self_attn.q_proj.biases" in names


def test_bad_settings(tmp_path):
    m, _ = tiny_model()
    with pytest.raises(ConfigError, match="bits must be one of"):
        quant.quantize_model(m, bits=2)
    with pytest.raises(ConfigError, match="group_size must be one of"):
        quant.quantize_model(m, bits=4, group_size=16)
    m2, tok = mz.load("tiny", quantize=4)
    mz.save(m2, tok, tmp_path / "q")
    with pytest.raises(ConfigError, match="already quantized"):
        mz.load(tmp_path / "q", quantize=8)
    with pytest.raises(ConfigError, match="group_size=64"):
        mz.load(tmp_path / "q", quantize=4, group_size=32)
    # its own format: loaded as-is (an mlx-community 4-bit checkpoint under the CLI's default --quantize 4)
    same, _ = mz.load(tmp_path / "q", quantize=4)
    x = mx.array([tok.encode(TEXT)], dtype=mx.int32)
    assert float(mx.abs(same(x) - m2(x)).max()) == 0.0
    assert quant.quantization_config(same) == quant.quantization_config(m2)
