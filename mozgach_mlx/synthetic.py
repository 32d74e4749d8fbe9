"""The built-in synthetic corpus: ``n_domains`` (108 by default) distinct, learnable rules.

Each domain is a *rule* over its own *alphabet*:

* The alphabet is 6 printable ASCII symbols chosen for that domain, such that any two
  domains share at most 1 symbol (the alphabets are blocks of a transversal design:
  symbols are points (i, j) of a 6 x 13 grid and a domain's alphabet is a "line"
  {(i, (s*i + t) mod 13)}; two lines meet in at most one point). Words are separated
  by spaces. A LoRA on a random-init byte-level model learns which bytes a domain uses
  within about ten steps, and that alone separates the domains: under another domain's
  adapter nearly every byte of a text is one that adapter never learned to predict.
  This is what makes "its own adapter has the lowest loss" and routing by lowest loss
  work with a tiny model and a short schedule. Small alphabets help: attention-only
  LoRA can only steer the (RMS-normalised) final hidden state, and the logit headroom
  that buys is shared between the tokens being boosted.
* The family (12 of them, cycling with the domain id) is a structural rule over the
  alphabet that shows in bigram and longer statistics — something further to learn for
  a longer schedule or a larger model:

  ======== ================================================================
  cycle    runs of consecutive symbols in a fixed cyclic order
  mirror   a word followed by its reverse (palindromes)
  double   a word written twice
  sorted   symbols of each word in the alphabet's order
  count    consecutive base-6 numbers (symbols are the digits)
  arith    base-3 additions ``x+y=z;`` (3 digits, 3 operator symbols)
  pairs    every symbol followed by its fixed partner (a derangement)
  syllable pseudo-words of consonant-vowel syllables (2 vowels, 4 consonants)
  markov   random walks where each symbol has 2 allowed successors
  runs     symbol i always repeated 1 + (i mod 4) times
  cipher   a shared pseudo-English lexicon under a per-domain substitution cipher
  brackets balanced brackets of two kinds with filler symbols inside
  ======== ================================================================

Held-out (valid) texts are fresh samples of the same rule, not copies of training
texts (checked by the tests). Names are ``NNN_family_V`` (``001_cycle_1``, ``013_cycle_2``, ...): the numeric
prefix is the domain id under :func:`mozgach_mlx.data.discover_domains`'s numbering.

:func:`write_corpus` materialises the corpus as an ordinary multi-domain data directory
(one folder per domain with ``train.jsonl`` / ``valid.jsonl``), so the built-in default
run and ``--data DIR`` go through the same loading code. :func:`proxy_routing` is a
training-free check of distinctness (n-gram models fitted on each domain's train texts
route the held-out texts).
"""

from __future__ import annotations

import bisect
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DataError
from .io import atomic_write_json, atomic_write_text

ALPHABET_SIZE = 6
_TD_PRIME = 13  # transversal design TD(6, 13): 169 alphabets, pairwise sharing <= 1 symbol
# Printable ASCII without space (the word separator) and the two JSON-escaped characters.
POOL = [chr(c) for c in range(33, 127) if chr(c) not in '"\\']
CORPUS_FILE = "corpus.json"
CORPUS_VERSION = 1  # bump whenever generation changes: write_corpus reuses a dir of the same spec


@dataclass
class SyntheticDomain:
    """One domain of the built-in corpus: its rule, alphabet and texts."""

    id: int
    name: str
    family: str
    rule: str
    alphabet: str
    train: list[str] = field(repr=False)
    valid: list[str] = field(repr=False)


# ---------------------------------------------------------------------------- randomness

class _Rng:
    """Seeded draws built only on ``random.Random.random()``, whose sequence Python
    guarantees across versions (``randrange``/``choice`` may change), and fast for the
    many scalar draws of text generation."""

    def __init__(self, *seed: int) -> None:
        s = 0
        for v in seed:
            s = s * 1_000_003 + int(v)
        self._random = random.Random(s).random

    def random(self) -> float:
        return self._random()

    def int(self, lo: int, hi: int) -> int:
        """Uniform in [lo, hi)."""
        return lo + int(self._random() * (hi - lo))

    def ints(self, lo: int, hi: int, n: int) -> list[int]:
        return [lo + int(self._random() * (hi - lo)) for _ in range(n)]

    def perm(self, n: int) -> list[int]:
        p = list(range(n))
        for i in range(n - 1, 0, -1):
            j = int(self._random() * (i + 1))
            p[i], p[j] = p[j], p[i]
        return p

    def weighted(self, cum: list[float]) -> int:
        """Index drawn with probabilities given by the cumulative sums ``cum`` (ending at 1)."""
        return min(bisect.bisect_right(cum, self._random()), len(cum) - 1)


# ---------------------------------------------------------------------------- families
# A family is (description, make_params(a, rng) -> dict, unit(a, params, rng) -> str):
# params are fixed per domain (part of the rule), units are sampled per text.

def _word(a, rng, lo=2, hi=4):
    return "".join(a[i] for i in rng.ints(0, len(a), rng.int(lo, hi + 1)))


def _cycle(a, p, rng):
    s, n = rng.int(0, len(a)), rng.int(3, 9)
    return "".join(a[(s + i) % len(a)] for i in range(n))


def _mirror(a, p, rng):
    w = _word(a, rng)
    return w + w[::-1]


def _double(a, p, rng):
    w = _word(a, rng)
    return w + w


def _sorted(a, p, rng):
    return "".join(a[i] for i in sorted(rng.ints(0, len(a), rng.int(3, 7))))


def _base(n, digits):
    b = len(digits)
    out = digits[n % b]
    while n >= b:
        n //= b
        out = digits[n % b] + out
    return out


def _count(a, p, rng):
    n = rng.int(8, 480)
    return " ".join(_base(n + i, a) for i in range(rng.int(2, 5)))


def _arith(a, p, rng):
    digits, plus, eq, end = a[:3], a[3], a[4], a[5]
    x, y = rng.ints(0, 27, 2)
    return f"{_base(x, digits)}{plus}{_base(y, digits)}{eq}{_base(x + y, digits)}{end}"


def _pairs_params(a, rng):
    while True:
        perm = rng.perm(len(a))
        if all(p != i for i, p in enumerate(perm)):
            return {"partner": perm}


def _pairs(a, p, rng):
    return "".join(a[i] + a[p["partner"][i]] for i in rng.ints(0, len(a), rng.int(2, 4)))


def _syllable(a, p, rng):
    vowels, cons = a[:2], a[2:]
    out = []
    for _ in range(rng.int(1, 4)):
        out.append(cons[rng.int(0, len(cons))] + vowels[rng.int(0, len(vowels))])
        if rng.random() < 0.3:
            out.append(cons[rng.int(0, len(cons))])
    return "".join(out)


def _markov_params(a, rng):
    return {"next": [rng.perm(len(a))[:2] for _ in a]}


def _markov(a, p, rng):
    i = rng.int(0, len(a))
    out = [a[i]]
    for _ in range(rng.int(2, 8)):
        i = p["next"][i][rng.int(0, 2)]
        out.append(a[i])
    return "".join(out)


def _runs(a, p, rng):
    return "".join(a[i] * (1 + i % 4) for i in rng.ints(0, len(a), rng.int(1, 4)))


# The shared language of the cipher family: a fixed lexicon over abstract letters 0..7,
# drawn once (independent of the corpus seed) with Zipf-like word frequencies.
_LEXICON_RNG = _Rng(1234)
_LEXICON = [_LEXICON_RNG.ints(0, ALPHABET_SIZE, _LEXICON_RNG.int(1, 7)) for _ in range(64)]
_LEXICON_CUM = list(np.cumsum(1.0 / np.arange(1, 65)) / np.sum(1.0 / np.arange(1, 65)))


def _cipher(a, p, rng):
    return "".join(a[i] for i in _LEXICON[rng.weighted(_LEXICON_CUM)])


def _brackets(a, p, rng):
    pairs, fill = [(a[0], a[1]), (a[2], a[3])], a[4:]

    def gen(depth):
        out = ""
        for _ in range(rng.int(1, 3)):
            o, c = pairs[rng.int(0, 2)]
            inner = gen(depth + 1) if depth < 2 and rng.random() < 0.5 else fill[rng.int(0, len(fill))]
            out += o + inner + c
        return out

    return gen(0)


def _no_params(a, rng):
    return {}


FAMILIES: dict[str, tuple[str, Callable, Callable]] = {
    "cycle": ("runs of consecutive symbols in the fixed cyclic order {alphabet}", _no_params, _cycle),
    "mirror": ("each word is followed by its reverse, over {alphabet}", _no_params, _mirror),
    "double": ("each word is written twice, over {alphabet}", _no_params, _double),
    "sorted": ("the symbols of each word appear in the order {alphabet}", _no_params, _sorted),
    "count": ("consecutive base-6 numbers with digits {alphabet}", _no_params, _count),
    "arith": ("base-3 additions x+y=z; with digits, plus, equals, end = {alphabet}", _no_params, _arith),
    "pairs": ("every symbol of {alphabet} is followed by its fixed partner", _pairs_params, _pairs),
    "syllable": ("consonant-vowel syllables; vowels then consonants: {alphabet}", _no_params, _syllable),
    "markov": ("random walks where each symbol of {alphabet} has 2 allowed successors",
               _markov_params, _markov),
    "runs": ("the i-th symbol of {alphabet} is always repeated 1 + i mod 4 times", _no_params, _runs),
    "cipher": ("a shared pseudo-English lexicon enciphered into {alphabet}", _no_params, _cipher),
    "brackets": ("balanced brackets (a0 a1), (a2 a3) with fillers a4, a5 of {alphabet}",
                 _no_params, _brackets),
}
FAMILY_NAMES = list(FAMILIES)


# ---------------------------------------------------------------------------- corpus

def _alphabets(n: int, seed: int) -> list[str]:
    """``n`` alphabets of ALPHABET_SIZE symbols from POOL; any two share at most 1 symbol
    for n <= 169 (lines of the transversal design), beyond that as few as a greedy
    random search finds. Symbol order within an alphabet is shuffled per domain."""
    rng = _Rng(seed, 0xA1FA)
    q, k = _TD_PRIME, ALPHABET_SIZE
    symbols = [POOL[i] for i in rng.perm(len(POOL))[: k * q]]  # point (i, j) -> symbols[i*q + j]
    lines = [[i * q + (s * i + t) % q for i in range(k)] for s in range(q) for t in range(q)]
    order = rng.perm(len(lines))
    blocks = [lines[o] for o in order[:n]]
    chosen = [set(b) for b in blocks]
    while len(blocks) < n:  # more domains than the design has lines
        best, best_overlap = None, None
        for _try in range(200):
            cand = rng.perm(k * q)[:k]
            overlap = max(len(c.intersection(cand)) for c in chosen)
            if best_overlap is None or overlap < best_overlap:
                best, best_overlap = cand, overlap
        blocks.append(best)
        chosen.append(set(best))
    return ["".join(symbols[blocks[d][i]] for i in rng.perm(k)) for d in range(n)]


def _texts(a: str, params: dict, unit: Callable, rng, n: int, lo: int, hi: int) -> list[str]:
    out = []
    for _ in range(n):
        target = rng.int(lo, hi + 1)
        parts, length = [], -1  # no separator before the first unit
        while length < target:
            u = unit(a, params, rng)
            parts.append(u)
            length += len(u) + 1
        out.append(" ".join(parts))
    return out


def domain_name(domain_id: int, n_families: int = len(FAMILIES)) -> str:
    family = FAMILY_NAMES[(domain_id - 1) % n_families]
    return f"{domain_id:03d}_{family}_{(domain_id - 1) // n_families + 1}"


def default_corpus(n_domains: int = 108, seed: int = 0, n_train: int = 128, n_valid: int = 16,
                   min_chars: int = 80, max_chars: int = 160) -> list[SyntheticDomain]:
    """Generate the built-in corpus (deterministic in all arguments).

    Args:
        n_domains: number of domains (ids 1..n_domains); family = FAMILIES[(id-1) % 12].
        seed: corpus seed (alphabets, per-domain rule parameters and texts).
        n_train, n_valid: texts per domain in each split.
        min_chars, max_chars: length range of one text (ASCII, so also bytes).
    """
    if n_domains < 1 or n_train < 1 or n_valid < 0:
        raise DataError(f"synthetic corpus needs n_domains >= 1, n_train >= 1, n_valid >= 0 "
                        f"(got {n_domains}, {n_train}, {n_valid})")
    if not 1 <= min_chars <= max_chars:
        raise DataError(f"synthetic corpus needs 1 <= min_chars <= max_chars (got {min_chars}, {max_chars})")
    out = []
    for d, a in enumerate(_alphabets(n_domains, seed), start=1):
        name = domain_name(d)
        family = name.split("_")[1]
        desc, make_params, unit = FAMILIES[family]
        rng = _Rng(seed, d)
        params = make_params(a, rng)
        train = _texts(a, params, unit, rng, n_train, min_chars, max_chars)
        valid = _texts(a, params, unit, rng, n_valid, min_chars, max_chars)
        out.append(SyntheticDomain(d, name, family, desc.format(alphabet=a), a, train, valid))
    return out


def _spec(n_domains, seed, n_train, n_valid, min_chars, max_chars) -> dict:
    return {"version": CORPUS_VERSION, "n_domains": n_domains, "seed": seed, "n_train": n_train,
            "n_valid": n_valid, "min_chars": min_chars, "max_chars": max_chars}


def write_corpus(path: str | Path, n_domains: int = 108, seed: int = 0, n_train: int = 128,
                 n_valid: int = 16, min_chars: int = 80, max_chars: int = 160) -> Path:
    """Materialise :func:`default_corpus` as a data directory and return its path.

    Layout: ``path/NNN_family_V/{train,valid}.jsonl`` (``{"text": ...}`` per line) and
    ``path/corpus.json`` (the generation arguments and each domain's rule). Files are
    written atomically and ``corpus.json`` last, so an interrupted write is redone; a
    directory already holding the same corpus is left untouched, and one holding a
    different corpus is an error (never silently mixed).
    """
    path = Path(path)
    spec = _spec(n_domains, seed, n_train, n_valid, min_chars, max_chars)
    meta_file = path / CORPUS_FILE
    if meta_file.exists():
        try:
            old = json.loads(meta_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{meta_file}: unreadable ({e}); delete {path} to regenerate the corpus") from e
        if old.get("spec") == spec:
            return path
        raise DataError(f"{path} already holds a different synthetic corpus ({old.get('spec')}); "
                        f"delete it or use another directory")
    corpus = default_corpus(n_domains, seed, n_train, n_valid, min_chars, max_chars)
    for dom in corpus:
        for split, texts in (("train", dom.train), ("valid", dom.valid)):
            if texts:
                lines = "".join(json.dumps({"text": t}) + "\n" for t in texts)
                atomic_write_text(path / dom.name / f"{split}.jsonl", lines)
    atomic_write_json(meta_file, {"spec": spec, "domains": [
        {"id": d.id, "name": d.name, "family": d.family, "rule": d.rule, "alphabet": d.alphabet}
        for d in corpus]})
    return path


# ---------------------------------------------------------------------------- distinctness proxy

def _ids(text: str) -> np.ndarray:
    """Bytes of ``text`` between BOS (256) and EOS (257)."""
    return np.concatenate([[256], np.frombuffer(text.encode(), np.uint8), [257]]).astype(np.int64)


def proxy_routing(corpus: list[SyntheticDomain], order: int = 1, alpha: float = 0.5) -> dict:
    """Training-free distinctness check: fit an add-``alpha`` byte n-gram model (order 1
    or 2) on each domain's train texts and route every held-out text to the domain whose
    model gives it the lowest mean loss per byte (as an adapter bank routes by lowest loss).

    Returns ``accuracy`` (fraction of held-out texts routed to their own domain),
    ``own_lowest`` (fraction of domains whose own model has the lowest mean held-out
    loss), ``min_margin`` (smallest gap, nats/byte, between the best other domain's and
    the own domain's loss over all held-out texts) and ``loss`` (n x n: mean held-out loss
    of domain j's texts (row j) under domain i's model (column i)).
    """
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order}")
    V, n = 258, len(corpus)
    counts = np.full((n, V ** order), alpha)
    for i, d in enumerate(corpus):
        ids = [_ids(t) for t in d.train]
        keys = np.concatenate([k[1:] if order == 1 else k[:-1] * V + k[1:] for k in ids])
        counts[i] += np.bincount(keys, minlength=V ** order)
    if order == 1:
        logp = np.log(counts / counts.sum(1, keepdims=True))
    else:
        c3 = counts.reshape(n, V, V)
        logp = np.log(c3 / c3.sum(2, keepdims=True)).reshape(n, V * V)
    loss = np.full((n, n), np.nan)
    correct = total = 0
    margin = math.inf
    for j, d in enumerate(corpus):
        if not d.valid:
            continue
        per = np.stack([-logp[:, k[1:] if order == 1 else k[:-1] * V + k[1:]].mean(1)
                        for k in map(_ids, d.valid)])  # (n_valid, n)
        loss[j] = per.mean(0)
        correct += int((per.argmin(1) == j).sum())
        total += len(d.valid)
        if n > 1:
            margin = min(margin, float((np.delete(per, j, axis=1).min(1) - per[:, j]).min()))
    own = float(np.mean([loss[j].argmin() == j for j in range(n) if corpus[j].valid]))
    return {"accuracy": correct / max(total, 1), "own_lowest": own,
            "min_margin": margin if n > 1 else float("nan"), "loss": loss}
