"""JSONL reading and validation: which format a record is in, and the valid records of a file."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import DataError

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
_FORMAT_KEYS = ("text", "prompt", "completion", "messages")


def record_format(rec: Any) -> str:
    """Return ``"text"``, ``"completion"`` or ``"messages"``; raise ValueError saying
    what is wrong with ``rec`` otherwise."""
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    keys = [k for k in _FORMAT_KEYS if k in rec]
    if keys == ["text"]:
        if not isinstance(rec["text"], str):
            raise ValueError(f"'text' must be a string, got {type(rec['text']).__name__}")
        return "text"
    if keys == ["prompt", "completion"]:
        for k in ("prompt", "completion"):
            if not isinstance(rec[k], str):
                raise ValueError(f"'{k}' must be a string, got {type(rec[k]).__name__}")
        return "completion"
    if keys == ["messages"]:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("'messages' must be a non-empty list of {'role', 'content'} objects")
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                    or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{j}] must be an object with string 'role' and 'content'")
            if m["role"] not in ROLES:
                raise ValueError(f"messages[{j}] has unknown role {m['role']!r}; expected one of {ROLES}")
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError("'messages' has no assistant turn, so nothing would be trained")
        return "messages"
    if not keys:
        raise ValueError(f"no 'text', 'prompt'/'completion' or 'messages' key (keys: {sorted(rec)[:8]})")
    if keys in (["prompt"], ["completion"]):
        raise ValueError("'prompt' and 'completion' must come together")
    raise ValueError(f"mixes formats (keys {keys}); use exactly one of 'text', "
                     "'prompt'+'completion' or 'messages' per line")


def iter_jsonl(path: Path, skip_bad_lines: bool, counter: list[int]) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, record)`` of valid lines; blank lines are ignored.

    A malformed line raises DataError naming the file and line, or with ``skip_bad_lines``
    is skipped and counted in ``counter[0]`` (a one-item list, so the caller sees the count
    after iterating).
    """
    try:
        fh = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    with fh:
        lineno = 0
        while True:
            try:
                line = fh.readline()
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: not UTF-8 text after line {lineno} ({e}); "
                                "re-encode the file as UTF-8") from e
            if not line:
                break
            lineno += 1
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                record_format(rec)
            except (json.JSONDecodeError, ValueError) as e:
                what = f"invalid JSON ({e.msg})" if isinstance(e, json.JSONDecodeError) else str(e)
                if skip_bad_lines:
                    counter[0] += 1
                    log.debug("%s:%d: skipped: %s", path, lineno, what)
                    continue
                raise DataError(f"{path}:{lineno}: {what}; fix the line or pass skip_bad_lines=True "
                                "(--skip-bad-lines) to skip and count it") from None
            yield lineno, rec


def read_jsonl(path: str | Path, skip_bad_lines: bool = False) -> tuple[list[dict], int]:
    """Read and validate a JSONL file. Returns ``(records, n_skipped)``.

    A malformed line (bad JSON, not an object, unknown/mixed format, wrong types) raises
    DataError naming the file and line, or with ``skip_bad_lines`` is skipped and counted.
    """
    counter = [0]
    recs = [r for _, r in iter_jsonl(Path(path), skip_bad_lines, counter)]
    return recs, counter[0]

