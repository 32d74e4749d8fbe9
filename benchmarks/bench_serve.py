"""Load test: N concurrent clients asking random adapters for T seconds, against
``mozgach serve`` and against ``mlx_lm.server``, side by side in one run.

Both servers get the same base (the built-in 4-bit tiny-stdlib by default, an MLX
checkpoint mlx-lm reads as is), the same adapters (random LoRA deltas on q/k/v/o, saved in
mlx-lm's format so both can load them), the same prompts and the same request pattern:
each client loops, picks an adapter and a prompt at random (seeded per client) and
streams a greedy completion of ``--max-tokens`` tokens.

How a request selects its adapter:
  ours     ``model: <adapter name>``; every adapter is in the bank, rows of one batch may
           use different adapters.
  mlx-lm   ``model: <base path>, adapters: <adapter path>`` (its per-request field): the
           server keeps one (model, adapter) loaded; a request for another one drains the
           running batch and reloads the model with that adapter (mlx_lm/server.py,
           ``ModelProvider.load``). Requests for the loaded adapter batch together.

Each server runs in its own process, started here. mlx-lm gets its fastest setup on a
CPU: by default the same weights dequantized to fp32 (``mlx_lm.convert --dequantize
--dtype float32``; as shipped, tiny-stdlib's fp16 scales make it compute in fp16, which
has no fast CPU path: ``--mlx-lm-weights shipped``), in a process that imports mozgach_mlx
first, so both servers use the same OpenBLAS GEMM on Linux (blasbind; ``--mlx-lm-plain``
starts it without). Ours keeps the 4-bit base. Printed per server: requests done, completion tokens per second
(all clients' tokens / wall time), p50/p95 latency and time to first token, failed
requests. Usage::

    python benchmarks/bench_serve.py                      # 32 clients x 60 s each
    python benchmarks/bench_serve.py --clients 16 --seconds 20 --adapters 4
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

import mozgach_mlx as mz
from mozgach_mlx import lora
from mozgach_mlx.models.checkpoint import resolve

PROMPTS = [
    "def read_config(path):\n",
    "import os\nimport sys\n\n",
    "class Queue:\n    \"\"\"A first-in, first-out queue.\"\"\"\n",
    "# Parse the command line and print a summary of the files it names.\n",
    "for line in open(filename):\n    fields = line.split(",
    "The quick brown fox jumps over the lazy dog. ",
    "    def __init__(self, name, value=None):\n",
    "try:\n    import json\nexcept ImportError:\n",
]


def make_adapters(model_name: str, n: int, root: Path, r: int = 8) -> list[Path]:
    """``n`` adapters with random A and B (so they differ from the base and each other)."""
    dirs = []
    for i in range(n):
        model, _ = mz.load(model_name)
        lora.apply(model, lora.LoRAConfig(r=r, alpha=2.0 * r, dropout=0.0), seed=i)
        flat = [(k, v) for k, v in tree_flatten(model.trainable_parameters()) if k.endswith("lora_b")]
        keys = mx.random.split(mx.random.key(1000 + i), len(flat))
        new_b = [(k, 0.05 * mx.random.normal(v.shape, key=kk)) for (k, v), kk in zip(flat, keys, strict=True)]
        model.load_weights(new_b, strict=False)
        d = root / f"expert{i:02d}"
        lora.save(model, d, format="mlx-lm")
        dirs.append(d)
    return dirs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode} before it was ready")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/v1/models")
            conn.getresponse().read()
            conn.close()
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"server on port {port} not ready after {timeout:.0f} s")


def one_request(port: int, body: dict) -> tuple[float, float | None, int, str | None]:
    """Stream one completion: (latency s, time to first token s, completion tokens, error)."""
    t0 = time.perf_counter()
    ttft, tokens, chunks = None, None, 0
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            return time.perf_counter() - t0, None, 0, f"HTTP {resp.status}: {resp.read()[:200]!r}"
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return time.perf_counter() - t0, ttft, 0, str(event["error"])[:200]
            if event.get("choices") and event["choices"][0].get("text"):
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
        conn.close()
    except (OSError, http.client.HTTPException, ValueError) as e:
        return time.perf_counter() - t0, ttft, 0, f"{type(e).__name__}: {e}"
    return time.perf_counter() - t0, ttft, chunks if tokens is None else tokens, None


def load(port: int, bodies: list[dict], clients: int, seconds: float, seed: int) -> dict:
    """``clients`` threads, each sending random ``bodies`` back to back for ``seconds``."""
    results: list[tuple] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        while time.perf_counter() < stop_at:
            res = one_request(port, rng.choice(bodies))
            with lock:
                results.append(res)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if r[3] is None]
    lat = sorted(r[0] for r in ok)
    ttft = sorted(r[1] for r in ok if r[1] is not None)

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    errors = [r[3] for r in results if r[3] is not None]
    return {"requests": len(ok), "failed": len(errors), "tokens": sum(r[2] for r in ok), "wall_s": wall,
            "tokens_per_s": sum(r[2] for r in ok) / wall, "p50_s": pct(lat, 0.5), "p95_s": pct(lat, 0.95),
            "ttft_p50_s": pct(ttft, 0.5), "ttft_p95_s": pct(ttft, 0.95), "first_errors": errors[:3]}


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ})


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--model", default="tiny-stdlib", help="built-in name or an MLX checkpoint directory")
    ap.add_argument("--only", choices=["ours", "mlx-lm"], default=None)
    ap.add_argument("--mlx-lm-plain", action="store_true", help="start mlx_lm.server without importing mozgach_mlx")
    ap.add_argument("--mlx-lm-weights", choices=["fp32", "shipped"], default="fp32",
                    help="mlx-lm's copy of the base: dequantized fp32 (its fastest on a CPU) or as shipped")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    model_dir = str(resolve(args.model))
    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    dirs = make_adapters(args.model, args.adapters, work)
    rows = {}
    common = {"max_tokens": args.max_tokens, "temperature": 0.0, "stream": True,
              "stream_options": {"include_usage": True}}

    if args.only in (None, "ours"):
        port = free_port()
        cmd = [sys.executable, "-m", "mozgach_mlx.cli", "serve", "--model", args.model, "--port", str(port),
               "--max-seqs", str(args.clients), "--max-tokens", str(max(args.max_tokens, 16))]
        for d in dirs:
            cmd += ["--adapter", str(d)]
        proc = start(cmd, work / "ours.log")
        try:
            wait_ready(port, proc)
            bodies = [{"model": d.name, "prompt": p, **common} for d in dirs for p in PROMPTS]
            rows["mozgach serve (mixed batches)"] = load(port, bodies, args.clients, args.seconds, args.seed)
        finally:
            stop(proc)

    if args.only in (None, "mlx-lm"):
        if args.mlx_lm_weights == "fp32":
            from mlx_lm import convert

            convert(model_dir, str(work / "base_fp32"), dequantize=True, dtype="float32")
            model_dir = str(work / "base_fp32")
        port = free_port()
        argv = ["--model", model_dir, "--port", str(port), "--max-tokens", str(args.max_tokens),
                "--decode-concurrency", str(args.clients), "--prompt-concurrency", str(args.clients)]
        if args.mlx_lm_plain:
            cmd = [sys.executable, "-m", "mlx_lm", "server", *argv]
        else:
            cmd = [sys.executable, "-c", "import sys, mozgach_mlx; from mlx_lm.server import main; "
                   "sys.argv = ['mlx_lm.server', *sys.argv[1:]]; main()", *argv]
        proc = start(cmd, work / "mlx_lm.log")
        try:
            wait_ready(port, proc)
            bodies = [{"model": model_dir, "adapters": str(d), "prompt": p, **common} for d in dirs for p in PROMPTS]
            rows["mlx_lm.server (reload per adapter)"] = load(port, bodies, args.clients, args.seconds, args.seed)
        finally:
            stop(proc)

    head = (f"| {'server':<36} | {'requests':>8} | {'tokens/s':>8} | {'p50 s':>6} | {'p95 s':>6} | "
            f"{'TTFT p50':>8} | {'TTFT p95':>8} | {'failed':>6} |")
    print(f"\n{args.clients} clients x {args.seconds:g} s, {args.adapters} adapters chosen at random, "
          f"{args.max_tokens} greedy tokens per request, base {args.model} (mlx-lm: {args.mlx_lm_weights})")
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    for name, r in rows.items():
        print(f"| {name:<36} | {r['requests']:>8} | {r['tokens_per_s']:>8.1f} | {r['p50_s']:>6.2f} | "
              f"{r['p95_s']:>6.2f} | {r['ttft_p50_s']:>8.2f} | {r['ttft_p95_s']:>8.2f} | {r['failed']:>6} |")
    if len(rows) == 2:
        a, b = (r["tokens_per_s"] for r in rows.values())
        print(f"throughput ratio (ours / mlx-lm): {a / b:.2f}x" if b else "mlx-lm completed nothing")
    for name, r in rows.items():
        if r["first_errors"]:
            print(f"{name}: first errors: {r['first_errors']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": rows}, indent=2))
    print(f"server logs in {work}")


if __name__ == "__main__":
    main()
