"""The context check: does ``max_seq_length`` fit the positions the model was trained on
(with its RoPE scaling)?"""

from __future__ import annotations

import math
from typing import Any

from ..errors import ConfigError


def _arg(model_args: Any, key: str):
    if isinstance(model_args, dict):
        return model_args.get(key)
    return getattr(model_args, key, None)


def check_context(max_seq_length: int, model_args: Any) -> int:
    """Check that ``max_seq_length`` fits the model's positions; return the usable context.

    The usable context is ``max_position_embeddings`` times the rope scaling ``factor``
    (of ``original_max_position_embeddings`` when the config gives it). Beyond it RoPE
    sees positions it was never trained on, so this raises ConfigError suggesting
    ``--rope-scaling linear --rope-factor F`` (F = the smallest sufficient factor).
    Without ``max_position_embeddings`` in the config nothing can be checked.
    """
    mpe = _arg(model_args, "max_position_embeddings")
    if not mpe:
        return max_seq_length
    scaling = _arg(model_args, "rope_scaling") or {}
    base = int(scaling.get("original_max_position_embeddings") or mpe)
    kind = scaling.get("type") or scaling.get("rope_type")
    factor = float(scaling.get("factor") or 1.0) if kind and kind != "default" else 1.0
    usable = max(int(mpe), int(base * factor))
    if max_seq_length <= usable:
        return usable
    need = math.ceil(max_seq_length / base)
    if kind and kind != "default":
        fix = (f"raise the factor: --rope-scaling {kind} --rope-factor {need} (or shorter "
               f"--max-seq-length)")
    else:
        fix = f"use --rope-scaling linear --rope-factor {need} (or --max-seq-length {usable})"
    scaled = f", rope {kind} x{factor:g}" if factor != 1 else ""
    raise ConfigError(f"max_seq_length={max_seq_length} exceeds the model's context of {usable} tokens "
                      f"(max_position_embeddings={mpe}{scaled}); {fix}")
