"""Attention forward+backward by mask pattern: ours (flash_attention) vs our plain causal vs
mx.fast.scaled_dot_product_attention vs the naive reference, side by side in one process.

For each sequence length L, head dim D and mask pattern it times one value_and_grad step
of ``sum(attention(q, k, v) * dO)`` w.r.t. q, k, v (B=1, H query heads, Hkv KV heads,
fp32) -- wall-clock and process CPU time (all threads; steadier than wall time on a
shared machine) -- and records MLX's peak memory over that step (``mx.reset_peak_memory`` /
``mx.get_peak_memory``; inputs are included, they are allocated before the reset).

Patterns (all causal):
    causal   plain causal attention (also the baseline "ours causal" of every other row)
    docs     L tokens packed from documents of --doc-length tokens (segment ids)
    s2       S²-Attn with groups of --s2-group tokens (half the heads shifted)
    window   sliding window of --window tokens

sdpa gets the same mask as a boolean (L, L) array (per head for s2; "causal" for plain
causal). Implementations whose L x L scores would not fit (estimated, see
``--max-quadratic-gb``) are skipped, so the run cannot swap the machine to death. For
``docs`` the run also checks that our output equals each document run on its own.

Usage:
    python benchmarks/bench_attention.py                       # causal, 1K..64K, D=64 and 128
    python benchmarks/bench_attention.py --lengths 32768 --dims 64 --patterns causal docs s2
    python benchmarks/bench_attention.py --lengths 8192 --patterns causal docs s2 window --repeats 2
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
import numpy as np

# isort: on
from mozgach_mlx import attention
from mozgach_mlx.backend import info

IMPLS = ("ours", "sdpa", "naive")
PATTERNS = ("causal", "docs", "s2", "window")
# Live (H, L, L) fp32 score-sized arrays during fwd+bwd, measured at L=4K/8K on this CPU:
# sdpa ~3.2, the naive reference ~4 (peak / (4 * H * L^2)).
QUADRATIC_FACTOR = {"ours": 0.0, "sdpa": 3.5, "naive": 4.5}


def pattern_kwargs(pattern: str, L: int, args) -> dict:
    """flash_attention / reference_attention keyword arguments of a pattern."""
    if pattern == "docs":
        seg = np.arange(L) // args.doc_length
        return {"segment_ids": mx.array(seg[None].astype(np.int32))}
    if pattern == "s2":
        return {"s2_group": args.s2_group}
    if pattern == "window":
        return {"window": args.window}
    return {}


def sdpa_mask(pattern: str, L: int, H: int, kw: dict):
    """The pattern as sdpa's mask: "causal" or a boolean (1, 1 or H, L, L) array."""
    if pattern == "causal":
        return "causal"
    i, j = mx.arange(L)[:, None], mx.arange(L)[None, :]
    vis = j <= i
    if "segment_ids" in kw:
        seg = kw["segment_ids"][0]
        vis = vis & (seg[:, None] == seg[None, :])
    if "window" in kw:
        vis = vis & (i - j < kw["window"])
    if "s2_group" in kw:
        g = kw["s2_group"]
        heads = []
        for h in range(H):
            shift = 0 if h < H // 2 else -(-g // 2)
            heads.append(vis & (mx.floor_divide(i - shift, g) == mx.floor_divide(j - shift, g)))
        return mx.stack(heads)[None]
    return vis[None, None]


def impl_fn(impl: str, pattern: str, L: int, H: int, kw: dict):
    if impl == "ours":
        return lambda q, k, v: attention.flash_attention(q, k, v, causal=True, **kw)
    if impl == "naive":
        return lambda q, k, v: attention.reference_attention(q, k, v, causal=True, **kw)
    mask = sdpa_mask(pattern, L, H, kw)
    if not isinstance(mask, str):
        mx.eval(mask)
    return lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5, mask=mask)


def inputs(L, D, H, Hkv):
    kq, kk, kv, kd = mx.random.split(mx.random.key(L + D), 4)
    q = mx.random.normal((1, H, L, D), key=kq)
    k = mx.random.normal((1, Hkv, L, D), key=kk)
    v = mx.random.normal((1, Hkv, L, D), key=kv)
    do = mx.random.normal((1, H, L, D), key=kd)
    mx.eval(q, k, v, do)
    return q, k, v, do


def measure(fn, L, D, H, Hkv, repeats):
    """(min wall s, min CPU s, peak bytes) of one fwd+bwd step."""
    q, k, v, do = inputs(L, D, H, Hkv)
    step = mx.value_and_grad(lambda q, k, v, do: (fn(q, k, v) * do).sum(), argnums=(0, 1, 2))
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


def docs_alone_error(L, D, H, Hkv, kw, doc_length) -> float:
    """max |ours(packed) - ours(each document alone)| of the forward output."""
    q, k, v, _ = inputs(L, D, H, Hkv)
    packed = attention.flash_attention(q, k, v, **kw)
    err = 0.0
    for a in range(0, L, doc_length):
        sl = slice(a, min(a + doc_length, L))
        alone = attention.flash_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl])
        err = max(err, float(mx.abs(packed[:, :, sl] - alone).max()))
    return err


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="*", default=None,
                    help="explicit sequence lengths (default: powers of two from --min-len to --max-len)")
    ap.add_argument("--min-len", type=int, default=1024)
    ap.add_argument("--max-len", type=int, default=65536)
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2, help="GQA: 8 query heads over 2 KV heads = 4")
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    ap.add_argument("--patterns", nargs="+", default=["causal"], choices=list(PATTERNS))
    ap.add_argument("--doc-length", type=int, default=1024, help="docs: tokens per packed document")
    ap.add_argument("--s2-group", type=int, default=8192, help="s2: tokens per S²-Attn group")
    ap.add_argument("--window", type=int, default=4096, help="window: sliding-window tokens")
    ap.add_argument("--repeats", type=int, default=2, help="timed steps per point (min is reported)")
    ap.add_argument("--long-repeats", type=int, default=1, help="timed steps for L >= 16K")
    ap.add_argument("--max-quadratic-gb", type=float, default=12.0,
                    help="skip an implementation when its estimated L^2 memory exceeds this")
    return ap.parse_args(argv)


def main(argv=None):
    args = _parse(argv)
    lengths = args.lengths or []
    if not lengths:
        L = args.min_len
        while L <= args.max_len:
            lengths.append(L)
            L *= 2
    H, Hkv = args.heads, args.kv_heads
    print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M}  {platform.machine()}  {info()}")
    print(f"# B=1 H={H} Hkv={Hkv} causal fp32, fwd+bwd of sum(attn(q,k,v)*dO) w.r.t. q,k,v; "
          f"attention path: {attention.attention_path()}; docs of {args.doc_length}, S2 group "
          f"{args.s2_group}, window {args.window}")
    for D in args.dims:  # warm-up: MLX's CPU compiler builds our fused kernels once per process
        for pattern in args.patterns:
            kw = pattern_kwargs(pattern, 256, argparse.Namespace(**{**vars(args), "doc_length": 64,
                                                                    "s2_group": 64, "window": 64}))
            for impl in args.impls:
                measure(impl_fn(impl, pattern, 256, H, kw), 256, D, H, Hkv, 1)

    cols = " | ".join(f"{i + ' wall':>10} {'cpu':>7} {'GiB':>6}" for i in args.impls)
    print(f"{'pattern':>7} {'L':>6} {'D':>4} | {cols} | causal/ours wall  cpu | sdpa/ours wall  cpu")
    rows = []
    for D in args.dims:
        for L in lengths:
            baseline = None  # our plain causal at this (L, D)
            for pattern in sorted(args.patterns, key=lambda p: p != "causal"):
                rows.append(_row(pattern, L, D, H, Hkv, args, baseline))
                baseline = rows[-1][3].get("ours") if pattern == "causal" else rows[-1][4]
    return rows


def _row(pattern, L, D, H, Hkv, args, baseline):
    kw = pattern_kwargs(pattern, L, args)
    cells, res = [], {}
    for impl in args.impls:
        heads = H if pattern == "s2" or impl != "sdpa" else 1
        est_gb = QUADRATIC_FACTOR[impl] * 4 * H * L * L / 1e9 + (heads * L * L / 1e9 if impl == "sdpa" else 0)
        if est_gb > args.max_quadratic_gb:
            cells.append(f"{'skip':>10} {f'~{est_gb:.0f}GB':>14}")
            continue
        reps = args.repeats if L < 16384 else args.long_repeats
        res[impl] = measure(impl_fn(impl, pattern, L, H, kw), L, D, H, Hkv, reps)
        t, ct, peak = res[impl]
        cells.append(f"{t:10.2f} {ct:7.2f} {peak / 2**30:6.3f}")
    if baseline is None and pattern != "causal" and "ours" in res:
        baseline = measure(impl_fn("ours", "causal", L, H, {}), L, D, H, Hkv,
                           args.repeats if L < 16384 else args.long_repeats)
    line = f"{pattern:>7} {L:>6} {D:>4} | " + " | ".join(cells)
    ours = res.get("ours")
    if ours and baseline and pattern != "causal":
        line += f" | {baseline[0] / ours[0]:9.2f}x {baseline[1] / ours[1]:5.2f}x"
    else:
        line += f" | {'-':>10} {'-':>5}"
    if ours and "sdpa" in res:
        line += f" | {res['sdpa'][0] / ours[0]:9.2f}x {res['sdpa'][1] / ours[1]:5.2f}x"
    if pattern == "docs" and ours:
        line += f"  (max |packed - each alone| = {docs_alone_error(L, D, H, Hkv, kw, args.doc_length):.2e})"
    if baseline and pattern != "causal":
        line += f"  [ours causal {baseline[0]:.2f} s wall, {baseline[1]:.2f} s cpu]"
    print(line, flush=True)
    return pattern, L, D, res, baseline


if __name__ == "__main__":
    main()
