"""Windows and packing: documents of any length into sequences of at most ``max_seq_length + 1`` tokens,
each token labelled with the document (segment) it belongs to."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

from ..errors import ConfigError
from .encode import Seq


class Packed(NamedTuple):
    """One training sequence: ``ids`` int32 (n,), ``mask`` bool (n,) as in :data:`Seq`,
    and ``segments`` int32 (n,): 0, 1, ... for the documents (or windows of a long
    document) packed into it, in order (non-decreasing; all 0 for one document)."""

    ids: np.ndarray
    mask: np.ndarray
    segments: np.ndarray


def windows(ids: np.ndarray, mask: np.ndarray, max_seq_length: int, overlap: int = 0) -> list[Seq]:
    """Cut one document into sequences of at most ``max_seq_length + 1`` tokens.

    Window starts advance by ``max_seq_length - overlap``; the last window is aligned to
    the document's end (full context). Targets already counted by an earlier window are
    masked, so ``sum(m[1:] for each window) == sum(mask[1:])``.
    """
    if not 0 <= overlap < max_seq_length:
        raise ConfigError(f"window overlap must be in [0, max_seq_length) = [0, {max_seq_length}), "
                          f"got {overlap}")
    n, w = len(ids), max_seq_length + 1
    if n <= w:
        return [(ids, mask)]
    stride = max_seq_length - overlap
    starts = list(range(0, n - w, stride)) + [n - w]
    out: list[Seq] = []
    counted = 0  # targets with index < counted (and > 0) are already in some window
    for s in starts:
        m = mask[s: s + w].copy()
        m[: max(0, counted - s)] = False
        out.append((ids[s: s + w], m))
        counted = s + w
    return out


def pack(encoded: Iterable[Seq], max_seq_length: int, eos_id: int, overlap: int = 0,
         *, pack: bool = True) -> list[Packed]:
    """Window long documents and (if ``pack``) pack short ones, in order.

    Each sequence records which document every token came from (:class:`Packed`
    ``segments``), so attention can keep documents apart (``TrainConfig.attention_mask``).
    A window of a long document fills a sequence on its own: one segment.

    Args:
        encoded: ``(ids, mask)`` per document (as from :func:`encode_record`).
        max_seq_length: targets per sequence; sequences have at most ``max_seq_length + 1`` tokens.
        eos_id: appended to a document that does not already end with it, so packed
            documents are always separated by EOS.
        overlap: context tokens shared by consecutive windows (their targets are masked).
        pack: ``False`` keeps one document (or window) per sequence.

    Sequences without any counted target are dropped.
    """
    if max_seq_length < 1:
        raise ConfigError(f"max_seq_length must be >= 1, got {max_seq_length}")
    w = max_seq_length + 1
    out: list[Packed] = []
    buf_ids: list[np.ndarray] = []
    buf_mask: list[np.ndarray] = []
    buf_len = 0

    def flush() -> None:
        nonlocal buf_len
        if buf_ids:
            seg = np.repeat(np.arange(len(buf_ids), dtype=np.int32), [len(i) for i in buf_ids])
            out.append(Packed(np.concatenate(buf_ids).astype(np.int32), np.concatenate(buf_mask).astype(bool), seg))
        buf_ids.clear()
        buf_mask.clear()
        buf_len = 0

    for ids, mask in encoded:
        ids = np.asarray(ids, dtype=np.int32)
        mask = np.asarray(mask, dtype=bool)
        if len(ids) == 0 or ids[-1] != eos_id:
            ids = np.append(ids, np.int32(eos_id))
            mask = np.append(mask, True)
        for wid, wm in windows(ids, mask, max_seq_length, overlap):
            if not pack:
                out.append(Packed(wid, wm, np.zeros(len(wid), np.int32)))
                continue
            if buf_len + len(wid) > w:
                flush()
            buf_ids.append(wid)
            buf_mask.append(wm)
            buf_len += len(wid)
    flush()
    return [s for s in out if len(s.ids) >= 2 and s.mask[1:].any()]

