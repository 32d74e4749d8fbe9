"""Evaluate a fleet run: every adapter on every domain's held-out data, and routing.

``mozgach eval --out OUT`` loads the run's base once, builds one :class:`AdapterBank`
over all finished adapters and scores every held-out sample under the base and under
every adapter.

Held-out samples (:func:`held_out_samples`), as ``benchmarks/bench_routing.py`` makes its
routing samples: per domain, the records of the held-out splits (``valid`` then ``test``;
neither is trained on) are tokenized, joined in file order with the EOS (and BOS) that
separate documents in training, and cut into consecutive windows of ``sample_tokens``
tokens (default 256); each window after a BOS is one sample. The last, shorter window
of a domain's text is a sample of the loss table but is not routed, so every routed
sample has exactly ``sample_tokens`` tokens. At most ``MAX_SAMPLES`` full windows per
domain are used (the shipped ``stdlib12`` corpus has 10-20: all of them).

That one (samples x adapters) loss matrix gives:

* per domain: the base's loss, its own adapter's loss, the best *other* adapter's loss
  (and which), and whether its own adapter is the lowest (token-weighted means over the
  domain's samples, so over all of its held-out tokens when no cap applies);
* routing by loss: a sample is routed to the adapter with the lowest loss on it;
* routing by signature: nearest centroid of the base's mean final hidden state, the
  centroids fitted on the first ``SIGNATURE_SAMPLES`` *train* records per domain
  (:meth:`AdapterBank.fit_signatures`);
* routing by tokens: multinomial naive Bayes over the sample's tokens, fitted on the
  token counts of the train split (:meth:`AdapterBank.fit_tokens`);
* routing by linear probe: softmax regression on the base's mean final hidden state,
  fitted on up to ``PROBE_SAMPLES`` train records per domain (:meth:`AdapterBank.fit_probe`).

The fits use the same records as ``bench_routing.py`` (train records longer than
``FIT_TOKENS`` tokens are cut into windows), so on the default run the eval's defaults
reproduce that benchmark's 256-token numbers. Each accuracy is printed with its sample
count and a 95% Wilson score interval (:func:`wilson_interval`).

Cost: (adapters + 1) x samples x ``sample_tokens`` forward tokens, run as batches with one
adapter per row (the base matmuls once per layer for all rows), plus one base pass over
the probe's train records. On the default run (12 adapters, 196 routed samples of 256
tokens, 208 in the loss table) that took 347-386 s on the loaded 2-core dev machine, about 60%
of it the loss pass (``benchmarks/RESULTS.md``, "The default run"). It grows with adapters x
domains: for the 108-domain synthetic run use ``--quick`` (``QUICK_SAMPLES`` per domain, no
signature or probe fit) or ``--route-samples`` / ``--sample-tokens``.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import data, lora
from .bank import AdapterBank
from .errors import ConfigError, DataError
from .io import atomic_write_json
from .rundir import Manifest, load_run_base, read_manifest, run_domains
from .tokenizer import bos_ids

SAMPLE_TOKENS = 256  # tokens per held-out sample after BOS (bench_routing.py's headline length)
MAX_SAMPLES = 64  # held-out samples per domain, at most (each domain's first windows)
QUICK_SAMPLES = 2  # per domain with --quick
HELD_OUT_SPLITS = ("valid", "test")
SIGNATURE_SAMPLES = 32  # train records per domain for the signature centroids (bench_routing's --fit-records)
PROBE_SAMPLES = 256  # train records per domain the linear probe is fitted on, at most
FIT_TOKENS = 1024  # train records longer than this are cut into windows of this many tokens for the fits
Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: two-sided 95% intervals
ROUTERS = (("loss", "loss"), ("tokens", "tokens (naive Bayes)"), ("probe", "linear probe"),
           ("signature", "signature"))  # (method, label) in the order they are printed
REPORT_FILE = "eval.json"

Seq = tuple[np.ndarray, np.ndarray]  # (ids int32 (n,), target mask bool (n,))


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion: ``(low, high)`` around ``k / n``.

    Wilson, E. B. (1927), "Probable inference, the law of succession, and statistical
    inference", JASA 22, 209-212; method 3 of Newcombe, R. G. (1998), "Two-sided confidence
    intervals for the single proportion: comparison of seven methods", Statistics in
    Medicine 17, 857-872. With ``p = k / n``:

    .. math::

        \\frac{p + z^2 / 2n}{1 + z^2 / n} \\pm \\frac{z}{1 + z^2 / n}
        \\sqrt{\\frac{p (1 - p)}{n} + \\frac{z^2}{4 n^2}}

    Unlike the normal (Wald) interval it stays inside [0, 1] and does not collapse to a
    point at ``k = 0`` or ``k = n``. ``z``: the normal quantile (default: 95% two-sided).
    ``(nan, nan)`` when ``n == 0``.
    """
    if not 0 <= k <= n:
        raise ValueError(f"wilson_interval needs 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return float("nan"), float("nan")
    p, z2 = k / n, z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class DomainResult:
    """One domain's row of the table (losses in nats per target token)."""

    adapter: str
    domain: str
    domain_id: int
    samples: int
    tokens: int
    base_loss: float
    own_loss: float
    best_other_loss: float | None
    best_other: str | None
    route_n: int
    route_loss_correct: int
    route_signature_correct: int | None
    route_tokens_correct: int | None = None
    route_probe_correct: int | None = None

    @property
    def own_best(self) -> bool:
        return self.best_other_loss is None or self.own_loss < self.best_other_loss

    @property
    def beats_base(self) -> bool:
        return self.own_loss < self.base_loss


@dataclass
class Report:
    """What ``mozgach eval`` prints: per-domain rows and routing accuracy/timing."""

    out_dir: str
    rows: list[DomainResult] = field(default_factory=list)
    not_evaluated: dict[str, str] = field(default_factory=dict)  # adapter -> why
    n_adapters: int = 0
    sample_tokens: int = SAMPLE_TOKENS
    held_out: list[str] = field(default_factory=lambda: list(HELD_OUT_SPLITS))  # the splits the samples come from
    route_loss_accuracy: float = float("nan")
    route_signature_accuracy: float | None = None
    route_loss_ms_per_sample: float = float("nan")
    route_signature_ms_per_sample: float | None = None
    signature_fit_seconds: float | None = None
    route_tokens_accuracy: float | None = None
    route_tokens_ms_per_sample: float | None = None
    route_probe_accuracy: float | None = None
    route_probe_ms_per_sample: float | None = None
    probe_fit_seconds: float | None = None
    seconds: float = 0.0
    # the full matrix behind the rows: loss_matrix[i][k] = adapter k's loss on the held-out
    # data of adapters[i]'s domain (token-weighted, the rows' samples); the diagonal is
    # each domain's own adapter
    adapters: list[str] = field(default_factory=list)
    loss_matrix: list[list[float]] = field(default_factory=list)
    # one entry per routed held-out sample: its domain's adapter and where each method sent it
    routes: list[dict] = field(default_factory=list)

    @property
    def all_own_best(self) -> bool:
        """Every evaluated domain's own adapter has the lowest loss on its held-out data."""
        return bool(self.rows) and all(r.own_best for r in self.rows)

    def route_counts(self, method: str) -> tuple[int, int] | None:
        """``(correct, routed)`` samples of router ``method`` over all domains, or None
        when it did not run."""
        n = sum(r.route_n for r in self.rows)
        hits = [getattr(r, f"route_{method}_correct") for r in self.rows]
        if n == 0 or any(h is None for h in hits):
            return None
        return int(sum(hits)), n

    def route_interval(self, method: str) -> tuple[float, float] | None:
        """95% Wilson score interval of router ``method``'s accuracy (None: not run)."""
        counts = self.route_counts(method)
        return None if counts is None else wilson_interval(*counts)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for row, r in zip(d["rows"], self.rows, strict=True):
            row.update(own_best=r.own_best, beats_base=r.beats_base)
        d["all_own_best"] = self.all_own_best
        d["route_samples"] = sum(r.route_n for r in self.rows)
        for m, _ in ROUTERS:
            counts = self.route_counts(m)
            d[f"route_{m}_correct"] = None if counts is None else counts[0]
            d[f"route_{m}_interval"] = None if counts is None else list(wilson_interval(*counts))
        return d

    def table(self) -> str:
        head = (f"| {'adapter':<15} | {'domain':<22} | {'n':>3} | {'tokens':>6} | {'base':>6} | {'own':>6} | "
                f"{'best other':>10} | {'which':<15} | {'own best':>8} | {'route loss':>10} | {'route tok':>9} |")
        lines = [head, "|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|"]
        for r in self.rows:
            tok = "-" if r.route_tokens_correct is None else f"{r.route_tokens_correct}/{r.route_n}"
            lines.append(
                f"| {r.adapter:<15} | {r.domain[:22]:<22} | {r.samples:>3} | {r.tokens:>6} | {_f(r.base_loss)} | "
                f"{_f(r.own_loss)} | {_f(r.best_other_loss, 10)} | {str(r.best_other or '-'):<15} | "
                f"{('yes' if r.own_best else 'NO'):>8} | {f'{r.route_loss_correct}/{r.route_n}':>10} | {tok:>9} |")
        n = len(self.rows)
        lines.append("")
        if self.rows:
            lines.append(f"held-out data: the {' + '.join(self.held_out)} records of each domain, joined (each ending "
                         "with its EOS, as in training) and cut "
                         f"into samples of {self.sample_tokens} tokens; losses over "
                         f"{_span(r.samples for r in self.rows)} samples = {_span(r.tokens for r in self.rows)} "
                         "target tokens per domain")
        lines.append(f"own adapter lowest on its held-out data: {sum(r.own_best for r in self.rows)}/{n} domains; "
                     f"beats the base: {sum(r.beats_base for r in self.rows)}/{n}")
        n_route = sum(r.route_n for r in self.rows)
        lines.append(f"routing top-1 accuracy over {n_route} held-out samples of {self.sample_tokens} tokens "
                     f"({_span(r.route_n for r in self.rows)} per domain, {self.n_adapters} adapters; "
                     "correct/samples, 95% Wilson interval):")
        lines += [self._router_line(m, label) for m, label in ROUTERS
                  if m == "loss" or getattr(self, f"route_{m}_accuracy") is not None]
        if self.not_evaluated:
            items = ", ".join(f"{k} ({v})" for k, v in list(self.not_evaluated.items())[:8])
            more = "" if len(self.not_evaluated) <= 8 else f" and {len(self.not_evaluated) - 8} more"
            lines.append(f"not evaluated: {items}{more}")
        lines.append(f"evaluated {self.n_adapters} adapters x {n} domains in {self.seconds:.1f} s")
        return "\n".join(lines)

    def _router_line(self, method: str, label: str) -> str:
        counts = self.route_counts(method)
        if counts is None:
            return f"  by {label}: -"
        lo, hi = wilson_interval(*counts)
        ms = getattr(self, f"route_{method}_ms_per_sample")
        fit = getattr(self, f"{method}_fit_seconds", None)
        cost = f"{ms:.{2 if method == 'tokens' else 1}f} ms/sample" + (
            ", all adapters batched" if method == "loss" else "") + ("" if fit is None else f", fit {fit:.1f} s")
        return (f"  by {label}: {_pct(getattr(self, f'route_{method}_accuracy'))} ({counts[0]}/{counts[1]}, "
                f"{100 * lo:.1f}-{100 * hi:.1f}%; {cost})")


def _f(x: float | None, width: int = 6) -> str:
    return f"{'-':>{width}}" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:>{width}.3f}"


def _pct(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{100 * x:.1f}%"


def _span(values) -> str:
    v = list(values)
    lo, hi = min(v), max(v)
    return f"{lo:,}" if lo == hi else f"{lo:,}-{hi:,}"


def held_out_samples(docs, tok, sample_tokens: int) -> tuple[list[Seq], int]:
    """One domain's held-out samples of ``sample_tokens`` tokens (after BOS).

    ``docs``: ``(ids, mask, ...)`` per document, as :func:`data.encode_record` makes them
    (BOS, the record, EOS). They are joined in order *as encoded*, so documents stay
    separated as in a packed training sequence: each ends with its EOS (a target where
    training made it one) and the next starts with its BOS (context) when the tokenizer
    uses one. The joined text is cut into consecutive windows of ``sample_tokens`` tokens,
    and each sample is BOS (when the tokenizer uses one; the first document's own BOS is
    dropped for it) + a window, with the window's target mask (without BOS the first
    token is context only). Windows with no target are skipped.

    Joining without the separators (before 2026-12-05) ran documents into each other --
    a text the adapters never saw: over SmolLM2 on wiki11 (lead sections of ~110 tokens,
    2-3 per window) one adapter looked 2.3% worse than the base on its own topic's
    windows and is 3.0% better with them (``benchmarks/RESULTS.md``, "Held-out samples
    keep the documents' EOS").

    Returns ``(samples, n_full)``: the first ``n_full`` samples hold exactly
    ``sample_tokens`` tokens after BOS; when the text does not divide evenly one shorter
    sample (the rest) follows.
    """
    if sample_tokens < 1:
        raise ConfigError(f"sample_tokens must be >= 1, got {sample_tokens}")
    head = np.asarray(bos_ids(tok), np.int32)
    parts = [(np.asarray(ids, np.int32), np.asarray(mask, bool)) for ids, mask, *_ in docs if len(ids)]
    if not parts:
        return [], 0
    ids, mask = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    if len(head) and len(ids) >= len(head) and np.array_equal(ids[: len(head)], head):
        ids, mask = ids[len(head):], mask[len(head):]  # the sample's head stands for it
    no_target = np.zeros(len(head), bool)
    full: list[Seq] = []
    rest: list[Seq] = []
    for s in range(0, len(ids), sample_tokens):
        w_ids, w_mask = ids[s: s + sample_tokens], mask[s: s + sample_tokens]
        sample = (np.concatenate([head, w_ids]), np.concatenate([no_target, w_mask]))
        if len(sample[0]) >= 2 and sample[1][1:].any():
            (full if len(w_ids) == sample_tokens else rest).append(sample)
    return full + rest, len(full)


def evaluate_run(out_dir: str | Path, max_batches: int | None = None, route_samples: int | None = None, *,
                 sample_tokens: int = SAMPLE_TOKENS, signature_samples: int = SIGNATURE_SAMPLES,
                 probe_samples: int = PROBE_SAMPLES, splits: tuple[str, ...] = HELD_OUT_SPLITS,
                 write: bool = True, progress: bool | None = None) -> Report:
    """Evaluate every finished adapter of the run in ``out_dir`` on every domain.

    Args:
        out_dir: a run directory made by ``mozgach train`` or ``mz.train_fleet`` (``manifest.json``).
        max_batches: held-out samples for the loss table = ``max_batches * batch_size``
            (the run's batch size) per domain; default: all of them (up to
            ``MAX_SAMPLES`` full ones and the shorter rest), or the routed ones when
            ``route_samples`` is given.
        route_samples: held-out samples per domain that are routed (default
            ``MAX_SAMPLES``: all of them on the shipped corpora; 0 = no routing).
        sample_tokens: tokens per held-out sample after BOS (:func:`held_out_samples`).
        signature_samples: train records per domain to fit the signature centroids
            (0 = skip signature routing).
        probe_samples: train records per domain to fit the linear probe, at most (0 = skip).
        splits: the held-out splits the samples come from, in order.
        write: also write the report to ``OUT/eval.json`` (atomically).
        progress: show a progress bar (default: when stderr is a terminal).

    Raises:
        ConfigError: no manifest / no finished adapters; AdapterError: unreadable adapters.
    """
    t_start = time.perf_counter()
    out = Path(out_dir)
    manifest = read_manifest(out)
    n_route, n_table, splits = _sample_counts(manifest, max_batches, route_samples, sample_tokens, splits)
    report = Report(out_dir=str(out), sample_tokens=sample_tokens, held_out=list(splits))
    chosen = _finished_adapters(manifest, out, report)
    model, tok = load_run_base(manifest)
    held, full, fit = _samples_by_adapter(chosen, tok, max(n_table, n_route), sample_tokens, splits, report)
    chosen = [(n, d) for n, d in chosen if held.get(n)]
    if not chosen:
        raise ConfigError(f"{out}: no adapter has held-out ({' / '.join(splits)}) data to evaluate on")

    names = [n for n, _ in chosen]
    seqs = [s for n in names for s in held[n]]
    owner = np.array([i for i, n in enumerate(names) for _ in held[n]])  # adapter index of each sample
    pos = np.concatenate([np.arange(len(held[n])) for n in names])  # its index within its domain
    in_table = pos < n_table
    routed = (pos < n_route) & np.concatenate([full[n] for n in names])  # full-length samples only
    with AdapterBank(model, tok, [out / n for n in names], names=names) as bank:
        report.n_adapters = len(bank)
        sums, counts = _loss_matrix(bank, seqs, names, progress, report)
        per_sample = sums[:, 1:] / np.maximum(counts, 1)  # (samples, adapters)
        by_loss = per_sample.argmin(1)
        if routed.any():
            report.route_loss_accuracy = float(np.mean(by_loss[routed] == owner[routed]))
        by_sig = by_tok = by_probe = None
        if routed.any() and all(fit[n] for n in names):
            if signature_samples:
                by_sig = _route_by(bank, "signature", {n: fit[n][:signature_samples] for n in names}, seqs, owner,
                                   routed, report)
            by_tok = _route_by(bank, "tokens", {n: fit[n] for n in names}, seqs, owner, routed, report)
            if probe_samples:
                by_probe = _route_by(bank, "probe", {n: fit[n][:probe_samples] for n in names}, seqs, owner,
                                     routed, report)

    for j, (name, dom) in enumerate(chosen):
        report.rows.append(_domain_row(j, name, dom, names, sums, counts, owner == j, in_table, routed,
                                       by_loss, by_sig, by_tok, by_probe))
    report.adapters = names
    report.loss_matrix = _domain_losses(sums, counts, owner, in_table, len(names))[:, 1:].tolist()
    report.routes = [{"adapter": names[owner[i]], "by_loss": names[by_loss[i]],
                      "by_signature": None if by_sig is None else names[by_sig[i]],
                      "by_tokens": None if by_tok is None else names[by_tok[i]],
                      "by_probe": None if by_probe is None else names[by_probe[i]]} for i in np.flatnonzero(routed)]
    report.rows.sort(key=lambda x: x.domain_id)
    report.seconds = time.perf_counter() - t_start
    if write:
        atomic_write_json(out / REPORT_FILE, report.to_dict())
    return report


def _sample_counts(manifest: Manifest, max_batches: int | None, route_samples: int | None, sample_tokens: int,
                   splits) -> tuple[int, int, tuple[str, ...]]:
    """(samples routed, samples in the loss table, held-out splits) per domain, checked."""
    n_route = MAX_SAMPLES if route_samples is None else int(route_samples)
    n_table = (n_route or MAX_SAMPLES) if max_batches is None else int(max_batches) * int(
        manifest.train.get("batch_size") or 1)
    if n_route < 0 or n_table < 1 or sample_tokens < 2:
        raise ConfigError(f"eval needs route_samples >= 0, max_batches >= 1 and sample_tokens >= 2 (got "
                          f"{route_samples}, {max_batches}, {sample_tokens})")
    splits = tuple(splits)
    if not splits or not set(splits) <= set(HELD_OUT_SPLITS):
        raise ConfigError(f"eval held-out splits must be some of {HELD_OUT_SPLITS}, got {splits}")
    return n_route, n_table, splits


def _finished_adapters(manifest: Manifest, out: Path, report: Report) -> list[tuple[str, Any]]:
    """``[(adapter name, Domain)]`` of the run's finished adapters whose files and data
    exist; the others go to ``report.not_evaluated`` with the reason."""
    domains = run_domains(manifest, out)
    chosen = []
    for name, rec in sorted(manifest.adapters.items()):
        dom = domains.get(rec.domain_id)
        if rec.status != "done":
            report.not_evaluated[name] = f"status {rec.status}"
        elif not (out / name / lora.CONFIG_FILE).is_file():
            report.not_evaluated[name] = "adapter files missing"
        elif dom is None:
            report.not_evaluated[name] = f"domain {rec.domain_id} not in the data"
        else:
            chosen.append((name, dom))
    if not chosen:
        raise ConfigError(f"{out}: no finished adapters to evaluate; train some with `mozgach train --out {out}`")
    return chosen


_WHOLE = 1 << 40  # a max_seq_length no record reaches: one sequence per record


def _samples_by_adapter(chosen, tok, n_held: int, sample_tokens: int, splits: tuple[str, ...], report: Report):
    """Per adapter: its domain's first ``n_held`` held-out samples, which of them have
    full length, and its train records (cut at ``FIT_TOKENS``) for the routers' fits."""
    held, full, fit = {}, {}, {}
    for name, dom in chosen:
        try:
            loaded = data.load_domain(dom, tok, _WHOLE, pack=False)
        except DataError as e:
            report.not_evaluated[name] = f"data: {e}"
            continue
        samples, n_full = held_out_samples([s for sp in splits for s in (loaded.get(sp) or [])], tok, sample_tokens)
        held[name] = samples[:n_held]
        full[name] = np.arange(len(held[name])) < n_full
        fit[name] = [w for ids, mask, *_ in (loaded.get("train") or [])
                     for w in data.windows(ids, mask, FIT_TOKENS - 1)]
        if not held[name]:
            report.not_evaluated[name] = "no held-out samples"
    return held, full, fit


def _loss_matrix(bank: AdapterBank, seqs: list, names: list[str], progress: bool | None, report: Report):
    """Summed loss of every sample under the base (column 0) and every adapter, as one
    batched pass with one adapter per row: ``(sums (S, 1 + A), target counts (S, 1))``."""
    pairs = [(t, a) for t in range(len(seqs)) for a in [None, *names]]
    bar = None
    if progress or (progress is None and sys.stderr.isatty()):
        from tqdm.auto import tqdm

        bar = tqdm(total=len(pairs), desc="eval (sample x adapter)", unit="pair", dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        sums, counts = bank.pair_losses(seqs, pairs, on_batch=None if bar is None else
                                        lambda done, total: bar.update(done - bar.n))
    finally:
        if bar is not None:
            bar.close()
    # the pass evaluated every sample under all adapters (+ the base): per routed sample
    # that is what route(method="loss") costs
    report.route_loss_ms_per_sample = 1000 * (time.perf_counter() - t0) * len(names) / (len(names) + 1) / len(seqs)
    return sums.reshape(len(seqs), len(names) + 1), counts.reshape(len(seqs), len(names) + 1)[:, :1]


def _route_by(bank: AdapterBank, method: str, fit: dict[str, list], seqs, owner, routed,
              report: Report) -> np.ndarray:
    """Fit ``method``'s router (signature, tokens or probe) on ``fit`` (train samples per
    adapter) and route every routed sample: its adapter index (-1 for the others). The
    fit time, accuracy and routing time per sample go to ``report.*``."""
    fitter = {"signature": bank.fit_signatures, "tokens": bank.fit_tokens, "probe": bank.fit_probe}[method]
    t0 = time.perf_counter()
    fitter(fit)
    if method != "tokens":
        setattr(report, f"{method}_fit_seconds", time.perf_counter() - t0)
    idx = np.flatnonzero(routed)
    t0 = time.perf_counter()
    scores = bank.route_scores([seqs[i] for i in idx], method=method)
    setattr(report, f"route_{method}_ms_per_sample", 1000 * (time.perf_counter() - t0) / len(idx))
    chosen = np.full(len(seqs), -1)
    chosen[idx] = scores.argmin(1)
    setattr(report, f"route_{method}_accuracy", float(np.mean(chosen[idx] == owner[idx])))
    return chosen


def _domain_losses(sums, counts, owner, in_table, n: int) -> np.ndarray:
    """(domains, 1 + adapters) token-weighted losses of each domain's table samples
    (column 0: the base), domain j being adapter j's."""
    out = np.full((n, sums.shape[1]), np.nan)
    for j in range(n):
        rows = (owner == j) & in_table
        out[j] = sums[rows].sum(0) / max(counts[rows, 0].sum(), 1)
    return out


def _domain_row(j: int, name: str, dom, names, sums, counts, mine, in_table, routed, by_loss,
                by_sig, by_tok=None, by_probe=None) -> DomainResult:
    """Domain ``j``'s row: token-weighted losses over its table samples, routing counts."""
    rows = mine & in_table
    tokens = counts[rows, 0].sum()
    dom_loss = sums[rows].sum(0) / max(tokens, 1)  # (1 + adapters,)
    others = np.delete(dom_loss[1:], j)
    k = int(np.argmin(others)) if len(others) else None
    r = mine & routed
    return DomainResult(
        adapter=name, domain=dom.name, domain_id=dom.id, samples=int(rows.sum()), tokens=int(tokens),
        base_loss=float(dom_loss[0]), own_loss=float(dom_loss[1 + j]),
        best_other_loss=None if k is None else float(others[k]),
        best_other=None if k is None else names[k + (k >= j)],
        route_n=int(r.sum()), route_loss_correct=int((by_loss[r] == j).sum()),
        route_signature_correct=None if by_sig is None else int((by_sig[r] == j).sum()),
        route_tokens_correct=None if by_tok is None else int((by_tok[r] == j).sum()),
        route_probe_correct=None if by_probe is None else int((by_probe[r] == j).sum()))
