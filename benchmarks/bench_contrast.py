"""Cost of a contrastive step (``TrainConfig.contrast``): before and after the rows above the
base stopped paying a backward pass, side by side in one process on the same rows.

Over SmolLM2-135M with a trained wiki11 adapter (default: the technology adapter of the
32-step contrastive fleet, ``bench_wiki11.py fleet --bases smollm2 --long --contrast 1``),
for a few (step, micro-batch) draws of other-topic rows, times

* ``own``: the step's own forward-backward on ``batch_size`` rows of the topic's training text;
* ``every row``: the hinge as it ran until 2026-12-05 -- the base's forward and a
  forward-backward for every other-topic row, the gradient kept for the held ones;
* ``held rows only``: :meth:`mozgach_mlx.contrast.Negatives.penalty` now -- the adapter's and
  the base's forward for every row, a forward-backward for the held ones only;

and checks that both give the same hinge and gradient. A fresh adapter (B = 0, every row
held) is timed too: the first steps' cost, where the new way pays one more forward per row.

    python benchmarks/bench_contrast.py [--adapter DIR] [--draws 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from functools import partial
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_wiki11 as w  # noqa: E402

import mozgach_mlx as mz  # noqa: E402
from mozgach_mlx import contrast, data, fleet, lora, memory, trainer  # noqa: E402
from mozgach_mlx.trainer import TrainConfig  # noqa: E402

RUN = w.RUNS / "smollm2_long_contrast"


def every_row(neg: contrast.Negatives, grad_fn, eval_fn, seg_kwargs, step: int, micro: int):
    """The hinge as before: a forward-backward for every row, kept where held."""
    wgt = float(neg.cfg.contrast)
    batches = neg._batches(neg.rows(step, micro))
    base = neg.base_sums(batches, eval_fn, seg_kwargs)
    hinge, acc, active = 0.0, None, 0
    for (x, y, m, seg), s0 in zip(batches, base, strict=True):
        (s, _), g = grad_fn(x, y, m, **seg_kwargs(seg))
        mx.eval(s, g)
        sa = s.item()
        if sa > s0 + contrast.AT_BASE * abs(s0):
            continue
        active += 1
        hinge += wgt * max(0.0, s0 - sa)
        g = tree_map(lambda t: -wgt * t, g)
        acc = g if acc is None else tree_map(mx.add, acc, g)
    if acc is not None:
        mx.eval(acc)
    return hinge, acc, active


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def max_rel_diff(a, b) -> float:
    if a is None or b is None:
        return 0.0 if a is b else float("inf")
    fa, fb = dict(tree_flatten(a)), dict(tree_flatten(b))
    return max(float(mx.abs(fa[k] - fb[k]).max()) / max(1e-12, float(mx.abs(fb[k]).max())) for k in fb)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", type=Path, default=RUN / "mozgach108_011")
    ap.add_argument("--draws", type=int, default=4, help="(step, micro-batch) draws of other-topic rows")
    args = ap.parse_args()
    spec = json.loads((RUN / "manifest.json").read_text())["config"]["train"]
    doms = sorted(data.discover_domains(w.corpus_dir(RUN)), key=lambda d: d.id)
    me = doms[int(args.adapter.name.rsplit("_", 1)[1]) - 1]
    cfg = TrainConfig(**{**spec, "lora": lora.LoRAConfig(**spec["lora"]), "progress": False})
    cfg = dataclasses.replace(cfg, seed=cfg.seed + me.id)  # as the fleet seeds each adapter
    model, tok = mz.load(w.BASES["smollm2"])
    pools = contrast.other_pools(doms, me, lambda d: fleet._load(d, tok, cfg)["train"] or [])
    own = fleet._load(me, tok, cfg)["train"]
    lora.ensure(model, cfg.lora)
    lora.reset(model, seed=cfg.seed)
    neg = contrast.Negatives(model, pools, cfg)
    neg.capture_base()
    fresh = tree_flatten(model.trainable_parameters())
    lora.load(model, args.adapter)
    trained = tree_flatten(model.trainable_parameters())
    model.train()
    plain = memory.MemoryStrategy(plain=True)  # what the fleet's adapters ran (manifest: memory_strategy)
    grad_fn = trainer._grad_fn(model, trainer.default_loss, cfg, plain, Path("/nonexistent"))
    seg_kwargs = partial(trainer._segment_kwargs, trainer.default_loss)
    x, y, m, seg = next(data.batches(own[: cfg.batch_size], cfg.batch_size, shuffle=False, segments=True))

    def own_fn():
        mx.eval(grad_fn(x, y, m, **seg_kwargs(seg)))

    own_fn()  # warm: compile / first-call costs out of the timings
    rows = []
    for label, weights in (("trained", trained), ("fresh (B = 0)", fresh)):
        model.load_weights(weights, strict=False)
        for k in range(args.draws if label == "trained" else 1):
            step, micro = 100 + k, 0
            _, t_own = timed(own_fn)
            (h0, g0, a0), t_old = timed(lambda s=step, mi=micro: every_row(neg, grad_fn, trainer._eval_loss,
                                                                            seg_kwargs, s, mi))
            (h1, g1, a1), t_new = timed(lambda s=step, mi=micro: neg.penalty(grad_fn, trainer._eval_loss, seg_kwargs,
                                                                            s, mi))
            rows.append({"adapter": label, "step": step, "held": a1, "rows": cfg.batch_size, "own_s": t_own,
                         "every_row_s": t_old, "held_only_s": t_new, "held_before": a0,
                         "hinge_diff": abs(h1 - h0), "grad_max_rel_diff": max_rel_diff(g1, g0)})
            r = rows[-1]
            print(f"| {label} | {step} | {a1}/{cfg.batch_size} | {t_own:.1f} | {t_old:.1f} | {t_new:.1f} | "
                  f"{(t_own + t_old) / (t_own + t_new):.2f}x | {r['grad_max_rel_diff']:.1e} |", flush=True)
    out = {"machine": w.machine(), "adapter": str(args.adapter), "rows": rows,
           "step_ratio_trained": float(np.mean([(r["own_s"] + r["every_row_s"]) / (r["own_s"] + r["held_only_s"])
                                               for r in rows if r["adapter"] == "trained"]))}
    (w.HERE / "results_contrast_step.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote benchmarks/results_contrast_step.json; step time (own + hinge) before/after, trained adapter: "
          f"{out['step_ratio_trained']:.2f}x")


if __name__ == "__main__":
    print("| adapter | draw | held rows | own fwd-bwd s | hinge, every row s | hinge, held rows only s | "
          "step before/after | grad max rel diff |\n|---|---|---|---|---|---|---|---|")
    main()
