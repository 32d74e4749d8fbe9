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

The peak is weights + adapter + checkpoints + the larger of (block + mlp) and (loss +
head): the chunked loss computes its gradient in the forward pass, so its buffers are
gone before the first block is recomputed (:func:`peak_of`; measured, see RESULTS.md).
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

The plain step (``strategy="plain"``, what ``auto`` runs when it fits) keeps every
block's activations instead of recomputing them: its "checkpoints" are PLAIN_D_WIDTHS
(B, L, d) and PLAIN_INTER_WIDTHS (B, L, intermediate) arrays per block (plus, on the
CPU with a quantized base, every layer's dequantized weights), its MLP runs whole, and
its time drops the recomputed forward (6 N flops per token, 14 D per pair).

Memory strategies (:mod:`mozgach_mlx.memory`, ``plan(..., strategy=)``), term by term:

    tile_chunk c       block (the attention phase): TILE_D_WIDTHS (B, L, d) arrays (the
                       input, the input gradient) + TILE_ATTN_WIDTHS arrays of
                       (B, L, q_dim + 2 kv_dim) (q/k/v, RoPE'd copies, output, gradients);
                       mlp: what the chunk phase (x, dy, dx, q/k/v, o whole + one chunk's
                       block and MLP working set) needs beyond the attention phase
                       time: +4 D flops per pair (attention forward once more) and
                       +2 x the q/k/v weights per token (phase A runs twice)
    offload            checkpoints: none in memory; time: write + read them at the
                       device's disk bandwidth (not overlapped)
    checkpoint_every k checkpoints: ceil(N / k) + k - 1 inputs; time: one more forward
                       of (k - 1) / k of the blocks
    checkpoint_dtype   checkpoints at 2 bytes per value (no change on a GPU)

In a 16-bit compute dtype the block term also counts the blockwise attention's fp32
copies of K, V and its fp32 dK, dV accumulators (read from attention/blockwise.py; the
coefficients are calibrated in fp32 on the CPU only -- nothing here ran on a GPU).

``strategy="auto"`` picks, among a fixed list of candidates (:data:`mozgach_mlx.memory.AUTO_CANDIDATES`),
the fastest whose estimate fits the budget. ``device=`` takes a profile from
:mod:`mozgach_mlx.devices` (the budget is its accelerator limit, e.g. Metal's default
working set; the throughput its peak times a stated sustained fraction).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import attention as attn
from . import devices as dev_mod
from . import plan_context as pc
from . import quant
from .devices import machine_memory_bytes
from .errors import ConfigError
from .lora import LoRAConfig
from .loss import auto_chunk
from .memory import MemoryStrategy, auto_candidates, parse_strategy
from .models import presets
from .plan_context import ContextParallel
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
MLP_WIDTHS = 16.0
LOSS_WIDTHS = 10.0  # MLX overlaps the next chunk's buffers with the current one (loss.py)
# Tiled block recompute (memory.py), units of B*L*(q_dim + 2 kv_dim) alive in its
# attention phase (q/k/v, RoPE'd copies, output, output gradient, dq/dk/dv), plus the
# block's input, its output gradient and input gradient (3 B*L*d). Calibrated against
# measured peaks (benchmarks/bench_memory.py, table in benchmarks/RESULTS.md).
TILE_ATTN_WIDTHS = 5.0
TILE_D_WIDTHS = 3.0
ENGINE_BLOCK_WIDTHS = 22.0  # an untiled block in the block-by-block step (offload / every k without tiles)
TILE_MLP_WIDTHS = 10.0  # one chunk's MLP working set in the tiled phase B (a plain vjp, no overlap)
# The plain step keeps every block's activations for the backward pass, in units of
# B*L*d and B*L*intermediate per block, plus (CPU, quantized base) every layer's
# dequantized fp32 weights. Fitted on the CPU against measured peaks, erring high
# (measured -> estimate, LoRA on every linear layer): tiny-stdlib B=4: L=256 190 -> 282 MiB,
# 1K 708 -> 1056, 2K 1360 -> 1448; SmolLM2-135M B=1: 512 1775 -> 1979, 2K 4034 -> 4280 MiB.
# auto runs it only when it fits.
PLAIN_D_WIDTHS = 12.0
PLAIN_INTER_WIDTHS = 4.0
# auto without memory_gb: the plain step must fit this share of the machine's memory
# (:func:`machine_memory_bytes`); otherwise the default step runs, as before any budget.
PLAIN_MACHINE_SHARE = 0.5

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
    context_parallel: ContextParallel | None = None  # one sequence over the ranks (per-rank figures)
    strategy: dict = field(default_factory=dict)  # MemoryStrategy fields; {} = the default step
    device: str | None = None
    io_seconds: float = 0.0  # offload file I/O per step (included in seconds_per_step)
    suggestions: list[str] = field(default_factory=list)

    @property
    def headroom_bytes(self) -> int | None:
        return None if self.budget_bytes is None else self.budget_bytes - self.total_bytes

    @property
    def fits(self) -> bool | None:
        return None if self.budget_bytes is None else self.total_bytes <= self.budget_bytes

    @property
    def tokens_per_second(self) -> float:
        return self.context * self.batch_size / self.seconds_per_step

    def table(self) -> str:
        lines = [f"plan: context {self.context:,} x batch {self.batch_size}"
                 + (f" on {self.device}" if self.device else "")]
        if self.strategy:
            lines.append(f"  strategy: {MemoryStrategy(**self.strategy).describe()}")
        for k, v in self.components.items():
            lines.append(f"  {k:<12} {v / GiB:9.3f} GiB")
        ring = " + ring" if "ring" in self.components else ""
        lines.append(f"  {'total':<12} {self.total_bytes / GiB:9.3f} GiB  (weights + adapter + checkpoints + "
                     f"the larger of block + mlp{ring} and loss + head)" + (" per rank" if ring else ""))
        if self.budget_bytes is not None:
            lines.append(f"  budget {self.budget_bytes / GiB:.1f} GiB: {'fits' if self.fits else 'does NOT fit'}"
                         + (f", headroom {self.headroom_bytes / GiB:.1f} GiB" if self.fits else "")
                         + (f"; longest context that fits ~{self.max_context:,}" if self.max_context else ""))
        io = f" (of which offload I/O {self.io_seconds:,.1f} s)" if self.io_seconds else ""
        lines.append(f"  time: {self.flops_per_step / 1e12:.2f} TFLOP/step{' per rank' if ring else ''} at "
                     f"{self.gflops:,.0f} GFLOP/s "
                     f"~ {_duration(self.seconds_per_step)}/step{io}, {self.tokens_per_second:,.0f} tokens/s "
                     "(estimate)")
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  suggestion: {n}" for n in self.suggestions]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "fits": self.fits, "tokens_per_second": self.tokens_per_second}


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _config_of(model_or_config: Any) -> tuple[dict, int | None, int | None]:
    """(HF-style config dict, stored base bytes if known, LoRA parameter count if applied)."""
    if isinstance(model_or_config, dict) and not hasattr(model_or_config, "args"):  # nn.Module is a dict
        return model_or_config, None, None
    if presets.is_preset(model_or_config):
        return presets.preset(model_or_config), None, None
    if isinstance(model_or_config, (str, Path)):
        from .models import checkpoint, gguf, tiny

        if str(model_or_config) == tiny.TINY_NAME:
            return dict(tiny.TINY_CONFIG), None, None
        path = checkpoint.resolve(model_or_config)
        if path.is_file():  # GGUF: the tensors as stored are the base's bytes
            return gguf.model_config(path), path.stat().st_size, None
        return checkpoint.read_config(path), None, None
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

    @property
    def qkv_width(self) -> int:
        return sum(self.linears[k][1] for k in ("q_proj", "k_proj", "v_proj"))

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

    @property
    def frozen_params(self) -> int:  # the block linears and the head (it runs over every position too)
        return self.linear_params + self.vocab * self.d

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
                loss_chunk: int, st: MemoryStrategy | None = None, dequant_bytes: int = 0) -> dict[str, int]:
    """Bytes per component of the peak at context ``n`` (see the module docstring).
    ``dequant_bytes``: every layer's dequantized weights (the plain step keeps them)."""
    st = st or MemoryStrategy()
    if st.plain:  # every block's activations are "checkpoints"; its MLP runs whole
        mlp_chunk = None
    chunk, lchunk = min(n, mlp_chunk or n), min(n, loss_chunk)
    width = max(s.d, s.heads * s.head_dim)
    lse = 2 * B * s.heads * n * 4
    kv_dim = s.qkv_width - s.heads * s.head_dim
    if act < 4:  # the blockwise attention's fp32 K/V copies and dK/dV accumulators (not measured: no GPU here)
        lse += 2 * B * n * kv_dim * 4
    ck_act = 2 if st.checkpoint_dtype in ("float16", "bfloat16") else act
    k = st.checkpoint_every
    stored = 0 if st.offload else -(-s.n_layers // k)
    checkpoints = stored * B * n * s.d * ck_act + (k - 1) * B * n * s.d * act
    if st.plain:
        checkpoints = int(s.n_layers * (PLAIN_D_WIDTHS * s.d + PLAIN_INTER_WIDTHS * s.inter) * B * n * act) \
            + dequant_bytes
    if st.tile_chunk:
        c = min(n, st.tile_chunk)
        block = int((TILE_D_WIDTHS * s.d + TILE_ATTN_WIDTHS * s.qkv_width) * B * n * act + lse)
        # phase B: x, dy, dx, q/k/v and o whole, plus one chunk's block and MLP working set
        phase_b = (3 * s.d + s.qkv_width + s.heads * s.head_dim) * B * n * act + \
            (BLOCK_WIDTHS * width + TILE_MLP_WIDTHS * s.inter) * B * c * act
        mlp = int(max(0, phase_b - block))
    else:
        widths = BLOCK_WIDTHS if st.runs_model_step else ENGINE_BLOCK_WIDTHS
        block = int(widths * B * n * width * act + lse)
        mlp = int(MLP_WIDTHS * B * chunk * s.inter * act)
    return {"weights": weights, "adapter": lora_n * 4 * 5, "checkpoints": checkpoints, "block": block,
            "mlp": mlp, "loss": int(LOSS_WIDTHS * B * lchunk * s.vocab * 4), "head": 2 * B * n * s.d * act}


def peak_of(components: dict[str, int]) -> int:
    """The peak of a step from its components: the loss phase (loss + head: the chunked
    loss computes its gradient in the forward pass) and the block phase (block + mlp: the
    backward's recompute) are never live at once, so the larger of the two counts."""
    c = components
    return c["weights"] + c["adapter"] + c["checkpoints"] + max(c["block"] + c["mlp"] + c.get("ring", 0),
                                                                 c["loss"] + c["head"])


def _max_context(total_at, budget: int, mlp_chunk: int | None = None, loss_chunk: int | None = None) -> int | None:
    """Longest context whose estimate fits ``budget`` (the estimate grows with the
    context: exponential search, then bisection). None if even one token does not fit."""
    if total_at(1) > budget:
        return None
    a, b = 1, 2
    while total_at(b) <= budget:
        a, b = b, b * 2
        if b > 2**40:
            return b
    while b - a > 1:
        mid = (a + b) // 2
        a, b = (mid, b) if total_at(mid) <= budget else (a, mid)
    return a


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


def _current_backend() -> str:
    from .backend import backend

    return backend()


def _check_args(context: int, batch_size: int, quantize, contrast_over_ranks: bool = False) -> None:
    if context < 1 or batch_size < 1:
        raise ConfigError(f"plan(): context and batch_size must be >= 1 (got {context}, {batch_size})")
    if quantize not in (None, 4, 8):
        raise ConfigError(f"plan(): quantize={quantize!r}; use 4, 8 or None")
    if contrast_over_ranks:
        raise ConfigError("plan(): contrast and context_parallel do not go together (as in TrainConfig); drop one")


DEFAULT_DISK_GBS = 2.0  # sequential SSD bandwidth assumed for offload without a device profile


def plan(model_or_config: Any, context: int = 100_000, *, batch_size: int = TrainConfig.batch_size,
         lora_rank: int = LoRAConfig.r, lora_targets: tuple[str, ...] = LoRAConfig.targets,
         quantize: int | None = parse_quantize(RunConfig.quantize), group_size: int | None = RunConfig.group_size,
         compute_bytes: int | None = None, mlp_chunk: int | None = TrainConfig.mlp_chunk,
         loss_chunk: int | None = TrainConfig.loss_chunk, memory_gb: float | None = None,
         gflops: float | None = None, backend: str | None = None, attention: dict | None = None,
         strategy: Any = TrainConfig.memory_strategy, device: str | dev_mod.Device | None = None,
         tile_chunk: int | None = None, ranks: int = 1, link: str = "10gbe", plain: bool = True,
         context_parallel: bool = False, link_gbps: float | None = None, context_split: str = "zigzag",
         contrast: bool = False) -> Plan:
    """Peak memory and step time of LoRA training at ``context`` tokens (defaults: the trainer's).

    ``model_or_config``: a model, config dict, preset id, ``"tiny"`` or path; ``compute_bytes``: 4 on the CPU, 2
    on a GPU; ``memory_gb``: budget (with ``device``: its RAM, the budget its accelerator limit); ``attention``:
    ``{"document_length": n}``, ``{"window": w}``, ``{"s2_group": g}`` or a mix (default causal); ``strategy``:
    MemoryStrategy, dict, ``"plain"``, ``"none"`` or ``"auto"`` (``plain``: may auto pick it); ``device``:
    ``m4``, ``m4-pro``, ``m4-max``, ``m3-max``, ``h100``, ``this``; ``ranks``/``link``/``link_gbps``: N
    processes (:mod:`plan_scale`), with ``context_parallel`` one sequence over them split ``context_split``
    (zigzag | contiguous), per rank (:mod:`mozgach_mlx.plan_context`); ``contrast``: with ``TrainConfig.contrast
    > 0`` (:func:`_contrast_flops`; same memory: rows run one by one)."""
    _check_args(context, batch_size, quantize, contrast and context_parallel)
    chosen = parse_strategy(strategy, context, tile_chunk)
    dv = device if isinstance(device, dev_mod.Device) or device is None else dev_mod.device(device, memory_gb)
    cfg, stored, lora_n = _config_of(model_or_config)
    s = _Shapes.of(cfg)
    backend = backend or (dv.backend if dv is not None else None) or _current_backend()
    act = compute_bytes or (4 if backend == "cpu" else 2)
    stored = stored if stored is not None else s.stored_bytes(quantize, group_size or quant.DEFAULT_GROUP_SIZE, act)
    lora_n = lora_n if lora_n is not None else s.lora_params(lora_rank, lora_targets)
    B, L = batch_size, context
    loss_chunk = loss_chunk if loss_chunk is not None else auto_chunk(s.vocab, B)
    weights = _live_weights(stored, s, backend, quantize)
    g = gflops or (dv.gflops if dv is not None else DEFAULT_GFLOPS.get(backend, DEFAULT_GFLOPS["cpu"]))
    disk = dv.disk_gbs if dv is not None and dv.disk_gbs else DEFAULT_DISK_GBS
    pairs, attention_note = _attention_pairs(attention, L, s.heads)

    dequant = s.linear_params * 4 if backend == "cpu" and quantize else 0
    pc.check(ranks, context_parallel, chosen)
    q_dim = s.heads * s.head_dim
    cp, kv_dim = ranks if context_parallel else 1, (s.qkv_width - q_dim) // 2  # K (= V) width
    share = pc.attention_share(cp, context_split, not attention)  # the busiest rank's share of the pairs

    def comps(st: MemoryStrategy, n: int, lora: int = lora_n) -> dict[str, int]:  # per rank, n tokens in all
        r = pc.local_tokens(n, cp)
        c = _components(s, r, B, act, weights, lora, mlp_chunk, loss_chunk, st, dequant)
        return c if cp == 1 else {**c, "ring": pc.ring_bytes(B, r, kv_dim, act, 4, cp, st.tile_chunk, q_dim)}

    def total_at(st: MemoryStrategy, n: int, lora: int = lora_n) -> int:
        return peak_of(comps(st, n, lora))

    def cost(st: MemoryStrategy, n: int = pc.local_tokens(L, cp), p: float = pairs * share) -> tuple[float, float]:
        flops = _step_flops(s, B, n, p, st) + (_contrast_flops(s, B, n, p, st) if contrast else 0.0)
        io = (2 * s.n_layers * B * n * s.d * act / (disk * 1e9)) if st.offload else 0.0
        return flops, flops / (g * 1e9) + io

    budget = _budget(dv, memory_gb)
    candidates = pc.usable(auto_candidates(L, tile_chunk, plain), cp)
    if chosen is None:
        chosen = _auto(candidates, lambda c: total_at(c, L), lambda c: cost(c)[1], budget, plain)
    comp = comps(chosen, L)
    flops, seconds = cost(chosen)
    cpx = pc.estimate(ranks=cp, link=link, link_gbps=link_gbps, layout=context_split, n_layers=s.n_layers, batch=B,
                      context=L, kv_dim=kv_dim, kv_bytes=act, dkv_bytes=4, forwards=pc.attention_forwards(chosen),
                      lora_params=lora_n, compute_seconds=seconds, single_seconds=cost(chosen, L, pairs)[1],
                      attention_pass_seconds=4.0 * s.n_layers * B * s.head_dim * pairs * share / (g * 1e9),
                      chunk=chosen.tile_chunk, q_dim=q_dim) if context_parallel else None
    max_ctx = budget and _max_context(lambda n: total_at(chosen, n), budget, mlp_chunk, loss_chunk)
    scale = scale_out(flops / (g * 1e9), lora_n, ranks, link, link_gbps=link_gbps) if ranks > 1 and not cpx else None
    notes = _notes(cfg, L, attention_note, budget is not None and max_ctx is None, dv, g, gflops, backend, seconds) \
        + ([scale.note()] if scale else []) + ([cpx.note()] if cpx and cp > 1 else []) \
        + ([_contrast_note(B, flops / _step_flops(s, B, L, pairs, chosen))] if contrast else [])
    total = peak_of(comp)
    sugg = [] if budget is None or total <= budget else _suggestions(
        total_at, candidates, chosen, L, budget, mlp_chunk, loss_chunk, lora_rank, s, lora_targets)
    return Plan(context=L, batch_size=B, components=comp, total_bytes=total, budget_bytes=budget,
                max_context=max_ctx, flops_per_step=flops, gflops=g, notes=notes,
                seconds_per_step=cpx.seconds_per_step if cpx else seconds,
                strategy={k: v for k, v in chosen.to_dict().items() if v != getattr(MemoryStrategy(), k)},
                device=dv.name if dv is not None else None, io_seconds=cost(chosen)[1] - flops / (g * 1e9),
                suggestions=sugg, scale=scale, context_parallel=cpx)


def _auto(candidates: list[MemoryStrategy], peak, seconds, budget: int | None, plain: bool) -> MemoryStrategy:
    """``strategy="auto"``: the fastest candidate whose ``peak`` fits ``budget`` (none fits:
    the smallest). Without a budget, the plain step if it fits PLAIN_MACHINE_SHARE of
    :func:`machine_memory_bytes`, else the default step."""
    if budget is None:
        machine = machine_memory_bytes()
        plain_st = MemoryStrategy(plain=True)
        fits_here = plain and machine is not None and peak(plain_st) <= PLAIN_MACHINE_SHARE * machine
        return plain_st if fits_here else MemoryStrategy()
    fitting = [c for c in candidates if peak(c) <= budget]
    return min(fitting, key=seconds) if fitting else min(candidates, key=peak)


def _live_weights(stored: int, s: _Shapes, backend: str, quantize: int | None) -> int:
    """The base's bytes in a step: on the CPU a quantized layer is dequantized per call,
    so one fp32 matrix (the largest) is live besides the stored weights."""
    return stored + (max(i * o for i, o in s.linears.values()) * 4 if backend == "cpu" and quantize else 0)


def _budget(dv, memory_gb: float | None) -> int | None:
    """The budget in bytes: the device's accelerator limit, else ``memory_gb``, else none."""
    if dv is not None:
        return int(dv.budget_gb * GiB)
    return None if memory_gb is None else int(memory_gb * GiB)


def _notes(cfg: dict, L: int, attention_note: str | None, nothing_fits: bool, dv, g: float,
           gflops: float | None, backend: str, seconds: float) -> list[str]:
    notes = [attention_note] if attention_note else []
    if nothing_fits:
        notes.append("even a short context does not fit this budget")
    if dv is not None:
        notes += _device_notes(dv, g, gflops)
    elif gflops is None:
        notes.append(f"throughput {g:,.0f} GFLOP/s is the planner's default for {backend}; pass gflops= "
                     "from benchmarks/bench_train.py for a real figure")
    if seconds > 3600:
        acc = TrainConfig.grad_accumulation
        notes.append(f"slow: one step takes ~{_duration(seconds)}, an optimizer step of {acc} sequences "
                     f"~{_duration(seconds * acc)}, 100 optimizer steps ~{_duration(100 * seconds * acc)} per adapter "
                     "(x 108 adapters for the fleet)")
    max_pos = cfg.get("max_position_embeddings")
    if max_pos and L > max_pos and not cfg.get("rope_scaling"):
        notes.append(f"context {L:,} > max_position_embeddings {max_pos:,}: set rope_scaling "
                     f"(e.g. linear, factor {L / max_pos:.1f})")
    return notes


def _contrast_note(B: int, ratio: float) -> str:
    return f"contrast: {B} other-domain rows per micro-batch, forward-backward and the base's forward ({ratio:.2f}x " \
        "the plain step's FLOPs)"


def _contrast_flops(s: _Shapes, B: int, L: int, pairs: float, st: MemoryStrategy) -> float:
    """What ``TrainConfig.contrast`` adds to a step (:mod:`mozgach_mlx.contrast`): B
    other-domain rows, each through the step's forward-backward and the base's forward
    (2 N flops per token, 4 D per pair). Measured on SmolLM2 at 4 x 256 tokens the rows
    cost more than this (a step ~3x the plain one, not ~2.3x): they run as batches of 1."""
    forward = 2.0 * s.frozen_params * B * L + 4.0 * s.n_layers * B * s.head_dim * pairs
    return _step_flops(s, B, L, pairs, st) + forward


def _step_flops(s: _Shapes, B: int, L: int, pairs: int, st: MemoryStrategy) -> float:
    """FLOPs of one step (module docstring), with the strategies' recomputation."""
    per_pair = 18.0
    linear = 8.0 * s.frozen_params
    if st.tile_chunk:
        per_pair += 4.0
        linear += 2.0 * 2 * s.n_layers * s.d * s.qkv_width
    k = st.checkpoint_every
    if k > 1:
        per_pair += 4.0 * (k - 1) / k
        linear += 2.0 * s.linear_params * (k - 1) / k
    if st.plain:  # no recomputed forward of the blocks
        per_pair -= 4.0
        linear -= 2.0 * s.linear_params
    return linear * B * L + per_pair * s.n_layers * B * s.head_dim * pairs


def _device_notes(dv: dev_mod.Device, g: float, gflops: float | None) -> list[str]:
    notes = []
    if dv.backend == "metal" and dv.limit_gb is None:
        notes.append(f"budget = Metal's default working-set limit {dv.budget_gb:.1f} GiB of {dv.memory_gb:g} GiB "
                     "(raise it with `sudo sysctl iogpu.wired_limit_mb=N`, at the OS's expense)")
    if gflops is None:
        notes.append(f"throughput {g:,.0f} GFLOP/s = {dv.source or dv.name} peak {dv.peak_tflops:g} TFLOPS x "
                     f"{dv.sustained:.0%} sustained (an assumption; see mozgach_mlx/devices.py)")
    return notes


def _suggestions(total_at, candidates, chosen, L, budget, mlp_chunk, loss_chunk, lora_rank, s, targets) -> list[str]:
    """Concrete ways out when the plan does not fit: a strategy, a context, a rank."""
    out = []
    fits = [c for c in candidates if total_at(c, L) <= budget]
    if fits:
        out.append(f"strategy {fits[0].describe()} fits at this context ({total_at(fits[0], L) / GiB:.1f} GiB)")
    best = max(candidates, key=lambda c: _max_context(lambda n, c=c: total_at(c, n), budget, mlp_chunk,
                                                      loss_chunk) or 0)
    ctx = _max_context(lambda n: total_at(best, n), budget, mlp_chunk, loss_chunk)
    if ctx:
        out.append(f"longest context that fits: ~{ctx:,} tokens with {best.describe()}")
    else:
        least = min(total_at(c, 1) for c in candidates)
        out.append(f"no context fits: the base weights and adapter alone need {least / GiB:.2f} GiB; use a larger "
                   "budget or a smaller base")
    if lora_rank > 4:
        saved = total_at(chosen, L) - total_at(chosen, L, s.lora_params(lora_rank // 2, targets))
        out.append(f"a smaller rank (r={lora_rank // 2}) saves only {saved / GiB:.2f} GiB")
    return out


def solve_context(model_or_config: Any, *, granularity: int = 1024, **kw) -> Plan:
    """The plan at the longest context (a multiple of ``granularity``) that fits the
    budget (``memory_gb=`` or ``device=`` is required): over the ``auto`` candidates, or
    for the ``strategy=`` given. Other keywords as :func:`plan`; if nothing fits, the
    plan at ``granularity`` tokens (which says so)."""
    probe = plan(model_or_config, 8 * granularity, **kw)
    if probe.budget_bytes is None:
        raise ConfigError("solve_context needs a budget: pass memory_gb= or device=")
    given = parse_strategy(kw.get("strategy", TrainConfig.memory_strategy), 8 * granularity, kw.get("tile_chunk"))
    best, n = None, kw.get("context_parallel") and kw.get("ranks")
    cands = pc.usable(auto_candidates(8 * granularity, kw.get("tile_chunk")), n)
    for st in ([given] if given is not None else cands):
        p = plan(model_or_config, 8 * granularity, **{**kw, "strategy": st})
        if p.max_context and (best is None or p.max_context > best[0]):
            best = (p.max_context, st)
    if best is None:
        return plan(model_or_config, granularity, **kw)
    ctx = max(granularity, best[0] // granularity * granularity)
    return plan(model_or_config, ctx, **{**kw, "strategy": best[1]})
