"""Routing: which of a bank's adapters fits a text.

By loss, a text goes to the adapter under which it has the lowest mean token loss (all N
adapters scored in one batched pass, :mod:`.scoring`). By signature, it goes to the nearest
centroid of the base model's mean final hidden state over a few samples of each adapter's
domain, after removing the mean over all samples (the part every text shares).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import numpy as np

from .. import data
from ..errors import AdapterError
from .layer import BankView
from .scoring import BATCH_TOKENS, Seq, batch_spans, encode

__all__ = ["embed", "embed_by_adapter", "embed_texts", "fit_signatures", "signature_scores", "top_k", "unit"]


def unit(x: np.ndarray) -> np.ndarray:
    """Rows (or a vector) scaled to unit L2 norm."""
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-12)


def embed(bank: BankView, seqs: Sequence[Seq], batch_tokens: int = BATCH_TOKENS) -> np.ndarray:
    """Mean base final hidden state over each sequence's tokens after BOS: (T, d) fp32."""
    out = []
    for start, end in batch_spans([len(ids) for ids, _ in seqs], batch_tokens):
        rows = [s for s, _ in seqs[start:end]]
        ids = data.pad_rows(rows)  # (R, L) int32
        # weight 1 on every real token but the first (BOS), 0 on padding
        w = data.pad_rows([np.arange(len(s)) > 0 for s in rows], dtype=np.float32)[..., None]  # (R, L, 1)
        with bank.use(None):
            h = bank.model.hidden(mx.array(ids)).astype(mx.float32)  # (R, L, d)
        wm = mx.array(w)
        e = (h * wm).sum(axis=1) / mx.maximum(wm.sum(axis=1), 1.0)  # (R, d)
        out.append(np.array(e))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def embed_texts(bank: BankView, texts: Sequence[Any]) -> np.ndarray:
    """:func:`embed` of texts, records or (ids, mask) pairs: (T, d) fp32."""
    return embed(bank, [encode(t, bank.tok) for t in texts])


def embed_by_adapter(bank: BankView, samples_by_adapter: dict[str, Sequence[Any]], caller: str) -> list[np.ndarray]:
    """Per adapter in bank order, the (T_n, d) embeddings of its samples.

    Raises:
        AdapterError: an adapter of the bank has no samples (the message names ``caller``).
    """
    missing = [n for n in bank.names if not samples_by_adapter.get(n)]
    if missing:
        raise AdapterError(f"{caller}: no samples for {len(missing)} adapter(s), e.g. {missing[0]!r}")
    return [embed_texts(bank, samples_by_adapter[n]) for n in bank.names]


def fit_signatures(bank: BankView, samples_by_adapter: dict[str, Sequence[Any]]) -> tuple[np.ndarray, np.ndarray]:
    """``(mean (d,), centroids (N, d))``: the mean embedding over all samples and, per
    adapter in bank order, the unit centroid of its samples' unit, mean-removed embeddings.

    Raises:
        AdapterError: an adapter of the bank has no samples.
    """
    embs = embed_by_adapter(bank, samples_by_adapter, "fit_signatures")
    mean = np.concatenate(embs).mean(0)
    return mean, np.stack([unit(unit(e - mean).mean(0)) for e in embs])


def signature_scores(bank: BankView, texts: Sequence[Any], mean: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(T, N) scores, lower = better: 1 - cosine similarity of each text's mean-removed
    embedding to each adapter's centroid (from :func:`fit_signatures`)."""
    e = unit(embed_texts(bank, texts) - mean)
    return 1.0 - e @ centroids.T


def top_k(scores: np.ndarray, names: Sequence[str], k: int) -> list[list[str]]:
    """Per row of (T, N) ``scores`` (lower = better), the names of the ``k`` best, best
    first; ties keep bank order."""
    return [[names[i] for i in np.argsort(row, kind="stable")[:k]] for row in scores]
