"""mx.distributed on one machine: 1 process vs 2 ranks (ring over 127.0.0.1), side by side.

    python benchmarks/bench_distributed.py                  # all parts, 8 built-in domains
    python benchmarks/bench_distributed.py --part fleet --n-domains 8
    python benchmarks/bench_distributed.py --part launcher
    python benchmarks/bench_distributed.py --part data

``data``:  one adapter trained in 1 process and data-parallel on 2 ranks with the same
           global batch (grad_accumulation 4 = 2 micro-batches per rank per step,
           dropout 0.1): the step losses side by side and their largest relative
           difference.
``fleet``: the built-in default run (tiny-stdlib on stdlib12, its schedule preset) on
           domains 1..N: ``mozgach train`` in 1 process (default BLAS threads, and
           ``MOZGACH_BLAS_THREADS=1``), then ``mozgach train --distributed adapters``
           on 2 ranks started by ``mlx.launch -n 2 --backend ring`` and by ``mozgach
           launch -n 2``, each rank with ``MOZGACH_BLAS_THREADS=1``; wall-clock of
           each, its ratio to the 1-process default-threads run, the CPU seconds of the
           launcher (sampled from /proc) and of all processes, whether every adapter
           file has the same sha256 as the 1-process run's, and the load average before
           and after each run (the machine may be shared: read the times with it).
``launcher``: the launchers alone: 2 ranks that sleep 10 s, the launcher's CPU seconds
           (``mlx.launch`` vs ``mozgach launch``).

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


def _ours(n: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "mozgach_mlx.launch", "-n", str(n), "--", sys.executable, *args]


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)  # every finished descendant (the ranks too)
    return r.ru_utime + r.ru_stime


def _proc_cpu(pid: int) -> float | None:
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def _timed(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd``: wall s, load average before and after, CPU s of all its processes and
    of the top process alone (the launcher; sampled from /proc every 0.5 s until it exits)."""
    before, cpu0 = os.getloadavg(), _cpu()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    top = 0.0
    while proc.poll() is None:
        top = _proc_cpu(proc.pid) or top
        time.sleep(0.5)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or "exited with code" in err:
        sys.exit(f"failed: {' '.join(cmd)}\n{err[-3000:]}")
    return {"wall": wall, "before": before, "after": os.getloadavg(), "cpu": _cpu() - cpu0, "top": top}


def _hashes(out: Path) -> dict[str, str]:
    return {f"{d.name}/{f.name}": hashlib.sha256(f.read_bytes()).hexdigest() for d in sorted(out.glob("mozgach108_*"))
            for f in sorted(d.iterdir()) if f.suffix in (".safetensors", ".json") and f.name != "result.json"}


def fleet(n_domains: int, tmp: Path, own_sessions: bool = False, only: list[str] | None = None) -> None:
    common = ["-m", "mozgach_mlx.train", "--domains", f"1-{n_domains}", "--quiet"]
    # Linux's autogroup scheduler shares the CPU per session: with --own-sessions the
    # 1-process run and each rank get a session (setsid) of their own
    pre = ["setsid", "--wait"] if own_sessions else []
    one_thread = {"MOZGACH_BLAS_THREADS": "1"}
    runs = [("1 process, default BLAS threads (auto)", "one", [*pre, sys.executable, *common], {}),
            ("1 process, MOZGACH_BLAS_THREADS=1", "one1", [*pre, sys.executable, *common], one_thread)]
    for label, name, make in (("2 ranks, mlx.launch, 1 BLAS thread each", "mlx", _launch),
                              ("2 ranks, mozgach launch, 1 BLAS thread each", "ours", _ours)):
        cmd = make(2, *common, "--distributed", "adapters")
        if own_sessions:
            i = cmd.index(sys.executable, 1 if make is _ours else 0)
            cmd[i:i] = ["setsid"]
        runs.append((label, name, cmd, one_thread))
    runs = [r for r in runs if only is None or r[1] in only or r[1] == "one"]  # "one" is the reference
    res = {}
    for _, name, cmd, env in runs:
        res[name] = _timed([*cmd, "--out", str(tmp / name)], env)
    ref = _hashes(tmp / "one")
    avg = lambda la: " / ".join(f"{x:.2f}" for x in la)  # noqa: E731
    print(f"fleet: built-in default run (tiny-stdlib, stdlib12), domains 1-{n_domains}, {os.cpu_count()} cores, "
          f"{platform.platform()}{', each process in its own session' if own_sessions else ''}")
    print("| run | wall s | vs 1 process (auto) | CPU s, launcher | CPU s, all processes | same sha256 | "
          "load avg before (1/5/15 min) | after |")
    print("|---|---:|---:|---:|---:|---|---|---|")
    for label, name, _, _ in runs:
        r = res[name]
        launcher = f"{r['top']:.1f}" if name in ("mlx", "ours") else "-"
        same = _hashes(tmp / name) == ref and len(ref) == 3 * n_domains
        print(f"| {label} | {r['wall']:.1f} | {r['wall'] / res['one']['wall']:.2f}x | {launcher} | {r['cpu']:.1f} | "
              f"{'yes' if same else 'NO'} | {avg(r['before'])} | {avg(r['after'])} |")


def launcher(seconds: float = 10) -> None:
    """The launchers' own CPU while 2 ranks sleep."""
    sleep = ["-c", f"import time; time.sleep({seconds})"]
    print(f"launchers alone: 2 ranks that sleep {seconds:g} s")
    print("| launcher | wall s | launcher CPU s | % of a core |")
    print("|---|---:|---:|---:|")
    for label, cmd in (("mlx.launch -n 2 --backend ring", _launch(2, *sleep)),
                       ("mozgach launch -n 2", _ours(2, *sleep))):
        r = _timed(cmd)
        print(f"| {label} | {r['wall']:.1f} | {r['top']:.2f} | {100 * r['top'] / r['wall']:.0f}% |")


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
    one = _timed([sys.executable, *me])["wall"]
    two = _timed(_launch(2, *me))["wall"]
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
    ap.add_argument("--part", choices=["data", "fleet", "launcher", "all"], default="all")
    ap.add_argument("--n-domains", type=int, default=8)
    ap.add_argument("--runs", default=None, help="fleet runs to time, e.g. one,ours (default: one,one1,mlx,ours)")
    ap.add_argument("--own-sessions", action="store_true",
                    help="run the 1-process run and each rank in a session of its own (setsid; see fleet())")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return _data_worker(Path(args.worker))
    tmp = Path(tempfile.mkdtemp(prefix="bench_dist_"))
    try:
        print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, python {platform.python_version()}, "
              f"MOZGACH_BLAS_THREADS={os.environ.get('MOZGACH_BLAS_THREADS', 'unset')} (fleet: set per run)")
        if args.part in ("launcher", "all"):
            launcher()
        if args.part in ("data", "all"):
            data(tmp)
        if args.part in ("fleet", "all"):
            fleet(args.n_domains, tmp, args.own_sessions, None if args.runs is None else args.runs.split(","))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
