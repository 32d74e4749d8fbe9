"""Perplexity by position: does the model use context further back than it was trained on?

Each document's tokens are scored with a sliding window of ``window`` tokens moved by
``stride``: the first window scores its tokens 1..W-1 (token 0 has no context), every
later window, starting ``stride`` further on, scores only the tokens no earlier window
scored (its last ``stride`` tokens, fewer at the end). So every token is scored once,
with at least ``window - stride`` tokens of context once past the first window (the
Hugging Face "perplexity of fixed-length models" scheme). A document no longer than the
window is one window.

Tokens are then grouped by their position in the document into buckets of
``bucket`` positions; a bucket's NLL is the mean over all its tokens of all documents,
its perplexity exp(NLL). Falling NLL with position = the model profits from the longer
context; a jump past the trained length = it does not extrapolate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .. import loss
from ..errors import ConfigError
from ..tokenizer import bos_ids
from .passkey import FILLER, KEY_LINE, random_key


def token_nll(model, doc: list[int], *, window: int, stride: int) -> np.ndarray:
    """NLL (nats) of every token of ``doc`` but the first, by position: (len(doc) - 1,),
    entry t-1 for token t. See the module docstring for the window scheme."""
    if window < 2 or not 0 < stride <= window - 1:
        raise ConfigError(f"ppl-by-position needs window >= 2 and 0 < stride < window, got window={window}, "
                          f"stride={stride}")
    ids = np.asarray(doc, dtype=np.int32)
    n = len(ids)
    nll = np.full(n - 1, np.nan)
    scored, start = 1, 0  # first token not yet scored; window start
    while scored < n:
        end = min(start + window, n)
        x = mx.array(ids[start:end - 1][None])  # (1, w-1): predicts start+1..end-1
        win_nll = np.array(loss.token_losses(model, model.hidden(x), mx.array(ids[start + 1:end][None]))[0])
        nll[scored - 1:end - 1] = win_nll[scored - start - 1:]
        scored = end
        start += stride
    return nll


@dataclass
class PositionTable:
    """Mean NLL per positional bucket; ``edges[i]`` .. ``edges[i+1]`` are token positions."""

    edges: list[int]
    nll: list[float]
    tokens: list[int]

    @property
    def ppl(self) -> list[float]:
        return [math.exp(v) if v == v else float("nan") for v in self.nll]

    def to_dict(self) -> dict:
        return {"edges": self.edges, "nll": self.nll, "ppl": self.ppl, "tokens": self.tokens}


def ppl_by_position(model, docs: list[list[int]], *, window: int, stride: int | None = None,
                    bucket: int = 256) -> PositionTable:
    """Per-bucket mean NLL of ``docs`` (lists of token ids). ``stride`` defaults to
    ``window // 2``. The model runs in eval mode."""
    if bucket <= 0:
        raise ConfigError(f"ppl-by-position bucket must be a positive number of tokens, got {bucket}")
    stride = window // 2 if stride is None else stride
    was_training = model.training
    model.eval()
    try:
        per_doc = [token_nll(model, d, window=window, stride=stride) for d in docs if len(d) >= 2]
    finally:
        model.train(was_training)
    if not per_doc:
        raise ConfigError("ppl-by-position needs at least one document of two or more tokens")
    n = max(len(a) for a in per_doc) + 1
    edges = list(range(0, n, bucket)) + [n]
    sums = np.zeros(len(edges) - 1)
    counts = np.zeros(len(edges) - 1, dtype=np.int64)
    for a in per_doc:
        pos = np.arange(1, len(a) + 1)  # position of the token each entry scores
        b = np.searchsorted(edges, pos, side="right") - 1
        np.add.at(sums, b, a)
        np.add.at(counts, b, 1)
    nll = [float(s / c) if c else float("nan") for s, c in zip(sums, counts, strict=True)]
    return PositionTable(edges, nll, counts.tolist())


def filler_documents(tok, length: int, n: int, *, seed: int = 0, key_every: int = 400,
                     digits: int = 5) -> list[list[int]]:
    """``n`` documents of exactly ``length`` tokens: the passkey filler with a key line
    (fresh random key) every ~``key_every`` tokens, at a random filler phase."""
    rng = np.random.default_rng(seed)
    unit = tok.encode(FILLER, add_bos=False)
    docs = []
    for _ in range(n):
        ids = bos_ids(tok)
        phase = int(rng.integers(0, len(unit)))
        while len(ids) < length:
            k = int(rng.integers(key_every // 2, key_every * 3 // 2))
            ids += (unit * (k // len(unit) + 2))[phase: phase + k]
            ids += tok.encode(KEY_LINE.format(key=random_key(rng, digits)), add_bos=False)
        docs.append(ids[:length])
    return docs


def format_position_table(tables: dict[str, PositionTable]) -> str:
    """Markdown: one row per variant, one column per bucket, cells = perplexity."""
    first = next(iter(tables.values()))
    e = first.edges
    head = "| variant | " + " | ".join(f"{e[i]}-{e[i + 1]}" for i in range(len(e) - 1)) + " |"
    sep = "|---" * len(e) + "|"
    rows = [head, sep]
    for name, t in tables.items():
        rows.append(f"| {name} | " + " | ".join(f"{p:.3g}" for p in t.ppl) + " |")
    return "\n".join(rows)
