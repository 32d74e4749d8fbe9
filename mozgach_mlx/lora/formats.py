"""The PEFT and mlx-lm adapter formats, as pure transforms of dicts.

* PEFT: ``adapter_config.json`` (``peft_type`` "LORA", ``r``, ``lora_alpha``, ...) and
  tensors ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` (r, in) and
  ``...lora_B.weight`` (out, r); trained norms / embeddings as ``modules_to_save``.
* mlx-lm: tensors ``model.layers.0.self_attn.q_proj.lora_a`` (in, r) / ``lora_b``
  (r, out), which is our own layout, and an ``adapter_config.json`` that ``mlx_lm.load(path,
  adapter_path=...)`` accepts. mlx-lm multiplies by ``lora_parameters.scale`` directly,
  so we write ``scale = alpha / r`` (or ``alpha / sqrt(r)``) and read ``alpha = scale * r``.

Nothing here touches a model or a file: ``files.py`` reads and writes, this module
translates.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import mlx.core as mx

from ..errors import AdapterError, ConfigError
from .config import ALL_LINEAR, LoRAConfig

__all__ = [
    "PEFT_PREFIX",
    "adapter_config",
    "config_from_mlx",
    "config_from_peft",
    "mlx_config",
    "peft_config",
    "split_weights",
    "weights_from_peft",
    "weights_to_peft",
]

PEFT_PREFIX = "base_model.model."


def peft_config(
    cfg: LoRAConfig, paths: list[str], layers: list[int], n_blocks: int, extras: Iterable[str], base_model: str | None
) -> dict:
    """PEFT's ``adapter_config.json`` keys for an adapter of ``cfg``.

    Args:
        paths: full paths of the adapted linear layers (their leaf names become
            ``target_modules``).
        layers: indices of the adapted blocks; ``n_blocks``: how many the model has
            (a tail shorter than all of them is written as ``layers_to_transform``).
        extras: parameter paths trained in full (their module names become
            ``modules_to_save``).
        base_model: ``base_model_name_or_path``.
    """
    leaf_names = sorted({p.rsplit(".", 1)[-1] for p in paths})
    modules_to_save = sorted({k.rsplit(".", 1)[0].rsplit(".", 1)[-1] for k in extras}) or None
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "revision": None,
        "r": cfg.r,
        "lora_alpha": int(cfg.alpha) if cfg.alpha.is_integer() else cfg.alpha,  # PEFT writes ints
        "lora_dropout": cfg.dropout,
        "target_modules": leaf_names,
        "use_rslora": cfg.rslora,
        "use_dora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": layers if len(layers) < n_blocks else None,
        "layers_pattern": "layers" if len(layers) < n_blocks else None,
        "modules_to_save": modules_to_save,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def mlx_config(cfg: LoRAConfig, paths: list[str], layers: list[int], base_model: str | None) -> dict:
    """mlx-lm's ``adapter_config.json`` keys (``fine_tune_type``, ``num_layers``,
    ``lora_parameters``) for an adapter of ``cfg`` on the layers at ``paths``; the
    scale is written as mlx-lm applies it, ``cfg.scale``."""
    prefix_re = re.compile(r"^(?:model\.)?layers\.\d+\.")
    keys = sorted({prefix_re.sub("", p) for p in paths})
    return {
        "fine_tune_type": "lora",
        "model": base_model,
        "num_layers": len(layers),
        "lora_parameters": {"rank": cfg.r, "scale": cfg.scale, "dropout": cfg.dropout, "keys": keys},
    }


def config_from_peft(c: dict, n_blocks: int, src: Path) -> LoRAConfig:
    """The :class:`LoRAConfig` of a PEFT ``adapter_config.json`` (dict ``c``) for a model
    of ``n_blocks`` blocks. Raises AdapterError (naming ``src``) for what we cannot load."""
    if c.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{src}: peft_type {c.get('peft_type')!r} is not supported; only LORA adapters load.")
    for key, ok in (("use_dora", False), ("bias", "none"), ("fan_in_fan_out", False)):
        if c.get(key, ok) not in (ok, None):
            raise AdapterError(f"{src}: {key}={c[key]!r} is not supported (need {ok!r}).")
    for key in ("rank_pattern", "alpha_pattern"):
        if c.get(key):
            raise AdapterError(f"{src}: per-layer {key} is not supported; save the adapter with one r/lora_alpha.")
    targets = c.get("target_modules")
    if isinstance(targets, str):
        if targets != ALL_LINEAR:
            raise AdapterError(f"{src}: regex target_modules {targets!r} are not supported; list the layer names.")
        targets = [ALL_LINEAR]
    layers = c.get("layers_to_transform")
    num_layers = None
    if layers is not None:
        layers = [layers] if isinstance(layers, int) else sorted(layers)
        if layers != list(range(n_blocks - len(layers), n_blocks)):
            raise AdapterError(
                f"{src}: layers_to_transform {layers} is not the last N of the model's {n_blocks} blocks; "
                "only a tail of blocks is supported."
            )
        num_layers = len(layers)
    saved = set(c.get("modules_to_save") or [])
    try:
        return LoRAConfig(
            r=c.get("r", 8),
            alpha=c.get("lora_alpha", 8),
            dropout=c.get("lora_dropout", 0.0),
            targets=tuple(targets or ()),
            rslora=bool(c.get("use_rslora", False)),
            train_embeddings="embed_tokens" in saved,
            train_norms=any(s.endswith("norm") for s in saved),
            num_layers=num_layers,
        )
    except ConfigError as e:
        raise AdapterError(f"{src}: {e}") from None


def config_from_mlx(c: dict, n_blocks: int, src: Path) -> LoRAConfig:
    """The :class:`LoRAConfig` of an mlx-lm ``adapter_config.json`` (dict ``c``):
    ``alpha = scale * rank``. Raises AdapterError (naming ``src``) for what we cannot load."""
    kind = c.get("fine_tune_type", "lora")
    if kind != "lora":
        raise AdapterError(f"{src}: fine_tune_type {kind!r} is not supported; only 'lora' adapters load.")
    p = c.get("lora_parameters")
    if not isinstance(p, dict) or "rank" not in p or "scale" not in p:
        raise AdapterError(f"{src}: lora_parameters must hold rank and scale (mlx-lm layout).")
    num_layers = c.get("num_layers")
    # mlx-lm adapts model.layers[-max(num_layers, 0):]: 0, negative or >= n means all blocks
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers <= 0:
        num_layers = n_blocks
    try:
        return LoRAConfig(
            r=p["rank"],
            alpha=float(p["scale"]) * p["rank"],  # mlx-lm: update = scale * x A B
            dropout=p.get("dropout", 0.0),
            targets=tuple(p.get("keys") or [ALL_LINEAR]),
            num_layers=num_layers if num_layers < n_blocks else None,
        )
    except (ConfigError, TypeError, ValueError) as e:
        raise AdapterError(f"{src}: {e}") from None


def adapter_config(config: dict, fmt: str, n_blocks: int, src: Path) -> LoRAConfig:
    """The :class:`LoRAConfig` of an ``adapter_config.json`` (dict ``config``, read from
    ``src``): our exact ``"mozgach"`` record if the file has one, else the PEFT (``fmt ==
    "peft"``) or mlx-lm keys. Raises AdapterError for a config we cannot load."""
    block = config.get("mozgach") if isinstance(config.get("mozgach"), dict) else {}
    if isinstance(block.get("lora"), dict):
        try:
            return LoRAConfig.from_dict(block["lora"], source=str(src))
        except ConfigError as e:
            raise AdapterError(str(e)) from None
    if fmt == "peft":
        return config_from_peft(config, n_blocks, src)
    return config_from_mlx(config, n_blocks, src)


def split_weights(weights: dict[str, mx.array]) -> tuple[dict, dict]:
    """``(low-rank tensors, the rest)``: ``...lora_a`` / ``...lora_b`` apart from the
    embeddings / norms trained in full."""
    lora = {k: v for k, v in weights.items() if k.endswith((".lora_a", ".lora_b"))}
    return lora, {k: v for k, v in weights.items() if k not in lora}


def weights_to_peft(lora_w: dict[str, mx.array], extras: dict[str, mx.array]) -> dict[str, mx.array]:
    """Our tensors in PEFT's naming and layout (the inverse of :func:`weights_from_peft`):
    ``...lora_a`` (in, r) -> ``base_model.model....lora_A.weight`` (r, in), ``...lora_b``
    (r, out) -> ``...lora_B.weight`` (out, r); ``extras`` keep their layout."""
    tensors = {}
    for k, v in lora_w.items():
        path, leaf = k.rsplit(".", 1)
        tensors[f"{PEFT_PREFIX}{path}.lora_{leaf[-1].upper()}.weight"] = v.T
    tensors.update({PEFT_PREFIX + k: v for k, v in extras.items()})
    return tensors


_PEFT_KEY = re.compile(r"^(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.[\w-]+)?\.weight$")


def weights_from_peft(tensors: dict[str, mx.array]) -> dict[str, mx.array]:
    """PEFT tensors in our naming and layout: ``...lora_A.weight`` (r, in) ->
    ``...lora_a`` (in, r), ``...lora_B.weight`` (out, r) -> ``...lora_b`` (r, out);
    ``modules_to_save`` copies under their module's own path."""
    out = {}
    for key, v in tensors.items():
        k = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        m = _PEFT_KEY.match(k)
        if m:
            out[f"{m['path']}.lora_{m['ab'].lower()}"] = v.T
        else:
            out[k.replace(".modules_to_save.default", "").replace(".original_module", "")] = v
    return out
