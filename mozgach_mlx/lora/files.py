"""Adapter directories: :func:`save`, :func:`read` and :func:`load`, PEFT or mlx-lm layout.

Both layouts' ``adapter_config.json`` carry a ``"mozgach"`` block with our exact
:class:`LoRAConfig` and the RoPE scaling / ``max_position_embeddings`` the adapter was
trained with; :func:`load` applies them with ``model.set_rope``, because a long-context
adapter on an unscaled base produces garbage. The format translations live in
``formats.py``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import AdapterError, ConfigError
from ..io import atomic_save_safetensors, atomic_write_json
from ..models.paths import blocks, get_module, linear_dims, natural_key
from ..models.rope import rope_of
from .config import LoRAConfig
from .formats import adapter_config, mlx_config, peft_config, split_weights, weights_from_peft, weights_to_peft
from .inject import apply, remove, require_adapters, restore_base, trainable
from .targets import extra_modules, lora_modules, selected_blocks, target_layers

__all__ = [
    "CONFIG_FILE",
    "FORMAT_VERSION",
    "MLX_EXTRA_WEIGHTS",
    "MLX_WEIGHTS",
    "PEFT_WEIGHTS",
    "apply_adapter_rope",
    "load",
    "read",
    "save",
]

FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
MLX_WEIGHTS = "adapters.safetensors"
# Trained norms / embeddings in the mlx-lm layout: mlx-lm's loader rejects anything but
# lora_a / lora_b in adapters.safetensors, so they live next to it.
MLX_EXTRA_WEIGHTS = "adapter_extra.safetensors"


def _mozgach_block(model: nn.Module, cfg: LoRAConfig, layers: list[int], extras: dict) -> dict:
    rope_scaling, max_pos = rope_of(model)
    args = getattr(model, "args", None)
    base = {
        k: getattr(args, k)
        for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
        if getattr(args, k, None) is not None
    }
    return {
        "format_version": FORMAT_VERSION,
        "lora": cfg.to_dict(),
        "scale": cfg.scale,
        "layers": layers,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": max_pos,
        "extra_weights": sorted(extras),
        "base": base,
    }


def save(
    model: nn.Module,
    out_dir: str | Path,
    format: str = "peft",
    *,
    base_model: str | None = None,
    training: dict | None = None,
) -> Path:
    """Write the model's adapter to ``out_dir`` (atomically, file by file).

    Args:
        format: ``"peft"`` (adapter_config.json + adapter_model.safetensors),
            ``"mlx-lm"`` (adapter_config.json + adapters.safetensors) or ``"both"`` (all
            of them, one adapter_config.json holding both formats' keys).
        base_model: recorded as PEFT ``base_model_name_or_path`` / mlx-lm ``model``;
            default ``model.name_or_path`` if set.
        training: how the adapter was trained (the trainer's ``training_record``:
            attention mask, S²-Attn group, sequence length), recorded as the
            ``"mozgach"`` block's ``"training"``; nothing reads it back.

    The config's ``"mozgach"`` block holds the exact :class:`LoRAConfig`, the RoPE scaling
    and ``max_position_embeddings`` of ``model.args`` (what it was trained with), and the
    base's shape. Trained embeddings / norms are saved too (PEFT ``modules_to_save``; in
    the mlx-lm layout a separate ``adapter_extra.safetensors`` that mlx-lm ignores).

    Returns:
        ``Path(out_dir)``.
    """
    if format not in ("peft", "mlx-lm", "both"):
        raise ConfigError(f"adapter format must be 'peft', 'mlx-lm' or 'both', got {format!r}.")
    cfg = require_adapters(model)
    out = Path(out_dir)
    base_model = base_model if base_model is not None else getattr(model, "name_or_path", None)
    lora_w, extras = split_weights(trainable(model))
    paths = [p for p, _ in lora_modules(model)]
    layers = selected_blocks(model, cfg)
    config: dict = {}
    fresh: set[Path] = set()
    if format in ("peft", "both"):
        config.update(peft_config(cfg, paths, layers, len(blocks(model)), extras, base_model))
        tensors = weights_to_peft(lora_w, extras)
        atomic_save_safetensors(out / PEFT_WEIGHTS, tensors, metadata={"format": "pt"})
        fresh.add(out / PEFT_WEIGHTS)
    if format in ("mlx-lm", "both"):
        config.update(mlx_config(cfg, paths, layers, base_model))
        atomic_save_safetensors(out / MLX_WEIGHTS, lora_w, metadata={"format": "mlx"})
        fresh.add(out / MLX_WEIGHTS)
        if extras:
            atomic_save_safetensors(out / MLX_EXTRA_WEIGHTS, extras, metadata={"format": "mlx"})
            fresh.add(out / MLX_EXTRA_WEIGHTS)
            warnings.warn(
                f"{out / MLX_EXTRA_WEIGHTS}: trained embeddings/norms are saved beside adapters.safetensors; "
                "mz.lora.load applies them, mlx-lm ignores them.",
                stacklevel=2,
            )
    written = [name for name in (PEFT_WEIGHTS, MLX_WEIGHTS, MLX_EXTRA_WEIGHTS) if (out / name) in fresh]
    config["mozgach"] = _mozgach_block(model, cfg, layers, extras) | {"files": written}
    if training is not None:
        config["mozgach"]["training"] = dict(training)
    # Written last: a directory with a config is a complete adapter.
    atomic_write_json(out / CONFIG_FILE, config)
    # Weights of an older save in another layout would be read instead of these.
    for name in (PEFT_WEIGHTS, MLX_WEIGHTS, MLX_EXTRA_WEIGHTS):
        if name not in written:
            (out / name).unlink(missing_ok=True)
    return out


def _read_config(d: Path) -> dict:
    path = d / CONFIG_FILE
    if not path.is_file():
        raise AdapterError(f"{path} not found; an adapter directory needs {CONFIG_FILE} (PEFT or mlx-lm layout).")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{path} is not valid JSON ({e}); re-save the adapter.") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path} must hold a JSON object, got {type(config).__name__}.")
    return config


def _detect_format(d: Path, block: dict) -> str:
    # Our own saves list the weight files they wrote: trust that over what else lies there.
    files = block.get("files") if isinstance(block.get("files"), list) else []
    if MLX_WEIGHTS in files and (d / MLX_WEIGHTS).is_file():
        return "mlx-lm"
    if PEFT_WEIGHTS in files and (d / PEFT_WEIGHTS).is_file():
        return "peft"
    if (d / MLX_WEIGHTS).is_file():
        return "mlx-lm"
    if (d / PEFT_WEIGHTS).is_file():
        return "peft"
    if (d / "adapter_model.bin").is_file():
        raise AdapterError(
            f"{d / 'adapter_model.bin'} is a PyTorch pickle; convert it to adapter_model.safetensors "
            "(PEFT: save_pretrained(..., safe_serialization=True))."
        )
    raise AdapterError(f"{d} holds neither {MLX_WEIGHTS} (mlx-lm) nor {PEFT_WEIGHTS} (PEFT).")


def _read_tensors(path: Path) -> dict[str, mx.array]:
    try:
        return mx.load(str(path))
    except Exception as e:  # mlx raises bare RuntimeError / ValueError for unreadable files
        raise AdapterError(f"{path} cannot be read as safetensors ({e}); re-save the adapter.") from None


def _expected_shapes(model: nn.Module, cfg: LoRAConfig) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for path, base in target_layers(model, cfg):
        in_dims, out_dims = linear_dims(base)
        shapes[f"{path}.lora_a"] = (in_dims, cfg.r)
        shapes[f"{path}.lora_b"] = (cfg.r, out_dims)
    for mpath in extra_modules(model, cfg):
        for k, v in tree_flatten(get_module(model, mpath).parameters()):
            shapes[f"{mpath}.{k}"] = tuple(v.shape)
    return shapes


def _check(weights: dict[str, mx.array], shapes: dict[str, tuple[int, ...]], src: Path, n_blocks: int) -> None:
    for k in sorted(weights, key=natural_key):
        v = weights[k]
        if k not in shapes:
            raise AdapterError(
                f"{src}: tensor {k} has no place in this base model ({n_blocks} blocks); "
                "the adapter was made for a different base model or LoRA config."
            )
        if tuple(v.shape) != shapes[k]:
            raise AdapterError(
                f"{src}: tensor {k} has shape {tuple(v.shape)} but this base model needs {shapes[k]}; "
                "the adapter was made for a different base model."
            )
    missing = sorted(set(shapes) - set(weights), key=natural_key)
    if missing:
        raise AdapterError(
            f"{src}: {len(missing)} adapter tensor(s) missing, e.g. {missing[0]}; the file is incomplete or "
            "its config does not match its weights."
        )


def apply_adapter_rope(model: nn.Module, block: dict, src: Path) -> None:
    """Give ``model`` the RoPE scaling an adapter was trained with (its ``"mozgach"``
    block's ``rope_scaling`` / ``max_position_embeddings``), via ``model.set_rope``.

    Nothing happens when the block records none or the model already runs with it.

    Raises:
        AdapterError: the model cannot change its RoPE, or rejects the scaling (naming ``src``).
    """
    if "rope_scaling" not in block and "max_position_embeddings" not in block:
        return
    want = (block.get("rope_scaling"), block.get("max_position_embeddings"))
    have = rope_of(model)
    if want[0] == have[0] and (want[1] is None or want[1] == have[1]):
        return
    if not hasattr(model, "set_rope"):
        raise AdapterError(
            f"{src}: the adapter was trained with rope_scaling={want[0]!r}, max_position_embeddings={want[1]!r} "
            f"but {type(model).__name__} cannot change its RoPE (no set_rope); load the base with that scaling."
        )
    try:
        model.set_rope(want[0], want[1])
    except ConfigError as e:
        raise AdapterError(f"{src}: cannot apply the adapter's RoPE scaling: {e}") from None


def read(model: nn.Module, adapter_dir: str | Path) -> tuple[LoRAConfig, dict[str, mx.array], dict]:
    """Read an adapter directory (PEFT or mlx-lm layout, detected) and check it against
    ``model``'s shapes, without changing the model (what :func:`load` and the adapter
    bank share).

    Returns:
        ``(cfg, weights, block)``: the adapter's :class:`LoRAConfig`; its tensors in our
        naming and layout (``<module path>.lora_a`` (in, r), ``.lora_b`` (r, out), plus
        trained embedding / norm parameters under their paths); and the config's
        ``"mozgach"`` block (``scale``, ``rope_scaling``, ``max_position_embeddings``...;
        ``{}`` for an adapter made elsewhere).

    Raises:
        AdapterError: as :func:`load`.
    """
    src = Path(adapter_dir)
    if not src.is_dir():
        raise AdapterError(f"adapter directory {src} does not exist.")
    config = _read_config(src)
    block = config.get("mozgach") if isinstance(config.get("mozgach"), dict) else {}
    fmt = _detect_format(src, block)
    n_blocks = len(blocks(model))
    cfg = adapter_config(config, fmt, n_blocks, src / CONFIG_FILE)
    if fmt == "peft":
        weights = weights_from_peft(_read_tensors(src / PEFT_WEIGHTS))
    else:
        weights = _read_tensors(src / MLX_WEIGHTS)
        listed = block.get("files")
        if (src / MLX_EXTRA_WEIGHTS).is_file() and (not isinstance(listed, list) or MLX_EXTRA_WEIGHTS in listed):
            weights.update(_read_tensors(src / MLX_EXTRA_WEIGHTS))
    try:
        shapes = _expected_shapes(model, cfg)
    except ConfigError as e:
        raise AdapterError(f"{src}: the adapter does not fit this model: {e}") from None
    _check(weights, shapes, src, n_blocks)
    return cfg, weights, block


def load(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Load an adapter (PEFT or mlx-lm layout, detected) into ``model``, in place.

    Applies LoRA with the file's config (replacing adapters the model already has if
    their config differs), loads the tensors, sets the RoPE scaling the adapter was
    trained with (``model.set_rope``), and puts the model in eval mode (dropout off), as
    ``mlx_lm.load`` does; call ``model.train()`` to keep training.

    Raises:
        AdapterError: as :func:`read`, or the adapter's RoPE scaling cannot be applied.
            Nothing in the model changes when it is raised.
    """
    src = Path(adapter_dir)
    cfg, weights, block = read(model, src)
    apply_adapter_rope(model, block, src)

    if getattr(model, "lora_config", None) == cfg and lora_modules(model):
        restore_base(model)  # same structure: reuse the layers, un-train embeddings / norms
    else:
        remove(model)
        apply(model, cfg, seed=0)  # fixed seed: loading leaves MLX's global RNG alone
    params = dict(tree_flatten(model.parameters()))
    model.load_weights([(k, v.astype(params[k].dtype)) for k, v in weights.items()], strict=False)
    mx.eval(model.parameters())
    model.eval()
    return model
