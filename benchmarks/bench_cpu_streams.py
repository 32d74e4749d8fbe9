"""The second CPU core for attention: MOZGACH_ATTENTION_CPU_STREAMS x MOZGACH_BLAS_THREADS.

Blockwise attention forward + backward (uncompiled, causal, batch 1, H=8, Hkv=2, D=64),
each setting in a fresh process (both variables are read at import / first use); wall
and CPU milliseconds (median of 3 after a warm-up).

    python benchmarks/bench_cpu_streams.py --lengths 2048,4096
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, statistics, sys, time
import numpy as np
import mozgach_mlx  # noqa: F401
import mlx.core as mx
from mozgach_mlx import attention as attn
L = int(sys.argv[1])
rng = np.random.default_rng(0)
a = lambda *s: mx.array(rng.normal(size=s).astype(np.float32))
q, k, v, do = a(1, 8, L, 64), a(1, 2, L, 64), a(1, 2, L, 64), a(1, 8, L, 64)
f = lambda: mx.eval(mx.vjp(lambda q, k, v: attn.flash_attention(q, k, v, causal=True), [q, k, v], [do]))
f()
ws, cs = [], []
for _ in range(3):
    t, c = time.perf_counter(), time.process_time()
    f()
    ws.append(time.perf_counter() - t)
    cs.append(time.process_time() - c)
print(json.dumps({"wall_ms": 1000 * statistics.median(ws), "cpu_ms": 1000 * statistics.median(cs)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="2048,4096")
    args = ap.parse_args()
    print("| L | BLAS threads | attention CPU streams | wall ms | CPU ms |")
    print("|---:|---:|---:|---:|---:|")
    for L in (int(x) for x in args.lengths.split(",")):
        for blas in (1, 2):
            for streams in (1, 2):
                env = dict(os.environ, MOZGACH_BLAS_THREADS=str(blas), MOZGACH_ATTENTION_CPU_STREAMS=str(streams))
                out = subprocess.run([sys.executable, "-c", CHILD, str(L)], env=env, capture_output=True, text=True,
                                     check=True).stdout.strip().splitlines()[-1]
                r = json.loads(out)
                print(f"| {L} | {blas} | {streams} | {r['wall_ms']:.0f} | {r['cpu_ms']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
