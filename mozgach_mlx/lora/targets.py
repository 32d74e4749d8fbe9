"""Which parts of a model an adapter touches under a :class:`LoRAConfig` (read only).

The adapted blocks are the last ``num_layers`` ones; inside each, every linear layer whose
path matches a target gets a LoRA layer; with ``train_embeddings`` / ``train_norms`` the
embedding and the norms of the adapted blocks (plus the final norm) are trained in full.
"""

from __future__ import annotations

import mlx.nn as nn

from ..errors import ConfigError
from ..models.paths import (
    blocks,
    blocks_prefix,
    embedding_path,
    final_norm_path,
    get_module,
    is_linear,
    is_norm,
    natural_key,
)
from .config import ALL_LINEAR, LoRAConfig
from .layer import LoRALinear

__all__ = ["extra_modules", "lora_modules", "norm_paths", "selected_blocks", "target_layers"]


def selected_blocks(model: nn.Module, cfg: LoRAConfig) -> list[int]:
    """Indices of the blocks ``cfg`` adapts: the last ``cfg.num_layers`` (all by default)."""
    n = len(blocks(model))
    if cfg.num_layers is not None and cfg.num_layers > n:
        raise ConfigError(f"LoRAConfig.num_layers is {cfg.num_layers} but the model has only {n} blocks.")
    k = n if cfg.num_layers is None else cfg.num_layers
    return list(range(n - k, n))


def _matches(rel_path: str, target: str) -> bool:
    return target == ALL_LINEAR or rel_path == target or rel_path.endswith("." + target)


def target_layers(model: nn.Module, cfg: LoRAConfig) -> list[tuple[str, nn.Module]]:
    """``[(full path, base linear)]`` of every layer that gets an adapter, in path order.

    A layer that already is a :class:`LoRALinear` counts with its base layer.

    Raises:
        ConfigError: a target matches no linear layer in the selected blocks.
    """
    layers, prefix = blocks(model), blocks_prefix(model)
    plan, used = [], set()
    for i in selected_blocks(model, cfg):
        modules = dict(layers[i].named_modules())
        for rel, m in modules.items():
            parent = rel.rsplit(".", 1)[0] if "." in rel else ""
            if isinstance(modules.get(parent), LoRALinear):
                continue  # the base inside an adapter: reached through the adapter
            if isinstance(m, LoRALinear):
                base = m.linear
            elif is_linear(m):
                base = m
            else:
                continue
            hits = [t for t in cfg.targets if _matches(rel, t)]
            if hits:
                used.update(hits)
                plan.append((f"{prefix}.{i}.{rel}", base))
    unused = [t for t in cfg.targets if t not in used]
    if unused:
        names = sorted({rel for rel, m in layers[-1].named_modules() if is_linear(m) and not rel.endswith(".linear")})
        raise ConfigError(
            f"LoRA target(s) {unused} match no linear layer of the model's blocks; "
            f"available: {', '.join(names) or 'none'}."
        )
    return sorted(plan, key=lambda pm: natural_key(pm[0]))


def norm_paths(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Norm modules trained with ``train_norms``: those of the adapted blocks + the final one."""
    layers, prefix = blocks(model), blocks_prefix(model)
    paths = []
    for i in selected_blocks(model, cfg):
        paths += [f"{prefix}.{i}.{rel}" for rel, m in layers[i].named_modules() if is_norm(m)]
    final = final_norm_path(model)
    try:
        if is_norm(get_module(model, final)):
            paths.append(final)
    except (KeyError, AttributeError):
        pass
    return sorted(paths, key=natural_key)


def extra_modules(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Module paths trained in full (embedding, norms) under ``cfg``.

    Raises:
        ConfigError: ``train_embeddings`` on a quantized (or missing) embedding.
    """
    paths = []
    if cfg.train_embeddings:
        emb = embedding_path(model)
        m = get_module(model, emb)
        if isinstance(m, nn.QuantizedEmbedding) or not isinstance(m, nn.Embedding):
            raise ConfigError(
                "train_embeddings needs a full-precision embedding, but the model's embed_tokens is "
                f"{type(m).__name__}; load the base with quantize_embeddings=False."
            )
        paths.append(emb)
    if cfg.train_norms:
        paths += norm_paths(model, cfg)
    return paths


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """``[(path, layer)]`` of the model's LoRA layers, in ``named_modules`` order."""
    return [(p, m) for p, m in model.named_modules() if isinstance(m, LoRALinear)]
