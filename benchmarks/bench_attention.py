"""Attention forward+backward: ours (flash_attention) vs mx.fast.scaled_dot_product_attention
vs the naive reference, side by side in one process.

For each sequence length L and head dim D it times one value_and_grad step of
``sum(attention(q, k, v) * dO)`` w.r.t. q, k, v (B=1, H query heads, Hkv KV heads, causal,
fp32) -- wall-clock and process CPU time (all threads; steadier than wall time on a
shared machine) -- and records MLX's peak memory over that step (``mx.reset_peak_memory`` /
``mx.get_peak_memory``; inputs are included, they are allocated before the reset).
Implementations whose L x L scores would not fit (estimated, see ``--max-quadratic-gb``)
are skipped, so the run cannot swap the machine to death.

Usage:
    python benchmarks/bench_attention.py                       # 1K..64K, D=64 and 128
    python benchmarks/bench_attention.py --max-len 16384       # quick
    python benchmarks/bench_attention.py --lengths 8192 --repeats 3 --dims 64
"""

from __future__ import annotations

import argparse
import datetime
import gc
import platform
import time

# isort: off
import mozgach_mlx  # noqa: F401  (loads the fast BLAS; must precede mlx.core)
import mlx.core as mx

# isort: on
from mozgach_mlx import attention
from mozgach_mlx.backend import info


def _sdpa(q, k, v, *, causal=True):
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5,
                                                mask="causal" if causal else None)


IMPLS = {
    "ours": lambda q, k, v: attention.flash_attention(q, k, v, causal=True),
    "sdpa": lambda q, k, v: _sdpa(q, k, v, causal=True),
    "naive": lambda q, k, v: attention.reference_attention(q, k, v, causal=True),
}
# Live (H, L, L) fp32 score-sized arrays during fwd+bwd, measured at L=4K/8K on this CPU:
# sdpa ~3.2, the naive reference ~4 (peak / (4 * H * L^2)).
QUADRATIC_FACTOR = {"ours": 0.0, "sdpa": 3.5, "naive": 4.5}


def step_fn(impl):
    fn = IMPLS[impl]

    def loss(q, k, v, do):
        return (fn(q, k, v) * do).sum()

    return mx.value_and_grad(loss, argnums=(0, 1, 2))


def measure(impl, L, D, H, Hkv, repeats):
    key = mx.random.key(L + D)
    kq, kk, kv, kd = mx.random.split(key, 4)
    q = mx.random.normal((1, H, L, D), key=kq)
    k = mx.random.normal((1, Hkv, L, D), key=kk)
    v = mx.random.normal((1, Hkv, L, D), key=kv)
    do = mx.random.normal((1, H, L, D), key=kd)
    mx.eval(q, k, v, do)
    step = step_fn(impl)
    times, cpu_times, peak = [], [], 0
    for _ in range(repeats):
        gc.collect()
        mx.clear_cache()
        mx.reset_peak_memory()
        t0, c0 = time.perf_counter(), time.process_time()
        out = step(q, k, v, do)
        mx.eval(out)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        peak = max(peak, mx.get_peak_memory())
        del out
    del q, k, v, do
    gc.collect()
    mx.clear_cache()
    return min(times), min(cpu_times), peak


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="*", default=None,
                    help="explicit sequence lengths (default: powers of two from --min-len to --max-len)")
    ap.add_argument("--min-len", type=int, default=1024)
    ap.add_argument("--max-len", type=int, default=65536)
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2, help="GQA: 8 query heads over 2 KV heads = 4")
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    ap.add_argument("--repeats", type=int, default=2, help="timed steps per point (min is reported)")
    ap.add_argument("--long-repeats", type=int, default=1, help="timed steps for L >= 16K")
    ap.add_argument("--max-quadratic-gb", type=float, default=12.0,
                    help="skip an implementation when its estimated L^2 memory exceeds this")
    args = ap.parse_args(argv)

    lengths = args.lengths or []
    if not lengths:
        L = args.min_len
        while L <= args.max_len:
            lengths.append(L)
            L *= 2
    H, Hkv = args.heads, args.kv_heads
    print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M}  {platform.machine()}  {info()}")
    print(f"# B=1 H={H} Hkv={Hkv} causal fp32, fwd+bwd of sum(attn(q,k,v)*dO) w.r.t. q,k,v; "
          f"attention path: {attention.attention_path()}")
    # Warm-up: MLX's CPU compiler builds our fused kernels once per process.
    for D in args.dims:
        for impl in args.impls:
            measure(impl, 256, D, H, Hkv, 1)

    header = f"{'L':>6} {'D':>4} | " + " | ".join(
        f"{i + ' wall':>10} {'cpu':>7} {'GiB':>6}" for i in args.impls)
    if "ours" in args.impls and "sdpa" in args.impls:
        header += " | sdpa/ours wall  cpu"
    print(header)
    rows = []
    for D in args.dims:
        for L in lengths:
            cells, res = [], {}
            for impl in args.impls:
                est_gb = QUADRATIC_FACTOR[impl] * 4 * H * L * L / 1e9
                if est_gb > args.max_quadratic_gb:
                    cells.append(f"{'skip':>10} {f'~{est_gb:.0f}GB':>14}")
                    continue
                reps = args.repeats if L < 16384 else args.long_repeats
                res[impl] = measure(impl, L, D, H, Hkv, reps)
                t, ct, peak = res[impl]
                cells.append(f"{t:10.2f} {ct:7.2f} {peak / 2**30:6.3f}")
            line = f"{L:>6} {D:>4} | " + " | ".join(cells)
            if "ours" in res and "sdpa" in res:
                line += (f" | {res['sdpa'][0] / res['ours'][0]:9.2f}x"
                         f" {res['sdpa'][1] / res['ours'][1]:5.2f}x")
            print(line, flush=True)
            rows.append((L, D, res))
    return rows


if __name__ == "__main__":
    main()
