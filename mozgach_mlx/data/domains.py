"""Domains for training many adapters: finding them in a dataset, numbering them stably,
and loading one domain's splits (layouts in the package docstring)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError
from .jsonl import iter_jsonl
from .splits import SPLITS, Split, find_split_file, load_files


@dataclass
class Domain:
    """One domain of a multi-domain dataset.

    ``train``/``valid``/``test`` are the JSONL files the domain's data comes from. When
    several domains share one file (records with a ``domain`` field), ``records`` holds
    this domain's parsed records per split (``{"train": [...], "valid": [...]}``) and
    takes precedence over the files. Load with :func:`load_domain` either way.
    """

    id: int
    name: str
    train: Path
    valid: Path | None = None
    test: Path | None = None
    records: dict[str, list[dict]] | None = field(default=None, repr=False)

    @property
    def n_records(self) -> dict[str, int] | None:
        return None if self.records is None else {k: len(v) for k, v in self.records.items()}


def load_domain(domain: Domain, tok, max_seq_length: int, *, overlap: int = 0, pack: bool = True,
                skip_bad_lines: bool = False, valid_fraction: float = 0.0,
                seed: int = 0) -> dict[str, Split | None]:
    """Tokenized splits of one domain (same result shape as :func:`load_dataset`)."""
    files = {"train": domain.train, "valid": domain.valid, "test": domain.test}
    kw = dict(overlap=overlap, pack=pack, skip_bad_lines=skip_bad_lines)
    label = f"domain {domain.id:03d} {domain.name}"
    return load_files(files, tok, max_seq_length, valid_fraction, seed, label, kw, domain.records)


_NUMBERED = re.compile(r"^(\d+)(?:[_\-. ].*)?$")


def number_domains(names: list[str], where: str = "") -> list[tuple[int, str]]:
    """Stable ids for domain names: the leading number if every name has one (1-based,
    unique), else 1..N in sorted name order. Returns ``[(id, name)]`` sorted by id."""
    if not names:
        return []
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise DataError(f"{where}: duplicate domain names {dup[:5]}")
    nums = [_NUMBERED.match(n) for n in names]
    if all(nums):
        ids = [int(m.group(1)) for m in nums]  # type: ignore[union-attr]
        if min(ids) < 1 or len(set(ids)) != len(ids):
            seen: dict[int, str] = {}
            for i, n in zip(ids, names, strict=True):
                if i in seen:
                    raise DataError(f"{where}: domains {seen[i]!r} and {n!r} have the same number {i}; "
                                    "numbered domain names must have unique numbers")
                seen[i] = n
            raise DataError(f"{where}: domain numbers must start at 1 (found {min(ids)}); rename the "
                            "domain or drop the numeric prefixes")
        return sorted(zip(ids, names, strict=True))
    return list(enumerate(sorted(names), start=1))


def discover_domains(path: str | Path, skip_bad_lines: bool = False) -> list[Domain]:
    """Find the domains of a multi-domain dataset (layouts in the :mod:`mozgach_mlx.data` docstring).

    A directory holding ``train.jsonl`` without ``domain`` fields is a single domain named
    after the directory; a plain JSONL file likewise (named after its stem).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory; pass a data directory or a JSONL file")
    if path.is_file():
        return _domains_from_files({"train": path, "valid": None, "test": None}, path, path.stem,
                                   skip_bad_lines)
    train = find_split_file(path, "train")
    if train is not None:
        files = {s: find_split_file(path, s) for s in SPLITS}
        return _domains_from_files(files, path, path.name, skip_bad_lines)
    found: dict[str, Domain] = {}
    for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        tr = find_split_file(sub, "train")
        if tr is None:
            if any(sub.glob("*.jsonl")):
                raise DataError(f"{sub}: domain folder has no train.jsonl (found "
                                f"{sorted(p.name for p in sub.glob('*.jsonl'))[:5]})")
            continue
        found[sub.name] = Domain(0, sub.name, tr, find_split_file(sub, "valid"),
                                 find_split_file(sub, "test"))
    for f in sorted(path.glob("*.jsonl")):
        if f.stem in found:
            raise DataError(f"{path}: domain {f.stem!r} is both a folder and {f.name}; keep one")
        found[f.stem] = Domain(0, f.stem, f)
    if not found:
        raise DataError(f"{path}: no domains found; expected one sub-folder per domain (with "
                        "train.jsonl), one NAME.jsonl per domain, or train.jsonl with a 'domain' field")
    return [Domain(i, n, found[n].train, found[n].valid, found[n].test)
            for i, n in number_domains(list(found), str(path))]


def _domains_from_files(files: dict, path: Path, default_name: str, skip_bad_lines: bool) -> list[Domain]:
    first = _first_record(files["train"])
    if "domain" not in first:
        return [Domain(1, default_name, files["train"], files["valid"], files["test"])]
    per: dict[str, dict[str, list[dict]]] = {}
    for split in SPLITS:
        f = files[split]
        if f is None:
            continue
        counter = [0]
        for lineno, rec in iter_jsonl(f, skip_bad_lines, counter):
            d = rec.get("domain")
            if isinstance(d, bool) or not isinstance(d, (str, int)) or str(d).strip() == "":
                if skip_bad_lines:
                    continue
                raise DataError(f"{f}:{lineno}: missing or invalid 'domain' field ({d!r}); every record of "
                                "a multi-domain file needs a non-empty string or integer 'domain'")
            s = rec.get("split", split) if split == "train" else split
            if s not in SPLITS:
                raise DataError(f"{f}:{lineno}: 'split' must be one of {SPLITS}, got {s!r}")
            per.setdefault(str(d), {}).setdefault(s, []).append(rec)
    out = []
    for i, name in number_domains(list(per), str(path)):
        recs = per[name]
        if not recs.get("train"):
            raise DataError(f"{path}: domain {name!r} has no train records")
        recs.setdefault("valid", [])
        out.append(Domain(i, name, files["train"], files["valid"], files["test"], records=recs))
    return out


def _first_record(path: Path) -> dict:
    for _, rec in iter_jsonl(path, True, [0]):
        return rec
    raise DataError(f"{path}: no valid records; the file is empty or every line is malformed")
