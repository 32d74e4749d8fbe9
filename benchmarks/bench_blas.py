"""fp32/fp16/bf16 GEMM throughput of MLX on the CPU: the wheel's bundled reference BLAS
vs the OpenBLAS ``import mozgach_mlx`` binds MLX's GEMM to (the ``scipy-openblas32`` pip
wheel, and a system OpenBLAS when one is installed), side by side.

Each configuration runs in a fresh subprocess that imports ``mlx.core`` *before*
``mozgach_mlx`` (the order that used to lose the fast BLAS), chosen with MOZGACH_BLAS.

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
import mlx.core as mx
import mozgach_mlx
from mozgach_mlx import backend
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
    from mozgach_mlx import backend

    rows = [("MLX bundled BLAS", run("none", args.n, args.repeats)),
            ("pip scipy-openblas32", run("pip", args.n, args.repeats))]
    if backend.system_blas():
        rows.append(("system OpenBLAS", run("system", args.n, args.repeats)))
    print(f"GEMM {args.n}x{args.n}x{args.n}, GFLOP/s")
    print(f"| {'configuration':<24} | {'fp32':>7} | {'fp16':>7} | {'bf16':>7} | library")
    print(f"|{'-' * 26}|{'-' * 9}|{'-' * 9}|{'-' * 9}|---------")
    for label, r in rows:
        print(f"| {label:<24} | {r['fp32']:7.1f} | {r['fp16']:7.1f} | {r['bf16']:7.1f} | {r['blas']}")
    for label, r in rows[1:]:
        print(f"fp32 speed-up of {label} over the bundled BLAS: {r['fp32'] / rows[0][1]['fp32']:.1f}x")


if __name__ == "__main__":
    main()
