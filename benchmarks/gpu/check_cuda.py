"""Issue 26 on a lent NVIDIA GPU; run by run.sh (README.md beside it says what each step measures).

    python benchmarks/gpu/check_cuda.py --out OUT [--budget 450] [--steps kernel,speed] [--dry-run]

Steps env, tests, kernel, speed, lora run in this order, each in a process group of its own with a
time limit (a crash or a hang costs that step only; the last step gets the time left); this parent
imports no MLX. OUT/results.json and OUT/summary.md are rewritten after every measurement.
--dry-run: the same code on the CPU at tiny sizes, the kernel calls replaced by the reference path.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
from importlib.util import find_spec
from pathlib import Path

from report import parse_junit, parse_progress, render

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
STEPS = ("env", "tests", "kernel", "speed", "lora")
CAPS = {"env": 40, "tests": 100, "kernel": 60, "speed": 120, "lora": 150}  # seconds each, at most
DRY_CAPS = {"env": 60, "tests": 240, "kernel": 90, "speed": 90, "lora": 240}  # the busy 2-core CPU
MARGIN = 10  # seconds a child gets less than its limit, to stop by itself and write its results

# The core tests of issue 26: model parity, attention values/gradients against the naive
# reference (causal, documents, S2), a LoRA training step, exact resume. (group, share, node ids)
T = "tests/"
TEST_GROUPS = [
    ("parity", 0.2, [T + "test_models.py::" + n for n in (
        "test_logits_equal_mlx_lm", "test_kv_cache_generation_equals_full_sequence",
        "test_packed_documents_equal_each_document_alone", "test_grad_checkpoint_and_mlp_chunk_keep_gradients")]),
    ("attention", 0.3, [T + "test_attention.py::" + n for n in (
        "test_fp32_matches_reference_small", "test_fp32_matches_reference_long",
        "test_sliding_window_matches_reference", "test_float64_ground_truth_agrees_with_reference",
        "test_low_precision_within_2x_reference_error",
        "test_works_under_compile_and_checkpoint")]),  # the CUDA kernel's own test: the kernel step
    ("masks", 0.2, [T + "test_attention_masks.py::" + n for n in (
        "test_segments_match_reference", "test_s2_matches_reference", "test_combined_patterns_match_reference",
        "test_packed_documents_equal_each_document_alone", "test_s2_is_longloras_shift_without_the_wrap_around")]),
    ("lora", 0.15, [T + "test_lora.py::" + n for n in (
        "test_lora_linear_matches_numpy_reference", "test_adapter_gradients_equal_naive_full_logits",
        "test_gradients_reach_adapters_through_checkpointed_blocks", "test_qlora_on_the_4bit_tiny_model")]),
    ("resume", 0.15, [T + "test_trainer.py::" + n for n in (
        "test_resume_reproduces_uninterrupted_run", "test_accumulation_equals_bigger_batch")]),
]
DRY_TEST_K = {"parity": "llama-none", "attention": "test_fp32_matches_reference_small and 64-True-8-4-1",
              "masks": "test_s2_matches_reference", "lora": "numpy_reference", "resume": "resume_reproduces"}
# fp32 tests assume fp32 matmuls; MLX's CUDA backend uses TF32 for them unless told not to.
TEST_ENV = {"MLX_ENABLE_TF32": "0", "NVIDIA_TF32_OVERRIDE": "0"}

# (H, Hkv, L, D, causal, window, dtype): odd L, GQA, every head dim the kernel claims, windows.
KERNEL_CASES = [(4, 4, 1, 64, True, None, "float32"), (8, 2, 7, 64, True, None, "float32"),
                (8, 2, 7, 128, False, None, "float32"), (4, 1, 129, 128, True, None, "float32"),
                (4, 4, 129, 64, False, None, "float32"), (8, 2, 1000, 64, True, None, "float32"),
                (8, 2, 1000, 128, False, None, "float32"), (4, 2, 129, 80, True, 16, "float32"),
                (4, 2, 1000, 96, False, 100, "float32"), (8, 2, 1000, 128, True, None, "bfloat16"),
                (16, 4, 1000, 64, True, None, "float16"), (2, 2, 4097, 128, True, None, "bfloat16")]
DRY_KERNEL_CASES = KERNEL_CASES[:5] + [(4, 2, 129, 80, True, 16, "float32"), (8, 2, 300, 128, True, None, "bfloat16")]
SPEED = {"H": 16, "Hkv": 4, "D": 128, "lengths": [8192, 32768, 131072]}
DRY_SPEED = {"H": 4, "Hkv": 2, "D": 64, "lengths": [256, 512, 1024]}
SPEED_SHARES = {"sdpa": 0.2, "blockwise": 0.4, "cuda": 0.4}  # of the speed step's time; in this order
# Llama-3.2-1B's shape (d=2048, 16 layers, GQA 32/8 x 64, vocab 128256, tied), random weights.
D2048 = {"hidden_size": 2048, "num_hidden_layers": 16, "intermediate_size": 8192, "num_attention_heads": 32,
         "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "tie_word_embeddings": True}
LORA = {"shape": "d2048", "lengths": [4096, 16384, 65536], "longest": 131072}
DRY_LORA = {"shape": "tiny", "lengths": [64, 128], "longest": 256}


# ------------------------------------------------------------------ shared helpers

class Clock:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def attempt(fn, *a, **kw) -> dict:
    """fn's dict (or {"value": ...}) with status and seconds; an exception is recorded, not raised."""
    t = time.perf_counter()
    try:
        out = fn(*a, **kw)
        out = dict(out) if isinstance(out, dict) else {"value": out}
        out.setdefault("status", "ok")
    except Exception as e:  # any failure is a result here
        msg = f"{type(e).__name__}: {e}"
        oom = re.search(r"out of memory|Unable to allocate|bad_alloc|cudaMalloc|MemoryError", msg, re.I)
        out = {"status": "OOM" if oom else "error", "error": msg[:600], "traceback": traceback.format_exc()[-3000:]}
        print(f"   !! {msg[:300]}", flush=True)
    out["seconds"] = round(time.perf_counter() - t, 3)
    return out


def _named(names: tuple[str, ...], fn, *a) -> dict:
    return dict(zip(names, fn(*a), strict=True))


class Part:
    """A child step's results, rewritten atomically on every change so the parent can read
    them even after the child was killed or crashed (``running`` says where)."""

    def __init__(self, path: Path):
        self.path, self.data = path, {}

    def __setitem__(self, key, value):
        self.data[key] = value
        write_json(self.path, self.data)
        print(f"{key}: {json.dumps(value, default=str)[:240]}", flush=True)

    def add(self, key, item):
        self.data.setdefault(key, []).append(item)
        write_json(self.path, self.data)
        print(f"{key} += {json.dumps({k: v for k, v in item.items() if k != 'traceback'}, default=str)[:400]}",
              flush=True)


# ------------------------------------------------------------------ child steps (import MLX)

def child_env(part: Part, clock: Clock, args) -> None:
    import mlx.core as mx
    import numpy as np

    part["mlx"] = mx.__version__
    part["default_device"] = str(mx.default_device())
    part["cuda_available"] = bool(mx.cuda.is_available())
    part["device_info"] = attempt(lambda: {k: str(v) for k, v in mx.device_info().items()})
    part["running"] = "first op"
    part["first_op"] = attempt(lambda: (mx.ones((4,)) + 1).tolist())
    part["env"] = {k: os.environ.get(k) for k in ("CUDA_HOME", "MLX_ENABLE_TF32", "MOZGACH_ATTENTION")}

    def precision():
        a = np.random.default_rng(0).standard_normal((512, 512)).astype(np.float32)
        ref = a.astype(np.float64) @ a.astype(np.float64)
        got = np.array(mx.array(a) @ mx.array(a)).astype(np.float64)
        return {"fp32_matmul_rel_error": float(np.linalg.norm(got - ref) / np.linalg.norm(ref)),
                "reads": "~1e-7: fp32; ~1e-4: TF32"}

    part["matmul"] = attempt(precision)
    part["running"] = "import mozgach_mlx"
    from mozgach_mlx import backend

    part["backend"] = attempt(backend.info)
    if backend.backend() == "cuda" and not args.dry_run:
        from mozgach_mlx.attention import dispatch

        part["running"] = "self_check"  # a crash here turns the kernel off for the later steps
        part["self_check_tf32_default"] = attempt(_named, ("ok", "reason"), dispatch.self_check, "cuda")
        part["running"] = "attention_path"  # what ours uses in the lora step (same environment)
        part["dispatcher_path_tf32_default"] = attempt(dispatch.attention_path)
    part["running"] = None


def _fwd_bwd(fn, q, k, v, w, **kw):
    """(o, dq, dk, dv) of sum(fn(q, k, v) * w), evaluated."""
    import mlx.core as mx

    def loss(q, k, v):
        return (fn(q, k, v, **kw).astype(mx.float32) * w).sum()

    o = fn(q, k, v, **kw)
    grads = mx.grad(loss, argnums=(0, 1, 2))(q, k, v)
    mx.eval(o, grads)
    return (o, *grads)


def _errors(got, ref) -> dict:
    """max |got - ref| and that over max(1, max |ref|) (the self-check's measure), per output."""
    import mlx.core as mx

    out = {}
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, ref, strict=True):
        a, b = a.astype(mx.float32), b.astype(mx.float32)
        err, top = float(mx.abs(a - b).max()), float(mx.abs(b).max())
        out[name] = {"max_abs": err, "rel": err / max(1.0, top)}
    return out


def compare_case(impl, case) -> dict:
    """impl vs the blockwise path (same device) and vs the fp32 naive reference on the CPU stream."""
    import mlx.core as mx

    from mozgach_mlx.attention import blockwise_attention, reference_attention

    H, Hkv, L, D, causal, window, dtype = case
    keys = mx.random.split(mx.random.key(L * 131 + D), 4)
    dt = getattr(mx, dtype)
    q, k, v = (mx.random.normal((1, h, L, D), key=kk).astype(dt) for h, kk in zip((H, Hkv, Hkv), keys[:3], strict=True))
    w = mx.random.normal((1, H, L, D), key=keys[3])
    kw = {"scale": D ** -0.5, "causal": causal, "window": window}
    got = _fwd_bwd(impl, q, k, v, w, **kw)
    vs_blockwise = _errors(got, _fwd_bwd(blockwise_attention, q, k, v, w, **kw))
    tol = 1e-4 if dtype == "float32" else 2e-2  # tests/test_attention.py::test_gpu_kernel_matches_blockwise
    ok = all(e["rel"] <= tol for e in vs_blockwise.values())  # False on nan too

    def truth():
        with mx.stream(mx.cpu):
            return _errors(got, _fwd_bwd(reference_attention, *(x.astype(mx.float32) for x in (q, k, v)), w, **kw))

    return {"pass": ok, "tol": tol, "vs_blockwise": vs_blockwise, "vs_cpu_fp32_reference": attempt(truth)}


def child_kernel(part: Part, clock: Clock, args) -> None:
    from mozgach_mlx import backend
    from mozgach_mlx.attention import dispatch, gpu, reference_attention

    cuda = backend.backend() == "cuda" and not args.dry_run
    part["env"] = {k: os.environ.get(k) for k in ("MLX_ENABLE_TF32",)}
    if cuda:
        part["running"] = "self_check"
        part["self_check"] = attempt(_named, ("ok", "reason"), dispatch.self_check, "cuda")
        part["running"] = "speed_check"
        part["speed_check"] = attempt(_named, ("kernel_s", "blockwise_s"), dispatch.speed_check, "cuda")
        impl = functools.partial(gpu.attention, kind="cuda")
    else:
        part["self_check"] = {"status": "skipped", "reason": "dry run / no CUDA backend: reference path instead"}
        impl = reference_attention
    for case in (KERNEL_CASES if cuda else DRY_KERNEL_CASES):
        row = dict(zip(("H", "Hkv", "L", "D", "causal", "window", "dtype"), case, strict=True))
        if clock.left() < 8:
            part.add("cases", {**row, "status": "skipped", "reason": "time budget"})
            continue
        part["running"] = f"case {case}"
        part.add("cases", {**row, **attempt(compare_case, impl, case)})
    if cuda and clock.left() > 8:
        part["running"] = "attention_path"  # the dispatcher's own first-use checks, as a user gets them
        part["dispatcher_path"] = attempt(dispatch.attention_path)
    part["running"] = None


def speed_point(fn, L: int, cfg: dict, dtype, clock: Clock, prev) -> dict:
    """Median seconds and peak memory of one fwd+bwd of sum(attn(q, k, v) * dO) at L tokens."""
    import mlx.core as mx

    pred = prev[1] * (L / prev[0]) ** 2 if prev else None
    runs, warm = (3, 1) if pred is None or pred < 5 else (1, 0)
    if pred is not None and pred * (runs + warm) > clock.left() - 3:
        return {"status": "skipped", "reason": f"predicted {pred:.1f} s/run x{runs + warm}, {clock.left():.0f} s left"}
    keys = mx.random.split(mx.random.key(L), 4)
    H, Hkv, D = cfg["H"], cfg["Hkv"], cfg["D"]
    q, k, v, do = (mx.random.normal((1, h, L, D), key=kk).astype(dtype)
                   for h, kk in zip((H, Hkv, Hkv, H), keys, strict=True))
    mx.eval(q, k, v, do)
    step = mx.grad(lambda q, k, v: (fn(q, k, v) * do).astype(mx.float32).sum(), argnums=(0, 1, 2))
    for _ in range(warm):
        mx.eval(step(q, k, v))
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        mx.eval(step(q, k, v))
        mx.synchronize()
        times.append(time.perf_counter() - t)
    peak = mx.get_peak_memory()
    return {"median_s": statistics.median(times), "runs_s": times, "peak_gib": peak / 2**30,
            "inputs_gib": sum(x.nbytes for x in (q, k, v, do)) / 2**30, "predicted_s": pred}


def _agreement(impls: dict, cfg: dict, L: int, dtype) -> dict:
    """max |o_impl - o_sdpa| of the forward at L (the speed step's inputs and dtype)."""
    import mlx.core as mx

    keys = mx.random.split(mx.random.key(L), 3)
    q, k, v = (mx.random.normal((1, h, L, cfg["D"]), key=kk).astype(dtype)
               for h, kk in zip((cfg["H"], cfg["Hkv"], cfg["Hkv"]), keys, strict=True))
    ref = impls["sdpa"](q, k, v).astype(mx.float32)
    out = {}
    for name in (n for n in impls if n != "sdpa"):
        r = attempt(lambda f=impls[name]: float(mx.abs(f(q, k, v).astype(mx.float32) - ref).max()))
        out[name] = r.get("value", r.get("error"))
    return out


def child_speed(part: Part, clock: Clock, args) -> None:
    import mlx.core as mx

    from mozgach_mlx.attention import blockwise_attention, gpu

    cfg = DRY_SPEED if args.dry_run else SPEED
    dtype = mx.float32 if args.dry_run else mx.bfloat16
    impls = {"sdpa": lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=cfg["D"] ** -0.5,
                                                                           mask="causal"),
             "blockwise": lambda q, k, v: blockwise_attention(q, k, v, causal=True),
             "cuda": lambda q, k, v: gpu.attention(q, k, v, causal=True, kind="cuda")}
    skip = "dry run (no CUDA)" if args.dry_run else ("the kernel crashed in an earlier step"
                                                    if args.kernel_status == "crashed" else None)
    if skip:
        impls.pop("cuda")
    part["config"] = {**cfg, "dtype": str(dtype), "B": 1, "causal": True, "cuda_skipped": skip}
    names = list(impls)
    for i, name in enumerate(names):
        sub = Clock(clock.left() * SPEED_SHARES[name] / sum(SPEED_SHARES[n] for n in names[i:]))
        prev = None
        for L in cfg["lengths"]:
            part["running"] = f"{name} L={L}"
            r = attempt(speed_point, impls[name], L, cfg, dtype, sub, prev)
            part.add("points", {"impl": name, "L": L, **r})
            gc.collect()
            mx.clear_cache()
            if r["status"] not in ("ok", "skipped"):
                break
            prev = (L, r["median_s"]) if r["status"] == "ok" else prev
    if clock.left() > 5:
        part["running"] = "agreement"
        part["agreement_vs_sdpa"] = attempt(_agreement, impls, cfg, cfg["lengths"][0], dtype)
    part["running"] = None


@contextlib.contextmanager
def _bench_train_for_gpu(bt, timeout: float):
    """bench_train.run_one as it is, but its child in bf16, with weights drawn by MLX (numpy
    takes ~10 s per run for 1.2 B parameters) and a time limit; restored on exit."""
    child, sub = bt.CHILD, bt.subprocess
    patched = child.replace("model.load_weights(weights_for(model))",
                            "model.load_weights(weights_for(model)); model.set_dtype(mx.bfloat16)")
    patched = patched.replace("mx.array(r.normal(0, 0.02, v.shape).astype(np.float32))",
                              "mx.random.normal(v.shape, scale=0.02)")
    bt.CHILD = patched
    bt.subprocess = types.SimpleNamespace(run=functools.partial(subprocess.run, timeout=timeout))
    try:
        yield {"bf16": patched.count("set_dtype(mx.bfloat16)") == 2, "mlx_random_init": "mx.random.normal(v" in patched}
    finally:
        bt.CHILD, bt.subprocess = child, sub


def lora_point(bt, shape: str, system: str, L: int, clock: Clock, prev) -> dict:
    pred = prev[1] * (L / prev[0]) ** 1.5 if prev else None  # attention ~L^2, the rest ~L
    steps, warmup_len = (2, 0) if L <= 8192 else (1, 0 if L <= 16384 else 2048)
    runs = steps + (1 if warmup_len == 0 or system == "mlx-lm" else 0.1)
    need = 15 + (pred or 0) * runs
    if pred is not None and need > clock.left() - 5:
        return {"status": "skipped", "reason": f"predicted {pred:.1f} s/step, ~{need:.0f} s, {clock.left():.0f} s left"}
    limit = max(10.0, min(clock.left() - 3, 3 * need if pred else 90))  # a first run that hangs: 90 s
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    limit_gb = 1e6 if hard == resource.RLIM_INFINITY else hard / 2**30  # CUDA maps far more than it uses
    with _bench_train_for_gpu(bt, limit) as how:
        try:
            r = bt.run_one(shape, system, L, steps, limit_gb, "4", 0.25, warmup_len)
        except subprocess.TimeoutExpired:
            r = {"error": f"timed out after {limit:.0f} s"}
    status = "ok" if "error" not in r else ("OOM" if r["error"] == "OOM" else "error")
    return {"status": status, **r, "steps": steps, "warmup_len": warmup_len, "predicted_s": pred, **how}


def planner_predictions(cfg: dict, lengths: list[int], dry: bool) -> dict:
    """plan() for the lora step's model at each length: the h100 profile and this device
    measured (devices.probe: a bf16 matmul on the GPU; its memory set to the GPU's)."""
    import mlx.core as mx

    from mozgach_mlx import devices
    from mozgach_mlx.plan import plan

    this = devices.probe(n=256 if dry else 8192)
    sizes = [v for k, v in mx.device_info().items() if "memory" in k and isinstance(v, int)]
    gpu_gb = max(sizes) / 2**30 if sizes else None
    this = this.with_memory(gpu_gb) if gpu_gb and this.backend == "cuda" else this
    mx.clear_cache()
    out = {"probe": {"tflops": this.peak_tflops, "memory_gb": this.memory_gb, "source": this.source}}
    for name, dev in (("h100", "h100"), ("this", this)):
        out[name] = []
        for L in lengths:
            p = plan(cfg, context=L, batch_size=1, lora_rank=16, quantize=4, mlp_chunk=4096, device=dev,
                     strategy="none")  # bench_train's step: checkpoint per block, chunked MLP and loss
            out[name].append({"L": L, "seconds": p.seconds_per_step, "tok_s": p.tokens_per_second,
                              "peak_gib": p.total_bytes / 2**30, "fits": p.fits, "strategy": p.strategy})
    return out


def child_lora(part: Part, clock: Clock, args) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_train as bt

    spec = DRY_LORA if args.dry_run else LORA
    bt.SHAPES.setdefault("d2048", D2048)
    cfg = {**bt.COMMON, **bt.SHAPES[spec["shape"]]}
    part["config"] = {"shape": spec["shape"], "model": cfg, "lora": "r=16 q/k/v/o", "quantize": 4, "dtype": "bf16",
                      "attention_env": os.environ.get("MOZGACH_ATTENTION")}
    part["running"] = "planner"
    part["planner"] = attempt(planner_predictions, cfg, spec["lengths"] + [spec["longest"]], args.dry_run)
    prev = {}
    for L in spec["lengths"]:
        for system in ("ours", "mlx-lm"):
            part["running"] = f"{system} L={L}"
            r = lora_point(bt, spec["shape"], system, L, clock, prev.get(system))
            part.add("points", {"system": system, "L": L, **r})
            if r["status"] == "ok":
                prev[system] = (L, r["step_s"])
    if "ours" in prev and prev["ours"][0] == spec["lengths"][-1]:  # our longest step: one more length
        part["running"] = f"ours L={spec['longest']}"
        part.add("points", {"system": "ours", "L": spec["longest"],
                            **lora_point(bt, spec["shape"], "ours", spec["longest"], clock, prev["ours"])})
    part["running"] = None


CHILDREN = {"env": child_env, "kernel": child_kernel, "speed": child_speed, "lora": child_lora}


# ------------------------------------------------------------------ the parent (no MLX here)

_current: list[subprocess.Popen] = []  # the running child, killed with its group on SIGTERM


def run_streaming(cmd: list[str], limit: float, env: dict, prefix: str) -> dict:
    """Run cmd in its own process group, echoing its output; kill the group after ``limit`` s."""
    t = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)
    _current.append(proc)
    lines: list[str] = []

    def pump():
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            print(prefix + line, end="", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=max(1.0, limit))
    except subprocess.TimeoutExpired:
        timed_out = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    reader.join(timeout=5)
    _current.remove(proc)
    return {"rc": proc.returncode, "timed_out": timed_out, "seconds": round(time.monotonic() - t, 1), "lines": lines}


def run_child(step: str, limit: float, args, env: dict, kernel_status: str) -> dict:
    part = Path(tempfile.mkdtemp(prefix="mozgach_gpu_")) / f"{step}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", step, "--part", str(part),
           "--budget", str(max(5.0, limit - MARGIN)), "--kernel-status", kernel_status]
    r = run_streaming(cmd + (["--dry-run"] if args.dry_run else []), limit, env, f"[{step}] ")
    data = json.loads(part.read_text()) if part.exists() else {}
    if r["timed_out"]:
        status = f"timed out after {limit:.0f} s" + (f" in {data['running']}" if data.get("running") else "")
    elif r["rc"] != 0 or data.get("running"):
        status = f"crashed (exit {r['rc']})" + (f" in {data['running']}" if data.get("running") else "")
    else:
        status = "ok"
    return {"status": status, "seconds": r["seconds"], **data,
            **({"tail": r["lines"][-30:]} if status != "ok" else {})}


def step_tests(clock: Clock, args, env: dict, save) -> dict:
    res = {"env": {**TEST_ENV, "MOZGACH_ATTENTION": env.get("MOZGACH_ATTENTION")}, "groups": {}}
    env = {**env, **TEST_ENV, "PYTHONPATH": os.pathsep.join(filter(None, (str(HERE), env.get("PYTHONPATH"))))}
    timeout = ["--timeout=90"] if find_spec("pytest_timeout") else []
    res["per_test_timeout"] = bool(timeout)
    junit_dir = Path(tempfile.mkdtemp(prefix="mozgach_junit_"))
    for i, (group, share, nodes) in enumerate(TEST_GROUPS):
        limit = clock.left() * share / sum(s for _, s, _ in TEST_GROUPS[i:])
        junit = junit_dir / f"{group}.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "-p", "gpu_default_device",
               f"--junitxml={junit}", *timeout, *nodes] + (["-k", DRY_TEST_K[group]] if args.dry_run else [])
        r = run_streaming(cmd, limit, env, f"[tests:{group}] ")
        parsed = parse_junit(junit) if junit.exists() else parse_progress(r["lines"])
        device = next((ln.split("default device ")[1] for ln in r["lines"] if "default device " in ln), None)
        res["groups"][group] = {"rc": r["rc"], "timed_out": r["timed_out"], "seconds": r["seconds"],
                                "limit_s": round(limit), "default_device": device, **parsed,
                                **({"tail": r["lines"][-25:]} if r["rc"] not in (0, 1) or r["timed_out"] else {})}
        save(res)
    total = {k: sum(g[k] for g in res["groups"].values()) for k in ("passed", "failed", "errors", "skipped")}
    return {**res, "total": total, "status": "ok"}


# ------------------------------------------------------------------ main

def _kernel_status(step: str, value: dict, current: str) -> str:
    """crashed | failed | ok | unknown: whether later steps may call the CUDA kernel."""
    st = value.get("status", "")
    if step in ("env", "kernel") and st != "ok" and any(
            w in st for w in ("self_check", "speed_check", "attention_path", "case")):
        return "crashed"
    check = value.get("self_check_tf32_default" if step == "env" else "self_check", {})
    if "ok" in check:
        return "ok" if check["ok"] else "failed"
    return current


def orchestrate(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    caps = {**(DRY_CAPS if args.dry_run else CAPS), **{k: float(v) for k, v in
                                                        (c.split("=") for c in filter(None, args.caps.split(",")))}}
    steps = [s for s in STEPS if not args.steps or s in args.steps.split(",")]
    clock = Clock(args.budget)
    results = {"meta": {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "budget_s": args.budget, "steps": steps,
                        "dry_run": args.dry_run, "python": sys.version.split()[0], "caps": caps}, "steps": {}}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}

    def save(step=None, value=None):
        if step:
            results["steps"][step] = value
        write_json(out / "results.json", results)
        (out / "summary.md").write_text(render(results))

    def on_term(signum, frame):  # run.sh's timeout: stop the child's whole group, keep what we have
        for p in list(_current):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
        results["meta"]["stopped"] = f"signal {signum}"
        save()
        os._exit(124)

    signal.signal(signal.SIGTERM, on_term)
    status = "unknown"
    for i, step in enumerate(steps):
        limit = clock.left() - 5 if i == len(steps) - 1 else min(caps[step], clock.left() - 5)
        if limit < 15:
            save(step, {"status": "skipped", "reason": f"time budget ({clock.left():.0f} s left)"})
            continue
        print(f"== {step}: up to {limit:.0f} s of {clock.left():.0f} s left", flush=True)
        t = time.monotonic()
        step_env = dict(env)
        if step in ("tests", "lora", "speed") and status == "crashed":
            step_env["MOZGACH_ATTENTION"] = "blockwise"  # the dispatcher would run the crashing self-check
        if step == "kernel":
            step_env["MLX_ENABLE_TF32"] = "0"  # fp32 cases against an fp32 blockwise path
        try:
            if step == "tests":
                value = step_tests(Clock(limit), args, step_env,
                                   lambda r, step=step: save(step, {**r, "status": "running"}))
            else:
                value = run_child(step, limit, args, step_env, status)
        except Exception:  # a bug here must not lose the later steps
            value = {"status": "error in check_cuda.py", "tail": traceback.format_exc().splitlines()}
        value["seconds"] = round(time.monotonic() - t, 1)
        status = results["meta"]["kernel_status"] = _kernel_status(step, value, status)
        save(step, value)
        print(f"== {step}: {value['status']} in {value['seconds']} s", flush=True)
    print(f"== done; {out / 'summary.md'}:\n")
    print((out / "summary.md").read_text())
    return 0


def child_main(args) -> int:
    part = Part(Path(args.part))
    part["running"] = "start"
    try:
        CHILDREN[args.child](part, Clock(args.budget), args)
    except Exception:
        part["error"] = traceback.format_exc()[-4000:]
        raise
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_out"), help="folder for results.json, summary.md")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for all steps together")
    ap.add_argument("--steps", default="", help=f"comma-separated subset of {','.join(STEPS)} (default all)")
    ap.add_argument("--caps", default="", help="per-step limits in s, e.g. tests=90,speed=150")
    ap.add_argument("--dry-run", action="store_true", help="the CPU, tiny sizes, no kernel calls")
    ap.add_argument("--child", choices=list(CHILDREN), help=argparse.SUPPRESS)
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--kernel-status", default="unknown", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    return child_main(args) if args.child else orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
