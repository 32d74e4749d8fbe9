"""Next tokens for a batch whose rows sample differently: greedy rows (temperature 0)
take the argmax; the others sample from ``softmax(logits / temperature)`` restricted to
the nucleus (``top_p``), each with its own random key, so a seeded request draws the same
tokens alone or in any batch (and the same as :meth:`AdapterBank.generate` with that seed).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

__all__ = ["RowSampling", "nucleus", "sample"]


@dataclass(frozen=True)
class RowSampling:
    """How one row picks its token this step (``key``: its random key for this step)."""

    temperature: float = 0.0
    top_p: float = 1.0
    key: mx.array | None = None


def nucleus(logits: mx.array, top_p: float) -> mx.array:
    """``logits`` (V,) with every token outside the nucleus set to -inf: the nucleus is the
    most probable tokens whose probabilities first reach ``top_p`` in total (Holtzman et
    al. 2020), at least the most probable one."""
    probs = mx.softmax(logits, axis=-1)
    ordered = mx.sort(probs)[::-1]  # descending
    before = mx.cumsum(ordered) - ordered  # mass of the more probable tokens
    kept = (before < top_p) | (mx.arange(ordered.shape[0]) == 0)
    threshold = mx.min(mx.where(kept, ordered, mx.inf))  # the least probable token kept
    return mx.where(probs >= threshold, logits, -mx.inf)


def sample(logits: mx.array, rows: list[RowSampling]) -> list[int]:
    """One token per row of ``logits`` (n, V)."""
    tokens = mx.argmax(logits, axis=-1)  # (n,)
    drawn = []
    for r, s in enumerate(rows):
        if s.temperature <= 0:
            continue
        lg = logits[r].astype(mx.float32)
        lg = (lg - lg.max()) / s.temperature  # shifted first: a tiny temperature cannot overflow to inf - inf
        if s.top_p < 1.0:
            lg = nucleus(lg, s.top_p)
        drawn.append((r, mx.random.categorical(lg[None], key=s.key)[0]))
    if drawn:
        idx = mx.array([r for r, _ in drawn])
        tokens[idx] = mx.stack([t for _, t in drawn]).astype(tokens.dtype)
    return tokens.tolist()
