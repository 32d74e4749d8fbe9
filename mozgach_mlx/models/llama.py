"""The Llama architecture family: ``llama``, ``mistral`` and ``qwen2``.

The three differ only in configuration, so they share one implementation:

    llama    optional ``attention_bias`` (q, k, v, o) and ``mlp_bias``
    mistral  llama + ``sliding_window`` on every layer when set
    qwen2    bias on q, k, v (never o); sliding window only with ``use_sliding_window``
             on layers >= ``max_window_layers``

Block: x + o(attn(rope(q(n1(x))), rope(k(n1(x))), v(n1(x)))) -> h; h + down(silu(gate(n2 h)) * up(n2 h)).
Attribute names equal Hugging Face checkpoint keys, so loading needs no rename table.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .. import attention as attn
from .. import ops
from ..errors import ConfigError
from .base import KVCache, causal_mask
from .rope import build_rope

MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass
class ModelArgs:
    """Hugging Face ``config.json`` fields of a Llama-family model (same names)."""

    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    head_dim: int | None = None
    num_key_value_heads: int | None = None
    max_position_embeddings: int | None = None
    rope_theta: float = 10000.0
    rope_traditional: bool = False
    rope_scaling: dict | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    use_sliding_window: bool = False
    max_window_layers: int | None = None
    layer_types: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    _REQUIRED = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size",
                 "num_attention_heads", "vocab_size")

    @classmethod
    def from_dict(cls, config: dict, *, source: str = "config.json") -> ModelArgs:
        """Build from a config dict; unknown keys are kept in ``extra`` (and written back
        on save), missing required keys raise ConfigError naming them."""
        if not isinstance(config, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(config).__name__}")
        missing = [k for k in cls._REQUIRED if config.get(k) is None]
        if missing:
            raise ConfigError(f"{source}: missing required field(s) {', '.join(missing)}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in config.items() if k in names}
        extra = {k: v for k, v in config.items() if k not in names}
        # transformers >= 5 writes rope_theta / rope_scaling inside "rope_parameters"
        rp = config.get("rope_parameters")
        if isinstance(rp, dict):
            if "rope_theta" not in known and "rope_theta" in rp:
                known["rope_theta"] = rp["rope_theta"]
            if known.get("rope_scaling") is None and (rp.get("rope_type") or rp.get("type")) not in (
                    None, "default"):
                known["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
        try:
            return cls(**known, extra=extra)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except TypeError as e:  # a field of the wrong JSON type reached arithmetic
            raise ConfigError(f"{source}: invalid field value ({e})") from None

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type {self.model_type!r} is not supported; supported: "
                              f"{', '.join(MODEL_TYPES)}")
        for name in self._REQUIRED[1:]:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"config field {name} must be a positive integer, got {v!r}")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(f"hidden_size ({self.hidden_size}) is not divisible by "
                                  f"num_attention_heads ({self.num_attention_heads}); set head_dim")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.layer_types is not None and len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries for "
                              f"{self.num_hidden_layers} layers")

    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.model_type != "qwen2" and self.attention_bias

    def window(self, layer: int) -> int | None:
        """Sliding-window size of layer ``layer`` (None = full causal attention)."""
        if self.layer_types is not None:
            return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None
        if self.model_type == "mistral":
            return self.sliding_window
        if self.model_type == "qwen2" and self.use_sliding_window:
            first = self.max_window_layers if self.max_window_layers is not None else 0
            return self.sliding_window if layer >= first else None
        return None

    def to_dict(self) -> dict:
        """The HF ``config.json`` dict (unknown fields read at load are kept)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out = dict(self.extra)
        out.pop("rope_parameters", None)  # superseded by rope_theta / rope_scaling below
        out.update({k: v for k, v in d.items() if v is not None or k == "rope_scaling"})
        return out


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        d, hd = args.hidden_size, args.head_dim
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = hd
        self.window = args.window(layer)
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=args.qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=args.qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=args.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=args.o_bias)
        self.set_rope(args)
        # Context parallelism (mozgach_mlx.context): while a context-parallel step runs, the
        # object that applies RoPE at this rank's global positions and runs ring attention.
        self.context_parallel = None

    def set_rope(self, args: ModelArgs) -> None:
        self.rope = build_rope(self.head_dim, args.rope_theta, args.rope_scaling,
                               args.max_position_embeddings, args.rope_traditional)

    @property
    def scale(self) -> float:
        # yarn's attention factor multiplies q and k: fold its square into the softmax scale
        return self.rope.attention_scale ** 2 / math.sqrt(self.head_dim)

    def __call__(self, x: mx.array, cache: KVCache | None = None, *, segment_ids: mx.array | None = None,
                 s2_group: int | None = None) -> mx.array:
        """x (B, L, d) -> (B, L, d). ``segment_ids`` (B, L): attend only within a segment
        (packed documents); ``s2_group``: S²-Attn groups in tokens (training). Both only
        for a full sequence (no cache offset)."""
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)  # (B, H, L, D)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)  # (B, Hkv, L, D)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        if self.context_parallel is not None and cache is None:  # x is this rank's slice of the sequence
            o = self.context_parallel.attention(q, k, v, rope=self.rope, scale=self.scale, window=self.window)
            return self.o_proj(o.transpose(0, 2, 1, 3).reshape(B, L, -1))
        offset = 0 if cache is None else cache.offset
        q = self.rope(q, offset=offset)
        k = self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)

        if offset == 0 and (L > 1 or segment_ids is not None):
            # training / prefill: the blockwise kernel (looked up now, so it can be swapped)
            o = attn.flash_attention(q, k, v, scale=self.scale, causal=True, window=self.window,
                                     segment_ids=segment_ids, s2_group=s2_group)
        else:
            if segment_ids is not None or s2_group is not None:
                raise ConfigError("segment_ids / s2_group apply to a whole sequence, not to decoding with a "
                                  "filled KV cache; call the model without them when generating.")
            if self.window is not None and offset + L > self.window:
                mask = causal_mask(L, offset, self.window)
            else:
                mask = "causal" if L > 1 else None
            o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        o = o.transpose(0, 2, 1, 3).reshape(B, L, -1)  # (B, L, H*D)
        return self.o_proj(o)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        d, f = args.hidden_size, args.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=args.mlp_bias)
        self.up_proj = nn.Linear(d, f, bias=args.mlp_bias)
        self.down_proj = nn.Linear(f, d, bias=args.mlp_bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(ops.silu(self.gate_proj(x)) * self.up_proj(x))


def _checkpointed(module: nn.Module, x: mx.array, **kwargs) -> mx.array:
    """``module(x, **kwargs)`` under ``mx.checkpoint``: only the inputs are kept for
    backward, the inside is recomputed. Trainable parameters go in as checkpoint inputs
    so their gradients (LoRA's included) flow out of the recomputation."""

    def inner(params, x):
        module.update(params)
        return module(x, **kwargs)

    return mx.checkpoint(inner)(module.trainable_parameters(), x)


def chunked_mlp(mlp: MLP, x: mx.array, chunk: int) -> mx.array:
    """``mlp(x)`` evaluated ``chunk`` positions at a time along L, each chunk under
    ``mx.checkpoint``, so the (B, L, intermediate) activation never exists whole.

    Shapes: x (B, L, d) -> (B, L, d).
    """
    L = x.shape[1]
    if L <= chunk:
        return mlp(x)
    parts = [_checkpointed(mlp, x[:, s : s + chunk]) for s in range(0, L, chunk)]
    return mx.concatenate(parts, axis=1)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(args, layer)
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, cache: KVCache | None = None, mlp_chunk: int | None = None, *,
                 segment_ids: mx.array | None = None, s2_group: int | None = None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), cache, segment_ids=segment_ids, s2_group=s2_group)
        n = self.post_attention_layernorm(h)
        return h + (chunked_mlp(self.mlp, n, mlp_chunk) if mlp_chunk else self.mlp(n))


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache: list[KVCache] | None = None, *,
                 grad_checkpoint: bool = False, mlp_chunk: int | None = None,
                 segment_ids: mx.array | None = None, s2_group: int | None = None) -> mx.array:
        h = self.embed_tokens(inputs)  # (B, L, d)
        caches = cache if cache is not None else [None] * len(self.layers)
        kw = dict(mlp_chunk=mlp_chunk, segment_ids=segment_ids, s2_group=s2_group)
        for layer, c in zip(self.layers, caches, strict=True):
            if grad_checkpoint and c is None:
                h = _checkpointed(layer, h, **kw)
            else:
                h = layer(h, cache=c, **kw)
        return self.norm(h)


class Model(nn.Module):
    """Llama-family causal LM.

    ``model(inputs (B, L) int) -> logits (B, L, V)``; ``hidden`` and ``logits`` split
    that in two so the loss can apply the head chunk by chunk.

    Training switches (plain attributes, default off):
        grad_checkpoint: run every block under ``mx.checkpoint`` (recompute in backward).
        mlp_chunk: evaluate the MLP this many positions at a time along L.
        s2_group: S²-Attn (LongLoRA) group, in tokens (int) or as a fraction of the
            sequence (float in (0, 1)); applied only in training mode
            (``model.train()``), so evaluation and generation use full attention.

    ``segment_ids`` (B, L) int32 (packed documents, from ``data.batches(...,
    segments=True)``): a token attends only to its own document. RoPE positions run on
    across documents; attention scores depend only on position differences, so each
    document sees what it would alone (up to rounding; not so for dynamic-NTK scaling,
    whose frequencies depend on the sequence length).
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = LlamaModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.grad_checkpoint = False
        self.mlp_chunk: int | None = None
        self.s2_group: int | float | None = None

    @property
    def layers(self) -> list[TransformerBlock]:
        return self.model.layers

    def hidden(self, inputs: mx.array, cache: list[KVCache] | None = None, *,
               segment_ids: mx.array | None = None) -> mx.array:
        """(B, L) token ids -> (B, L, d) hidden states after the final norm."""
        if self.mlp_chunk is not None and self.mlp_chunk <= 0:
            raise ConfigError(f"mlp_chunk must be a positive number of positions, got {self.mlp_chunk}")
        s2 = attn.s2_group_tokens(self.s2_group, inputs.shape[1]) if self.training and cache is None else None
        return self.model(inputs, cache, grad_checkpoint=self.grad_checkpoint, mlp_chunk=self.mlp_chunk,
                          segment_ids=segment_ids, s2_group=s2)

    def logits(self, h: mx.array) -> mx.array:
        """(..., d) -> (..., V) with lm_head, or the tied embedding."""
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def __call__(self, inputs: mx.array, cache: list[KVCache] | None = None, *,
                 segment_ids: mx.array | None = None) -> mx.array:
        return self.logits(self.hidden(inputs, cache, segment_ids=segment_ids))

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.layers]

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """HF checkpoint dict -> our parameter names (drop precomputed rotary tables and
        the duplicated head of tied models)."""
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
            for suffix in ("scales", "biases"):
                weights.pop(f"lm_head.{suffix}", None)
        return weights

    def set_rope(self, rope_scaling: dict | None, max_position_embeddings: int | None = None) -> None:
        """Rebuild every layer's RoPE with a new scaling (validated before anything changes)."""
        new = dataclasses.replace(self.args, rope_scaling=rope_scaling,
                                  max_position_embeddings=(max_position_embeddings
                                                           or self.args.max_position_embeddings))
        build_rope(new.head_dim, new.rope_theta, new.rope_scaling, new.max_position_embeddings,
                   new.rope_traditional)
        self.args = new
        for layer in self.layers:
            layer.self_attn.set_rope(new)
