"""Where things sit inside a model: the transformer blocks, the embedding, the final norm,
and any module by its dotted parameter path.

Paths are those of the parameter tree and of the checkpoint keys: our models and mlx-lm's
keep the blocks at ``model.layers`` (``model.layers.0.self_attn.q_proj``); a bare inner
model keeps them at ``layers``. LoRA, the adapter bank and loading share these helpers.
"""

from __future__ import annotations

from typing import Any

import mlx.nn as nn

from ..errors import ConfigError

__all__ = [
    "blocks",
    "blocks_prefix",
    "embedding_path",
    "final_norm_path",
    "get_module",
    "is_linear",
    "is_norm",
    "linear_dims",
    "natural_key",
]


def blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks, in order (``model.model.layers`` or ``model.layers``)."""
    if "model" in model and "layers" in model.model:
        return model.model.layers
    if hasattr(model, "layers"):
        return model.layers
    raise ConfigError(f"{type(model).__name__} has no transformer blocks at model.model.layers or model.layers.")


def blocks_prefix(model: nn.Module) -> str:
    """Path of the block list: ``"model.layers"`` or ``"layers"``; block i is ``f"{prefix}.{i}"``."""
    return "model.layers" if "model" in model and "layers" in model.model else "layers"


def embedding_path(model: nn.Module) -> str:
    """Path of the input embedding: ``"model.embed_tokens"`` or ``"embed_tokens"``."""
    return "model.embed_tokens" if "model" in model else "embed_tokens"


def final_norm_path(model: nn.Module) -> str:
    """Path of the norm after the last block: ``"model.norm"`` or ``"norm"`` (it may be absent)."""
    return "model.norm" if "model" in model else "norm"


def get_module(root: nn.Module, path: str) -> Any:
    """The module (or parameter) at a dotted path, e.g. ``"model.layers.0.self_attn.q_proj"``.

    Numeric parts index lists. Raises KeyError / AttributeError / IndexError for a path
    that is not there.
    """
    obj: Any = root
    for part in path.split("."):
        obj = obj[int(part)] if isinstance(obj, list) else obj[part]
    return obj


def natural_key(path: str) -> list:
    """Sort key ordering paths by block number, not as text (``layers.2`` before ``layers.10``)."""
    return [int(p) if p.isdigit() else p for p in path.split(".")]


def is_linear(m: nn.Module) -> bool:
    """A dense or quantized linear layer (any subclass)."""
    return isinstance(m, (nn.Linear, nn.QuantizedLinear))


def is_norm(m: nn.Module) -> bool:
    """An RMSNorm / LayerNorm, or a module of a class named ``...Norm``."""
    return isinstance(m, (nn.RMSNorm, nn.LayerNorm)) or type(m).__name__.endswith("Norm")


def linear_dims(linear: nn.Module) -> tuple[int, int]:
    """``(input_dims, output_dims)`` of a Linear or QuantizedLinear.

    The weight is (out, in); a quantized weight packs ``32 // bits`` values per uint32.
    """
    out_dims, in_dims = linear.weight.shape
    if isinstance(linear, nn.QuantizedLinear):
        in_dims = in_dims * 32 // linear.bits
    return in_dims, out_dims
