"""The ``mozgach`` command line: train | eval | generate | plan.

One source of defaults: the dataclasses (:class:`RunConfig`, :class:`TrainConfig`,
:class:`LoRAConfig`, :class:`GenerationConfig`) and :func:`mozgach_mlx.plan` (whose own
defaults come from those dataclasses). Every click option defaults to ``None`` and only
overrides what the user actually gave; precedence is CLI > YAML (``--config``) > the
built-in default preset (only for the built-in default run: tiny model + synthetic
corpus) > dataclass defaults. What each command does is in :mod:`mozgach_mlx.commands`.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import click

from .bank import GenerationConfig
from .errors import ConfigError, MozgachError
from .lora import LoRAConfig
from .rundir import DEFAULT_RUN_LORA, DEFAULT_RUN_TRAIN, RunConfig, parse_quantize
from .train_config import TrainConfig

__all__ = ["DEFAULT_RUN_LORA", "DEFAULT_RUN_TRAIN", "RunConfig", "build_configs", "main"]


def _field_options(cls, prefix: str = "", skip: tuple = ()):
    """click options for a dataclass's scalar fields, all defaulting to None."""
    opts = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        dest = prefix + f.name
        flag = "--" + dest.replace("_", "-")
        typ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        help_ = f.metadata.get("help", "")
        if typ == "bool":
            opts.append(click.option(f"{flag}/--no-{flag[2:]}", dest, default=None, help=help_))
        elif "tuple" in typ:
            opts.append(click.option(flag, dest, default=None, help=help_ + " (comma-separated)"))
        else:
            ptype = float if "float" in typ else int if "int" in typ else str
            opts.append(click.option(flag, dest, type=ptype, default=None, help=help_))
    return opts


def _apply(opts):
    def deco(fn):
        for o in reversed(opts):
            fn = o(fn)
        return fn
    return deco


def _load_yaml(path: str | None) -> dict:
    if not path:
        return {}
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError as e:
        raise ConfigError(f"--config {path}: file not found") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: invalid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping at the top level")
    return data


def build_configs(cli: dict, yaml_cfg: dict):
    """Merge CLI > YAML > preset > defaults into (RunConfig, TrainConfig)."""
    run_names = {f.name for f in dataclasses.fields(RunConfig)}
    train_names = {f.name for f in dataclasses.fields(TrainConfig)} - {"lora"}
    lora_names = {f.name for f in dataclasses.fields(LoRAConfig)}

    y_run = {k: v for k, v in yaml_cfg.items() if k not in ("train", "lora")}
    unknown = set(y_run) - run_names
    if unknown:
        raise ConfigError(f"--config: unknown top-level key(s) {sorted(unknown)}; "
                          f"valid: {sorted(run_names)} plus 'train:' and 'lora:' sections")
    y_train, y_lora = yaml_cfg.get("train") or {}, yaml_cfg.get("lora") or {}
    for sect, names, given in (("train", train_names, y_train), ("lora", lora_names, y_lora)):
        bad = set(given) - names
        if bad:
            raise ConfigError(f"--config: unknown key(s) {sorted(bad)} in '{sect}:'; valid: {sorted(names)}")

    c_run = {k: v for k, v in cli.items() if k in run_names and v is not None}
    run = RunConfig(**{**y_run, **c_run})
    preset_train = DEFAULT_RUN_TRAIN if run.builtin_default else {}
    preset_lora = DEFAULT_RUN_LORA if run.builtin_default else {}
    c_train = {k: v for k, v in cli.items() if k in train_names and v is not None}
    c_lora = {k[len("lora_"):]: v for k, v in cli.items()
              if k.startswith("lora_") and k[len("lora_"):] in lora_names and v is not None}
    if isinstance(c_lora.get("targets"), str):
        c_lora["targets"] = tuple(t.strip() for t in c_lora["targets"].split(",") if t.strip())
    lcfg = {**preset_lora, **y_lora, **c_lora}
    if "targets" in lcfg:
        lcfg["targets"] = tuple(lcfg["targets"])
    tcfg = TrainConfig(**{**preset_train, **y_train, **c_train}, lora=LoRAConfig(**lcfg))
    if run.quiet:
        tcfg.progress = False
    return run, tcfg


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """mozgach: long-context QLoRA fine-tuning of many LoRA experts over one base."""


def _fail(e: Exception) -> None:
    click.echo(f"error: {e}", err=True)
    sys.exit(2)


@main.command("train")
@click.option("--config", "config_path", default=None, help="YAML file with run keys, 'train:' and 'lora:'")
@_apply(_field_options(RunConfig))
@_apply(_field_options(TrainConfig, skip=("lora", "progress")))
@_apply(_field_options(LoRAConfig, prefix="lora_"))
def train_cmd(config_path: str | None, **cli: Any) -> None:
    """Train one adapter per domain over one base (the 108 by default)."""
    try:
        from .commands import run_fleet

        run, tcfg = build_configs(cli, _load_yaml(config_path))
        code = run_fleet(run, tcfg)
    except MozgachError as e:
        _fail(e)
    sys.exit(code)


@main.command("eval")
@click.option("--out", required=True, help="the run directory to evaluate")
@click.option("--max-batches", type=int, default=None, help="validation batches per domain")
@click.option("--route-samples", type=int, default=None, help="held-out samples per domain for routing")
def eval_cmd(out: str, max_batches: int | None, route_samples: int | None) -> None:
    """Per domain: base loss, own adapter's loss, best other adapter's loss; routing accuracy."""
    try:
        from .commands import eval_run

        code = eval_run(out, max_batches=max_batches, route_samples=route_samples)
    except MozgachError as e:
        _fail(e)
    sys.exit(code)


@main.command("generate")
@click.option("--out", default=None, help="a run directory: its base and adapters")
@click.option("--model", default=None, help="base model (default: the run's, else tiny)")
@click.option("--adapter", default=None, help="adapter name or directory (default: none = base)")
@click.option("--prompt", required=True)
@_apply(_field_options(GenerationConfig))
def generate_cmd(out, model, adapter, prompt, **gen: Any) -> None:
    """Generate text with the base or one adapter."""
    try:
        from .commands import generate_text

        cfg = GenerationConfig(**{k: v for k, v in gen.items() if v is not None})
        click.echo(generate_text(out=out, model=model, adapter=adapter, prompt=prompt, gen=cfg))
    except MozgachError as e:
        _fail(e)


@main.command("plan")
@click.option("--model", default=None, help=f"{RunConfig.model!r}, a model directory or Hub repo id "
              "(only config.json is read)")
@click.option("--context", type=int, default=None, help="tokens per training sequence (default 100,000)")
@click.option("--batch-size", type=int, default=None, help=f"sequences per step (default {TrainConfig.batch_size})")
@click.option("--quantize", default=None, help=f"base quantization: 4, 8 or none (default {RunConfig.quantize})")
@click.option("--lora-r", type=int, default=None, help=f"LoRA rank (default {LoRAConfig.r})")
@click.option("--memory-gb", type=float, default=None, help="memory budget to check (e.g. 48)")
@click.option("--gflops", type=float, default=None, help="measured training throughput, GFLOP/s")
@click.option("--backend", type=click.Choice(["cpu", "metal", "cuda"]), default=None,
              help="plan for this backend (default: the one here)")
def plan_cmd(model, context, batch_size, quantize, lora_r, memory_gb, gflops, backend) -> None:
    """Estimate peak memory and step time of LoRA training at a context length."""
    try:
        from .plan import plan

        given = {"context": context, "batch_size": batch_size, "lora_rank": lora_r, "memory_gb": memory_gb,
                 "gflops": gflops, "backend": backend}
        kw = {k: v for k, v in given.items() if v is not None}
        if quantize is not None:
            kw["quantize"] = parse_quantize(quantize)
        click.echo(plan(model or RunConfig.model, **kw).table())
    except MozgachError as e:
        _fail(e)


if __name__ == "__main__":
    main()
