# ruff: noqa: I001  (import order matters: mozgach_mlx must load the fast BLAS before mlx.core)
"""Context parallelism: peak memory per rank, step time and bytes sent, 1 process vs N ranks.

    python benchmarks/bench_context_parallel.py [--lengths 16384 32768] [--ranks 2] [--strategy none|tile]

Runs one training step (value and LoRA gradients, fp32, the 2-layer d=64 model of
tests/conftest.small_config with 4-bit weights off) of one sequence at each length:
first in this process (the reference), then with ``mlx.launch -n N --backend ring``
(this script's ``--rank-step`` mode in every rank). ``--strategy none``: per-block
checkpointing (cases ``causal-L-ckpt``); ``tile``: tiled block recompute with tiles of
512 positions in both (``causal-L-tile``; the ranks' ring streams K/V in units of 512
keys). Prints a table and writes benchmarks/results_context_parallel.json (model dims,
L, N, strategy, the ``mz.plan`` arguments of the step, peaks in bytes, bytes sent per
rank, step seconds with the load average); rows of other cases already there are kept.
Tiled rows also measure the tiled step in one process at a rank's length, ceil(L / N)
(``one_process_local``).
"""

import mozgach_mlx as mz  # noqa: F401
import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from cp_worker import case_strategy, cp_case, cp_step_sums  # noqa: E402
from conftest import small_config  # noqa: E402

OUT = ROOT / "benchmarks" / "results_context_parallel.json"


def one_step(name: str, group) -> dict:
    model, cfg, batch = cp_case(name)
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    if group is None and case_strategy(cfg).tile_chunk:  # the tiled step of one process
        from mozgach_mlx import memory

        x, y, m, seg = batch
        mx.eval(memory.value_and_grad(model, case_strategy(cfg), loss_chunk=cfg.loss_chunk)(x, y, m, seg))
        sent = 0
    elif group is None:
        from cp_worker import reference_step

        reference_step(model, cfg, batch)
        sent = 0
    else:
        _, _, _, tr = cp_step_sums(model, cfg, batch, group)
        sent = tr.bytes_sent
    return {"peak_bytes": mx.get_peak_memory(), "step_s": time.perf_counter() - t0, "bytes_sent": sent}


def plan_kwargs(name: str) -> dict:
    """What ``mz.plan`` needs to describe the step of case ``name`` (tests/test_plan_context.py
    checks the plan against the measured peaks with these)."""
    _, cfg, (x, *_) = cp_case(name)
    return {"batch_size": x.shape[0], "quantize": None, "lora_rank": cfg.lora.r,
            "lora_targets": list(cfg.lora.targets), "loss_chunk": cfg.loss_chunk, "compute_bytes": 4,
            "mlp_chunk": None, "context_split": cfg.context_split,
            "strategy": {k: v for k, v in case_strategy(cfg).to_dict().items() if v or k == "checkpoint_every"}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--strategy", choices=("none", "tile"), default="none")
    ap.add_argument("--rank-step", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.rank_step:
        group = mx.distributed.init(strict=True)
        res = one_step(a.rank_step, group)
        Path(os.environ["CP_BENCH_OUT"]).joinpath(f"rank{group.rank()}.json").write_text(json.dumps(res))
        return
    rows = []
    for L in a.lengths:
        name = f"causal-{L}-{'tile' if a.strategy == 'tile' else 'ckpt'}"
        load = os.getloadavg()[0]
        ref = one_step(name, None)
        tmp = Path(f"/tmp/cp_bench_{os.getpid()}_{L}")
        tmp.mkdir(parents=True, exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launch = Path(sys.executable).parent / "mlx.launch"
        env = {**os.environ, "CP_BENCH_OUT": str(tmp), "PYTHONPATH": str(ROOT)}
        subprocess.run([str(launch), "-n", str(a.ranks), "--backend", "ring", "-p", str(port), sys.executable,
                        __file__, "--rank-step", name], check=True, env=env, timeout=3000)
        ranks = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(a.ranks)]
        # the same step in one process at a rank's length: what "per rank = the 1-process terms
        # at ceil(L / N) tokens + the ring" predicts, measured
        local = -(-L // a.ranks)
        extra = {"one_process_local": {"L": local, **one_step(name.replace(str(L), str(local), 1), None)}} \
            if a.strategy == "tile" else {}
        kind = "tiled recompute (tile 512)" if a.strategy == "tile" else "checkpointing (none)"
        rows.append({"L": L, "N": a.ranks, "case": name, "strategy": kind + ", fp32, zigzag",
                     "model": small_config(max_position_embeddings=32768), "plan": plan_kwargs(name),
                     "one_process": ref, "ranks": ranks, **extra,
                     "peak_ratio": max(r["peak_bytes"] for r in ranks) / ref["peak_bytes"],
                     "load_average_1m": load})
    print(f"| {'L':>6} | {'1-proc peak MiB':>15} | {'rank peak MiB':>13} | {'ratio':>5} | {'1-proc s':>8} | "
          f"{'ranks s':>7} | {'sent/rank MiB':>13} | load |")
    for r in rows:
        print(f"| {r['L']:>6} | {r['one_process']['peak_bytes'] / 2**20:>15.1f} | "
              f"{max(x['peak_bytes'] for x in r['ranks']) / 2**20:>13.1f} | {r['peak_ratio']:>5.2f} | "
              f"{r['one_process']['step_s']:>8.1f} | {max(x['step_s'] for x in r['ranks']):>7.1f} | "
              f"{max(x['bytes_sent'] for x in r['ranks']) / 2**20:>13.2f} | {r['load_average_1m']:.1f} |")
    doc = json.loads(OUT.read_text()) if OUT.exists() else {"rows": []}
    old = [{"date": doc.get("date"), "command": doc.get("command"), **r} for r in doc["rows"]]
    cases = {r["case"] for r in rows}
    rows = [r for r in old if r["case"] not in cases] + [{**r, "date": time.strftime("%Y-%m-%d"),
                                                          "command": " ".join(sys.argv)} for r in rows]
    OUT.write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
