"""Put adapters into a model and take them out: apply, reset, ensure, remove, fuse.

:func:`apply` swaps each targeted linear layer for a :class:`LoRALinear` wrapping it and
freezes everything else; the base values of modules trained in full (embedding, norms)
are remembered so :func:`reset` and :func:`remove` can restore them.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .. import quant
from ..errors import AdapterError, ConfigError
from ..models.paths import get_module, linear_dims, natural_key
from .config import LoRAConfig
from .layer import LoRALinear
from .targets import extra_modules, lora_modules, target_layers

__all__ = ["apply", "ensure", "fuse", "remove", "require_adapters", "reset", "restore_base", "trainable"]


def _set_base_state(model: nn.Module, state: dict | None) -> None:
    # A plain attribute (not a Module child), so it is no part of the parameter tree.
    object.__setattr__(model, "_lora_base_state", state)


def _base_state(model: nn.Module) -> dict:
    return model.__dict__.get("_lora_base_state") or {}


def apply(model: nn.Module, cfg: LoRAConfig | None = None, *, seed: int | None = None) -> nn.Module:
    """Add LoRA adapters to ``model`` in place and freeze everything else.

    Args:
        model: our model (or an mlx-lm model: same paths) without adapters.
        cfg: what to adapt; default ``LoRAConfig()`` (its field defaults).
        seed: seed for the ``lora_a`` initialisation (default: MLX's global generator).

    Returns:
        ``model``, with ``model.lora_config = cfg``. Trainable parameters afterwards are
        exactly the adapters (plus embeddings / norms if configured): :func:`trainable`.
    """
    cfg = cfg or LoRAConfig()
    if not isinstance(cfg, LoRAConfig):
        raise ConfigError(f"lora.apply expects a LoRAConfig, got {type(cfg).__name__}.")
    if lora_modules(model):
        raise ConfigError("the model already has LoRA adapters; call lora.remove(model) first or lora.reset(model).")
    plan = target_layers(model, cfg)
    extras = extra_modules(model, cfg)
    model.freeze()
    keys = _keys(seed, len(plan))
    layers = [
        (path, LoRALinear(base, cfg.r, cfg.alpha, cfg.dropout, cfg.rslora, key=k))
        for (path, base), k in zip(plan, keys, strict=True)
    ]
    for _, layer in layers:
        layer.train(model.training)  # new modules start in training mode; follow the model
    model.update_modules(tree_unflatten(layers))
    base_state = {}
    for path in extras:
        m = get_module(model, path)
        m.unfreeze()
        # Arrays are immutable: keeping references is a free snapshot of the base values.
        base_state.update({f"{path}.{k}": v for k, v in tree_flatten(m.parameters())})
    _set_base_state(model, base_state)
    model.lora_config = cfg
    return model


def _keys(seed: int | None, n: int) -> list[mx.array | None]:
    if seed is None:
        return [None] * n
    return list(mx.random.split(mx.random.key(seed), max(n, 1)))[:n] if n else []


def require_adapters(model: nn.Module) -> LoRAConfig:
    """The config of the model's adapters; AdapterError if it has none."""
    cfg = getattr(model, "lora_config", None)
    if cfg is None or not lora_modules(model):
        raise AdapterError("the model has no LoRA adapters; call mz.lora.apply(model, cfg) or mz.lora.load first.")
    return cfg


def reset(model: nn.Module, seed: int | None = None) -> nn.Module:
    """Re-initialise every adapter (``lora_a`` random, ``lora_b`` zero) and restore trained
    embeddings / norms to the base values: a fresh adapter without reloading the base.

    With the same ``seed`` the result equals ``apply(model, cfg, seed=seed)`` on the base.
    """
    require_adapters(model)
    mods = lora_modules(model)
    for (_, m), k in zip(sorted(mods, key=lambda pm: natural_key(pm[0])), _keys(seed, len(mods)), strict=True):
        m.reset_parameters(k)
    restore_base(model)
    return model


def restore_base(model: nn.Module) -> None:
    """Put the base values back into the modules trained in full (embedding, norms)."""
    state = _base_state(model)
    if state:
        model.update(tree_unflatten(list(state.items())))


def trainable(model: nn.Module) -> dict[str, mx.array]:
    """Flat ``{parameter path: array}`` of what is trained (what a checkpoint holds)."""
    return dict(tree_flatten(model.trainable_parameters()))


def ensure(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Make ``model`` carry adapters of exactly ``cfg``: keep them if it already does,
    replace adapters of another config (the base is kept), apply if it has none."""
    current = getattr(model, "lora_config", None)
    if current != cfg:
        if current is not None:
            remove(model)
        apply(model, cfg)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Take the adapters out (each LoRA layer back to its base layer) and restore trained
    embeddings / norms to their base values. The base stays frozen."""
    mods = lora_modules(model)
    if mods:
        model.update_modules(tree_unflatten([(p, m.linear) for p, m in mods]))
    state = _base_state(model)
    if state:
        model.update(tree_unflatten(list(state.items())))
        for path in {k.rsplit(".", 1)[0] for k in state}:
            get_module(model, path).freeze()
    _set_base_state(model, None)
    if getattr(model, "lora_config", None) is not None:
        del model.lora_config
    return model


def fuse(
    model: nn.Module,
    dequantize: bool = False,
    *,
    out_dir: str | Path | None = None,
    tokenizer=None,
) -> nn.Module:
    """Merge the adapters into the base weights, in place: ``W <- W + s B^T A^T``.

    Args:
        dequantize: return full-precision layers: the adapted layers, and every other
            quantized Linear / Embedding of the model too (a standalone fp model).
            Otherwise adapted quantized layers are re-quantized with their own settings
            (adds 4-bit rounding error on top of the adapter).
        out_dir: also save the fused model there (Hugging Face layout, ``mz.save``);
            needs ``tokenizer``.

    Trained embeddings / norms are already in the model and stay. Returns ``model``
    without adapters (``model.lora_config`` removed).
    """
    require_adapters(model)
    if out_dir is not None and tokenizer is None:
        raise ConfigError("lora.fuse(out_dir=...) needs the tokenizer to save a standalone model.")
    model.update_modules(tree_unflatten([(p, m.fuse(dequantize)) for p, m in lora_modules(model)]))
    if dequantize:
        _dequantize_all(model)
    _set_base_state(model, None)
    del model.lora_config
    mx.eval(model.parameters())
    if out_dir is not None:
        from ..models import save as save_model

        save_model(model, tokenizer, out_dir)
    return model


def _dequantize_all(model: nn.Module) -> None:
    swaps = []
    for path, m in model.named_modules():
        if isinstance(m, nn.QuantizedLinear):
            in_dims, out_dims = linear_dims(m)
            lin = nn.Linear(in_dims, out_dims, bias="bias" in m)
            lin.weight = quant.dequantized_weight(m)
            if "bias" in m:
                lin.bias = m.bias
            swaps.append((path, lin))
        elif isinstance(m, nn.QuantizedEmbedding):
            w = quant.dequantized_weight(m)
            emb = nn.Embedding(*w.shape)
            emb.weight = w
            swaps.append((path, emb))
    for _, m in swaps:
        m.freeze()
    if swaps:
        model.update_modules(tree_unflatten(swaps))
