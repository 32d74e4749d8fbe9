"""fp32/fp16/bf16 GEMM throughput of MLX on the CPU: the wheel's bundled reference BLAS
vs the OpenBLAS ``import mozgach_mlx`` binds MLX's GEMM to (the ``scipy-openblas32`` pip
wheel, and a system OpenBLAS when one is installed), side by side.

Each configuration runs in a fresh subprocess that imports ``mlx.core`` *before*
``mozgach_mlx`` (the order that used to lose the fast BLAS), chosen with MOZGACH_BLAS.

    python benchmarks/bench_blas.py [--n 256 1024] [--repeats 9]

fp32 is the median of ``--repeats`` calls (and the best one: on the shared dev machine the
spread is wide), fp16/bf16 (no BLAS path in MLX) one call.
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
info = backend.info()
out = {"blas": backend.blas_status()[0] or "bundled reference BLAS", "threads": info["cpu_blas_threads"]}
for name, dt in (("fp32", mx.float32), ("fp16", mx.float16), ("bf16", mx.bfloat16)):
    a = mx.random.normal((n, n)).astype(dt); b = mx.random.normal((n, n)).astype(dt)
    mx.eval(a @ b)
    times = []
    for _ in range(reps if name == "fp32" else 1):
        t = time.perf_counter()
        mx.eval(a @ b)
        times.append(time.perf_counter() - t)
    times.sort()
    out[name] = 2 * n**3 / times[len(times) // 2] / 1e9
    if name == "fp32":
        out["fp32_best"] = 2 * n**3 / times[0] / 1e9
print(json.dumps(out))
"""


def run(env_blas: str, n: int, reps: int, threads: int | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOZGACH_BLAS", "OPENBLAS_NUM"))}
    env["MOZGACH_BLAS"] = env_blas
    if threads is not None:
        env["MOZGACH_BLAS_THREADS"] = str(threads)
    res = subprocess.run([sys.executable, "-c", CHILD, str(n), str(reps)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    from mozgach_mlx import backend

    configs = [("MLX bundled BLAS", "none", None), ("pip scipy-openblas32", "pip", None),
               ("pip, 2 threads", "pip", 2)]
    if backend.system_blas():
        configs += [("system OpenBLAS", "system", None), ("system, 2 threads", "system", 2)]
    for n in args.n:
        rows = [(label, run(blas, n, args.repeats, thr)) for label, blas, thr in configs]
        print(f"GEMM {n}x{n}x{n}, GFLOP/s")
        print(f"| {'configuration':<22} | threads | fp32 median | fp32 best | {'fp16':>7} | {'bf16':>7} | library")
        print(f"|{'-' * 24}|---------|-------------|-----------|{'-' * 9}|{'-' * 9}|---------")
        for label, r in rows:
            print(f"| {label:<22} | {str(r['threads'] or '-'):>7} | {r['fp32']:11.1f} | {r['fp32_best']:9.1f} "
                  f"| {r['fp16']:7.1f} | {r['bf16']:7.1f} | {r['blas']}")
        for label, r in rows[1:]:
            print(f"fp32 median speed-up of {label} over the bundled BLAS: {r['fp32'] / rows[0][1]['fp32']:.1f}x")
        print()


if __name__ == "__main__":
    main()
