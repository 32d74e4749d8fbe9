"""What the CLI commands do, as plain functions (``mozgach train | eval | generate``).

The click layer (:mod:`mozgach_mlx.cli`) parses and merges options; these functions run,
print and return the exit code. What they share about a run directory (its config,
manifest, base and data) is in :mod:`mozgach_mlx.rundir`.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

from . import data as data_mod
from . import distributed as dist
from .bank import AdapterBank, GenerationConfig
from .errors import ConfigError
from .evaluate import QUICK_SAMPLES, evaluate_run
from .fleet import adapter_dir_name, parse_domains, train_fleet
from .rundir import RunConfig, base_identity, data_dir, load_base, load_run_base, read_manifest
from .tokenizer import HFTokenizer
from .trainer import TrainConfig, check_memory, memory_plan


def run_fleet(run: RunConfig, tcfg: TrainConfig) -> int:
    """Train the selected domains; print the summary table. Exit code 1 if any failed.

    The run directory is held (:func:`rundir.locked`) from the start, before the base is
    loaded or the built-in corpus written, so a second process on it refuses at once.
    ``run.distributed`` (``data`` / ``adapters``): this process is one rank of a group
    started by ``mlx.launch``; rank 0 holds the directory and alone prints the summary."""
    if tcfg.memory_gb is not None:  # pre-flight from config.json alone: before any data or weights
        check_memory(memory_plan(run.model, tcfg, quantize=run.quant_bits()))
    if run.distributed == "context":  # every adapter context-parallel over the ranks (mozgach_mlx.context)
        tcfg = dataclasses.replace(tcfg, context_parallel=True)
    group = dist.init(run.distributed)
    with dist.hold(run.out, group):
        return _run_fleet(run, tcfg, group)


def _run_fleet(run: RunConfig, tcfg: TrainConfig, group=None) -> int:
    out = Path(run.out)
    main = dist.is_main(group)
    # rank 0 writes the built-in corpus first; the others then find it (or, on another
    # machine, write their own identical copy)
    dist.together(group, lambda: data_dir(run), main_only=True)
    domains = dist.together(group, lambda: data_mod.discover_domains(data_dir(run)))
    ids = parse_domains(run.domains, [d.id for d in domains])
    selected = [d for d in domains if d.id in ids]
    model, tok = load_base(run)
    data_mod.check_context(tcfg.max_seq_length, model.args)

    bar = None
    if not run.quiet and main:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(selected), desc="adapters", unit="adapter", dynamic_ncols=True)

    def on_event(kind: str, info: dict) -> None:
        if bar is None:
            if kind == "failed":
                print(f"{info['name']} ({info['domain']}): FAILED: {info['error']}", file=sys.stderr)
            return
        if kind in ("done", "skip", "failed"):
            bar.update(1)
        if kind == "failed":
            bar.write(f"{info['name']} ({info['domain']}): FAILED: {info['error']}")
        bar.set_postfix_str(f"{info['name']} {kind}")

    try:
        res = train_fleet(model, tok, selected, tcfg, out, base=base_identity(model, run.model),
                          run_config=run, on_event=on_event, distributed=run.distributed, group=group,
                          negative_domains=domains)
    finally:
        if bar is not None:
            bar.close()
    if not main:
        return 0 if res.ok else 1
    adapters = res.manifest["adapters"]
    rows = [adapters.get(adapter_dir_name(d.id), {"domain": d.name}) | {"name": adapter_dir_name(d.id)}
            for d in selected]
    print(summary_table(rows))
    n_beat = sum(1 for r in rows if _beats(r))
    print(f"{len(res.done)} trained, {len(res.skipped)} already done, {len(res.failed)} failed; "
          f"{n_beat}/{len(rows)} adapters beat the base on their own held-out data. Output: {out}")
    return 0 if res.ok else 1


def _beats(r: dict) -> bool:
    v, b = r.get("valid_loss"), r.get("base_valid_loss")
    return v is not None and b is not None and v < b


def _fmt(x, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def summary_table(rows: list[dict]) -> str:
    head = (f"| {'adapter':<15} | {'domain':<26} | {'status':<7} | {'base':>6} | {'valid':>6} | "
            f"{'beats':>5} | {'steps':>5} | {'tokens':>8} | {'sec':>6} | {'peak GB':>7} |")
    lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    for r in rows:
        lines.append(
            f"| {r['name']:<15} | {str(r.get('domain', ''))[:26]:<26} | {r.get('status', '-'):<7} | "
            f"{_fmt(r.get('base_valid_loss'), '6.3f')} | {_fmt(r.get('valid_loss'), '6.3f')} | "
            f"{('yes' if _beats(r) else 'no'):>5} | {_fmt(r.get('steps'), '5d')} | "
            f"{_fmt(r.get('tokens'), '8d')} | {_fmt(r.get('seconds'), '6.1f')} | "
            f"{_fmt(r.get('peak_memory_gb'), '7.3f')} |")
    return "\n".join(lines)


def eval_run(out: str, *, max_batches: int | None = None, route_samples: int | None = None,
             sample_tokens: int | None = None, split: str | None = None, quick: bool = False) -> int:
    """Print per-domain base / own / best-other losses and the routing accuracy of a run
    (``evaluate_run``'s defaults unless given). ``quick``: ``QUICK_SAMPLES`` samples per domain
    unless ``route_samples`` says otherwise, and only the routers that need no fit on the
    base's hidden states (loss, tokens). ``split``: ``valid+test``, ``valid`` or ``test``."""
    extra: dict = {} if sample_tokens is None else {"sample_tokens": sample_tokens}
    if quick:
        route_samples = QUICK_SAMPLES if route_samples is None else route_samples
        extra.update(signature_samples=0, probe_samples=0)
    if split is not None:
        extra["splits"] = tuple(split.split("+"))
    report = evaluate_run(out, max_batches=max_batches, route_samples=route_samples, **extra)
    print(report.table())
    return 0 if report.all_own_best else 1


def eval_long_context(*, passkey: bool, ppl: bool, model: str | None = None, adapter: str | None = None,
                      lengths: str | None = None, depths: str | None = None, trials: int | None = None,
                      stride: int | None = None, bucket: int | None = None) -> int:
    """``mozgach eval --passkey / --ppl-by-position``: print the passkey grid (exact % /
    per-digit %) and the perplexity-by-position table of a base, with or without an adapter."""
    from . import evals, lora, models

    lens = evals.parse_lengths(lengths if lengths is not None else "1k,2k,4k")
    deps = evals.parse_depths(depths if depths is not None else "0,0.25,0.5,0.75,1")
    if adapter is not None and not Path(adapter).is_dir():
        raise ConfigError(f"--adapter {adapter}: no such adapter directory")
    base, tok = models.load(model or RunConfig.model)
    if adapter is not None:
        lora.load(base, adapter)
    name = (model or RunConfig.model) + (f" + {adapter}" if adapter else "")
    if passkey:
        grid = evals.passkey_grid(base, tok, lens, deps, trials=10 if trials is None else trials)
        print(evals.format_grid(grid, title=f"passkey {name} (exact % / per-digit %)"))
    if ppl:
        docs = evals.filler_documents(tok, max(lens), 2)
        table = evals.ppl_by_position(base, docs, window=max(lens), stride=stride,
                                      bucket=256 if bucket is None else bucket)
        print(evals.format_position_table({name: table}))
    return 0


def generate_text(*, out: str | None, model: str | None, adapter: str | None, prompt: str,
                  gen: GenerationConfig | None = None, chat: bool | None = None) -> str:
    """Text generated from ``prompt`` by a run's base (or ``model``) with one adapter or none.

    ``chat``: send ``prompt`` as a user message through the tokenizer's chat template
    (default: when the base's tokenizer has a template of its own, as instruct models do;
    not the byte tokenizer's built-in one)."""
    from . import models

    gen = gen or GenerationConfig()
    if out is not None:
        base, tok = load_run_base(read_manifest(out), model=model)
    else:
        base, tok = models.load(model or RunConfig.model)
    dirs = []
    if adapter is not None:
        p = Path(adapter)
        if not p.exists() and out is not None:
            p = Path(out) / adapter
        if not p.exists():
            raise ConfigError(f"--adapter {adapter}: no such adapter directory")
        dirs = [p]
    if chat is None:
        chat = isinstance(tok, HFTokenizer) and tok.has_chat_template
    if chat:
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    bank = AdapterBank(base, tok, dirs)
    return bank.generate(prompt, adapter=dirs[0].name if dirs else None, max_tokens=gen.max_tokens,
                         temperature=gen.temperature)
