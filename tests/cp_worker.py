# ruff: noqa: I001  (import order matters: mozgach_mlx must load the fast BLAS before mlx.core)
"""One rank of the context-parallel tests in tests/test_context_parallel.py (started by
``mlx.launch -n 2 --backend ring``), and the cases they share with the 1-process reference.

    python tests/cp_worker.py grads OUT CASE [CASE ...]
    python tests/cp_worker.py train OUT [--kill-rank R --kill-after N] [--single] [--length L]

``grads``: for each case (:func:`cp_case`), one context-parallel step (loss sum, token
count and LoRA gradients summed over the group); rank 0 writes ``OUT/CASE.safetensors``.
``train``: :func:`train_case` trained with ``TrainConfig.context_parallel`` into OUT (with
``--single``: one process, no group, not context-parallel); ``--kill-rank R --kill-after
N``: rank R SIGKILLs itself in its N-th loss call (tests/test_context_faults.py).
"""

import mozgach_mlx as mz  # noqa: F401
import argparse
import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import randomize, small_config  # noqa: E402

from mozgach_mlx import distributed as dist, lora, memory, quant, trainer  # noqa: E402
from mozgach_mlx.context import step as cp_step  # noqa: E402
from mozgach_mlx.errors import MozgachError  # noqa: E402
from mozgach_mlx.models import Model, ModelArgs  # noqa: E402

LORA = lora.LoRAConfig(r=4, alpha=8, dropout=0.0, targets=("q_proj", "k_proj", "v_proj", "o_proj"))


def cp_case(name: str):
    """(model, cfg, batch (x, y, mask, segment_ids or None)) of a named case, the same in
    every process: ``<mask>-<length>[-<split>][-q4][-ckpt][-tile]`` with mask causal | document |
    s2 | window | all (documents + S² + window); ``tile``: tiled block recompute with tiles
    of 512 positions (:func:`case_strategy`)."""
    parts = name.split("-")
    kind, length = parts[0], int(parts[1])
    split = "contiguous" if "contiguous" in parts else "zigzag"
    extra = {"sliding_window": 300, "model_type": "mistral"} if kind in ("window", "all") else {}
    args = small_config(max_position_embeddings=32768, **extra)
    model = randomize(Model(ModelArgs.from_dict(args)), seed=3)
    if "q4" in parts:
        quant.quantize_model(model, bits=4, group_size=64)
    lora.apply(model, LORA)
    rng = np.random.default_rng(7)
    model.update(_random_tree(model, rng))
    model.train()
    model.s2_group = 0.25 if kind in ("s2", "all") else None
    model.grad_checkpoint = "ckpt" in parts
    cfg = mz.TrainConfig(context_parallel=True, context_split=split, progress=False, lora=LORA, loss_chunk=512,
                         **({"memory_strategy": "tile", "tile_chunk": 512} if "tile" in parts else {}))
    tokens = rng.integers(0, 259, (1, length + 1))
    x, y = mx.array(tokens[:, :-1].astype(np.int32)), mx.array(tokens[:, 1:].astype(np.int32))
    mask = mx.array((rng.random((1, length)) > 0.1).astype(np.float32))
    seg = None
    if kind in ("document", "all"):
        cuts = np.sort(rng.choice(np.arange(1, length), 6, replace=False))
        seg = mx.array(np.searchsorted(cuts, np.arange(length), side="right")[None].astype(np.int32))
    return model, cfg, (x, y, mask, seg)


def _random_tree(model, rng):
    from mlx.utils import tree_unflatten

    flat = tree_flatten(model.trainable_parameters())
    return tree_unflatten([(k, mx.array(rng.normal(0, 0.05, v.shape).astype(np.float32))) for k, v in flat])


def case_strategy(cfg) -> memory.MemoryStrategy:
    """The memory strategy of a case's context-parallel step: tiles of ``cfg.tile_chunk``
    for ``-tile`` cases, else per-block checkpointing (the model's own step)."""
    return memory.MemoryStrategy(tile_chunk=cfg.tile_chunk) if cfg.memory_strategy == "tile" else \
        memory.MemoryStrategy()


def reference_step(model, cfg, batch):
    """The 1-process step of the same batch: ((loss_sum, n), grads)."""
    x, y, m, seg = batch
    kw = {} if seg is None else {"segment_ids": seg}
    vg = nn.value_and_grad(model, lambda x, y, m, **k: trainer.default_loss(model, x, y, m, cfg, **k))
    out = vg(x, y, m, **kw)
    mx.eval(out)
    return out


def cp_step_sums(model, cfg, batch, group):
    """The context-parallel step summed over the group: (loss_sum, n, grads)."""
    x, y, m, seg = batch
    fn = cp_step.grad_fn(model, trainer.default_loss, cfg, case_strategy(cfg), group)
    (s, n), g = fn(x, y, m, segment_ids=seg)
    mx.eval(s, n, g)
    g, s, n = dist.sum_step(g, s.item(), int(n.item()), group)
    return s, n, g, fn.transport


def run_grads(out: Path, cases: list[str], group) -> None:
    for name in cases:
        model, cfg, batch = cp_case(name)
        mx.reset_peak_memory()
        s, n, g, tr = cp_step_sums(model, cfg, batch, group)
        if dist.is_main(group):
            arrays = {f"grad.{k}": v for k, v in tree_flatten(g)}
            arrays["loss_sum"], arrays["tokens"] = mx.array(s), mx.array(float(n))
            mx.save_safetensors(str(out / f"{name}.safetensors"), arrays)
        (out / f"{name}.rank{dist.rank(group)}.json").write_text(json.dumps(
            {"bytes_sent": tr.bytes_sent, "messages": tr.messages, "peak": mx.get_peak_memory()}))


TRAIN_STEPS, TRAIN_SAVE_EVERY = 6, 2


def train_case(steps: int = TRAIN_STEPS, length: int = 512):
    """(model, tok, splits, cfg) of the fault tests: the tiny model on a 4-bit base with
    per-block checkpointing, context-parallel, one sequence of ``length`` .. ``length`` + 75
    tokens per step (odd lengths: not a multiple of the ranks or the block), ``steps``
    steps, a checkpoint every 2. The same in every process; ``context_parallel=False`` of
    it is the 1-process reference (the fingerprint ignores the flag)."""
    model, tok = mz.load("tiny")
    quant.quantize_model(model, bits=4, group_size=64)
    rng = np.random.default_rng(0)

    def seq(n):
        mask = np.ones(n, bool)
        mask[0] = False
        mask[rng.random(n) < 0.1] = False  # some targets masked out, as prompts are
        return rng.integers(0, 259, n).astype(np.int32), mask

    train = [seq(length + 1 + int(rng.integers(0, 76))) for _ in range(8)]
    splits = {"train": train, "valid": [seq(length + 1)]}
    cfg = mz.TrainConfig(learning_rate=3e-3, warmup_steps=1, max_steps=steps, grad_accumulation=1, batch_size=1,
                         max_seq_length=length + 128, eval_every=0, eval_batches=1, save_every=TRAIN_SAVE_EVERY,
                         grad_checkpoint=True, progress=False, memory_strategy="none", context_parallel=True,
                         lora=LORA)
    return model, tok, splits, cfg


def run_train(out: Path, group, kill_rank: int | None, kill_after: int | None, length: int) -> None:
    """Train :func:`train_case` into ``out``; every rank writes ``out/../result{rank}.json``.
    ``kill_rank``: that rank SIGKILLs itself in the forward of its ``kill_after``-th loss
    call (a step's graph is being built; the other ranks are already inside the step's
    collectives, waiting for this rank's K/V blocks)."""
    model, tok, splits, cfg = train_case(length=length)
    if group is None:
        cfg = dataclasses.replace(cfg, context_parallel=False)
    loss_fn = trainer.default_loss
    if kill_rank is not None and dist.rank(group) == kill_rank:
        calls = {"n": 0}

        def loss_fn(*a, **k):
            calls["n"] += 1
            if calls["n"] == kill_after:
                (out.parent / f"killed{kill_rank}.txt").write_text(repr(time.time()))
                os.kill(os.getpid(), signal.SIGKILL)
            return trainer.default_loss(*a, **k)

    res = trainer.train_adapter(model, tok, splits, cfg, out, loss_fn=loss_fn, group=group)
    (out.parent / f"result{dist.rank(group)}.json").write_text(json.dumps(
        {**dataclasses.asdict(res), "ranks": dist.size(group), "context_parallel": cfg.context_parallel}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("grads", "train"))
    ap.add_argument("out")
    ap.add_argument("cases", nargs="*")
    ap.add_argument("--kill-rank", type=int)
    ap.add_argument("--kill-after", type=int)
    ap.add_argument("--single", action="store_true", help="one process, no group (the rerun on 1 rank)")
    ap.add_argument("--length", type=int, default=512, help="train: the shortest sequence's length")
    a = ap.parse_args()
    group = None if a.single else dist.init("data")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.what == "grads":
        run_grads(out, a.cases, group)
        return
    try:
        run_train(out, group, a.kill_rank, a.kill_after, a.length)
    except MozgachError as e:  # one line, as `mozgach train` prints it
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
