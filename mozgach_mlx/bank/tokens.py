"""Routing by token statistics: multinomial naive Bayes over a text's tokens.

McCallum & Nigam (1998), "A comparison of event models for naive Bayes text
classification"; the same bag-of-tokens idea as fastText's classifier (Joulin et al.,
2016) without the learned embedding. Each adapter ``n`` gets a unigram distribution over
the tokenizer's vocabulary from the token counts ``c[n, v]`` of samples of its domain
(Laplace/Lidstone smoothing ``alpha``):

.. math::

    \\log p_n(v) = \\log \\frac{c_{nv} + \\alpha}{\\sum_u c_{nu} + \\alpha V}

and a text ``t_1..t_T`` scores ``-(1/T) \\sum_i \\log p_n(t_i)`` under each adapter (lower
= better; a uniform prior over adapters). It needs no model pass at all: the cost per
sample is tokenization plus a (T,) gather per adapter, and the fitted state is one
(N, V) float32 table.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import AdapterError, ConfigError
from .scoring import encode

__all__ = ["DEFAULT_ALPHA", "fit_token_log_probs", "token_counts", "token_scores"]

DEFAULT_ALPHA = 0.1


def _ids(item: Any, tok) -> np.ndarray:
    """Token ids of a text / record / (ids, mask) pair, without BOS, EOS and padding."""
    ids, _ = encode(item, tok)
    keep = np.ones(len(ids), bool)
    for special in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id):
        if special is not None:
            keep &= ids != special
    return ids[keep]


def token_counts(items: Sequence[Any], tok, vocab_size: int) -> np.ndarray:
    """(V,) float64 counts of every token id over ``items`` (texts, records or pairs)."""
    c = np.zeros(vocab_size, np.float64)
    for item in items:
        ids = _ids(item, tok)
        if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ConfigError(f"token id {int(ids.max())} outside the vocabulary of {vocab_size}")
        np.add.at(c, ids, 1.0)
    return c


def fit_token_log_probs(samples_by_adapter: dict[str, Sequence[Any]], names: Sequence[str], tok,
                        vocab_size: int, alpha: float = DEFAULT_ALPHA) -> np.ndarray:
    """(N, V) float32 smoothed log unigram probabilities, one row per adapter in ``names`` order.

    Raises:
        AdapterError: an adapter has no samples.
        ConfigError: ``alpha <= 0``.
    """
    if not alpha > 0:
        raise ConfigError(f"fit_tokens: alpha must be > 0 (Lidstone smoothing), got {alpha}")
    missing = [n for n in names if not samples_by_adapter.get(n)]
    if missing:
        raise AdapterError(f"fit_tokens: no samples for {len(missing)} adapter(s), e.g. {missing[0]!r}")
    counts = np.stack([token_counts(samples_by_adapter[n], tok, vocab_size) for n in names])  # (N, V)
    logp = np.log(counts + alpha) - np.log(counts.sum(1, keepdims=True) + alpha * vocab_size)
    return logp.astype(np.float32)


def token_scores(texts: Sequence[Any], tok, log_probs: np.ndarray) -> np.ndarray:
    """(T, N) scores, lower = better: the mean negative log-likelihood per token of each
    text under each adapter's unigram model (``log_probs`` from :func:`fit_token_log_probs`).
    A text with no tokens scores 0 under every adapter."""
    out = np.zeros((len(texts), log_probs.shape[0]), np.float32)
    for i, t in enumerate(texts):
        ids = _ids(t, tok)
        ids = ids[(ids >= 0) & (ids < log_probs.shape[1])]
        if len(ids):
            out[i] = -log_probs[:, ids].mean(1)
    return out
