"""LoRA: low-rank adapters on the linear layers of a frozen (optionally 4-bit) base.

A LoRA layer wraps a frozen linear map ``W`` (``nn.Linear`` or ``nn.QuantizedLinear``,
any subclass) by composition and adds a trainable rank-``r`` update:

.. math::

    y = W x + b + s \\cdot B^{\\top} A^{\\top} \\mathrm{dropout}(x),\\qquad
    s = \\alpha / r \\;\\; (\\text{rsLoRA: } s = \\alpha / \\sqrt{r})

stored as ``lora_a`` (in, r) and ``lora_b`` (r, out), i.e. ``y = linear(x) + s *
dropout(x) @ lora_a @ lora_b``. ``lora_a`` starts uniform in ``±1/sqrt(in)``
(Kaiming-uniform with ``a = sqrt(5)``, as PEFT and mlx-lm) and ``lora_b`` at zero, so an
untrained adapter leaves the model unchanged.

Attribute names follow mlx-lm (``linear``, ``lora_a``, ``lora_b``), so parameter paths
are mlx-lm's: ``model.layers.0.self_attn.q_proj.lora_a``.

One adapter's state is :func:`trainable` (a flat name -> array dict). Files:

* PEFT: ``adapter_config.json`` (``peft_type`` "LORA", ``r``, ``lora_alpha``, ...) and
  ``adapter_model.safetensors`` with
  ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` (r, in) and
  ``...lora_B.weight`` (out, r); trained norms / embeddings as ``modules_to_save``.
* mlx-lm: ``adapters.safetensors`` with ``model.layers.0.self_attn.q_proj.lora_a`` (in, r)
  / ``lora_b`` (r, out) and an ``adapter_config.json`` that ``mlx_lm.load(path,
  adapter_path=...)`` accepts. mlx-lm multiplies by ``lora_parameters.scale`` directly,
  so we write ``scale = alpha / r`` (or ``alpha / sqrt(r)``) and read ``alpha = scale * r``.

Both configs carry a ``"mozgach"`` block with our exact :class:`LoRAConfig` and the RoPE
scaling / ``max_position_embeddings`` the adapter was trained with; :func:`load` applies
them with ``model.set_rope``, because a long-context adapter on an unscaled base
produces garbage.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from . import quant
from .errors import AdapterError, ConfigError
from .io import atomic_save_safetensors, atomic_write_json

__all__ = [
    "LoRAConfig",
    "LoRALinear",
    "apply",
    "fuse",
    "load",
    "read",
    "remove",
    "reset",
    "save",
    "trainable",
]

ALL_LINEAR = "all-linear"
FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
MLX_WEIGHTS = "adapters.safetensors"
# Trained norms / embeddings in the mlx-lm layout: mlx-lm's loader rejects anything but
# lora_a / lora_b in adapters.safetensors, so they live next to it.
MLX_EXTRA_WEIGHTS = "adapter_extra.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclass
class LoRAConfig:
    """Which layers get adapters and how big they are.

    Args:
        r: rank of the update (> 0).
        alpha: scale numerator; the update is multiplied by ``alpha / r``
            (``alpha / sqrt(r)`` with ``rslora``).
        dropout: dropout probability on the adapter's input, in [0, 1).
        targets: names of the linear layers inside each transformer block that get an
            adapter: a leaf name (``"q_proj"``, ``"gate_proj"``...) or a path inside the
            block (``"self_attn.q_proj"``); ``("all-linear",)`` for every linear layer.
        rslora: rank-stabilised scaling ``alpha / sqrt(r)`` (Kalajdzievski 2023).
        train_embeddings: also train the input embedding (``embed_tokens``) in full
            (LongLoRA: needed with plain LoRA to extend context well). Tied models
            thereby train the output head too.
        train_norms: also train the RMSNorm weights of the adapted blocks and the final
            norm (LongLoRA).
        num_layers: adapt only the last ``num_layers`` blocks; None = all.
    """

    r: int = field(default=16, metadata={"help": "LoRA rank"})
    alpha: float = field(default=32.0, metadata={"help": "LoRA alpha (update scaled by alpha/r)"})
    dropout: float = field(default=0.1, metadata={"help": "dropout on the adapter input"})
    targets: tuple[str, ...] = field(default=("q_proj", "k_proj", "v_proj", "o_proj"), metadata={
        "help": "layers to adapt, e.g. q_proj,k_proj,v_proj,o_proj,gate_proj or all-linear"})
    rslora: bool = field(default=False, metadata={"help": "rank-stabilised scale alpha/sqrt(r)"})
    train_embeddings: bool = field(default=False, metadata={"help": "also train the input embedding (LongLoRA)"})
    train_norms: bool = field(default=False, metadata={"help": "also train the RMSNorm weights (LongLoRA)"})
    num_layers: int | None = field(default=None, metadata={"help": "adapt only the last N blocks (default all)"})

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"LoRAConfig.r must be a positive integer, got {self.r!r}.")
        if (
            isinstance(self.alpha, bool)
            or not isinstance(self.alpha, (int, float))
            or not math.isfinite(self.alpha)
            or self.alpha <= 0
        ):
            raise ConfigError(f"LoRAConfig.alpha must be a positive number, got {self.alpha!r}.")
        self.alpha = float(self.alpha)
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not (0.0 <= self.dropout < 1.0)
        ):
            raise ConfigError(f"LoRAConfig.dropout must be a probability in [0, 1), got {self.dropout!r}.")
        self.dropout = float(self.dropout)
        if not isinstance(self.targets, Sequence) or not self.targets:
            raise ConfigError(
                f"LoRAConfig.targets must be a non-empty list of layer names such as 'q_proj', got {self.targets!r}."
            )
        bad = [t for t in self.targets if not isinstance(t, str) or not re.fullmatch(r"[\w.\-]+", t)]
        if bad:
            raise ConfigError(f"LoRAConfig.targets holds invalid layer name(s) {bad!r}; use names like 'q_proj'.")
        if len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"LoRAConfig.targets lists a layer twice: {list(self.targets)!r}.")
        self.targets = tuple(self.targets)
        for name in ("rslora", "train_embeddings", "train_norms"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"LoRAConfig.{name} must be true or false, got {getattr(self, name)!r}.")
        if self.num_layers is not None and (
            isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int) or self.num_layers <= 0
        ):
            raise ConfigError(
                f"LoRAConfig.num_layers must be a positive integer or None (all layers), got {self.num_layers!r}."
            )

    @property
    def scale(self) -> float:
        """The factor ``s`` on the low-rank update: ``alpha / r`` or ``alpha / sqrt(r)``."""
        return scale_of(self.r, self.alpha, self.rslora)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "LoRAConfig") -> LoRAConfig:
        """Build from a dict (unknown keys are an error: they are likely typos)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(
                f"{source}: unknown LoRA field(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}."
            )
        try:
            return cls(**d)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None


def scale_of(r: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def _linear_dims(linear: nn.Module) -> tuple[int, int]:
    """(input_dims, output_dims) of a Linear or QuantizedLinear."""
    out_dims, in_dims = linear.weight.shape
    if isinstance(linear, nn.QuantizedLinear):
        in_dims = in_dims * 32 // linear.bits
    return in_dims, out_dims


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, nn.QuantizedLinear))


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update.

    .. math::

        y = \\mathrm{linear}(x) + s \\cdot (\\mathrm{dropout}(x)\\, A)\\, B,\\qquad
        A \\in \\mathbb{R}^{d_{in} \\times r},\\; B \\in \\mathbb{R}^{r \\times d_{out}},\\;
        s = \\alpha / r \\text{ (or } \\alpha/\\sqrt{r}\\text{)}

    Args:
        linear: the base layer (``nn.Linear``, ``nn.QuantizedLinear`` or a subclass such as
            ``quant.QuantizedLinear``); kept as ``self.linear`` and frozen.
        r: rank.
        alpha: scale numerator.
        dropout: dropout probability on the adapter input (active in training mode only).
        rslora: use ``alpha / sqrt(r)``.
        key: PRNG key for ``lora_a``'s initialisation (default: the global generator).

    Shapes: x (..., in) -> (..., out); ``lora_a`` (in, r) uniform in ±1/sqrt(in),
    ``lora_b`` (r, out) zero.
    """

    def __init__(
        self,
        linear: nn.Module,
        r: int = 16,
        alpha: float = 32.0,
        dropout: float = 0.0,
        rslora: bool = False,
        *,
        key: mx.array | None = None,
    ) -> None:
        super().__init__()
        if not _is_linear(linear):
            raise ConfigError(f"LoRA wraps Linear or QuantizedLinear layers, got {type(linear).__name__}.")
        self.linear = linear
        self.linear.freeze()
        self.input_dims, self.output_dims = _linear_dims(linear)
        self.r, self.alpha, self.rslora = r, float(alpha), rslora
        self.scale = scale_of(r, alpha, rslora)
        self.dropout = nn.Dropout(p=dropout)
        self.reset_parameters(key)

    def reset_parameters(self, key: mx.array | None = None) -> None:
        """Fresh adapter: ``lora_a`` ~ U(±1/sqrt(in)), ``lora_b`` = 0 (fp32)."""
        bound = 1.0 / math.sqrt(self.input_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (self.input_dims, self.r), key=key)
        self.lora_b = mx.zeros((self.r, self.output_dims))

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)  # (..., out)
        z = (self.dropout(x) @ self.lora_a) @ self.lora_b  # (..., r) -> (..., out)
        return y + (self.scale * z).astype(y.dtype)

    def delta_weight(self) -> mx.array:
        """The update in the base weight's layout: ``s * B^T A^T``, (out, in), fp32."""
        return self.scale * (self.lora_b.T @ self.lora_a.T)

    def fuse(self, dequantize: bool = False) -> nn.Module:
        """A plain layer computing the same map: ``W + s B^T A^T`` (bias kept).

        A quantized base is dequantized, updated and re-quantized with its own settings
        (same class, group size, bits, mode), unless ``dequantize``, which returns an
        fp32 ``nn.Linear``. A float base keeps its dtype.
        """
        linear = self.linear
        quantized = isinstance(linear, nn.QuantizedLinear)
        w = quant.dequantized_weight(linear) if quantized else linear.weight
        dtype = mx.float32 if quantized else w.dtype
        fused = nn.Linear(self.input_dims, self.output_dims, bias="bias" in linear)
        fused.weight = (w.astype(mx.float32) + self.delta_weight()).astype(dtype)
        if "bias" in linear:
            fused.bias = linear.bias
        if quantized and not dequantize:
            fused = type(linear).from_linear(fused, linear.group_size, linear.bits, mode=linear.mode)
        fused.freeze()
        return fused


# ----------------------------------------------------------------------------- structure


def _blocks(model: nn.Module) -> list[nn.Module]:
    if "model" in model and "layers" in model.model:
        return model.model.layers
    if hasattr(model, "layers"):
        return model.layers
    raise ConfigError(f"{type(model).__name__} has no transformer blocks at model.model.layers or model.layers.")


def _blocks_prefix(model: nn.Module) -> str:
    return "model.layers" if "model" in model and "layers" in model.model else "layers"


def _embedding_path(model: nn.Module) -> str:
    return "model.embed_tokens" if "model" in model else "embed_tokens"


def _selected(model: nn.Module, cfg: LoRAConfig) -> list[int]:
    n = len(_blocks(model))
    if cfg.num_layers is not None and cfg.num_layers > n:
        raise ConfigError(f"LoRAConfig.num_layers is {cfg.num_layers} but the model has only {n} blocks.")
    k = n if cfg.num_layers is None else cfg.num_layers
    return list(range(n - k, n))


def _matches(rel_path: str, target: str) -> bool:
    return target == ALL_LINEAR or rel_path == target or rel_path.endswith("." + target)


def _plan(model: nn.Module, cfg: LoRAConfig) -> list[tuple[str, nn.Module]]:
    """``[(full path, base linear)]`` of every layer that gets an adapter (read only).

    Raises ConfigError for a target that matches no linear layer in the selected blocks.
    """
    blocks, prefix = _blocks(model), _blocks_prefix(model)
    plan, used = [], set()
    for i in _selected(model, cfg):
        modules = dict(blocks[i].named_modules())
        for rel, m in modules.items():
            parent = rel.rsplit(".", 1)[0] if "." in rel else ""
            if isinstance(modules.get(parent), LoRALinear):
                continue  # the base inside an adapter: reached through the adapter
            if isinstance(m, LoRALinear):
                base = m.linear
            elif _is_linear(m):
                base = m
            else:
                continue
            hits = [t for t in cfg.targets if _matches(rel, t)]
            if hits:
                used.update(hits)
                plan.append((f"{prefix}.{i}.{rel}", base))
    unused = [t for t in cfg.targets if t not in used]
    if unused:
        names = sorted({rel for rel, m in blocks[-1].named_modules() if _is_linear(m) and not rel.endswith(".linear")})
        raise ConfigError(
            f"LoRA target(s) {unused} match no linear layer of the model's blocks; "
            f"available: {', '.join(names) or 'none'}."
        )
    return sorted(plan, key=lambda pm: _natural_key(pm[0]))


def _natural_key(path: str) -> list:
    return [int(p) if p.isdigit() else p for p in path.split(".")]


def _get(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = obj[int(part)] if isinstance(obj, list) else obj[part]
    return obj


def _norm_paths(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Norm modules trained with ``train_norms``: those of the adapted blocks + the final one."""
    blocks, prefix = _blocks(model), _blocks_prefix(model)
    paths = []
    for i in _selected(model, cfg):
        paths += [f"{prefix}.{i}.{rel}" for rel, m in blocks[i].named_modules() if _is_norm(m)]
    final = "model.norm" if "model" in model else "norm"
    try:
        if _is_norm(_get(model, final)):
            paths.append(final)
    except (KeyError, AttributeError):
        pass
    return sorted(paths, key=_natural_key)


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, (nn.RMSNorm, nn.LayerNorm)) or type(m).__name__.endswith("Norm")


def _extra_modules(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Module paths trained in full (embedding, norms) under ``cfg``."""
    paths = []
    if cfg.train_embeddings:
        emb = _embedding_path(model)
        m = _get(model, emb)
        if isinstance(m, nn.QuantizedEmbedding) or not isinstance(m, nn.Embedding):
            raise ConfigError(
                "train_embeddings needs a full-precision embedding, but the model's embed_tokens is "
                f"{type(m).__name__}; load the base with quantize_embeddings=False."
            )
        paths.append(emb)
    if cfg.train_norms:
        paths += _norm_paths(model, cfg)
    return paths


def _lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(p, m) for p, m in model.named_modules() if isinstance(m, LoRALinear)]


def _set_base_state(model: nn.Module, state: dict | None) -> None:
    # A plain attribute (not a Module child), so it is no part of the parameter tree.
    object.__setattr__(model, "_lora_base_state", state)


def _base_state(model: nn.Module) -> dict:
    return model.__dict__.get("_lora_base_state") or {}


# ----------------------------------------------------------------------------- lifecycle


def apply(model: nn.Module, cfg: LoRAConfig | None = None, *, seed: int | None = None) -> nn.Module:
    """Add LoRA adapters to ``model`` in place and freeze everything else.

    Args:
        model: our model (or an mlx-lm model: same paths) without adapters.
        cfg: what to adapt; default ``LoRAConfig()`` (r=16, alpha=32, dropout 0.1, q/k/v/o).
        seed: seed for the ``lora_a`` initialisation (default: MLX's global generator).

    Returns:
        ``model``, with ``model.lora_config = cfg``. Trainable parameters afterwards are
        exactly the adapters (plus embeddings / norms if configured): :func:`trainable`.
    """
    cfg = cfg or LoRAConfig()
    if not isinstance(cfg, LoRAConfig):
        raise ConfigError(f"lora.apply expects a LoRAConfig, got {type(cfg).__name__}.")
    if _lora_modules(model):
        raise ConfigError("the model already has LoRA adapters; call lora.remove(model) first or lora.reset(model).")
    plan = _plan(model, cfg)
    extras = _extra_modules(model, cfg)
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
        m = _get(model, path)
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


def _require(model: nn.Module) -> LoRAConfig:
    cfg = getattr(model, "lora_config", None)
    if cfg is None or not _lora_modules(model):
        raise AdapterError("the model has no LoRA adapters; call mz.lora.apply(model, cfg) or mz.lora.load first.")
    return cfg


def reset(model: nn.Module, seed: int | None = None) -> nn.Module:
    """Re-initialise every adapter (``lora_a`` random, ``lora_b`` zero) and restore trained
    embeddings / norms to the base values: a fresh adapter without reloading the base.

    With the same ``seed`` the result equals ``apply(model, cfg, seed=seed)`` on the base.
    """
    _require(model)
    mods = _lora_modules(model)
    for (_, m), k in zip(sorted(mods, key=lambda pm: _natural_key(pm[0])), _keys(seed, len(mods)), strict=True):
        m.reset_parameters(k)
    _restore_base(model)
    return model


def _restore_base(model: nn.Module) -> None:
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
    mods = _lora_modules(model)
    if mods:
        model.update_modules(tree_unflatten([(p, m.linear) for p, m in mods]))
    state = _base_state(model)
    if state:
        model.update(tree_unflatten(list(state.items())))
        for path in {k.rsplit(".", 1)[0] for k in state}:
            _get(model, path).freeze()
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
    _require(model)
    if out_dir is not None and tokenizer is None:
        raise ConfigError("lora.fuse(out_dir=...) needs the tokenizer to save a standalone model.")
    model.update_modules(tree_unflatten([(p, m.fuse(dequantize)) for p, m in _lora_modules(model)]))
    if dequantize:
        _dequantize_all(model)
    _set_base_state(model, None)
    del model.lora_config
    mx.eval(model.parameters())
    if out_dir is not None:
        from .models import save as save_model

        save_model(model, tokenizer, out_dir)
    return model


def _dequantize_all(model: nn.Module) -> None:
    swaps = []
    for path, m in model.named_modules():
        if isinstance(m, nn.QuantizedLinear):
            in_dims, out_dims = _linear_dims(m)
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


# ----------------------------------------------------------------------------- files


def _rope_of(model: nn.Module) -> tuple[dict | None, int | None]:
    args = getattr(model, "args", None)
    return getattr(args, "rope_scaling", None), getattr(args, "max_position_embeddings", None)


def _split_weights(weights: dict[str, mx.array]) -> tuple[dict, dict]:
    lora = {k: v for k, v in weights.items() if k.endswith((".lora_a", ".lora_b"))}
    return lora, {k: v for k, v in weights.items() if k not in lora}


def _mozgach_block(model: nn.Module, cfg: LoRAConfig, layers: list[int], extras: dict) -> dict:
    rope_scaling, max_pos = _rope_of(model)
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


def _peft_config(
    cfg: LoRAConfig, model: nn.Module, paths: list[str], layers: list[int], extras: dict, base_model: str | None
) -> dict:
    leaf_names = sorted({p.rsplit(".", 1)[-1] for p in paths})
    n = len(_blocks(model))
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
        "layers_to_transform": layers if len(layers) < n else None,
        "layers_pattern": "layers" if len(layers) < n else None,
        "modules_to_save": modules_to_save,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def _mlx_config(cfg: LoRAConfig, paths: list[str], layers: list[int], base_model: str | None) -> dict:
    prefix_re = re.compile(r"^(?:model\.)?layers\.\d+\.")
    keys = sorted({prefix_re.sub("", p) for p in paths})
    return {
        "fine_tune_type": "lora",
        "model": base_model,
        "num_layers": len(layers),
        "lora_parameters": {"rank": cfg.r, "scale": cfg.scale, "dropout": cfg.dropout, "keys": keys},
    }


def save(
    model: nn.Module,
    out_dir: str | Path,
    format: str = "peft",
    *,
    base_model: str | None = None,
) -> Path:
    """Write the model's adapter to ``out_dir`` (atomically, file by file).

    Args:
        format: ``"peft"`` (adapter_config.json + adapter_model.safetensors),
            ``"mlx-lm"`` (adapter_config.json + adapters.safetensors) or ``"both"`` (all
            of them, one adapter_config.json holding both formats' keys).
        base_model: recorded as PEFT ``base_model_name_or_path`` / mlx-lm ``model``;
            default ``model.name_or_path`` if set.

    The config's ``"mozgach"`` block holds the exact :class:`LoRAConfig`, the RoPE scaling
    and ``max_position_embeddings`` of ``model.args`` (what it was trained with), and the
    base's shape. Trained embeddings / norms are saved too (PEFT ``modules_to_save``; in
    the mlx-lm layout a separate ``adapter_extra.safetensors`` that mlx-lm ignores).

    Returns:
        ``Path(out_dir)``.
    """
    if format not in ("peft", "mlx-lm", "both"):
        raise ConfigError(f"adapter format must be 'peft', 'mlx-lm' or 'both', got {format!r}.")
    cfg = _require(model)
    out = Path(out_dir)
    base_model = base_model if base_model is not None else getattr(model, "name_or_path", None)
    lora_w, extras = _split_weights(trainable(model))
    paths = [p for p, _ in _lora_modules(model)]
    layers = _selected(model, cfg)
    config: dict = {}
    fresh: set[Path] = set()
    if format in ("peft", "both"):
        config.update(_peft_config(cfg, model, paths, layers, extras, base_model))
        tensors = {}
        for k, v in lora_w.items():
            path, leaf = k.rsplit(".", 1)
            # ours A (in, r), B (r, out)  ->  PEFT lora_A.weight (r, in), lora_B.weight (out, r)
            tensors[f"{PEFT_PREFIX}{path}.lora_{leaf[-1].upper()}.weight"] = v.T
        tensors.update({PEFT_PREFIX + k: v for k, v in extras.items()})
        atomic_save_safetensors(out / PEFT_WEIGHTS, tensors, metadata={"format": "pt"})
        fresh.add(out / PEFT_WEIGHTS)
    if format in ("mlx-lm", "both"):
        config.update(_mlx_config(cfg, paths, layers, base_model))
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


def _cfg_from_peft(c: dict, n_blocks: int, src: Path) -> LoRAConfig:
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


def _cfg_from_mlx(c: dict, n_blocks: int, src: Path) -> LoRAConfig:
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


def _read_tensors(path: Path) -> dict[str, mx.array]:
    try:
        return mx.load(str(path))
    except Exception as e:  # mlx raises bare RuntimeError / ValueError for unreadable files
        raise AdapterError(f"{path} cannot be read as safetensors ({e}); re-save the adapter.") from None


_PEFT_KEY = re.compile(r"^(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.[\w-]+)?\.weight$")


def _weights_from_peft(tensors: dict[str, mx.array]) -> dict[str, mx.array]:
    out = {}
    for key, v in tensors.items():
        k = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        m = _PEFT_KEY.match(k)
        if m:
            out[f"{m['path']}.lora_{m['ab'].lower()}"] = v.T
        else:
            out[k.replace(".modules_to_save.default", "").replace(".original_module", "")] = v
    return out


def _expected_shapes(model: nn.Module, cfg: LoRAConfig) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for path, base in _plan(model, cfg):
        in_dims, out_dims = _linear_dims(base)
        shapes[f"{path}.lora_a"] = (in_dims, cfg.r)
        shapes[f"{path}.lora_b"] = (cfg.r, out_dims)
    for mpath in _extra_modules(model, cfg):
        for k, v in tree_flatten(_get(model, mpath).parameters()):
            shapes[f"{mpath}.{k}"] = tuple(v.shape)
    return shapes


def _check(weights: dict[str, mx.array], shapes: dict[str, tuple[int, ...]], src: Path, n_blocks: int) -> None:
    for k in sorted(weights, key=_natural_key):
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
    missing = sorted(set(shapes) - set(weights), key=_natural_key)
    if missing:
        raise AdapterError(
            f"{src}: {len(missing)} adapter tensor(s) missing, e.g. {missing[0]}; the file is incomplete or "
            "its config does not match its weights."
        )


def _apply_rope(model: nn.Module, block: dict, src: Path) -> None:
    if "rope_scaling" not in block and "max_position_embeddings" not in block:
        return
    want = (block.get("rope_scaling"), block.get("max_position_embeddings"))
    have = _rope_of(model)
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
    n_blocks = len(_blocks(model))
    if isinstance(block.get("lora"), dict):
        try:
            cfg = LoRAConfig.from_dict(block["lora"], source=str(src / CONFIG_FILE))
        except ConfigError as e:
            raise AdapterError(str(e)) from None
    elif fmt == "peft":
        cfg = _cfg_from_peft(config, n_blocks, src / CONFIG_FILE)
    else:
        cfg = _cfg_from_mlx(config, n_blocks, src / CONFIG_FILE)

    if fmt == "peft":
        weights = _weights_from_peft(_read_tensors(src / PEFT_WEIGHTS))
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
    _apply_rope(model, block, src)

    if getattr(model, "lora_config", None) == cfg and _lora_modules(model):
        _restore_base(model)  # same structure: reuse the layers, un-train embeddings / norms
    else:
        remove(model)
        apply(model, cfg, seed=0)  # fixed seed: loading leaves MLX's global RNG alone
    params = dict(tree_flatten(model.parameters()))
    model.load_weights([(k, v.astype(params[k].dtype)) for k, v in weights.items()], strict=False)
    mx.eval(model.parameters())
    model.eval()
    return model
