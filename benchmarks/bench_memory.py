"""Measured peak memory of one training step vs the planner's estimate, per memory strategy.

Each configuration runs in a fresh subprocess: a model of the given shape with random
weights, quantized to 4 or 8 bits, LoRA r=16 on q/k/v/o (dropout 0), one warm-up step
on 256 tokens, then one value-and-gradient step at L tokens whose peak is read with
``mx.get_peak_memory()`` after ``mx.reset_peak_memory()``. The step is the trainer's:
the default strategy is ``nn.value_and_grad`` with ``mx.checkpoint`` per block, the
others run through ``mozgach_mlx.memory.value_and_grad``. Sequences are packed documents
of ``--doc`` tokens (the trainer's default document mask); the memory terms do not
depend on the mask, the attention time does, and it keeps the long steps affordable on
this CPU.

    python benchmarks/bench_memory.py run                  # the calibration set -> benchmarks/calibration.jsonl
    python benchmarks/bench_memory.py run --only tiny-64k  # one named configuration
    python benchmarks/bench_memory.py report               # table: measured vs plan (and the +-10% check)

``run`` skips configurations already in the output file, so it resumes. Offloaded
steps also report the seconds spent writing and reading the memory-mapped file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "calibration.jsonl"
COMMON = {"model_type": "llama", "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 131072}
SHAPES = {
    "tiny": {"hidden_size": 256, "num_hidden_layers": 4, "intermediate_size": 768, "num_attention_heads": 8,
             "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 259, "tie_word_embeddings": True},
    "d512": {"hidden_size": 512, "num_hidden_layers": 8, "intermediate_size": 1536, "num_attention_heads": 8,
             "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 32000, "tie_word_embeddings": False},
    "d768": {"hidden_size": 768, "num_hidden_layers": 6, "intermediate_size": 2048, "num_attention_heads": 12,
             "num_key_value_heads": 4, "head_dim": 64, "vocab_size": 32000, "tie_word_embeddings": False},
    "d384mha": {"hidden_size": 384, "num_hidden_layers": 3, "intermediate_size": 1024, "num_attention_heads": 6,
                "num_key_value_heads": 6, "head_dim": 64, "vocab_size": 16384, "tie_word_embeddings": True},
}
# name -> (shape, L, bits, strategy kwargs); strategy {} = the default step
CONFIGS = {
    "tiny-8k-default": ("tiny", 8192, 4, {}),
    "tiny-16k-tile": ("tiny", 16384, 4, {"tile_chunk": 2048}),
    "tiny-16k-tile-offload": ("tiny", 16384, 8, {"tile_chunk": 2048, "offload": True}),
    "d384mha-32k-tile-every3": ("d384mha", 32768, 4, {"tile_chunk": 2048, "checkpoint_every": 3}),
    "d512-2k-default": ("d512", 2048, 4, {}),
    "d512-4k-default-8bit": ("d512", 4096, 8, {}),
    "d512-8k-tile": ("d512", 8192, 4, {"tile_chunk": 1024}),
    "d768-8k-default": ("d768", 8192, 8, {}),
    "d768-16k-tile-offload": ("d768", 16384, 4, {"tile_chunk": 2048, "offload": True}),
    "d768-16k-offload": ("d768", 16384, 4, {"offload": True}),
    "tiny-64k-tile-offload": ("tiny", 65536, 4, {"tile_chunk": 4096, "offload": True}),
    "d512-32k-tile-offload": ("d512", 32768, 4, {"tile_chunk": 4096, "offload": True}),
}
MLP_CHUNK = 4096
DOC = 4096

CHILD = r"""
import json, sys, time, tempfile
import mozgach_mlx as mz
import mlx.core as mx, mlx.nn as nn, numpy as np
from mozgach_mlx import lora, memory, trainer
cfg, L, bits = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
strategy, doc = json.loads(sys.argv[4]), int(sys.argv[5])
mlp_chunk = int(sys.argv[6])
mx.random.seed(0)
model = mz.models.Model(mz.ModelArgs.from_dict(cfg))
mz.quant.quantize_model(model, bits=bits, group_size=64)
lora.apply(model, lora.LoRAConfig(r=16, alpha=32, dropout=0.0))
model.grad_checkpoint, model.mlp_chunk = True, mlp_chunk
model.train()
mx.eval(model.parameters())
tc = trainer.TrainConfig(mlp_chunk=mlp_chunk)
st = memory.MemoryStrategy(**strategy)
tmp = tempfile.mkdtemp(prefix="bench-memory-")
io = {"write": 0.0, "read": 0.0}
if st.offload:  # time the file I/O of the step
    put, get = memory.CheckpointStore.put, memory.CheckpointStore.get
    def timed_put(self, i, x):
        mx.eval(x); t = time.perf_counter(); put(self, i, x); io["write"] += time.perf_counter() - t
    def timed_get(self, i):
        t = time.perf_counter(); x = get(self, i); mx.eval(x); io["read"] += time.perf_counter() - t; return x
    memory.CheckpointStore.put, memory.CheckpointStore.get = timed_put, timed_get
if st.is_default:
    f = nn.value_and_grad(model, lambda a, b, c, **kw: trainer.default_loss(model, a, b, c, tc, **kw))
else:
    f = memory.value_and_grad(model, st, loss_chunk=tc.loss_chunk, offload_dir=tmp)
def batch(n):
    x = mx.random.randint(0, cfg["vocab_size"], (1, n))
    seg = mx.array((np.arange(n) // doc)[None].astype(np.int32))
    return x, x, mx.ones((1, n)), seg
x, y, m, seg = batch(256)
mx.eval(f(x, y, m, segment_ids=seg))
x, y, m, seg = batch(L)
mx.eval(x, seg)
mx.synchronize(); mx.clear_cache(); mx.reset_peak_memory()
io["write"] = io["read"] = 0.0
t = time.perf_counter()
mx.eval(f(x, y, m, segment_ids=seg))
secs = time.perf_counter() - t
print(json.dumps({"peak_bytes": mx.get_peak_memory(), "seconds": secs, "io_write_s": io["write"],
                  "io_read_s": io["read"]}))
"""


def run(names: list[str], out: Path) -> None:
    done = set()
    if out.exists():
        done = {json.loads(line)["name"] for line in out.read_text().splitlines() if line.strip()}
    for name in names:
        if name in done:
            print(f"{name}: already measured")
            continue
        shape, L, bits, strategy = CONFIGS[name]
        cfg = {**COMMON, **SHAPES[shape]}
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg), str(L), str(bits), json.dumps(strategy),
                            str(DOC), str(MLP_CHUNK)], capture_output=True, text=True, env=dict(os.environ))
        if p.returncode != 0:
            print(f"{name}: FAILED {(p.stderr or p.stdout).strip().splitlines()[-1:]}")
            continue
        rec = {"name": name, "shape": shape, "context": L, "bits": bits, "strategy": strategy, "doc": DOC,
               "mlp_chunk": MLP_CHUNK, **json.loads(p.stdout.strip().splitlines()[-1]),
               "wall_s": time.perf_counter() - t, "date": time.strftime("%Y-%m-%d")}
        with out.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"{name}: peak {rec['peak_bytes'] / 2**20:,.0f} MiB, {rec['seconds']:.1f} s", flush=True)


def estimate(rec: dict) -> int:
    import mozgach_mlx as mz

    cfg = {**COMMON, **SHAPES[rec["shape"]]}
    return mz.plan(cfg, rec["context"], quantize=rec["bits"], backend="cpu", mlp_chunk=rec["mlp_chunk"],
                   strategy=rec["strategy"] or "none",
                   attention={"document_length": rec["doc"]}).total_bytes


def report(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    print("| config | shape | L | bits | strategy | measured MiB | plan MiB | plan/measured | step s | I/O s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        r["estimate"] = est = estimate(r)
        st = ", ".join(f"{k}={v}" for k, v in r["strategy"].items()) or "default"
        io = f"{r['io_write_s'] + r['io_read_s']:.2f}" if r["strategy"].get("offload") else "-"
        print(f"| {r['name']} | {r['shape']} | {r['context']:,} | {r['bits']} | {st} | "
              f"{r['peak_bytes'] / 2**20:,.0f} | {est / 2**20:,.0f} | {est / r['peak_bytes']:.3f} | "
              f"{r['seconds']:.1f} | {io} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cmd", choices=["run", "report"])
    ap.add_argument("--only", default=None, help="comma-separated configuration names")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    if a.cmd == "run":
        run(a.only.split(",") if a.only else list(CONFIGS), a.out)
    else:
        report(a.out)


if __name__ == "__main__":
    main()
