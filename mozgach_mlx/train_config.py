"""The configuration of one adapter's training run (:class:`TrainConfig`).

Its own module so that everything that needs the training defaults (the trainer, the
planner, the CLI) reads them from one dataclass without importing the trainer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from .errors import ConfigError
from .lora import LoRAConfig
from .typecheck import check_fields

MEMORY_STRATEGIES = ("auto", "plain", "none", "tile", "offload", "tile+offload")


def _help(text: str, **kw) -> dict:
    return {"help": text, **kw}


def _s2_group_ok(v) -> bool:
    if v is None:
        return True
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return 0 < v < 1 or (v >= 1 and float(v).is_integer())


@dataclass
class TrainConfig:
    """Everything that defines one adapter's training run. Defaults are the seed's."""

    learning_rate: float = field(default=2e-4, metadata=_help("peak learning rate (AdamW)"))
    warmup_steps: int = field(default=100, metadata=_help("linear warmup, in optimizer steps"))
    lr_schedule: str = field(default="cosine", metadata=_help("decay after warmup: cosine|linear|constant"))
    min_lr_ratio: float = field(default=0.0, metadata=_help("final lr as a fraction of the peak"))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW decoupled weight decay"))
    batch_size: int = field(default=1, metadata=_help("sequences per micro-batch"))
    grad_accumulation: int = field(default=4, metadata=_help("micro-batches per optimizer step"))
    max_grad_norm: float = field(default=0.3, metadata=_help("clip the global gradient norm (0 = off)"))
    epochs: int = field(default=3, metadata=_help("passes over the training data"))
    max_steps: int | None = field(default=None, metadata=_help("optimizer steps; overrides --epochs"))
    max_seq_length: int = field(default=2048, metadata=_help("tokens per training sequence"))
    pack: bool = field(default=True, metadata=_help("pack short documents up to max_seq_length"))
    group_by_length: bool = field(default=False, metadata=_help(
        "batch sequences of similar length (sorted within windows of 16 batches of the shuffled order) "
        "and pad to a multiple of 16: less padding, the same sequences per epoch"))
    window_overlap: int = field(default=0, metadata=_help("overlap between windows of long documents"))
    skip_bad_lines: bool = field(default=False, metadata=_help("skip malformed JSONL lines instead of failing"))
    seed: int = field(default=0, metadata=_help("seed for adapter init, shuffling and dropout"))
    eval_every: int = field(default=200, metadata=_help("validate every N optimizer steps (0 = only at end)"))
    eval_batches: int | None = field(default=None, metadata=_help("validation batches (None = all)"))
    save_every: int = field(default=100, metadata=_help("checkpoint every N optimizer steps (0 = only at end)"))
    grad_checkpoint: bool | None = field(default=None, metadata=_help(
        "recompute each block in the backward pass: None = auto (memory_strategy auto runs the plain step, "
        "without, when it fits); True = always; False = never"))
    mlp_chunk: int | None = field(default=4096, metadata=_help(
        "evaluate the MLP in chunks of N positions (None = the whole sequence at once)"))
    loss_chunk: int | None = field(default=None, metadata=_help(
        "positions per chunk of lm_head + cross-entropy (default: ~64 MiB of logits per chunk)"))
    progress: bool = field(default=True, metadata=_help("show a progress bar"))
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    attention_mask: str = field(default="document", metadata=_help(
        "attention of packed sequences: document (each document alone) | causal (across documents)"))
    s2_attn_group: float | int | None = field(default=None, metadata=_help(
        "S2-Attn (LongLoRA) group in training: tokens, or a fraction of the sequence such as 0.25 (None = off)"))

    memory_strategy: str = field(default="auto", metadata=_help(
        "memory strategy: auto (the planner's fastest that fits memory_gb, else this machine's memory) | plain "
        "(no checkpointing, the MLP whole) | none (per-block checkpointing) | tile | offload | tile+offload"))
    tile_chunk: int | None = field(default=None, metadata=_help(
        "positions per chunk of the tiled block recompute (default 4096)"))
    memory_gb: float | None = field(default=None, metadata=_help(
        "memory budget in GiB: plan before loading data and refuse a step that does not fit"))
    context_parallel: bool = field(default=False, metadata=_help(
        "context parallelism: with a process group (--distributed context) every rank holds a slice of each "
        "sequence and attention runs as ring attention (mozgach_mlx.context)"))
    context_split: str = field(default="zigzag", metadata=_help(
        "how sequences are sliced over the ranks: zigzag (chunks r and 2N-1-r: balanced causal work) | contiguous"))
    contrast: float = field(default=0.0, metadata=_help(
        "contrastive adapters (fleets): weight of a hinge that pushes the adapter's loss on other domains' "
        "sequences (batch_size per micro-batch) back up to the base's where it is below (mozgach_mlx.contrast); "
        "0 = off"))
    compile: bool = field(default=True, metadata=_help(
        "compile the step's value-and-grad (mx.compile; one trace per batch shape) with the built-in loss, "
        "the default memory strategy and one process; the same losses to float rounding"))

    def __post_init__(self) -> None:
        check_fields(self)
        if _s2_group_ok(self.s2_attn_group) and self.s2_attn_group is not None and self.s2_attn_group >= 1:
            self.s2_attn_group = int(self.s2_attn_group)  # tokens (the CLI parses numbers as floats)
        checks = [
            ("learning_rate", self.learning_rate > 0, "a positive number"),
            ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
            ("lr_schedule", self.lr_schedule in ("cosine", "linear", "constant"), "cosine, linear or constant"),
            ("min_lr_ratio", 0.0 <= self.min_lr_ratio <= 1.0, "in [0, 1]"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("grad_accumulation", self.grad_accumulation >= 1, ">= 1"),
            ("max_grad_norm", self.max_grad_norm >= 0, ">= 0"),
            ("epochs", self.epochs >= 1, ">= 1"),
            ("max_steps", self.max_steps is None or self.max_steps >= 1, ">= 1 or None"),
            ("max_seq_length", self.max_seq_length >= 2, ">= 2"),
            ("loss_chunk", self.loss_chunk is None or self.loss_chunk >= 1, ">= 1 or None"),
            ("mlp_chunk", self.mlp_chunk is None or self.mlp_chunk >= 1, ">= 1 or None"),
            ("save_every", self.save_every >= 0, ">= 0"),
            ("eval_every", self.eval_every >= 0, ">= 0"),
            ("attention_mask", self.attention_mask in ("document", "causal"), "document or causal"),
            ("s2_attn_group", _s2_group_ok(self.s2_attn_group), "None, whole tokens or a fraction in (0, 1)"),
            ("memory_strategy", self.memory_strategy in MEMORY_STRATEGIES, ", ".join(MEMORY_STRATEGIES)),
            ("tile_chunk", self.tile_chunk is None or self.tile_chunk >= 1, ">= 1 or None"),
            ("memory_gb", self.memory_gb is None or self.memory_gb > 0, "> 0 or None"),
            ("context_split", self.context_split in ("zigzag", "contiguous"), "zigzag or contiguous"),
            ("contrast", self.contrast >= 0 and not (self.contrast > 0 and self.context_parallel),
             ">= 0, and 0 under context parallelism (its step sums the loss over ranks after the hinge)"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise ConfigError(f"TrainConfig.{name}={getattr(self, name)!r} is invalid: it must be {want}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown TrainConfig field(s) {sorted(unknown)}; valid: {sorted(names)}")
        return cls(**d)

    def fingerprint(self) -> str:
        """Hash of the fields that change the optimisation trajectory (not logging knobs)."""
        d = self.to_dict()
        # memory knobs do not change the trajectory (the strategies are exact), nor does context
        # parallelism: a run resumes on another number of ranks
        for k in ("progress", "eval_every", "eval_batches", "save_every", "memory_strategy", "tile_chunk",
                  "memory_gb", "compile", "context_parallel", "context_split"):
            d.pop(k, None)
        if not d["group_by_length"]:  # added later: runs recorded before it keep their fingerprint
            d.pop("group_by_length")
        if not d["contrast"]:  # added later, like group_by_length
            d.pop("contrast")
        if d["grad_checkpoint"] is None:  # auto, the default since it replaced True: old runs keep theirs
            d["grad_checkpoint"] = True
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
