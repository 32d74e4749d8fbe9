"""Passkey retrieval (Mohtashami & Jaggi 2023; the test of PI, arXiv 2306.15595, and YaRN).

A prompt of exactly ``length`` tokens: filler text (PI's "The grass is green. ..."
repeated) with the line ``The pass key is KEY. Remember it.`` placed so that it starts
at fraction ``depth`` of the filler (0 = first, 1 = last, just before the question), then
the question ``What is the pass key? The pass key is`` whose answer is the key.

Scoring: one forward pass over prompt + key, teacher forced. The greedy-decoded key
equals the true key exactly when the argmax at every key position is the true token
(greedy decoding then reproduces the key token by token), so **exact** accuracy is the
greedy-decoding exact match without running a decoder. **Per-digit** accuracy is the
fraction of key tokens whose argmax is right given the true earlier digits
(teacher-forced). Chance for a random guesser over ``n`` decimal digits: exact 10^-n,
per-digit 1/10.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from ..errors import ConfigError
from ..tokenizer import bos_ids

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is "


@dataclass
class PasskeyPrompt:
    """One prompt: ``tokens`` (the prompt, ``length`` ids) and ``answer`` (the key's ids);
    ``key_pos`` is the index of the key line's first token in ``tokens``."""

    tokens: list[int]
    answer: list[int]
    key: str
    key_pos: int
    depth: float


def _parse_list(value: str, what: str, conv) -> list:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"--{what} must be a comma-separated list, got {value!r}")
    out = []
    for part in value.split(","):
        part = part.strip()
        try:
            out.append(conv(part))
        except ValueError:
            raise ConfigError(f"--{what}: cannot read {part!r}; use e.g. "
                              f"{'1k,2k,4k' if what == 'lengths' else '0,0.5,1'}") from None
    return out


def _length(s: str) -> int:
    mult = 1
    if s[-1:].lower() == "k":
        s, mult = s[:-1], 1024
    n = float(s) * mult
    if n != int(n) or n <= 0:
        raise ValueError(s)
    return int(n)


def parse_lengths(value: str) -> list[int]:
    """``"1k,2k,4096"`` -> ``[1024, 2048, 4096]`` (``k`` = 1024 tokens); ConfigError otherwise."""
    return _parse_list(value, "lengths", _length)


def parse_depths(value: str) -> list[float]:
    """``"0,0.25,1"`` -> floats in [0, 1]; ConfigError otherwise."""
    out = _parse_list(value, "depths", float)
    bad = [d for d in out if not 0.0 <= d <= 1.0]
    if bad:
        raise ConfigError(f"--depths must lie in [0, 1] (0 = start, 1 = end of the filler), got {bad[0]}")
    return out


def random_key(rng: np.random.Generator, digits: int) -> str:
    """A key of ``digits`` decimal digits, the first non-zero."""
    return str(rng.integers(1, 10)) + "".join(str(d) for d in rng.integers(0, 10, digits - 1))


def make_prompt(tok, length: int, depth: float, key: str, *, filler: str = FILLER,
                filler_offset: int = 0) -> PasskeyPrompt:
    """Build a prompt of exactly ``length`` tokens with ``key`` at ``depth``.

    Layout: [BOS] filler[:a] KEY_LINE filler[a:] QUESTION, the filler cut from an endless
    repetition of ``filler`` starting ``filler_offset`` tokens in, and ``a`` =
    round(depth * filler tokens).

    Raises:
        ConfigError: ``length`` too short for the key line and question.
    """
    head = bos_ids(tok)
    key_ids = tok.encode(KEY_LINE.format(key=key), add_bos=False)
    q_ids = tok.encode(QUESTION, add_bos=False)
    n_fill = length - len(head) - len(key_ids) - len(q_ids)
    if n_fill < 0:
        raise ConfigError(f"passkey length {length} is too short: the key line and question alone take "
                          f"{length - n_fill} tokens")
    unit = tok.encode(filler, add_bos=False)
    reps = (n_fill + filler_offset) // len(unit) + 2
    fill = (unit * reps)[filler_offset: filler_offset + n_fill]
    a = int(round(depth * n_fill))
    tokens = head + fill[:a] + key_ids + fill[a:] + q_ids
    answer = tok.encode(key, add_bos=False)
    return PasskeyPrompt(tokens, answer, key, len(head) + a, depth)


def score_prompts(model, prompts: list[PasskeyPrompt], *, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(exact (N,) bool, per-token correct (N, n_answer) bool) for prompts of one length and
    one answer length, by one teacher-forced forward pass per batch."""
    exact, digits = [], []
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s: s + batch_size]
        seqs = np.array([p.tokens + p.answer for p in chunk], dtype=np.int32)  # (b, L + n)
        n = len(chunk[0].answer)
        start = len(chunk[0].tokens) - 1  # logits at start..start+n-1 predict the answer
        h = model.hidden(mx.array(seqs[:, :-1]))[:, start: start + n]  # (b, n, d)
        pred = np.array(mx.argmax(model.logits(h), axis=-1))  # (b, n)
        ok = pred == seqs[:, start + 1: start + 1 + n]
        digits.append(ok)
        exact.append(ok.all(axis=1))
    return np.concatenate(exact), np.concatenate(digits)


@dataclass
class PasskeyGrid:
    """Accuracies indexed [length][depth] (fractions in [0, 1])."""

    lengths: list[int]
    depths: list[float]
    trials: int
    digits: int
    exact: np.ndarray = field(repr=False)  # (len(lengths), len(depths))
    per_digit: np.ndarray = field(repr=False)

    def mean_exact(self, length: int) -> float:
        return float(self.exact[self.lengths.index(length)].mean())

    def mean_digit(self, length: int) -> float:
        return float(self.per_digit[self.lengths.index(length)].mean())

    def to_dict(self) -> dict:
        return {"lengths": self.lengths, "depths": self.depths, "trials": self.trials, "digits": self.digits,
                "exact": self.exact.tolist(), "per_digit": self.per_digit.tolist()}


def passkey_grid(model, tok, lengths: list[int], depths: list[float], *, trials: int = 10, digits: int = 5,
                 seed: int = 0, batch_size: int = 8) -> PasskeyGrid:
    """Passkey accuracy over ``lengths`` x ``depths``, ``trials`` random keys (and filler
    phases) per cell, seeded. The model runs in eval mode (full attention)."""
    if trials <= 0 or digits <= 0:
        raise ConfigError(f"passkey trials and digits must be positive, got {trials}, {digits}")
    was_training = model.training
    model.eval()
    rng = np.random.default_rng(seed)
    unit = len(tok.encode(FILLER, add_bos=False))
    exact = np.zeros((len(lengths), len(depths)))
    per_digit = np.zeros_like(exact)
    try:
        for i, length in enumerate(lengths):
            for j, depth in enumerate(depths):
                prompts = [make_prompt(tok, length, depth, random_key(rng, digits),
                                       filler_offset=int(rng.integers(0, unit))) for _ in range(trials)]
                ex, dg = score_prompts(model, prompts, batch_size=batch_size)
                exact[i, j], per_digit[i, j] = ex.mean(), dg.mean()
    finally:
        model.train(was_training)
    return PasskeyGrid(list(lengths), list(depths), trials, digits, exact, per_digit)


def format_grid(grid: PasskeyGrid, title: str = "") -> str:
    """A markdown table: one row per length, one column per depth, cells
    ``exact% / per-digit%``, and a mean column."""
    head = "| length | " + " | ".join(f"d={d:g}" for d in grid.depths) + " | mean |"
    sep = "|---" * (len(grid.depths) + 2) + "|"
    rows = [f"**{title}**" if title else "", head, sep]
    for i, L in enumerate(grid.lengths):
        cells = [f"{100 * grid.exact[i, j]:.0f} / {100 * grid.per_digit[i, j]:.0f}" for j in range(len(grid.depths))]
        rows.append(f"| {L} | " + " | ".join(cells)
                    + f" | {100 * grid.exact[i].mean():.0f} / {100 * grid.per_digit[i].mean():.0f} |")
    return "\n".join(r for r in rows if r)
