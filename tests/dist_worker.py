# ruff: noqa: I001  (import order matters: mozgach_mlx must load the fast BLAS before mlx.core)
"""One rank of the 2-process tests in tests/test_distributed.py (started by mlx.launch).

    python tests/dist_worker.py data OUT [--kill-rank R --kill-after N] [--checks]

``data``: data-parallel training of one adapter (:func:`data_parallel_case`) into OUT;
each rank writes ``OUT/rank{r}.json`` (its TrainResult) for the test to compare. With
``--checks`` it first runs the refusals that must be agreed by both ranks (config
mismatch, sizes that do not divide, the run-directory lock) and records them in
``OUT/checks{r}.json``. ``--kill-rank R --kill-after N``: rank R SIGKILLs itself at its
N-th training micro-batch (mid-run, after the step-2 checkpoint).
"""

import mozgach_mlx as mz  # noqa: F401
import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
from mozgach_mlx import distributed as dist
from mozgach_mlx import lora, synthetic, trainer
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
    ap.add_argument("mode", choices=["data"])
    ap.add_argument("out")
    ap.add_argument("--kill-rank", type=int, default=None)
    ap.add_argument("--kill-after", type=int, default=0)
    ap.add_argument("--checks", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
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
