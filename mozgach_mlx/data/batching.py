"""Batches: the epoch order, padding rows, and ``(inputs, targets, mask)`` batches of sequences."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import mlx.core as mx
import numpy as np

from ..errors import ConfigError


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of ``n`` sequences used in ``epoch`` (depends only on seed, epoch, n)."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


# group_by_length: batches are formed inside windows of this many batches of the epoch's
# permutation (as Hugging Face's LengthGroupedSampler, "mega-batches"), and padded to a
# multiple of GROUP_PAD tokens so that a compiled step sees few distinct shapes.
GROUP_WINDOW_BATCHES = 16
GROUP_PAD = 16


def grouped_order(order: np.ndarray, lengths: Sequence[int], batch_size: int) -> np.ndarray:
    """``order`` with each window of ``GROUP_WINDOW_BATCHES * batch_size`` sequences sorted
    by length, longest first (stable): consecutive batches then hold sequences of similar
    length and pad little. Which sequences an epoch sees is unchanged; the batches of a
    window are still drawn from the epoch's random permutation."""
    window = GROUP_WINDOW_BATCHES * batch_size
    parts = []
    for a in range(0, len(order), window):
        w = order[a: a + window]
        parts.append(w[np.argsort([-lengths[int(i)] for i in w], kind="stable")])
    return np.concatenate(parts) if parts else order


def num_batches(n_seqs: int, batch_size: int, drop_last: bool = False) -> int:
    """Batches in one epoch of ``n_seqs`` sequences (a smaller last batch counts unless ``drop_last``)."""
    return n_seqs // batch_size if drop_last else -(-n_seqs // batch_size)


def pad_rows(rows: Sequence[np.ndarray], length: int | None = None, *, fill: float = 0,
             dtype: Any = np.int32) -> np.ndarray:
    """Stack 1-D rows into one ``(len(rows), length)`` array, padded on the right with ``fill``.

    ``length`` defaults to the longest row; a row longer than ``length`` is an error (rows
    are never cut silently). The one row-padding helper of the package (batches, the
    adapter bank's scoring and signatures).
    """
    longest = max((len(r) for r in rows), default=0)
    length = longest if length is None else int(length)
    if longest > length:
        raise ValueError(f"pad_rows: a row of {longest} items does not fit length {length}")
    out = np.full((len(rows), length), fill, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def batches(seqs, batch_size: int, seed: int = 0, epoch: int = 0, start: int = 0, *,
            shuffle: bool = True, pad_id: int = 0, drop_last: bool = False,
            pad_to_multiple: int = 1, segments: bool = False, group_by_length: bool = False) -> Iterator[tuple]:
    """Yield ``(inputs, targets, mask)`` for one epoch: int32, int32, float32, each (B, L).

    ``inputs = ids[:-1]``, ``targets = ids[1:]``, ``mask = mask[1:]`` per sequence, padded
    on the right to the batch's longest (rounded up to ``pad_to_multiple``) with
    ``pad_id`` and mask 0. The order is a permutation fixed by ``(seed, epoch)`` (or file
    order with ``shuffle=False``); ``start`` is the index of the first batch to yield, so
    a run resumed after ``k`` batches of this epoch continues with exactly batch ``k``.
    The last batch may be smaller unless ``drop_last``.

    ``seqs`` holds ``(ids, mask)`` or ``(ids, mask, segments)`` (:class:`Packed`). With
    ``segments`` the batches are ``(inputs, targets, mask, segment_ids)``: int32 (B, L)
    segment ids of the inputs (padding continues its row's last segment; causally no real
    token sees it), or None when no row of the batch holds more than one document -- then
    document masking is plain causal attention and costs nothing.

    ``group_by_length`` (with ``shuffle``): :func:`grouped_order` of the permutation, and
    padding to a multiple of ``GROUP_PAD`` (at least ``pad_to_multiple``).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    n = len(seqs)
    order = epoch_order(n, seed, epoch) if shuffle else np.arange(n)
    if group_by_length and shuffle:
        order = grouped_order(order, [len(s[0]) for s in seqs], batch_size)
        pad_to_multiple = max(pad_to_multiple, GROUP_PAD)
    for b in range(max(0, start), num_batches(n, batch_size, drop_last)):
        idx = order[b * batch_size: (b + 1) * batch_size]
        items = [seqs[int(i)] for i in idx]
        length = max(len(s[0]) for s in items) - 1
        length = -(-length // pad_to_multiple) * pad_to_multiple
        ids_b = pad_rows([s[0] for s in items], length + 1, fill=pad_id, dtype=np.int32)
        mask_b = pad_rows([s[1] for s in items], length + 1, fill=0, dtype=np.float32)
        batch = (mx.array(ids_b[:, :-1]), mx.array(ids_b[:, 1:]), mx.array(mask_b[:, 1:]))
        yield (*batch, _segment_ids(items, length)) if segments else batch


def _segment_ids(items, length: int) -> mx.array | None:
    """(B, length) int32 segment ids of the inputs, or None if every row is one document."""
    rows = [np.asarray(s[2][:-1]) if len(s) > 2 else np.zeros(len(s[0]) - 1, np.int32) for s in items]
    if not any(len(r) and r[-1] != r[0] for r in rows):
        return None
    out = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
        out[i, len(r):] = r[-1] if len(r) else 0
    return mx.array(out)
