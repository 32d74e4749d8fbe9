"""Evaluate a fleet run: every adapter on every domain's held-out data, and routing.

``mozgach eval --out OUT`` loads the run's base once, builds one :class:`AdapterBank`
over all finished adapters and, per domain, scores held-out samples (the first
``sample_tokens`` tokens of each valid record) under the base and under every adapter.
That one (samples x adapters) loss matrix gives:

* per domain: the base's loss, its own adapter's loss, the best *other* adapter's loss
  (and which), and whether its own adapter is the lowest (token-weighted means over the
  domain's samples);
* routing by loss: a sample is routed to the adapter with the lowest loss on it;
* routing by signature: nearest centroid of the base's mean final hidden state, the
  centroids fitted on a few *train* samples per domain (:meth:`AdapterBank.fit_signatures`);
* routing by tokens: multinomial naive Bayes over the sample's tokens, fitted on the
  token counts of every train window of each domain (:meth:`AdapterBank.fit_tokens`);
* routing by linear probe: softmax regression on the base's mean final hidden state,
  fitted on up to ``PROBE_SAMPLES`` train windows per domain (:meth:`AdapterBank.fit_probe`).

Cost: N adapters x D domains x S samples x T tokens forward tokens, run as batches with
one adapter per row (the base matmuls once per layer for all rows). The defaults (S=2,
T=64) keep 108 x 108 at about 1.5M tokens: about 6.5 CPU-minutes with the tiny 4-bit
model (a few minutes on 2 idle cores).
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

DEFAULT_ROUTE_SAMPLES = 2
SAMPLE_TOKENS = 64
SIGNATURE_SAMPLES = 8
PROBE_SAMPLES = 64  # train windows per domain the linear probe is fitted on
REPORT_FILE = "eval.json"


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

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for row, r in zip(d["rows"], self.rows, strict=True):
            row.update(own_best=r.own_best, beats_base=r.beats_base)
        d["all_own_best"] = self.all_own_best
        return d

    def table(self) -> str:
        head = (f"| {'adapter':<15} | {'domain':<22} | {'n':>3} | {'base':>6} | {'own':>6} | "
                f"{'best other':>10} | {'which':<15} | {'own best':>8} | {'route loss':>10} | {'route sig':>9} |")
        lines = [head, "|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|"]
        for r in self.rows:
            sig = "-" if r.route_signature_correct is None else f"{r.route_signature_correct}/{r.route_n}"
            lines.append(
                f"| {r.adapter:<15} | {r.domain[:22]:<22} | {r.samples:>3} | {_f(r.base_loss)} | "
                f"{_f(r.own_loss)} | {_f(r.best_other_loss, 10)} | {str(r.best_other or '-'):<15} | "
                f"{('yes' if r.own_best else 'NO'):>8} | {f'{r.route_loss_correct}/{r.route_n}':>10} | {sig:>9} |")
        n = len(self.rows)
        lines.append("")
        lines.append(f"own adapter lowest on its held-out data: {sum(r.own_best for r in self.rows)}/{n} domains; "
                     f"beats the base: {sum(r.beats_base for r in self.rows)}/{n}")
        n_route = sum(r.route_n for r in self.rows)
        routers = [f"by loss {_pct(self.route_loss_accuracy)} ({self.route_loss_ms_per_sample:.1f} ms/sample, "
                   "all adapters batched)"]
        for m, label, digits in (("signature", "signature", 1), ("tokens", "tokens (naive Bayes)", 2),
                                 ("probe", "linear probe", 1)):
            acc, fit = getattr(self, f"route_{m}_accuracy"), getattr(self, f"{m}_fit_seconds", None)
            if acc is not None:
                routers.append(f"by {label} {_pct(acc)} ({getattr(self, f'route_{m}_ms_per_sample'):.{digits}f} "
                               f"ms/sample" + ("" if fit is None else f", fit {fit:.1f} s") + ")")
        lines.append(f"routing top-1 accuracy over {n_route} held-out samples (<= {self.sample_tokens} tokens, "
                     f"{self.n_adapters} adapters): " + "; ".join(routers))
        if self.not_evaluated:
            items = ", ".join(f"{k} ({v})" for k, v in list(self.not_evaluated.items())[:8])
            more = "" if len(self.not_evaluated) <= 8 else f" and {len(self.not_evaluated) - 8} more"
            lines.append(f"not evaluated: {items}{more}")
        lines.append(f"evaluated {self.n_adapters} adapters x {n} domains in {self.seconds:.1f} s")
        return "\n".join(lines)


def _f(x: float | None, width: int = 6) -> str:
    return f"{'-':>{width}}" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:>{width}.3f}"


def _pct(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{100 * x:.1f}%"


def _samples(split, n: int | None, bos: int | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """The first ``n`` documents' opening windows of a split loaded with windows of
    ``sample_tokens`` (windows that start with BOS; every window without a BOS token)."""
    out = []
    for ids, mask, *_ in (split or []):
        if (bos is None or ids[0] == bos) and len(ids) >= 2 and mask[1:].any():
            out.append((ids, mask))
        if n is not None and len(out) >= n:
            break
    return out


def evaluate_run(out_dir: str | Path, max_batches: int | None = None, route_samples: int | None = None, *,
                 sample_tokens: int = SAMPLE_TOKENS, signature_samples: int = SIGNATURE_SAMPLES,
                 write: bool = True, progress: bool | None = None) -> Report:
    """Evaluate every finished adapter of the run in ``out_dir`` on every domain.

    Args:
        out_dir: a run directory made by ``mozgach train`` or ``mz.train_fleet`` (``manifest.json``).
        max_batches: held-out samples for the loss table = ``max_batches * batch_size``
            (the run's batch size) per domain; default: the routing samples.
        route_samples: held-out samples per domain that are routed (default 2; 0 = no
            routing).
        sample_tokens: each held-out sample is cut to this many tokens.
        signature_samples: train samples per domain to fit the signature centroids
            (0 = skip signature routing).
        write: also write the report to ``OUT/eval.json`` (atomically).
        progress: show a progress bar (default: when stderr is a terminal).

    Raises:
        ConfigError: no manifest / no finished adapters; AdapterError: unreadable adapters.
    """
    t_start = time.perf_counter()
    out = Path(out_dir)
    manifest = read_manifest(out)
    n_route = DEFAULT_ROUTE_SAMPLES if route_samples is None else int(route_samples)
    n_table = (n_route or DEFAULT_ROUTE_SAMPLES) if max_batches is None else int(max_batches) * int(
        manifest.train.get("batch_size") or 1)
    if n_route < 0 or n_table < 1 or sample_tokens < 2:
        raise ConfigError(f"eval needs route_samples >= 0, max_batches >= 1 and sample_tokens >= 2 (got "
                          f"{route_samples}, {max_batches}, {sample_tokens})")
    report = Report(out_dir=str(out), sample_tokens=sample_tokens)
    chosen = _finished_adapters(manifest, out, report)
    model, tok = load_run_base(manifest)
    held, fit, tok_fit = _samples_by_adapter(chosen, tok, max(n_table, n_route), signature_samples,
                                             sample_tokens, report)
    chosen = [(n, d) for n, d in chosen if held.get(n)]
    if not chosen:
        raise ConfigError(f"{out}: no adapter has held-out (valid) data to evaluate on")

    names = [n for n, _ in chosen]
    seqs = [s for n in names for s in held[n]]
    owner = np.array([i for i, n in enumerate(names) for _ in held[n]])  # adapter index of each sample
    pos = np.concatenate([np.arange(len(held[n])) for n in names])  # its index within its domain
    routed = pos < n_route
    with AdapterBank(model, tok, [out / n for n in names], names=names) as bank:
        report.n_adapters = len(bank)
        sums, counts = _loss_matrix(bank, seqs, names, progress, report)
        per_sample = sums[:, 1:] / np.maximum(counts, 1)  # (samples, adapters)
        by_loss = per_sample.argmin(1)
        if routed.any():
            report.route_loss_accuracy = float(np.mean(by_loss[routed] == owner[routed]))
        by_sig = by_tok = by_probe = None
        if signature_samples and all(fit[n] for n in names) and routed.any():
            by_sig = _route_by(bank, "signature", {n: fit[n] for n in names}, seqs, owner, routed, report)
        if all(tok_fit.get(n) for n in names) and routed.any():
            by_tok = _route_by(bank, "tokens", {n: tok_fit[n] for n in names}, seqs, owner, routed, report)
            by_probe = _route_by(bank, "probe", {n: tok_fit[n][:PROBE_SAMPLES] for n in names}, seqs, owner,
                                 routed, report)

    for j, (name, dom) in enumerate(chosen):
        report.rows.append(_domain_row(j, name, dom, names, sums, counts, owner == j, pos < n_table, routed,
                                       by_loss, by_sig, by_tok, by_probe))
    report.adapters = names
    report.loss_matrix = _domain_losses(sums, counts, owner, pos < n_table, len(names))[:, 1:].tolist()
    report.routes = [{"adapter": names[owner[i]], "by_loss": names[by_loss[i]],
                      "by_signature": None if by_sig is None else names[by_sig[i]],
                      "by_tokens": None if by_tok is None else names[by_tok[i]],
                      "by_probe": None if by_probe is None else names[by_probe[i]]} for i in np.flatnonzero(routed)]
    report.rows.sort(key=lambda x: x.domain_id)
    report.seconds = time.perf_counter() - t_start
    if write:
        atomic_write_json(out / REPORT_FILE, report.to_dict())
    return report


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


def _samples_by_adapter(chosen, tok, n_held: int, n_fit: int, sample_tokens: int, report: Report):
    """Per adapter: held-out samples of its domain, train samples for its signature and
    every train window for its token statistics."""
    held, fit, tok_fit = {}, {}, {}
    bos = tok.bos_token_id if bos_ids(tok) else None  # windows of documents start with BOS only then
    for name, dom in chosen:
        try:
            # one document per sequence, cut into windows of sample_tokens: the opening
            # window of each document is one sample
            splits = data.load_domain(dom, tok, sample_tokens - 1, pack=False)
        except DataError as e:
            report.not_evaluated[name] = f"data: {e}"
            continue
        held[name] = _samples(splits.get("valid"), n_held, bos)
        fit[name] = _samples(splits.get("train"), n_fit, bos) if n_fit else []
        tok_fit[name] = _samples(splits.get("train"), None, None)
        if not held[name]:
            report.not_evaluated[name] = "no held-out samples"
    return held, fit, tok_fit


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
