"""Datasets: JSONL formats, tokenization with loss masks, windows, packing, batches,
and discovery of many domains.

Formats (one JSON object per line; extra keys such as ``domain`` are ignored):

    {"text": "..."}                                  every token counts in the loss
    {"prompt": "...", "completion": "..."}           only completion tokens (+ EOS) count
    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]}
                                                     only assistant turns count

A *sequence* is ``(ids, mask)``: ``ids`` int32 ``(n,)`` and ``mask`` bool ``(n,)`` where
``mask[i]`` says whether predicting ``ids[i]`` (from ``ids[:i]``) counts in the loss, so
``mask[0]`` is never used. :func:`batches` turns sequences into ``inputs = ids[:-1]``,
``targets = ids[1:]``, ``mask = mask[1:]``.

Windows and packing (:func:`pack`): a document longer than ``max_seq_length + 1`` tokens
is cut into windows of exactly ``max_seq_length + 1`` tokens (``max_seq_length``
targets); consecutive windows share ``overlap`` tokens of context and the last window is
aligned to the document's end. A target already counted in an earlier window is masked,
so every target of a document is counted exactly once. Shorter documents are packed
greedily (in file order) into sequences of at most ``max_seq_length + 1`` tokens, each
ending in EOS.

Packing tradeoff: packed sequences use plain causal attention (no block-diagonal mask),
so a token of a later document can attend to the earlier documents of its sequence. The
EOS between documents tells the model a new document starts, and this is what most LLM
pre-training does; for chat/instruction data where cross-document leakage matters, use
``pack=False`` (one document per sequence, padded at batch time: more padding, less
throughput, no leakage).

Domains (:func:`discover_domains`) for training many adapters: a directory with one
sub-folder per domain (each with ``train.jsonl`` and optionally ``valid.jsonl`` /
``test.jsonl``), or one ``NAME.jsonl`` per domain, or one JSONL (file, or ``train.jsonl``
/ ``valid.jsonl`` of a directory) whose records carry a ``domain`` field (a record of
that single file may also carry ``"split": "valid"`` or ``"test"``). Folders whose names
start with ``.`` or ``_`` are ignored. A ``NAME.jsonl`` domain has no valid split unless
``valid_fraction`` holds part of it out. Numbering is stable: if every domain name
starts with a number (``001_caesar_3``, ``7``, ``12-law``) that number is the id
(1-based, unique); otherwise domains are sorted by name and numbered 1..N, so adding a
domain renumbers the ones after it -- number them if ids must never move.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from .errors import ConfigError, DataError, TokenizerError

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
ROLES = ("system", "user", "assistant", "tool")
_FORMAT_KEYS = ("text", "prompt", "completion", "messages")

Seq = tuple[np.ndarray, np.ndarray]  # (ids int32 (n,), mask bool (n,))


# ---------------------------------------------------------------------------- reading

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


def _iter_jsonl(path: Path, skip_bad_lines: bool, counter: list[int]) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, record)`` of valid lines; blank lines are ignored."""
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
    recs = [r for _, r in _iter_jsonl(Path(path), skip_bad_lines, counter)]
    return recs, counter[0]


# ---------------------------------------------------------------------------- encoding

def _enc(tok, text: str) -> list[int]:
    return list(tok.encode(text, add_bos=False))


def _render(tok, messages: list[dict], add_generation_prompt: bool) -> str:
    try:
        return tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    except TokenizerError as e:
        raise DataError(str(e)) from e
    except Exception as e:  # jinja templates raise arbitrary types (e.g. on role order)
        raise DataError(f"the tokenizer's chat template failed on these messages "
                        f"({type(e).__name__}: {e})") from e


def _encode_messages(msgs: list[dict], tok) -> tuple[list[int], list[bool]]:
    """Assistant spans from rendering prefixes of the conversation.

    For each assistant turn i the span is ``[len(render(msgs[:i], gen_prompt)),
    len(render(msgs[:i+1])))`` in tokens. That is only valid if the template renders
    conversations incrementally (each prefix's tokens are a prefix of the whole); a
    template that rewrites earlier turns (e.g. drops past reasoning) breaks it -> DataError.
    """
    if not getattr(tok, "has_chat_template", False):
        raise DataError("'messages' data needs a tokenizer with a chat template; use "
                        "{'prompt','completion'} data or a tokenizer_config.json with chat_template")
    full_text = _render(tok, msgs, False)
    full = _enc(tok, full_text)
    eos = tok.eos_token_id
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        pre_text = _render(tok, msgs[:i], True)
        upto_text = _render(tok, msgs[: i + 1], False)
        if not (full_text.startswith(upto_text) and upto_text.startswith(pre_text)):
            raise DataError(f"the chat template does not render conversations incrementally (the text "
                            f"up to assistant turn {i} is not a prefix of the whole conversation), so "
                            "assistant tokens cannot be located; use {'prompt','completion'} data or a "
                            "template that keeps earlier turns unchanged")
        pre, upto = _enc(tok, pre_text), _enc(tok, upto_text)
        if upto[: len(pre)] != pre or full[: len(upto)] != upto:
            raise DataError(f"tokenizing the chat template's output is not prefix-stable at assistant "
                            f"turn {i} (tokens merge across the turn boundary), so assistant tokens cannot "
                            "be located exactly; use {'prompt','completion'} data instead")
        spans.append((len(pre), len(upto)))
    ids: list[int] = []
    mask: list[bool] = []
    pos = 0
    for a, b in spans:
        ids += full[pos:b]
        mask += [False] * (a - pos) + [True] * (b - a)
        # Templates of chat models end a turn with their end-of-turn token (usually EOS);
        # the byte tokenizer's template doesn't, so EOS is inserted to teach stopping.
        if eos is not None and eos not in full[a:b]:
            ids.append(eos)
            mask.append(True)
        pos = b
    ids += full[pos:]
    mask += [False] * (len(full) - pos)
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
        mask.append(False)
    return ids, mask


def encode_record(record: dict, tok) -> Seq:
    """Tokenize one record into ``(ids int32 (n,), mask bool (n,))``.

    BOS (if the tokenizer has one) starts the document and EOS ends it (after the
    completion; after each assistant turn unless the chat template already emits EOS).
    ``mask`` marks tokens that count in the loss as targets: all tokens but BOS for
    ``text``; completion + EOS for ``prompt/completion``; assistant turns (their content
    and the template's end-of-turn tokens, not the role header) for ``messages``.
    """
    try:
        fmt = record_format(record)
    except ValueError as e:
        raise DataError(f"bad record: {e}") from None
    eos, bos = tok.eos_token_id, tok.bos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos_token_id; documents cannot be separated")
    if fmt == "text":
        body = _enc(tok, record["text"])
        ids, mask = body + [eos], [True] * (len(body) + 1)
    elif fmt == "completion":
        p, c = record["prompt"], record["completion"]
        prompt = _enc(tok, p)
        joint = _enc(tok, p + c)
        # Tokenize jointly when the prompt's tokens survive (natural tokenization at the
        # boundary); otherwise concatenate separately tokenized parts.
        body = joint if joint[: len(prompt)] == prompt else prompt + _enc(tok, c)
        ids = body + [eos]
        mask = [False] * len(prompt) + [True] * (len(body) - len(prompt) + 1)
    else:
        ids, mask = _encode_messages(record["messages"], tok)
    if bos is not None and (not ids or ids[0] != bos):
        ids, mask = [bos, *ids], [False, *mask]
    return np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=bool)


# ---------------------------------------------------------------------------- windows and packing

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


# ---------------------------------------------------------------------------- splits and datasets

@dataclass
class Split:
    """One tokenized split: a list-like of sequences plus where they came from."""

    seqs: list[Seq]
    source: str
    n_records: int
    n_skipped: int
    n_tokens: int = field(init=False)
    n_targets: int = field(init=False)

    def __post_init__(self) -> None:
        self.n_tokens = int(sum(len(i) for i, _ in self.seqs))
        self.n_targets = int(sum(int(m[1:].sum()) for _, m in self.seqs))

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
        items: Iterable[tuple[int | None, dict]] = _iter_jsonl(path, skip_bad_lines, counter)
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
    seqs = _pack(encoded, max_seq_length, tok.eos_token_id, overlap, pack=pack)
    if counter[0]:
        log.warning("%s: skipped %d malformed lines", label, counter[0])
    return Split(seqs, label, len(encoded), counter[0])


_pack = pack  # load_split's keyword ``pack`` shadows the function inside it


def _find_split_file(d: Path, split: str) -> Path | None:
    names = (f"{split}.jsonl", "validation.jsonl", "val.jsonl") if split == "valid" else (f"{split}.jsonl",)
    for n in names:
        if (d / n).is_file():
            return d / n
    return None


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
        train = _find_split_file(path, "train")
        if train is None:
            present = sorted(p.name for p in path.iterdir())[:10]
            raise DataError(f"{path}: no train.jsonl (found {present}); a dataset directory needs "
                            "train.jsonl and optionally valid.jsonl / test.jsonl")
        files = {"train": train, "valid": _find_split_file(path, "valid"),
                 "test": _find_split_file(path, "test")}
    elif path.is_file():
        files = {"train": path, "valid": None, "test": None}
    else:
        raise DataError(f"{path}: no such file or directory; pass a JSONL file or a directory "
                        "with train.jsonl")
    return _load_files(files, tok, max_seq_length, valid_fraction, seed, str(path), kw)


def _load_files(files: dict, tok, max_seq_length: int, valid_fraction: float, seed: int,
                label: str, kw: dict, records: dict | None = None) -> dict[str, Split | None]:
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


# ---------------------------------------------------------------------------- context check

def _arg(model_args: Any, key: str):
    if isinstance(model_args, dict):
        return model_args.get(key)
    return getattr(model_args, key, None)


def check_context(max_seq_length: int, model_args: Any) -> int:
    """Check that ``max_seq_length`` fits the model's positions; return the usable context.

    The usable context is ``max_position_embeddings`` times the rope scaling ``factor``
    (of ``original_max_position_embeddings`` when the config gives it). Beyond it RoPE
    sees positions it was never trained on, so this raises ConfigError suggesting
    ``--rope-scaling linear --rope-factor F`` (F = the smallest sufficient factor).
    Without ``max_position_embeddings`` in the config nothing can be checked.
    """
    mpe = _arg(model_args, "max_position_embeddings")
    if not mpe:
        return max_seq_length
    scaling = _arg(model_args, "rope_scaling") or {}
    base = int(scaling.get("original_max_position_embeddings") or mpe)
    kind = scaling.get("type") or scaling.get("rope_type")
    factor = float(scaling.get("factor") or 1.0) if kind and kind != "default" else 1.0
    usable = max(int(mpe), int(base * factor))
    if max_seq_length <= usable:
        return usable
    need = math.ceil(max_seq_length / base)
    if kind and kind != "default":
        fix = (f"raise the factor: --rope-scaling {kind} --rope-factor {need} (or shorter "
               f"--max-seq-length)")
    else:
        fix = f"use --rope-scaling linear --rope-factor {need} (or --max-seq-length {usable})"
    scaled = f", rope {kind} x{factor:g}" if factor != 1 else ""
    raise ConfigError(f"max_seq_length={max_seq_length} exceeds the model's context of {usable} tokens "
                      f"(max_position_embeddings={mpe}{scaled}); {fix}")


# ---------------------------------------------------------------------------- batches

def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of ``n`` sequences used in ``epoch`` (depends only on seed, epoch, n)."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def num_batches(n_seqs: int, batch_size: int, drop_last: bool = False) -> int:
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
            pad_to_multiple: int = 1) -> Iterator[tuple[mx.array, mx.array, mx.array]]:
    """Yield ``(inputs, targets, mask)`` for one epoch: int32, int32, float32, each (B, L).

    ``inputs = ids[:-1]``, ``targets = ids[1:]``, ``mask = mask[1:]`` per sequence, padded
    on the right to the batch's longest (rounded up to ``pad_to_multiple``) with
    ``pad_id`` and mask 0. The order is a permutation fixed by ``(seed, epoch)`` (or file
    order with ``shuffle=False``); ``start`` is the index of the first batch to yield, so
    a run resumed after ``k`` batches of this epoch continues with exactly batch ``k``.
    The last batch may be smaller unless ``drop_last``.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    n = len(seqs)
    order = epoch_order(n, seed, epoch) if shuffle else np.arange(n)
    for b in range(max(0, start), num_batches(n, batch_size, drop_last)):
        idx = order[b * batch_size: (b + 1) * batch_size]
        items = [seqs[int(i)] for i in idx]
        length = max(len(ids) for ids, _ in items) - 1
        length = -(-length // pad_to_multiple) * pad_to_multiple
        ids_b = pad_rows([ids for ids, _ in items], length + 1, fill=pad_id, dtype=np.int32)
        mask_b = pad_rows([m for _, m in items], length + 1, fill=0, dtype=np.float32)
        yield mx.array(ids_b[:, :-1]), mx.array(ids_b[:, 1:]), mx.array(mask_b[:, 1:])


# ---------------------------------------------------------------------------- domains

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
    return _load_files(files, tok, max_seq_length, valid_fraction, seed, label, kw, domain.records)


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
    """Find the domains of a multi-domain dataset (see the module docstring for layouts).

    A directory holding ``train.jsonl`` without ``domain`` fields is a single domain named
    after the directory; a plain JSONL file likewise (named after its stem).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory; pass a data directory or a JSONL file")
    if path.is_file():
        return _domains_from_files({"train": path, "valid": None, "test": None}, path, path.stem,
                                   skip_bad_lines)
    train = _find_split_file(path, "train")
    if train is not None:
        files = {s: _find_split_file(path, s) for s in SPLITS}
        return _domains_from_files(files, path, path.name, skip_bad_lines)
    found: dict[str, Domain] = {}
    for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        tr = _find_split_file(sub, "train")
        if tr is None:
            if any(sub.glob("*.jsonl")):
                raise DataError(f"{sub}: domain folder has no train.jsonl (found "
                                f"{sorted(p.name for p in sub.glob('*.jsonl'))[:5]})")
            continue
        found[sub.name] = Domain(0, sub.name, tr, _find_split_file(sub, "valid"),
                                 _find_split_file(sub, "test"))
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
        for lineno, rec in _iter_jsonl(f, skip_bad_lines, counter):
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
    for _, rec in _iter_jsonl(path, True, [0]):
        return rec
    raise DataError(f"{path}: no valid records; the file is empty or every line is malformed")
