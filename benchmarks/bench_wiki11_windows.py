"""Loss routing over more held-out windows (issue 28): a finished wiki11 fleet over SmolLM2
scored on the first ``--per-topic`` full 256-token held-out windows of every topic
instead of the first 4 that ``bench_wiki11.py eval`` and ``snapshots`` afford.

Routing by loss costs (adapters + 1) forward passes per sample (~1.1 s per pass of 256
tokens on the 2-core machine), so 44 samples gave wide intervals (39/44: 76-95%). This
scores more windows of the same held-out text, the same way (``bench_wiki11.topic_samples``:
``mozgach eval``'s windows, in order, per topic balanced), and prints the routing table
with every count it rests on:

    python benchmarks/bench_wiki11_windows.py --run smollm2_long_contrast --per-topic 16
    python benchmarks/bench_wiki11_windows.py --run smollm2 --per-topic 16   # the 8-step preset

Per-sample losses are cached in ``$WIKI11_RUNS/smollm2_windows_eos.json`` (one column per
run/adapter, plus the base), saved after every topic, so an interrupted run resumes and
the base is scored once for all runs. Results: ``benchmarks/results_wiki11_windows.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_wiki11 as w  # noqa: E402

import mozgach_mlx as mz  # noqa: E402
from mozgach_mlx import data  # noqa: E402
from mozgach_mlx.bank import AdapterBank  # noqa: E402
from mozgach_mlx.evaluate import wilson_interval  # noqa: E402
from mozgach_mlx.io import atomic_write_json  # noqa: E402

CACHE = w.RUNS / "smollm2_windows_eos.json"  # samples with the documents' EOS (since 2026-12-05)
RESULTS = w.HERE / "results_wiki11_windows.json"


def load_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def fleet(run: str) -> tuple[Path, list, list[str], list[str]]:
    """A fleet run's directory, its domains (by id), adapter names and topic names."""
    rdir = w.RUNS / run
    doms = sorted(data.discover_domains(w.corpus_dir(rdir)), key=lambda d: d.id)
    return rdir, doms, [mz.fleet.adapter_dir_name(d.id) for d in doms], [d.name for d in doms]


def score(run: str, per_topic: int, cache: dict) -> dict:
    """Scores the windows missing from ``cache`` (updated in place, saved after every topic)."""
    rdir, doms, names, topics = fleet(run)
    manifest = json.loads((rdir / "manifest.json").read_text())["adapters"]
    if any(manifest.get(n, {}).get("status") != "done" for n in names):
        raise SystemExit(f"{rdir}: not every adapter is finished (manifest.json); finish the fleet first")
    rows = cache.setdefault("rows", {})
    model, tok = mz.load(w.BASES["smollm2"])
    t_all = time.perf_counter()
    with AdapterBank(model, tok, [rdir / n for n in names], names=names) as bank:
        for j, d in enumerate(doms):
            samples = w.topic_samples(tok, d, per_topic)
            keys = [f"{topics[j]}/{i}" for i in range(len(samples))]
            pairs = [(i, a) for i, k in enumerate(keys) for a in [None, *names]
                     if ("base" if a is None else f"{run}/{a}") not in rows.get(k, {})]
            if not pairs:
                continue
            t0 = time.perf_counter()
            sums, counts = bank.pair_losses(samples, pairs)
            for (i, a), s, c in zip(pairs, sums, counts, strict=True):
                rows.setdefault(keys[i], {})["base" if a is None else f"{run}/{a}"] = float(s / c)
            cache["seconds"] = cache.get("seconds", 0.0) + time.perf_counter() - t0
            atomic_write_json(CACHE, cache)
            print(f"{topics[j]}: {len(samples)} windows, {len(pairs)} passes in {time.perf_counter() - t0:.0f} s",
                  flush=True)
    print(f"scored in {time.perf_counter() - t_all:.0f} s", flush=True)
    return table(run, names, topics, rows, per_topic)


def table(run: str, names: list[str], topics: list[str], rows: dict, per_topic: int) -> dict:
    keys = [(j, k) for j, t in enumerate(topics) for i in range(per_topic) if (k := f"{t}/{i}") in rows]
    owner = np.array([j for j, _ in keys])
    base = np.array([rows[k]["base"] for _, k in keys])
    per = np.array([[rows[k][f"{run}/{n}"] for n in names] for _, k in keys])
    routed = per.argmin(1) == owner
    own = per[np.arange(len(keys)), owner]
    res = {"run": run, "per_topic": per_topic, "samples": len(keys), "routed_by_loss": int(routed.sum()),
           "interval": list(wilson_interval(int(routed.sum()), len(keys))), "topics": {}}
    print(f"\n{run}: loss routing among {len(names)} adapters, the first {per_topic} full held-out windows per topic")
    print("| topic | windows | routed by loss | base | own | gain | own lowest (mean) | own below base |")
    print("|---|---|---|---|---|---|---|---|")
    for j, t in enumerate(topics):
        m = owner == j
        mean = per[m].mean(0)
        r = {"windows": int(m.sum()), "routed": int(routed[m].sum()), "base": float(base[m].mean()),
             "own": float(own[m].mean()), "own_lowest": bool(mean.argmin() == j),
             "own_below_base": int((own[m] < base[m]).sum())}
        res["topics"][t] = r
        print(f"| {t} | {r['windows']} | {r['routed']}/{r['windows']} | {r['base']:.3f} | {r['own']:.3f} | "
              f"{100 * (1 - r['own'] / r['base']):.1f}% | {'yes' if r['own_lowest'] else 'NO'} | "
              f"{r['own_below_base']}/{r['windows']} |")
    first4 = np.array([int(k.rsplit("/", 1)[1]) < 4 for _, k in keys])
    rest = ~first4
    res["first4"] = int(routed[first4].sum()), int(first4.sum())
    res["rest"] = int(routed[rest].sum()), int(rest.sum())
    res["own_lowest"] = sum(r["own_lowest"] for r in res["topics"].values())
    print(f"all: {w.ci(int(routed.sum()), len(keys))}; the first 4 per topic {w.ci(*res['first4'])}; "
          f"the others {w.ci(*res['rest']) if rest.any() else '-'}; own lowest {res['own_lowest']}/{len(topics)}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="fleet run dir under $WIKI11_RUNS, e.g. smollm2_long_contrast")
    ap.add_argument("--per-topic", type=int, default=16, help="first N full held-out windows per topic")
    ap.add_argument("--table-only", action="store_true", help="print the table from the cache, score nothing")
    args = ap.parse_args()
    cache = load_json(CACHE)
    if args.table_only:
        _, _, names, topics = fleet(args.run)
        res = table(args.run, names, topics, cache.get("rows", {}), args.per_topic)
    else:
        res = score(args.run, args.per_topic, cache)
    out = load_json(RESULTS)
    out[f"{args.run}/{args.per_topic}"] = {**res, "machine": w.machine(), "cache_seconds": cache.get("seconds")}
    atomic_write_json(RESULTS, out)

if __name__ == "__main__":
    main()
