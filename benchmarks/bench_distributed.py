"""mx.distributed on one machine: 1 process vs 2 ranks (mlx.launch, ring over 127.0.0.1), side by side.

    python benchmarks/bench_distributed.py                  # both parts, 8 built-in domains
    python benchmarks/bench_distributed.py --part fleet --n-domains 16
    python benchmarks/bench_distributed.py --part data

``data``:  one adapter trained in 1 process and data-parallel on 2 ranks with the same
           global batch (grad_accumulation 4 = 2 micro-batches per rank per step,
           dropout 0.1): the step losses side by side and their largest relative
           difference.
``fleet``: the built-in default run (tiny model, its schedule preset) on the first N
           domains: ``mozgach train`` in 1 process, then ``mlx.launch -n 2 --backend
           ring mozgach train --distributed adapters``; wall-clock of each, the speed-up,
           whether every adapter file has the same sha256 in both runs, and the load
           average before and after each run (the machine may be shared: read the
           speed-up with it).

Each run is a fresh subprocess; nothing is cached between them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LAUNCH = Path(sys.executable).parent / "mlx.launch"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(n: int, *args: str) -> list[str]:
    return [str(LAUNCH), "-n", str(n), "--backend", "ring", "-p", str(_port()), sys.executable, *args]


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)  # every finished descendant (the ranks too)
    return r.ru_utime + r.ru_stime


def _timed(cmd: list[str]) -> tuple[float, tuple, tuple, float]:
    """(wall s, load average before, after, CPU s of the run's processes)."""
    before, cpu0 = os.getloadavg(), _cpu()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or "exited with code" in proc.stderr:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return wall, before, os.getloadavg(), _cpu() - cpu0


def _hashes(out: Path) -> dict[str, str]:
    return {f"{d.name}/{f.name}": hashlib.sha256(f.read_bytes()).hexdigest() for d in sorted(out.glob("mozgach108_*"))
            for f in sorted(d.iterdir()) if f.suffix in (".safetensors", ".json") and f.name != "result.json"}


def fleet(n_domains: int, tmp: Path, own_sessions: bool = False) -> None:
    common = ["-m", "mozgach_mlx.train", "--n-domains", str(n_domains), "--quiet"]
    # Linux's autogroup scheduler shares the CPU per session: with --own-sessions the
    # 1-process run and each rank get a session (setsid) of their own
    pre = ["setsid", "--wait"] if own_sessions else []
    one, l1a, l1b, c1 = _timed([*pre, sys.executable, *common, "--out", str(tmp / "one")])
    launch = _launch(2, *common, "--distributed", "adapters", "--out", str(tmp / "two"))
    if own_sessions:
        i = launch.index(sys.executable)
        launch[i:i] = ["setsid"]
    two, l2a, l2b, c2 = _timed(launch)
    h1, h2 = _hashes(tmp / "one"), _hashes(tmp / "two")
    same = h1 == h2 and len(h1) == 3 * n_domains
    avg = lambda la: " / ".join(f"{x:.1f}" for x in la)  # noqa: E731
    print(f"fleet: built-in default run, {n_domains} domains, {os.cpu_count()} cores, {platform.platform()}"
          f"{', each process in its own session' if own_sessions else ''}")
    print("| run | wall s | CPU s (user+sys, all processes) | load avg before (1/5/15 min) | after |")
    print("|---|---:|---:|---|---|")
    print(f"| 1 process | {one:.1f} | {c1:.1f} | {avg(l1a)} | {avg(l1b)} |")
    print(f"| 2 ranks (adapters) | {two:.1f} | {c2:.1f} | {avg(l2a)} | {avg(l2b)} |")
    print(f"speed-up {one / two:.2f}x; adapter files identical (sha256, {len(h1)} files): {same}")


def _data_worker(out: Path) -> None:
    import mozgach_mlx as mz

    group = mz.distributed.init("data") if os.environ.get("MLX_RANK") else None
    model, tok, splits, cfg = _data_case(out)
    res = mz.train_adapter(model, tok, splits, cfg, out / f"adapter-{mz.distributed.size(group)}", group=group)
    if mz.distributed.is_main(group):
        (out / f"losses-{mz.distributed.size(group)}.json").write_text(json.dumps(res.losses))


def _data_case(out: Path):
    import mozgach_mlx as mz

    mz.synthetic.write_corpus(out / "data", n_domains=1, n_train=64, n_valid=8)
    model, tok = mz.load("tiny")
    dom = mz.data.discover_domains(out / "data")[0]
    cfg = mz.TrainConfig(learning_rate=2e-3, warmup_steps=2, max_steps=12, grad_accumulation=4, batch_size=2,
                         max_seq_length=128, eval_every=0, save_every=4, grad_checkpoint=False, progress=False,
                         lora=mz.LoRAConfig(r=8, alpha=16, dropout=0.1))
    return model, tok, mz.data.load_domain(dom, tok, max_seq_length=cfg.max_seq_length), cfg


def data(tmp: Path) -> None:
    me = [str(Path(__file__).resolve()), "--worker", str(tmp)]
    one, *_ = _timed([sys.executable, *me])
    two, *_ = _timed(_launch(2, *me))
    l1 = json.loads((tmp / "losses-1.json").read_text())
    l2 = json.loads((tmp / "losses-2.json").read_text())
    print("data-parallel: tiny model, global batch 4 x 2 sequences x 128 tokens, dropout 0.1, 12 steps")
    print("| step | 1 process | 2 ranks | rel. diff |")
    print("|---:|---:|---:|---:|")
    for i, (a, b) in enumerate(zip(l1, l2, strict=True), 1):
        print(f"| {i} | {a:.6f} | {b:.6f} | {abs(a - b) / abs(a):.1e} |")
    worst = max(abs(a - b) / abs(a) for a, b in zip(l1, l2, strict=True))
    print(f"largest relative difference {worst:.1e}; wall (incl. start-up) 1 process {one:.1f} s, 2 ranks {two:.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["data", "fleet", "both"], default="both")
    ap.add_argument("--n-domains", type=int, default=8)
    ap.add_argument("--blas-threads", type=int, default=None,
                    help="OPENBLAS_NUM_THREADS for every process (default: OpenBLAS's own, one per core)")
    ap.add_argument("--own-sessions", action="store_true",
                    help="run the 1-process run and each rank in a session of its own (setsid; see fleet())")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.blas_threads:
        os.environ["OPENBLAS_NUM_THREADS"] = str(args.blas_threads)
    if args.worker:
        return _data_worker(Path(args.worker))
    tmp = Path(tempfile.mkdtemp(prefix="bench_dist_"))
    try:
        print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, python {platform.python_version()}, "
              f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}")
        if args.part in ("data", "both"):
            data(tmp)
        if args.part in ("fleet", "both"):
            fleet(args.n_domains, tmp, args.own_sessions)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
