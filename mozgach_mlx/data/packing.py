"""Windows and packing: documents of any length into sequences of at most ``max_seq_length + 1`` tokens."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ..errors import ConfigError
from .encode import Seq


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
         *, pack: bool = True) -> list[Seq]:
    """Window long documents and (if ``pack``) pack short ones, in order.

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
    out: list[Seq] = []
    buf_ids: list[np.ndarray] = []
    buf_mask: list[np.ndarray] = []
    buf_len = 0

    def flush() -> None:
        nonlocal buf_len
        if buf_ids:
            out.append((np.concatenate(buf_ids).astype(np.int32), np.concatenate(buf_mask).astype(bool)))
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
                out.append((wid, wm))
                continue
            if buf_len + len(wid) > w:
                flush()
            buf_ids.append(wid)
            buf_mask.append(wm)
            buf_len += len(wid)
    flush()
    return [(i, m) for i, m in out if len(i) >= 2 and m[1:].any()]

