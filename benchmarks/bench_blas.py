"""fp32/fp16/bf16 GEMM throughput of MLX on the CPU: bundled reference BLAS vs the
optimized CBLAS that ``import mozgach_mlx`` loads (OpenBLAS), side by side.

Each configuration runs in a fresh subprocess (the BLAS is chosen at mlx.core import).

    python benchmarks/bench_blas.py [--n 1024] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, time
import mozgach_mlx
from mozgach_mlx import backend
import mlx.core as mx
n, reps = int(sys.argv[1]), int(sys.argv[2])
out = {"blas": backend.blas_status()[0] or "bundled reference BLAS"}
for name, dt in (("fp32", mx.float32), ("fp16", mx.float16), ("bf16", mx.bfloat16)):
    a = mx.random.normal((n, n)).astype(dt); b = mx.random.normal((n, n)).astype(dt)
    mx.eval(a @ b)
    t = time.perf_counter()
    for _ in range(reps if name == "fp32" else 1):
        mx.eval(a @ b)
    dt_s = (time.perf_counter() - t) / (reps if name == "fp32" else 1)
    out[name] = 2 * n**3 / dt_s / 1e9
print(json.dumps(out))
"""


def run(env_blas: str | None, n: int, reps: int) -> dict:
    env = dict(os.environ)
    if env_blas is not None:
        env["MOZGACH_BLAS"] = env_blas
    res = subprocess.run([sys.executable, "-c", CHILD, str(n), str(reps)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    rows = [("MLX bundled BLAS", run("none", args.n, args.repeats)),
            ("mozgach_mlx (OpenBLAS)", run(None, args.n, args.repeats))]
    print(f"GEMM {args.n}x{args.n}x{args.n}, GFLOP/s")
    print(f"| {'configuration':<24} | {'fp32':>7} | {'fp16':>7} | {'bf16':>7} | library")
    print(f"|{'-' * 26}|{'-' * 9}|{'-' * 9}|{'-' * 9}|---------")
    for label, r in rows:
        print(f"| {label:<24} | {r['fp32']:7.1f} | {r['fp16']:7.1f} | {r['bf16']:7.1f} | {r['blas']}")
    print(f"fp32 speed-up: {rows[1][1]['fp32'] / rows[0][1]['fp32']:.1f}x")


if __name__ == "__main__":
    main()
