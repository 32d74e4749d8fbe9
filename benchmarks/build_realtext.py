"""Build the real-text corpora of issue 14 from Python sources on this machine.

Three outputs, all deterministic for a given Python installation:

* the **pretraining text** of the built-in pretrained base (``--pretrain-out``, one text
  file): the standard library's ``*.py`` sources *minus* the domain modules below, the
  test suite, idlelib and lib2to3. Not shipped (the weights trained on it are).
* the **stdlib12** domain corpus (``--domains-out``, default: the package's
  ``mozgach_mlx/corpora/stdlib12``, shipped): 12 standard-library modules, each one
  domain, cut into ~600-character records at line boundaries; record ``i`` goes to
  ``test`` if ``i % 10 == 9``, ``valid`` if ``i % 10 == 8``, else ``train``.
* the **site12** corpus (``--site-out``): the same recipe over 12 third-party packages
  in site-packages, the second corpus nothing was tuned on. Not shipped.

Python's sources are under the PSF licence, which allows redistribution; the shipped
corpus is generated once with this script (from CPython 3.11.7), because other Python
versions have other sources.

    python benchmarks/build_realtext.py --pretrain-out /tmp/pretrain.txt --site-out /tmp/site12
"""

from __future__ import annotations

import argparse
import json
import sysconfig
from pathlib import Path

STDLIB_DOMAINS = {  # domain name -> files under the stdlib directory
    "argparse": ["argparse.py"],
    "logging": ["logging/__init__.py", "logging/handlers.py"],
    "http_client": ["http/client.py"],
    "typing": ["typing.py"],
    "tarfile": ["tarfile.py"],
    "zipfile": ["zipfile.py"],
    "decimal": ["_pydecimal.py"],
    "subprocess": ["subprocess.py"],
    "inspect": ["inspect.py"],
    "pathlib": ["pathlib.py"],
    "datetime": ["datetime.py"],
    "turtle": ["turtle.py"],
}
SITE_DOMAINS = {  # domain name -> package directory in site-packages
    "click": "click", "jinja2": "jinja2", "jsonschema": "jsonschema", "h11": "h11",
    "idna": "idna", "attr": "attr", "dateutil": "dateutil", "markdown_it": "markdown_it",
    "nbformat": "nbformat", "filelock": "filelock", "fsspec": "fsspec", "pygments": "pygments",
}
EXCLUDED_DIRS = ("test", "tests", "idlelib", "lib2to3", "site-packages", "turtledemo", "__pycache__")
RECORD_CHARS = 600


def records(text: str, size: int = RECORD_CHARS) -> list[str]:
    """Consecutive chunks of whole lines, each ending once it reaches ``size`` characters;
    a single longer line is cut at ``size``. Blank-only chunks are dropped."""
    out, cur = [], ""
    for line in text.splitlines(keepends=True):
        while len(line) > size:
            out.append(cur + line[: size - len(cur)])
            line, cur = line[size - len(cur):], ""
        cur += line
        if len(cur) >= size:
            out.append(cur)
            cur = ""
    if cur.strip():
        out.append(cur)
    return [r for r in out if r.strip()]


def split_of(i: int) -> str:
    return "test" if i % 10 == 9 else "valid" if i % 10 == 8 else "train"


def write_domain(out: Path, name: str, texts: list[str], max_records: int) -> dict:
    recs = [r for t in texts for r in records(t)][:max_records]
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in ("train", "valid", "test"):
        rows = [r for i, r in enumerate(recs) if split_of(i) == split]
        with open(d / f"{split}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps({"text": r}) + "\n")
        counts[split] = len(rows)
    return counts


def site_texts(root: Path, package: str, limit_chars: int) -> list[str]:
    texts, total = [], 0
    for p in sorted((root / package).rglob("*.py")):
        if any(part in EXCLUDED_DIRS for part in p.relative_to(root).parts):
            continue
        t = p.read_text(errors="replace")
        texts.append(t)
        total += len(t)
        if total >= limit_chars:
            break
    return texts


def pretrain_text(stdlib: Path) -> str:
    used = {stdlib / f for files in STDLIB_DOMAINS.values() for f in files}
    parts = []
    for p in sorted(stdlib.rglob("*.py")):
        rel = p.relative_to(stdlib).parts
        if p in used or any(part in EXCLUDED_DIRS for part in rel):
            continue
        if rel[0] in {"logging", "http"} and p.name in {"__init__.py", "client.py", "handlers.py"}:
            continue
        parts.append(p.read_text(errors="replace"))
    return "\n".join(parts)


def main() -> None:
    here = Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--domains-out", type=Path, default=here / "mozgach_mlx" / "corpora" / "stdlib12")
    ap.add_argument("--pretrain-out", type=Path, default=None)
    ap.add_argument("--site-out", type=Path, default=None)
    ap.add_argument("--site-packages", type=Path, default=Path(sysconfig.get_paths()["purelib"]))
    ap.add_argument("--max-records", type=int, default=120, help="records per domain (before the split)")
    args = ap.parse_args()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name, files in STDLIB_DOMAINS.items():
        c = write_domain(args.domains_out, name, [(stdlib / f).read_text() for f in files], args.max_records)
        print(f"stdlib12 {name:12s} {c}")
    if args.site_out is not None:
        for name, pkg in SITE_DOMAINS.items():
            texts = site_texts(args.site_packages, pkg, RECORD_CHARS * args.max_records)
            c = write_domain(args.site_out, name, texts, args.max_records)
            print(f"site12 {name:12s} {c}")
    if args.pretrain_out is not None:
        text = pretrain_text(stdlib)
        args.pretrain_out.write_text(text)
        print(f"pretrain text: {len(text):,} characters -> {args.pretrain_out}")


if __name__ == "__main__":
    main()
