"""Splits: one split (train, valid or test) read, tokenized and packed; the split files of
a dataset directory; the deterministic valid holdout."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError
from . import packing
from .encode import Seq, encode_record
from .jsonl import iter_jsonl, read_jsonl
from .packing import Packed

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")


@dataclass
class Split:
    """One tokenized split: a list-like of sequences plus where they came from."""

    seqs: list[Packed]
    source: str
    n_records: int
    n_skipped: int
    n_tokens: int = field(init=False)
    n_targets: int = field(init=False)

    def __post_init__(self) -> None:
        self.n_tokens = int(sum(len(s[0]) for s in self.seqs))
        self.n_targets = int(sum(int(s[1][1:].sum()) for s in self.seqs))

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i):
        return self.seqs[i]

    def __iter__(self):
        return iter(self.seqs)

    def summary(self) -> dict:
        return {"source": self.source, "records": self.n_records, "skipped": self.n_skipped,
                "sequences": len(self.seqs), "tokens": self.n_tokens, "targets": self.n_targets}


def load_split(source: str | Path | list[dict], tok, max_seq_length: int, *, overlap: int = 0,
               pack: bool = True, skip_bad_lines: bool = False, name: str | None = None) -> Split:
    """Read (a JSONL path, or already parsed records), tokenize, window and pack one split.

    Raises DataError if the split has no usable record (naming the file), or on a bad line
    (naming file and line) unless ``skip_bad_lines``.
    """
    counter = [0]
    if isinstance(source, (str, Path)):
        path = Path(source)
        label = str(path)
        items: Iterable[tuple[int | None, dict]] = iter_jsonl(path, skip_bad_lines, counter)
    else:
        label = name or "<records>"
        items = ((None, r) for r in source)
    encoded: list[Seq] = []
    for lineno, rec in items:
        try:
            encoded.append(encode_record(rec, tok))
        except DataError as e:
            where = f"{label}:{lineno}" if lineno is not None else label
            if skip_bad_lines:
                counter[0] += 1
                log.debug("%s: skipped: %s", where, e)
                continue
            raise DataError(f"{where}: {e}") from None
    if not encoded:
        extra = f" ({counter[0]} malformed lines skipped)" if counter[0] else ""
        raise DataError(f"{label}: no usable records{extra}; the split is empty")
    # Called through its module: this function's keyword ``pack`` (the on/off switch) shadows the name.
    seqs = packing.pack(encoded, max_seq_length, tok.eos_token_id, overlap, pack=pack)
    if counter[0]:
        log.warning("%s: skipped %d malformed lines", label, counter[0])
    return Split(seqs, label, len(encoded), counter[0])


def find_split_file(d: Path, split: str) -> Path | None:
    """The file of ``split`` in directory ``d`` (``valid`` also as ``validation.jsonl`` or
    ``val.jsonl``), or None."""
    names = (f"{split}.jsonl", "validation.jsonl", "val.jsonl") if split == "valid" else (f"{split}.jsonl",)
    for n in names:
        if (d / n).is_file():
            return d / n
    return None


def load_files(files: dict[str, Path | None], tok, max_seq_length: int, valid_fraction: float,
               seed: int, label: str, kw: dict[str, Any],
               records: dict[str, list[dict]] | None = None) -> dict[str, Split | None]:
    """Tokenized splits from ``files`` (split name -> JSONL path or None), or from
    ``records`` (split name -> parsed records) when several domains share one file.

    Returns ``{"train": Split, "valid": Split | None}`` plus ``"test"`` when present; a
    missing valid split is held out of train when ``valid_fraction > 0``, else logged.
    ``label`` names the source in messages; ``kw`` is passed on to :func:`load_split`.
    """
    if records is not None:  # a domain of a shared multi-domain file: its own records only
        src = {s: (records.get(s) or None) for s in SPLITS}
    else:
        src = {s: files.get(s) for s in SPLITS}
    if src["valid"] is None and valid_fraction > 0:
        train_recs = src["train"]
        if not isinstance(train_recs, list):
            train_recs, _ = read_jsonl(train_recs, kw["skip_bad_lines"])
        src["train"], src["valid"] = _holdout(train_recs, valid_fraction, seed)
    out: dict[str, Split | None] = {}
    for s in SPLITS:
        if src[s] is None:
            if s != "test":
                out[s] = None
            continue
        out[s] = load_split(src[s], tok, max_seq_length, name=f"{label}[{s}]", **kw)
    if out["valid"] is None:
        log.warning("%s: no validation split (valid.jsonl); validation loss will not be reported "
                    "(pass valid_fraction to hold out part of train)", label)
    return out


def _holdout(recs: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    if not 0 < fraction < 1:
        raise ConfigError(f"valid_fraction must be in (0, 1), got {fraction}")
    if len(recs) < 2:
        return recs, []
    n_valid = min(len(recs) - 1, max(1, round(fraction * len(recs))))
    order = np.random.default_rng([seed, 0x5EED]).permutation(len(recs))
    held = set(order[:n_valid].tolist())
    return ([r for i, r in enumerate(recs) if i not in held], [r for i, r in enumerate(recs) if i in held])
