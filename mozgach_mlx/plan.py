"""Memory and time planner: will a LoRA training step at context L fit, and how long
will it take?

The estimate follows the training data flow (DESIGN.md) term by term, for a step with
per-block gradient checkpointing, the chunked MLP, blockwise attention and the chunked
loss, in the compute dtype (fp32 on the CPU, bf16/fp16 on a GPU):

    weights            base parameters as stored (quantized: bits/8 per weight + scales
                       and biases per group), plus on the CPU one dequantized matrix
    adapter            LoRA parameters x 5 (value, gradient, accumulated gradient, Adam m, v)
    checkpoints        one (B, L, d) block input per layer, kept for the backward pass
    block              one block recomputed in the backward: its (B, L, .) activations and
                       their gradients (attention is O(L), never O(L^2))
    mlp                (B, chunk, intermediate) activations and gradients of one MLP chunk
    loss               (B, loss_chunk, vocab) logits, probabilities and gradients
    head               final hidden states and their gradient

Every term but the weights and the adapter is linear in L (or constant), which is the
point of the design; the coefficients of the activation terms are calibrated against
measured peaks (tests/test_plan.py checks the estimate against ``mx.get_peak_memory``).

Time: a LoRA step costs ~8 N flops per token for the N frozen parameters (forward,
recomputed forward, input gradients; no weight gradients) and (2 + 2 + 5) * 2 D flops
per layer, head and computed (query, key) pair of attention (forward, recompute,
backward: 9 matmuls over the pair), divided by a throughput you give (or the planner's
defaults per backend). The pairs are those the blockwise attention computes for the
step's mask (``attention.computed_pairs``): about L^2 / 2 for causal attention, far
fewer with packed documents, a sliding window or S²-Attn (``plan(..., attention=)``).
It is an estimate; benchmarks/bench_train.py measures.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import attention as attn
from .errors import ConfigError
from .lora import LoRAConfig
from .loss import auto_chunk
from .plan_scale import ScaleOut, scale_out
from .rundir import RunConfig, parse_quantize
from .train_config import TrainConfig

GiB = 2**30

# Activation arrays of (B, L, width) alive while one block is recomputed and
# differentiated, in units of B*L*d (attention side, including norms, q/k/v/o, rope,
# residuals and their gradients) and B*chunk*intermediate (MLP side: gate, up, the
# product and their gradients). Calibrated on the CPU backend with blockwise attention,
# 4-bit base, grad checkpointing, mlp_chunk 1024 (measured peak -> estimate):
#   tiny (d=256, 4 layers, vocab 259)   L=2K 116 -> 105 MiB, 4K 159 -> 166, 8K 279 -> 285
#   d=512, 4 layers, 32K vocab          L=2K 837 -> 863 MiB, 4K 819 -> 939
# (tests/test_plan.py re-measures the tiny model).
BLOCK_WIDTHS = 24.0
MLP_WIDTHS = 10.0
LOSS_WIDTHS = 8.0  # MLX overlaps the next chunk's buffers with the current one (loss.py)

# Sustained training throughput by backend (GFLOP/s), used when none is given:
# conservative figures, override with a measured one.
DEFAULT_GFLOPS = {"cpu": 60.0, "metal": 8_000.0, "cuda": 100_000.0}


@dataclass
class Plan:
    """The planner's answer. Bytes per component; ``total_bytes`` is the peak estimate."""

    context: int
    batch_size: int
    components: dict[str, int]
    total_bytes: int
    budget_bytes: int | None
    max_context: int | None
    flops_per_step: float
    gflops: float
    seconds_per_step: float
    notes: list[str] = field(default_factory=list)
    scale: ScaleOut | None = None  # over several ranks (plan(..., ranks=, link=))

    @property
    def fits(self) -> bool | None:
        return None if self.budget_bytes is None else self.total_bytes <= self.budget_bytes

    @property
    def tokens_per_second(self) -> float:
        return self.context * self.batch_size / self.seconds_per_step

    def table(self) -> str:
        lines = [f"plan: context {self.context:,} x batch {self.batch_size}"]
        for k, v in self.components.items():
            lines.append(f"  {k:<12} {v / GiB:9.3f} GiB")
        lines.append(f"  {'total':<12} {self.total_bytes / GiB:9.3f} GiB")
        if self.budget_bytes is not None:
            lines.append(f"  budget {self.budget_bytes / GiB:.1f} GiB: {'fits' if self.fits else 'does NOT fit'}"
                         + (f"; longest context that fits ~{self.max_context:,}" if self.max_context else ""))
        lines.append(f"  time: {self.flops_per_step / 1e12:.2f} TFLOP/step at {self.gflops:,.0f} GFLOP/s "
                     f"~ {self.seconds_per_step:.1f} s/step, {self.tokens_per_second:,.0f} tokens/s (estimate)")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "fits": self.fits, "tokens_per_second": self.tokens_per_second}


def _config_of(model_or_config: Any) -> tuple[dict, int | None, int | None]:
    """(HF-style config dict, stored base bytes if known, LoRA parameter count if applied)."""
    if isinstance(model_or_config, dict) and not hasattr(model_or_config, "args"):  # nn.Module is a dict
        return model_or_config, None, None
    if isinstance(model_or_config, (str, Path)):
        from .models import checkpoint, tiny

        if str(model_or_config) == tiny.TINY_NAME:
            return dict(tiny.TINY_CONFIG), None, None
        return checkpoint.read_config(checkpoint.resolve(model_or_config)), None, None
    args = getattr(model_or_config, "args", None)
    if args is None:
        raise ConfigError("plan(): pass a model, its ModelArgs-carrying model, a config dict or a model path")
    from mlx.utils import tree_flatten

    cfg = args.to_dict() if hasattr(args, "to_dict") else dataclasses.asdict(args)
    base = lora_n = 0
    for name, p in tree_flatten(model_or_config.parameters()):
        if ".lora_" in name:
            lora_n += p.size
        else:
            base += p.nbytes
    return cfg, base, (lora_n or None)


def _need(cfg: dict, key: str):
    if cfg.get(key) is None:
        raise ConfigError(f"plan(): the model config has no {key!r}")
    return cfg[key]


@dataclass(frozen=True)
class _Shapes:
    """The sizes of a decoder-only model that the estimate needs."""

    d: int
    n_layers: int
    inter: int
    vocab: int
    heads: int
    head_dim: int
    linears: dict  # name -> (in, out) of each linear layer of a block
    tied: bool

    @classmethod
    def of(cls, cfg: dict) -> _Shapes:
        d, inter = _need(cfg, "hidden_size"), _need(cfg, "intermediate_size")
        heads = _need(cfg, "num_attention_heads")
        kv_heads = cfg.get("num_key_value_heads") or heads
        head_dim = cfg.get("head_dim") or d // heads
        q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
        linears = {"q_proj": (d, q_dim), "k_proj": (d, kv_dim), "v_proj": (d, kv_dim), "o_proj": (q_dim, d),
                   "gate_proj": (d, inter), "up_proj": (d, inter), "down_proj": (inter, d)}
        return cls(d, _need(cfg, "num_hidden_layers"), inter, _need(cfg, "vocab_size"), heads, head_dim,
                   linears, bool(cfg.get("tie_word_embeddings")))

    @property
    def linear_params(self) -> int:
        return self.n_layers * sum(i * o for i, o in self.linears.values())

    def stored_bytes(self, quantize: int | None, group_size: int, act: int) -> int:
        """Base bytes as stored: packed bits + a scale and bias per group, or ``act`` bytes."""
        embed = self.vocab * self.d * (1 if self.tied else 2)
        norms = self.n_layers * 2 * self.d
        if quantize:
            per_weight = quantize / 8 + 2 * act / group_size
            return int(self.linear_params * per_weight + embed * act + norms * act)
        return int((self.linear_params + embed + norms) * act)

    def lora_params(self, rank: int, targets: tuple[str, ...]) -> int:
        unknown = [t for t in targets if t not in self.linears]
        if unknown:
            raise ConfigError(f"plan(): unknown LoRA target(s) {unknown}; use {sorted(self.linears)}")
        return self.n_layers * sum(rank * (self.linears[t][0] + self.linears[t][1]) for t in targets)


def _components(s: _Shapes, n: int, B: int, act: int, weights: int, lora_n: int, mlp_chunk: int | None,
                loss_chunk: int) -> dict[str, int]:
    """Bytes per component of the peak at context ``n`` (see the module docstring)."""
    chunk, lchunk = min(n, mlp_chunk or n), min(n, loss_chunk)
    width = max(s.d, s.heads * s.head_dim)
    return {
        "weights": weights,
        "adapter": lora_n * 4 * 5,
        "checkpoints": s.n_layers * B * n * s.d * act,
        "block": int(BLOCK_WIDTHS * B * n * width * act + 2 * B * s.heads * n * 4),
        "mlp": int(MLP_WIDTHS * B * chunk * s.inter * act),
        "loss": int(LOSS_WIDTHS * B * lchunk * s.vocab * 4),
        "head": 2 * B * n * s.d * act,
    }


def _max_context(total_at, budget: int, mlp_chunk: int | None, loss_chunk: int) -> int | None:
    """Longest context whose estimate fits ``budget``: past the chunk sizes every term is
    affine in the context, so two evaluations solve it. None if even that does not fit."""
    lo = max(mlp_chunk or 1, loss_chunk)
    at_lo = total_at(lo)
    slope = (total_at(2 * lo) - at_lo) / lo
    return int(lo + (budget - at_lo) / slope) if budget > at_lo else None


ATTENTION_KEYS = ("document_length", "window", "s2_group")


def _attention_pairs(attention: dict | None, L: int, heads: int) -> tuple[int, str | None]:
    """(computed (query, key) pairs over ``heads`` heads for one sequence, a note)."""
    attention = dict(attention or {})
    unknown = sorted(set(attention) - set(ATTENTION_KEYS))
    if unknown:
        raise ConfigError(f"plan(): unknown attention key(s) {unknown}; use {list(ATTENTION_KEYS)}")
    doc = attention.get("document_length")
    if doc is not None and (isinstance(doc, bool) or not isinstance(doc, int) or doc < 1):
        raise ConfigError(f"plan(): attention document_length must be a positive number of tokens, got {doc!r}")
    window = attention.get("window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ConfigError(f"plan(): attention window must be a positive number of tokens, got {window!r}")
    group = attn.s2_group_tokens(attention.get("s2_group"), L)
    seg = None if doc is None else np.arange(L) // doc
    pairs = attn.computed_pairs(L, heads=heads, window=window, segment_ids=seg, s2_group=group)
    if not attention:
        return pairs, None
    causal = attn.computed_pairs(L, heads=heads)
    desc = ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in attention.items() if v is not None)
    return pairs, f"attention ({desc}) computes {pairs / causal:.1%} of the causal attention's (query, key) pairs"


def plan(model_or_config: Any, context: int = 100_000, *, batch_size: int = TrainConfig.batch_size,
         lora_rank: int = LoRAConfig.r, lora_targets: tuple[str, ...] = LoRAConfig.targets,
         quantize: int | None = parse_quantize(RunConfig.quantize), group_size: int = RunConfig.group_size,
         compute_bytes: int | None = None, mlp_chunk: int | None = TrainConfig.mlp_chunk,
         loss_chunk: int | None = TrainConfig.loss_chunk, memory_gb: float | None = None,
         gflops: float | None = None, backend: str | None = None, attention: dict | None = None,
         ranks: int = 1, link: str = "10gbe") -> Plan:
    """Estimate peak memory and step time of LoRA training at ``context`` tokens.

    Defaults are the trainer's and the run's (:class:`TrainConfig`, :class:`LoRAConfig`,
    :class:`RunConfig`), so a plan describes the step ``mozgach train`` would run.

    Args:
        model_or_config: a loaded model (its actual stored bytes are used), a config dict,
            ``"tiny"`` or a model path/repo (only ``config.json`` is read).
        context: tokens per sequence.
        quantize: base bits (4, 8) or None; ignored for a loaded model (it is measured).
        compute_bytes: bytes per activation (default: 4 on the CPU, 2 on a GPU).
        mlp_chunk: the trainer's MLP chunk (None = whole sequence).
        loss_chunk: the loss chunk (None = the trainer's automatic choice).
        memory_gb: a budget to check against (e.g. 48 for the reference M4 laptop).
        gflops: sustained throughput; default per backend (see DEFAULT_GFLOPS).
        attention: the mask of the training step, which decides the attention FLOPs:
            ``{"document_length": n}`` (packed documents of n tokens, the trainer's
            ``attention_mask="document"``), ``{"window": w}`` (sliding window),
            ``{"s2_group": g}`` (S²-Attn, tokens or a fraction of the context), or a
            combination; default plain causal attention.
        ranks, link: also estimate training over ``ranks`` processes joined by ``link``
            (``thunderbolt5``, ``10gbe``, ``1gbe``): :mod:`mozgach_mlx.plan_scale`.
    """
    if context < 1 or batch_size < 1:
        raise ConfigError(f"plan(): context and batch_size must be >= 1 (got {context}, {batch_size})")
    if quantize not in (None, 4, 8):
        raise ConfigError(f"plan(): quantize={quantize!r}; use 4, 8 or None")
    cfg, stored, lora_n = _config_of(model_or_config)
    s = _Shapes.of(cfg)
    if backend is None:
        from .backend import backend as _backend

        backend = _backend()
    act = compute_bytes or (4 if backend == "cpu" else 2)
    if stored is None:
        stored = s.stored_bytes(quantize, group_size, act)
    if lora_n is None:
        lora_n = s.lora_params(lora_rank, lora_targets)
    B, L = batch_size, context
    if loss_chunk is None:
        loss_chunk = auto_chunk(s.vocab, B)
    # on the CPU a quantized layer is dequantized per call: one fp32 matrix is live
    weights = stored + (max(i * o for i, o in s.linears.values()) * 4 if backend == "cpu" and quantize else 0)

    def total_at(n: int) -> int:
        return sum(_components(s, n, B, act, weights, lora_n, mlp_chunk, loss_chunk).values())

    comp = _components(s, L, B, act, weights, lora_n, mlp_chunk, loss_chunk)
    notes = []
    budget = int(memory_gb * GiB) if memory_gb is not None else None
    max_ctx = None if budget is None else _max_context(total_at, budget, mlp_chunk, loss_chunk)
    if budget is not None and max_ctx is None:
        notes.append("even a short context does not fit this budget")
    n_frozen = s.linear_params + (s.vocab * s.d)  # the head runs over every position too
    pairs, attention_note = _attention_pairs(attention, L, s.heads)
    if attention_note:
        notes.append(attention_note)
    flops = 8.0 * n_frozen * B * L + 18.0 * s.n_layers * B * s.head_dim * pairs
    g = gflops or DEFAULT_GFLOPS.get(backend, DEFAULT_GFLOPS["cpu"])
    if gflops is None:
        notes.append(f"throughput {g:,.0f} GFLOP/s is the planner's default for {backend}; pass gflops= "
                     "from benchmarks/bench_train.py for a real figure")
    max_pos = cfg.get("max_position_embeddings")
    if max_pos and L > max_pos and not cfg.get("rope_scaling"):
        notes.append(f"context {L:,} > max_position_embeddings {max_pos:,}: set rope_scaling "
                     f"(e.g. linear, factor {L / max_pos:.1f})")
    scale = scale_out(flops / (g * 1e9), lora_n, ranks, link) if ranks > 1 else None
    notes += [scale.note()] if scale else []
    return Plan(context=L, batch_size=B, components=comp, total_bytes=sum(comp.values()), budget_bytes=budget,
                max_context=max_ctx, flops_per_step=flops, gflops=g, seconds_per_step=flops / (g * 1e9),
                notes=notes, scale=scale)
