"""Loading one adapter's dataset: a directory, a JSONL file or a :class:`Domain`, checked
against the model's context."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import DataError
from .context import check_context
from .domains import Domain, load_domain
from .splits import Split, find_split_file, load_files


def load_dataset(source: str | Path | Domain, tok, max_seq_length: int, *, overlap: int = 0,
                 pack: bool = True, skip_bad_lines: bool = False, valid_fraction: float = 0.0,
                 seed: int = 0, model_args: Any = None) -> dict[str, Split | None]:
    """Load a dataset: a directory with ``train.jsonl`` (required), ``valid.jsonl`` and
    ``test.jsonl`` (optional), a single JSONL file (all train), or a :class:`Domain`.

    Returns ``{"train": Split, "valid": Split | None}`` plus ``"test"`` when present. A
    missing valid split is reported (logged) and, with ``valid_fraction > 0``, carved
    deterministically (by ``seed``) out of the train records. ``model_args`` (ModelArgs or
    config dict) turns on :func:`check_context`.
    """
    if model_args is not None:
        check_context(max_seq_length, model_args)
    kw = dict(overlap=overlap, pack=pack, skip_bad_lines=skip_bad_lines)
    if isinstance(source, Domain):
        return load_domain(source, tok, max_seq_length, valid_fraction=valid_fraction, seed=seed, **kw)
    path = Path(source)
    if path.is_dir():
        train = find_split_file(path, "train")
        if train is None:
            present = sorted(p.name for p in path.iterdir())[:10]
            raise DataError(f"{path}: no train.jsonl (found {present}); a dataset directory needs "
                            "train.jsonl and optionally valid.jsonl / test.jsonl")
        files = {"train": train, "valid": find_split_file(path, "valid"),
                 "test": find_split_file(path, "test")}
    elif path.is_file():
        files = {"train": path, "valid": None, "test": None}
    else:
        raise DataError(f"{path}: no such file or directory; pass a JSONL file or a directory "
                        "with train.jsonl")
    return load_files(files, tok, max_seq_length, valid_fraction, seed, str(path), kw)
