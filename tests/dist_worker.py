# ruff: noqa: I001  (import order matters: mozgach_mlx must load the fast BLAS before mlx.core)
"""One rank of the 2-process tests in tests/test_distributed.py (started by mlx.launch
or ``mozgach launch``).

    python tests/dist_worker.py data OUT [--kill-rank R --kill-after N] [--checks]
    python tests/dist_worker.py fleet OUT --data DIR [--separate-disks] [--fail-rank R --fail-after N]

``data``: data-parallel training of one adapter (:func:`data_parallel_case`) into OUT;
each rank writes ``OUT/rank{r}.json`` (its TrainResult) for the test to compare. With
``--checks`` it first runs the refusals that must be agreed by both ranks (config
mismatch, sizes that do not divide, the run-directory lock) and records them in
``OUT/checks{r}.json``. ``--kill-rank R --kill-after N``: rank R SIGKILLs itself at its
N-th training micro-batch (mid-run, after the step-2 checkpoint).

``fleet``: an adapter-parallel fleet (:func:`fleet_case`) over the corpus in DIR, into
``OUT/run`` (a shared disk) or, with ``--separate-disks``, rank r into ``OUT/disk{r}``
(as if the machines shared no disk: rank 0 must fetch the others' files). Each rank
writes ``OUT/rank{r}.json``: its result and, per adapter it trained, how many
collectives (all_sum, all_gather, send, recv) the rank had made before and after it.
``--fail-rank R --fail-after N``: rank R raises RuntimeError at its N-th training
micro-batch, having written the time to ``OUT/raised{R}.txt``.
"""

import mozgach_mlx as mz  # noqa: F401
import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
from mozgach_mlx import distributed as dist
from mozgach_mlx import fleet, lora, synthetic, trainer
from mozgach_mlx.data import discover_domains, load_domain
from mozgach_mlx.errors import ConfigError


def data_parallel_case(tmp: Path):
    """The model, data and config the data-parallel test trains (also in one process)."""
    synthetic.write_corpus(tmp / "data", n_domains=1, n_train=24, n_valid=4)
    model, tok = mz.load("tiny")
    dom = discover_domains(tmp / "data")[0]
    cfg = mz.TrainConfig(learning_rate=3e-3, warmup_steps=1, max_steps=6, grad_accumulation=4, batch_size=2,
                         max_seq_length=64, eval_every=3, save_every=2, grad_checkpoint=False, progress=False,
                         lora=lora.LoRAConfig(r=4, alpha=8, dropout=0.1))
    splits = load_domain(dom, tok, max_seq_length=cfg.max_seq_length)
    return model, tok, splits, cfg


def fleet_case(data: Path, steps: int = 4):
    """The model, domains and config of the adapter-parallel tests (also in one process)."""
    model, tok = mz.load("tiny")
    cfg = mz.TrainConfig(learning_rate=3e-3, warmup_steps=1, max_steps=steps, grad_accumulation=1, batch_size=2,
                         max_seq_length=64, eval_every=0, eval_batches=1, save_every=2, grad_checkpoint=False,
                         progress=False, lora=lora.LoRAConfig(r=4, alpha=8, dropout=0.0))
    return model, tok, discover_domains(data), cfg


def _fleet(args, out: Path) -> None:
    group = dist.init("adapters")
    r = dist.rank(group)
    counted = [0]

    def counting(f):
        def wrapped(*a, **kw):
            counted[0] += 1
            return f(*a, **kw)
        return wrapped

    for name in ("all_sum", "all_gather", "send", "recv"):
        setattr(mx.distributed, name, counting(getattr(mx.distributed, name)))
    model, tok, domains, cfg = fleet_case(Path(args.data), args.steps)
    calls, per_adapter = 0, []
    train = fleet.train_adapter

    def loss_fn(model, *a, **kw):
        nonlocal calls
        if model.training and r == args.fail_rank:
            calls += 1
            if calls >= args.fail_after:
                (out / f"raised{r}.txt").write_text(str(time.time()))
                raise RuntimeError(f"injected failure on rank {r}")
        return trainer.default_loss(model, *a, **kw)

    def train_adapter(*a, **kw):
        before = counted[0]
        res = train(*a, loss_fn=loss_fn, **kw)
        per_adapter.append([before, counted[0]])
        return res

    fleet.train_adapter = train_adapter
    where = out / (f"disk{r}" if args.separate_disks else "run")
    res = fleet.train_fleet(model, tok, domains, cfg, where, distributed="adapters", group=group)
    (out / f"rank{r}.json").write_text(json.dumps({"done": res.done, "failed": res.failed, "skipped": res.skipped,
                                                   "per_adapter": per_adapter, "collectives": counted[0]}))


def _checks(model, tok, splits, cfg, out: Path, group) -> dict:
    """The refusals both ranks must agree on; returns {check: error message}."""
    seen = {}
    bad = dataclasses.replace(cfg, learning_rate=1e-3) if dist.rank(group) == 1 else cfg
    for key, c in (("mismatch", bad), ("divide", dataclasses.replace(cfg, grad_accumulation=3))):
        try:
            trainer.train_adapter(model, tok, splits, c, out / key, group=group)
            seen[key] = None
        except ConfigError as e:
            seen[key] = str(e)
    with dist.hold(out / "held", group):  # both ranks inside: rank 1 is not locked out ...
        code = "import sys; from mozgach_mlx import rundir\nwith rundir.locked(sys.argv[1]): pass\n"
        other = subprocess.run([sys.executable, "-c", code, str(out / "held")], capture_output=True, text=True,
                               timeout=120)  # ... and an unrelated process is refused
        seen["lock"] = other.stderr.strip().splitlines()[-1] if other.returncode else None
        dist.barrier(group)
    return seen


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["data", "fleet"])
    ap.add_argument("out")
    ap.add_argument("--kill-rank", type=int, default=None)
    ap.add_argument("--kill-after", type=int, default=0)
    ap.add_argument("--checks", action="store_true")
    ap.add_argument("--data", default=None)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--separate-disks", action="store_true")
    ap.add_argument("--fail-rank", type=int, default=None)
    ap.add_argument("--fail-after", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    if args.mode == "fleet":
        return _fleet(args, out)
    group = dist.init("data")
    r = dist.rank(group)
    model, tok, splits, cfg = data_parallel_case(out / f"case{r}")
    if args.checks:
        (out / f"checks{r}.json").write_text(json.dumps(_checks(model, tok, splits, cfg, out, group)))
    calls = 0

    def loss_fn(model, *a, **kw):
        nonlocal calls
        if model.training and r == args.kill_rank:
            calls += 1
            if calls >= args.kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
        return trainer.default_loss(model, *a, **kw)

    sizes = []  # what travels: the element count of every all_sum
    all_sum = mx.distributed.all_sum
    mx.distributed.all_sum = lambda x, **kw: (sizes.append(x.size), all_sum(x, **kw))[1]
    res = trainer.train_adapter(model, tok, splits, cfg, out / "adapter", loss_fn=loss_fn, group=group)
    (out / f"rank{r}.json").write_text(json.dumps({**res.to_dict(), "all_sum_sizes": sizes}))


if __name__ == "__main__":
    main()
