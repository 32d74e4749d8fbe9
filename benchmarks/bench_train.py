"""One LoRA training step, ours vs mlx-lm's, side by side: tokens/s and peak memory.

Same model shape, same weights, same LoRA config (r=16, alpha=32 -> mlx-lm scale 2.0,
q/k/v/o, dropout 0 for determinism), same tokens, AdamW. mlx-lm runs its own model,
LoRA layers and loss (``default_loss`` on full logits) with its ``grad_checkpoint`` on;
we run ``mz.trainer.default_loss`` (chunked loss) with per-block checkpointing, the
chunked MLP and blockwise attention. Step time is reported as wall clock and as the child's CPU
time (all threads; steadier on a shared machine). Each (system, shape, length) runs in a fresh
subprocess with an address-space limit, so an out-of-memory shows up as "OOM" in the
table instead of taking the machine down.

    python benchmarks/bench_train.py                      # tiny + d512/8L/32K vocab at 2K, 8K, 16K
    python benchmarks/bench_train.py --shapes tiny --lengths 2048,8192 --steps 2
    python benchmarks/bench_train.py --shapes d512 --lengths 32768 --systems ours,ours-s2 --s2-group 0.25 \
        --steps 1 --warmup-len 1024          # S²-Attn (LongLoRA) vs full causal attention at 32K

Systems: ``mlx-lm``, ``ours`` (full causal attention) and ``ours-s2`` (ours with
``model.s2_group``: S²-Attn in the training step, groups of --s2-group tokens or that
fraction of L). ``--warmup-len`` runs the warm-up step (kernel compilation, optimizer
state) on the first N tokens instead of a whole step at L, which at 32K would double the
run time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SHAPES = {
    # the built-in tiny model (byte vocab)
    "tiny": {"hidden_size": 256, "num_hidden_layers": 4, "intermediate_size": 768, "num_attention_heads": 8,
             "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 259, "tie_word_embeddings": True},
    # a small model with a real vocabulary
    "d512": {"hidden_size": 512, "num_hidden_layers": 8, "intermediate_size": 1536, "num_attention_heads": 8,
             "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 32000, "tie_word_embeddings": False},
}
COMMON = {"model_type": "llama", "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 131072}

CHILD = r"""
import json, resource, sys, time
cfg = json.loads(sys.argv[1]); system, L, steps = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
limit_gb, quant, s2_group, warmup_len = float(sys.argv[5]), sys.argv[6], float(sys.argv[7]), int(sys.argv[8])
resource.setrlimit(resource.RLIMIT_AS, (int(limit_gb * 2**30), int(limit_gb * 2**30)))
import mozgach_mlx as mz
import mlx.core as mx, mlx.nn as nn, mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

rng = np.random.default_rng(0)
tokens = mx.array(rng.integers(0, cfg["vocab_size"], size=(1, L + 1)).astype(np.int32))
inputs, targets = tokens[:, :-1], tokens[:, 1:]
keys = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]

def weights_for(model):
    r = np.random.default_rng(1)
    return [(k, mx.array(r.normal(0, 0.02, v.shape).astype(np.float32)) if "norm" not in k else mx.ones(v.shape))
            for k, v in sorted(tree_flatten(model.parameters()))]

if system == "mlx-lm":
    from mlx_lm.models import llama
    from mlx_lm.tuner.trainer import default_loss, grad_checkpoint
    from mlx_lm.tuner.utils import linear_to_lora_layers
    model = llama.Model(llama.ModelArgs.from_dict(cfg))
    model.load_weights(weights_for(model))
    if quant != "none":
        nn.quantize(model, group_size=64, bits=int(quant))
    model.freeze()
    linear_to_lora_layers(model, len(model.layers), {"rank": 16, "scale": 2.0, "dropout": 0.0, "keys": keys})
    grad_checkpoint(model.layers[0])
    lengths = mx.array([[1, L]])
    batch = tokens
    loss_fn = lambda m: default_loss(m, batch, lengths)[0]
else:
    from mozgach_mlx import lora, trainer
    from mozgach_mlx.models.llama import Model, ModelArgs
    model = Model(ModelArgs.from_dict(cfg))
    model.load_weights(weights_for(model))
    if quant != "none":
        mz.quant.quantize_model(model, bits=int(quant), group_size=64)
    lora.apply(model, lora.LoRAConfig(r=16, alpha=32, dropout=0.0))
    tc = trainer.TrainConfig(grad_checkpoint=True, mlp_chunk=4096)
    model.grad_checkpoint, model.mlp_chunk = True, tc.mlp_chunk
    if system == "ours-s2":
        model.s2_group = int(s2_group) if s2_group >= 1 else s2_group
    def loss_fn(m, n_tok=None):
        x, y = (inputs, targets) if n_tok is None else (inputs[:, :n_tok], targets[:, :n_tok])
        s, n = trainer.default_loss(m, x, y, mx.ones(y.shape, mx.float32), tc)
        return s / n
model.train()
mx.eval(model.parameters())
opt = optim.AdamW(learning_rate=1e-4, weight_decay=0.0)
vg = nn.value_and_grad(model, loss_fn)

def step(*a):
    loss, grads = vg(model, *a)
    opt.update(model, grads)
    mx.eval(loss, model.trainable_parameters(), opt.state)
    return loss.item()

# warm-up (kernel compilation, optimizer state allocation), on a prefix with --warmup-len
step() if warmup_len <= 0 or system == "mlx-lm" else step(warmup_len)
mx.reset_peak_memory()
t, c = time.perf_counter(), time.process_time()
for _ in range(steps):
    loss = step()
dt, dc = (time.perf_counter() - t) / steps, (time.process_time() - c) / steps
print(json.dumps({"tok_s": L / dt, "step_s": dt, "cpu_s": dc, "peak_gb": mx.get_peak_memory() / 1e9, "loss": loss}))
"""


def run_one(shape: str, system: str, L: int, steps: int, limit_gb: float, quant: str, s2_group: float = 0.25,
            warmup_len: int = 0) -> dict:
    cfg = {**COMMON, **SHAPES[shape]}
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg), system, str(L), str(steps),
                        str(limit_gb), quant, str(s2_group), str(warmup_len)], capture_output=True, text=True,
                       env=dict(os.environ))
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or [f"exit code {p.returncode}, no output"]
        oom = any(s in (p.stderr + p.stdout) for s in ("bad_alloc", "Unable to allocate", "MemoryError",
                                                        "out of memory", "std::bad_alloc"))
        oom = oom or p.returncode in (-9, 137, -6)
        return {"error": "OOM" if oom else f"failed: {tail[0][:80]}", "wall": time.perf_counter() - t}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="tiny,d512")
    ap.add_argument("--lengths", default="2048,8192,16384")
    ap.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    ap.add_argument("--limit-gb", type=float, default=20.0, help="address-space limit per run")
    ap.add_argument("--quantize", default="none", help="base quantization for both: none, 4 or 8")
    ap.add_argument("--json", default=None, help="also write the raw results here")
    ap.add_argument("--systems", default="mlx-lm,ours", help="mlx-lm, ours, ours-s2 (comma-separated)")
    ap.add_argument("--s2-group", type=float, default=0.25, help="ours-s2: S² group, tokens or a fraction of L")
    ap.add_argument("--warmup-len", type=int, default=0, help="warm up on this many tokens (0 = a whole step)")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    systems = args.systems.split(",")
    rows = []
    print(f"LoRA r=16 q/k/v/o training step, batch 1, quantize={args.quantize}, {args.steps} timed steps, "
          f"S² group {args.s2_group:g}")
    print("| shape | L | " + " | ".join(f"{s} tok/s | {s} step s | {s} CPU s | {s} peak GB" for s in systems)
          + " | " + " | ".join(f"{s} / {systems[0]} speed (wall, CPU)" for s in systems[1:]) + " |")
    print("|---|---:|" + "---:|" * (4 * len(systems) + len(systems) - 1))
    for shape in args.shapes.split(","):
        for L in lengths:
            res = {s: run_one(shape, s, L, args.steps, args.limit_gb, args.quantize, args.s2_group, args.warmup_len)
                   for s in systems}
            rows.append({"shape": shape, "L": L, **res})

            def f(r, k, spec):
                return r["error"] if "error" in r else format(r[k], spec)

            cells = [f"{f(res[s], 'tok_s', '.0f')} | {f(res[s], 'step_s', '.1f')} | {f(res[s], 'cpu_s', '.1f')} | "
                     f"{f(res[s], 'peak_gb', '.2f')}" for s in systems]
            first = res[systems[0]]
            ratios = [f"{res[s]['tok_s'] / first['tok_s']:.2f}x, {first['cpu_s'] / res[s]['cpu_s']:.2f}x"
                      if "error" not in res[s] and "error" not in first else "-" for s in systems[1:]]
            print(f"| {shape} | {L} | " + " | ".join(cells + ratios) + " |", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
