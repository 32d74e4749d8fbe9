"""models.paths: finding blocks, modules and linear shapes by their checkpoint paths.

Expected values are written out by hand from the model's own attribute structure (what
the Hugging Face checkpoint keys are) and from the layers' constructor arguments.
"""

import mlx.core as mx
import mlx.nn as nn
import pytest

from mozgach_mlx.errors import ConfigError
from mozgach_mlx.models import Model, ModelArgs, paths

ARGS = {
    "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 3, "intermediate_size": 96,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128, "rms_norm_eps": 1e-5,
}  # fmt: skip


@pytest.fixture
def model():
    return Model(ModelArgs.from_dict(ARGS))


def test_blocks_and_prefixes_of_a_full_and_a_bare_model(model):
    assert paths.blocks(model) is model.model.layers and len(paths.blocks(model)) == 3
    assert (paths.blocks_prefix(model), paths.embedding_path(model), paths.final_norm_path(model)) == (
        "model.layers", "model.embed_tokens", "model.norm")
    inner = model.model  # the bare inner model: blocks at .layers
    assert paths.blocks(inner) is inner.layers
    assert (paths.blocks_prefix(inner), paths.embedding_path(inner), paths.final_norm_path(inner)) == (
        "layers", "embed_tokens", "norm")
    with pytest.raises(ConfigError, match="no transformer blocks"):
        paths.blocks(nn.Linear(2, 2))


def test_get_module_follows_checkpoint_paths(model):
    assert paths.get_module(model, "model.layers.2.self_attn.q_proj") is model.model.layers[2].self_attn.q_proj
    assert paths.get_module(model, "model.norm") is model.model.norm
    assert paths.get_module(model, "model.layers.0.mlp.up_proj.weight") is model.model.layers[0].mlp.up_proj.weight
    with pytest.raises(KeyError):
        paths.get_module(model, "model.layers.0.nope")
    with pytest.raises(IndexError):
        paths.get_module(model, "model.layers.7")


def test_natural_key_orders_by_block_number():
    ps = ["model.layers.10.mlp", "model.layers.2.self_attn", "model.layers.2.mlp", "model.layers.1.mlp"]
    assert sorted(ps, key=paths.natural_key) == [
        "model.layers.1.mlp", "model.layers.2.mlp", "model.layers.2.self_attn", "model.layers.10.mlp"]
    assert sorted(ps) != sorted(ps, key=paths.natural_key)  # as text, 10 sorts before 2


@pytest.mark.parametrize("bits", [4, 8])
def test_linear_dims_of_dense_and_quantized(bits):
    dense = nn.Linear(64, 40)
    assert paths.linear_dims(dense) == (64, 40)
    q = nn.QuantizedLinear.from_linear(dense, group_size=32, bits=bits)
    assert q.weight.shape == (40, 64 * bits // 32)  # packed: 32 // bits values per uint32
    assert paths.linear_dims(q) == (64, 40)
    assert paths.is_linear(dense) and paths.is_linear(q)
    assert not paths.is_linear(nn.Embedding(4, 4))


def test_is_norm(model):
    assert paths.is_norm(model.model.norm) and paths.is_norm(nn.LayerNorm(4))
    assert not paths.is_norm(model.model.layers[0].mlp)
    assert not paths.is_norm(mx.ones(3))
