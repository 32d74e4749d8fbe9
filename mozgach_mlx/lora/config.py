"""What a LoRA adapter is: :class:`LoRAConfig` (rank, scale, targets...) and its scale."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import ConfigError
from ..typecheck import check_fields

__all__ = ["ALL_LINEAR", "LoRAConfig", "scale_of"]

# The target that means "every linear layer of the adapted blocks" (PEFT's spelling).
ALL_LINEAR = "all-linear"


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
        check_fields(self)
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
    """The factor on the low-rank update: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / math.sqrt(r) if rslora else alpha / r
