"""Scoring texts under a bank's adapters: summed token losses, many (text, adapter) pairs
per batch with one adapter per row.

The cross-entropy is :func:`mozgach_mlx.loss.row_losses` (chunked: the (rows, L, vocab)
logits never exist whole), with chunks small enough that one (rows, chunk, vocab) fp32
buffer stays near 64 MiB however many rows a batch holds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .. import data, loss
from ..errors import ConfigError
from .layer import BankView

__all__ = ["BATCH_TOKENS", "Seq", "batch_spans", "encode", "losses", "mean_loss", "pair_losses", "row_losses"]

Seq = tuple[np.ndarray, np.ndarray]  # (ids int32 (n,), target mask bool (n,))

# Rows x positions per forward pass of the batched loss / signature paths: large enough to
# keep the CPU's GEMMs efficient, small enough for the hidden states of a batch.
BATCH_TOKENS = 4096


def encode(item: Any, tok) -> Seq:
    """A text, a JSONL record or an ``(ids, mask)`` pair as ``(ids int32 (n,), mask bool (n,))``."""
    if isinstance(item, str):
        return data.encode_record({"text": item}, tok)
    if isinstance(item, dict):
        return data.encode_record(item, tok)
    if isinstance(item, tuple) and len(item) == 2:
        return np.asarray(item[0], np.int32), np.asarray(item[1], bool)
    raise ConfigError(f"expected a text, a JSONL record or an (ids, mask) pair, got {type(item).__name__}")


def batch_spans(lengths: Sequence[int], batch_tokens: int) -> list[tuple[int, int]]:
    """Split rows, in the given order, into consecutive ``[start, end)`` batches of at most
    ``batch_tokens`` rows x longest row (a row longer than that is a batch alone)."""
    spans, start = [], 0
    while start < len(lengths):
        end, longest = start + 1, lengths[start]
        while end < len(lengths) and (end - start + 1) * max(longest, lengths[end]) <= batch_tokens:
            longest = max(longest, lengths[end])
            end += 1
        spans.append((start, end))
        start = end
    return spans


def row_losses(model: nn.Module, seqs: Sequence[Seq]) -> tuple[np.ndarray, np.ndarray]:
    """Summed target-token loss and target count of each sequence, one batch row each,
    under whatever the model's bank layers currently select: ``(loss_sum (R,), n (R,))``."""
    ids = data.pad_rows([i for i, _ in seqs])  # (R, n) int32
    w = data.pad_rows([m for _, m in seqs], dtype=np.float32)  # (R, n)
    x, y, w = mx.array(ids[:, :-1]), mx.array(ids[:, 1:]), mx.array(w[:, 1:])
    h = model.hidden(x)  # (R, L, d)
    vocab = model.logits(h[:1, :1]).shape[-1]  # a shape only: nothing is computed
    chunk = loss.auto_chunk(vocab, len(seqs), minimum=1)
    total, count = loss.row_losses(model, h, y, w, chunk)
    return np.array(total), np.array(count)


def pair_losses(bank: BankView, seqs: Sequence[Any], pairs: Sequence[tuple[int, Any]],
                batch_tokens: int = BATCH_TOKENS,
                on_batch: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Loss of ``seqs[t]`` under adapter ``a`` for every ``(t, a)`` in ``pairs``: ``(loss_sum
    (P,), n_targets (P,))``. Pairs run shortest first, as batches of about ``batch_tokens``
    rows x positions with one adapter per row; ``on_batch(pairs_done, pairs_total)`` after
    each batch."""
    enc = [encode(s, bank.tok) for s in seqs]
    order = sorted(range(len(pairs)), key=lambda p: len(enc[pairs[p][0]][0]))
    sums, counts = np.zeros(len(pairs)), np.zeros(len(pairs))
    for start, end in batch_spans([len(enc[pairs[p][0]][0]) for p in order], batch_tokens):
        batch = order[start:end]
        with bank.use(bank.selection([pairs[p][1] for p in batch])):
            s, c = row_losses(bank.model, [enc[pairs[p][0]] for p in batch])
        sums[batch], counts[batch] = s, c
        if on_batch is not None:
            on_batch(end, len(order))
    return sums, counts


def losses(bank: BankView, texts: Sequence[Any], adapters: Sequence[Any] | None = None,
           batch_tokens: int = BATCH_TOKENS) -> np.ndarray:
    """Mean token loss of every text under every adapter (default: all of the bank's): (T, K)."""
    adapters = list(bank.names) if adapters is None else list(adapters)
    pairs = [(t, a) for t in range(len(texts)) for a in adapters]
    s, c = pair_losses(bank, texts, pairs, batch_tokens)
    return (s / np.maximum(c, 1)).reshape(len(texts), len(adapters))


def mean_loss(bank: BankView, text: Any | Sequence[Any], adapter: Any = None) -> float:
    """Token-weighted mean loss of a text or list of texts under ``adapter`` (a list: one
    adapter per text)."""
    texts = list(text) if isinstance(text, list) else [text]
    rows = adapter if isinstance(adapter, list) else [adapter] * len(texts)
    if len(rows) != len(texts):
        raise ConfigError(f"{len(rows)} adapters for {len(texts)} texts")
    s, c = pair_losses(bank, texts, list(enumerate(rows)))
    return float(s.sum() / max(c.sum(), 1))
