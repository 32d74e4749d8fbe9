"""A shared "genre" adapter first, then plain topic adapters over it (issue 28, an
alternative to ``--contrast``): does absorbing what every topic shares into the base make
plain, cheap topic adapters route by loss?

Why: trained on one topic each, plain adapters over SmolLM2 all learn mostly the genre
(Wikipedia lead sections), so the loss router's argmin compares genre noise (RESULTS.md
"Contrastive adapters"). Domain-adaptive pretraining on the union of the domains first
(Gururangan et al. 2020, "Don't Stop Pretraining", ACL) takes the shared part out: here one
LoRA adapter G is trained on all 11 topics' training text (shuffled together), fused into
the base (``lora.fuse``, dequantized), and the first ``--topics`` topics' adapters are trained
over base + G with the wiki11 preset's plain schedule (``--steps``; ``--half``: also scored at
half the steps). They
are scored as ``bench_wiki11.py snapshots`` scores (the first 4 held-out 256-token samples per
topic, routed among the trained topics' adapters over base + G).

    python benchmarks/bench_wiki11_genre.py --genre-steps 32 --steps 16 --topics 5 --half

Run dir ``$WIKI11_RUNS/genre``; results ``benchmarks/results_wiki11_genre_G{g}_{s}_t{topics}.json``.
Needs the corpus that ``bench_wiki11.py fleet`` built (any of its SmolLM2 run dirs).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

import numpy as np
from bench_wiki11 import HERE, ROUTE_SAMPLES, RUNS, ci, corpus_dir, topic_samples

import mozgach_mlx as mz
from mozgach_mlx import data
from mozgach_mlx.bank import AdapterBank
from mozgach_mlx.rundir import WIKI_RUN_LORA, WIKI_RUN_TRAIN

OUT = RUNS / "genre"


def config(steps: int) -> mz.TrainConfig:
    """The wiki11 preset with ``steps`` steps (no checkpoints: each run is short)."""
    train = {**WIKI_RUN_TRAIN, "max_steps": steps, "save_every": 0}
    return mz.TrainConfig(**train, progress=False, lora=mz.LoRAConfig(**WIKI_RUN_LORA))


def genre_domain(doms: list) -> data.Domain:
    """All topics' train (and valid) records, shuffled together (seed 0), as one domain."""
    gdir = OUT / "genre_data"
    gdir.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid"):
        lines = [ln for d in doms for ln in getattr(d, split).read_text().splitlines() if ln.strip()]
        random.Random(0).shuffle(lines)
        (gdir / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return data.discover_domains(gdir)[0]


def train(model, tok, doms: list, args) -> dict:
    """G (or its saved weights), fused; then each topic's plain adapter over base + G."""
    seconds = {}
    g_dir = OUT / f"G{args.genre_steps}"
    t0 = time.perf_counter()
    if (g_dir / mz.lora.CONFIG_FILE).is_file():
        mz.lora.load(model, g_dir)
    else:
        mz.train_adapter(model, tok, genre_domain(doms), config(args.genre_steps), g_dir)
        seconds["genre"] = time.perf_counter() - t0
    mz.lora.fuse(model, dequantize=True)
    half = args.steps // 2
    for d in doms[:args.topics]:
        name = f"G{args.genre_steps}_{d.name}_{args.steps}"
        if (OUT / name / mz.lora.CONFIG_FILE).is_file():
            continue
        t0 = time.perf_counter()

        def snap(rec, d=d):
            if rec["step"] == half:
                mz.lora.save(model, OUT / f"G{args.genre_steps}_{d.name}_{half}", format="peft")
        mz.train_adapter(model, tok, d, config(args.steps), OUT / name, callback=snap)
        seconds[d.name] = time.perf_counter() - t0
        print(f"{d.name}: {args.steps} steps over base + G in {seconds[d.name]:.0f} s", flush=True)
    return seconds


def score(model, tok, doms: list, args) -> dict:
    topics = doms[:args.topics]
    samples = [s for d in topics for s in topic_samples(tok, d, ROUTE_SAMPLES)]
    owner = np.repeat(np.arange(len(topics)), ROUTE_SAMPLES)
    out = {}
    for steps in ((args.steps // 2,) if args.half else ()) + (args.steps,):
        names = [f"G{args.genre_steps}_{d.name}_{steps}" for d in topics]
        with AdapterBank(model, tok, [OUT / n for n in names], names=names) as bank:
            cols = [None, *names]
            sums, counts = bank.pair_losses(samples, [(i, c) for i in range(len(samples)) for c in cols])
        loss = (sums / counts).reshape(len(samples), len(cols))  # nats/token; column 0: base + G
        per = loss[:, 1:]
        routed = int((per.argmin(1) == owner).sum())
        gain = loss[:, :1] - per
        own = gain[np.arange(len(samples)), owner]
        others = (gain.sum(1) - own) / (len(topics) - 1)
        out[str(steps)] = {"routed_by_loss": routed, "samples": len(samples), "own_gain": float(own.mean()),
                           "other_gain": float(others.mean()), "loss": loss.tolist(),
                           "per_topic_routed": {d.name: int((per.argmin(1)[owner == j] == j).sum())
                                                for j, d in enumerate(topics)}}
        print(f"| G{args.genre_steps} + {steps} plain steps | {ci(routed, len(samples))} | {own.mean():+.4f} | "
              f"{others.mean():+.4f} |", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--genre-steps", type=int, default=32, help="steps of the shared adapter G")
    ap.add_argument("--steps", type=int, default=16, help="plain steps of each topic adapter over base + G")
    ap.add_argument("--topics", type=int, default=5, help="train and route the first N topics")
    ap.add_argument("--half", action="store_true", help="also score the snapshots at half the steps")
    ap.add_argument("--run", default="smollm2_contrast16", help="a bench_wiki11 run dir holding the corpus")
    args = ap.parse_args()
    doms = sorted(data.discover_domains(corpus_dir(RUNS / args.run)), key=lambda d: d.id)
    model, tok = mz.load("smollm2-135m")
    seconds = train(model, tok, doms, args)
    print("| schedule | routed by loss | own gain vs base + G (nats/token) | other adapters' gain |\n|---|---|---|---|")
    res = {"args": vars(args), "seconds": seconds, "by_step": score(model, tok, doms, args)}
    path = HERE / f"results_wiki11_genre_G{args.genre_steps}_{args.steps}_t{args.topics}.json"
    path.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
