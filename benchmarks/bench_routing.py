"""Routers and top-2 mixing on a trained run over a real-text corpus (issue 14).

For a run directory (``python -m mozgach_mlx.train --out RUN ...``) and its data
directory (one sub-folder per domain with train/valid/test.jsonl):

* **routing samples** of ``L`` tokens (``--lengths``, default 256 and 1024): each
  domain's valid + test records are tokenized, concatenated and cut into windows of
  ``L`` tokens; each window (after BOS) is one sample. Every router's top-1 accuracy and
  wall time per sample: ``loss`` (all adapters scored), ``signature`` (centroids of the
  base's mean hidden state, fitted on ``--fit-records`` train records per domain),
  ``probe`` (softmax regression on the base's mean hidden state, fitted on the train split),
  ``tokens`` (naive Bayes on the train split's token counts), and what ``auto`` picks
  after ``bank.measure_routers`` on the valid split's records.
* **mixing**: on the ``L``-token samples of each domain and on samples whose first half
  comes from one domain and second half from another, the mean token loss under the
  router's top-1 adapter, under the top-2 mix weighted by the router's posterior
  ``softmax(-T * score)`` (T = the sample's tokens: the sequence log-likelihood for
  ``loss`` and ``tokens``), and under the equal top-2 mix.

    python benchmarks/bench_routing.py --run RUN --data DATA [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import mozgach_mlx as mz
from mozgach_mlx.bank import AdapterBank


def read_jsonl(path: Path) -> list[str]:
    if not path.is_file():
        return []
    return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]


def windows(tok, texts: list[str], length: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """BOS + consecutive ``length``-token windows of the texts joined as training packs
    them (each text: BOS, its tokens, EOS; the first BOS is the window's), with every
    token but a BOS a target."""
    ids = [i for t in texts for i in [tok.bos_token_id, *tok.encode(t, add_bos=False), tok.eos_token_id]][1:]
    out = []
    for s in range(0, len(ids) - length + 1, length):
        seq = np.array([tok.bos_token_id, *ids[s: s + length]], np.int32)
        out.append((seq, (np.arange(len(seq)) > 0) & (seq != tok.bos_token_id)))
    return out


def timed_scores(bank, samples, method):
    t0 = time.perf_counter()
    scores = bank.route_scores(samples, method)
    return scores, 1000 * (time.perf_counter() - t0) / len(samples)


def posterior_top2(scores: np.ndarray, tokens: int, equal: bool) -> list[dict[int, float]]:
    out = []
    for row in scores:
        a, b = np.argsort(row, kind="stable")[:2]
        if equal:
            out.append({int(a): 0.5, int(b): 0.5})
            continue
        z = -tokens * np.array([row[a], row[b]], np.float64)
        w = np.exp(z - z.max())
        w /= w.sum()
        out.append({int(a): float(w[0]), int(b): float(w[1])})
    return out


def mix_losses(bank, samples, scores, tokens: int) -> dict[str, float]:
    names = bank.names
    top1 = [names[int(i)] for i in scores.argmin(1)]
    res = {"top1": bank.loss(samples, adapter=top1)}
    for label, equal in (("top2_posterior", False), ("top2_equal", True)):
        mixes = [{names[i]: w for i, w in m.items()} for m in posterior_top2(scores, tokens, equal)]
        res[label] = bank.loss(samples, adapter=mixes)
    return res


def two_domain_samples(by_domain: dict[str, list], half: int):
    """Sample k of domain d's first half followed by sample k of domain d+1's second half."""
    names = list(by_domain)
    out = []
    for j, n in enumerate(names):
        m = names[(j + 1) % len(names)]
        for (a, _), (b, _) in zip(by_domain[n], by_domain[m], strict=False):
            seq = np.concatenate([a[: half + 1], b[half + 1:]])
            out.append(((seq, np.arange(len(seq)) > 0), n, m))
    return out


def run(args) -> dict:
    manifest = json.loads((args.run / "manifest.json").read_text())
    model_name = manifest["config"]["run"]["model"]
    adapters = {n: r["domain"] for n, r in sorted(manifest["adapters"].items()) if r["status"] == "done"}
    model, tok = mz.load(model_name)
    results: dict = {"run": str(args.run), "data": str(args.data), "model": model_name, "lengths": {}}
    with AdapterBank(model, tok, [args.run / n for n in adapters], names=list(adapters)) as bank:
        train = {n: read_jsonl(args.data / d / "train.jsonl") for n, d in adapters.items()}
        valid = {n: read_jsonl(args.data / d / "valid.jsonl") for n, d in adapters.items()}
        test = {n: read_jsonl(args.data / d / "test.jsonl") for n, d in adapters.items()}
        t0 = time.perf_counter()
        bank.fit_signatures({n: t[: args.fit_records] for n, t in train.items()})
        results["signature_fit_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        bank.fit_tokens(train)
        results["tokens_fit_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        bank.fit_probe(train)
        results["probe_fit_s"] = time.perf_counter() - t0
        results["measured_on_valid_records"] = bank.measure_routers(valid)
        results["auto"] = bank.best_router()
        for length in args.lengths:
            by_domain = {n: windows(tok, valid[n] + test[n], length) for n in adapters}
            samples = [s for n in adapters for s in by_domain[n]]
            owner = np.array([j for j, n in enumerate(adapters) for _ in by_domain[n]])
            row: dict = {"samples": len(samples), "per_domain": {n: len(v) for n, v in by_domain.items()}}
            all_scores = {}
            for method in args.methods:
                scores, ms = timed_scores(bank, samples, method)
                all_scores[method] = scores
                row[method] = {"accuracy": float(np.mean(scores.argmin(1) == owner)), "ms_per_sample": ms}
            row["auto"] = bank.best_router()
            if length <= args.mix_max_length and {"loss", "tokens"} <= set(args.methods):
                row["mix_single_domain"] = {m: mix_losses(bank, samples, all_scores[m], length)
                                            for m in ("loss", "tokens")}
                mixed = two_domain_samples(by_domain, length // 2)
                ms = [s for s, _, _ in mixed]
                mixed_res = {m: mix_losses(bank, ms, bank.route_scores(ms, m), length) for m in ("loss", "tokens")}
                mixed_res["oracle_pair_equal"] = bank.loss(ms, adapter=[{a: 0.5, b: 0.5} for _, a, b in mixed])
                mixed_res["first_domain_only"] = bank.loss(ms, adapter=[a for _, a, _ in mixed])
                row["mix_two_domains"] = mixed_res
            results["lengths"][str(length)] = row
            print(json.dumps({str(length): row}), flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--methods", nargs="+", default=["loss", "signature", "probe", "tokens"],
                    choices=["loss", "signature", "probe", "tokens"], help="routers to measure")
    ap.add_argument("--fit-records", type=int, default=32, help="train records per domain for the signatures")
    ap.add_argument("--mix-max-length", type=int, default=256, help="mixing measured at lengths up to this")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    res = run(args)
    for length, row in res["lengths"].items():
        print(f"\nL={length}: {row['samples']} samples; auto -> {row['auto']}")
        print("| router | top-1 accuracy | ms / sample |\n|---|---|---|")
        for m in args.methods:
            print(f"| {m} | {100 * row[m]['accuracy']:.1f}% | {row[m]['ms_per_sample']:.2f} |")
        for key in ("mix_single_domain", "mix_two_domains"):
            if key in row:
                print(f"{key}: " + json.dumps({k: (round(v, 4) if isinstance(v, float) else
                                                   {kk: round(vv, 4) for kk, vv in v.items()})
                                               for k, v in row[key].items()}))
    if args.json is not None:
        args.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
