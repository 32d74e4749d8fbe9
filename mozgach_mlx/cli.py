"""The ``mozgach`` command line: train | eval | report | generate | plan | export | serve.

One source of defaults: the dataclasses (:class:`RunConfig`, :class:`TrainConfig`,
:class:`LoRAConfig`, :class:`GenerationConfig`) and :func:`mozgach_mlx.plan` (whose own
defaults come from those dataclasses). Every click option defaults to ``None`` and only
overrides what the user actually gave; precedence is CLI > YAML (``--config``) > the
built-in runs' presets (:meth:`RunConfig.preset`: tiny-stdlib on stdlib12, the default;
tiny on the synthetic corpus) > dataclass defaults. What each command does is in :mod:`mozgach_mlx.commands`.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import click

from .bank import GenerationConfig
from .errors import ConfigError, MozgachError
from .evaluate import MAX_SAMPLES, QUICK_SAMPLES, SAMPLE_TOKENS
from .lora import LoRAConfig
from .rundir import DEFAULT_RUN_LORA, DEFAULT_RUN_TRAIN, RunConfig, parse_quantize
from .serve.config import ServeConfig
from .train_config import TrainConfig
from .typecheck import load_yaml

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
        if typ in ("bool", "bool | None"):  # a flag pair; not given: None (the dataclass's default)
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


def build_configs(cli: dict, yaml_cfg: dict, source: str = "--config"):
    """Merge CLI > YAML > preset > defaults into (RunConfig, TrainConfig).

    The YAML values are checked on their own first, so an error in the file names the
    file (``source``) and the key; an error in the merged result is the CLI's."""
    run_names = {f.name for f in dataclasses.fields(RunConfig)}
    train_names = {f.name for f in dataclasses.fields(TrainConfig)} - {"lora"}
    lora_names = {f.name for f in dataclasses.fields(LoRAConfig)}

    y_run = {k: v for k, v in yaml_cfg.items() if k not in ("train", "lora")}
    unknown = set(y_run) - run_names
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key(s) {sorted(unknown)}; "
                          f"valid: {sorted(run_names)} plus 'train:' and 'lora:' sections")
    y_train, y_lora = yaml_cfg.get("train") or {}, yaml_cfg.get("lora") or {}
    for sect, names, given in (("train", train_names, y_train), ("lora", lora_names, y_lora)):
        if not isinstance(given, dict):
            raise ConfigError(f"{source}: '{sect}:' must be a mapping of keys to values, got {given!r}")
        bad = set(given) - names
        if bad:
            raise ConfigError(f"{source}: unknown key(s) {sorted(bad)} in '{sect}:'; valid: {sorted(names)}")
    if yaml_cfg:
        try:  # the file's values on their own, so that an error names the file
            RunConfig(**y_run)
            TrainConfig(**y_train, lora=LoRAConfig(**y_lora))
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    c_run = {k: v for k, v in cli.items() if k in run_names and v is not None}
    run = RunConfig(**{**y_run, **c_run})
    preset_train, preset_lora = run.preset()
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


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def _guarded(run, args, debug: bool):
    """Run a click entry point so that no error a user can cause shows a traceback.

    Usage errors, our own errors (:class:`MozgachError`) and OS errors (a path that is a
    file, a permission, a full disk) print one line and exit 2; an unexpected internal
    error prints one line and the hint to rerun with ``--debug``, and exits 1 (with
    ``--debug`` the traceback is shown instead).
    """
    try:
        run(args)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.UsageError as e:
        hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
        click.echo(f"error: {_one_line(e.format_message())}{hint}", err=True)
        sys.exit(2)
    except (click.Abort, KeyboardInterrupt):
        click.echo("aborted", err=True)
        sys.exit(130)
    except MozgachError as e:
        click.echo(f"error: {_one_line(e)}", err=True)
        sys.exit(2)
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        click.echo(f"error: {e.strerror or _one_line(e)}{where}", err=True)
        sys.exit(2)
    except Exception as e:
        if debug:
            raise
        click.echo(f"error: internal error ({type(e).__name__}: {_one_line(e)}); "
                   "run again with --debug for the traceback", err=True)
        sys.exit(1)


class _Guarded:
    """click Command / Group whose ``main`` runs inside :func:`_guarded`."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        argv = list(sys.argv[1:] if args is None else args)
        _guarded(lambda a: super(_Guarded, self).main(a, prog_name, complete_var, standalone_mode=False, **extra),
                 argv, debug="--debug" in argv)


class GuardedCommand(_Guarded, click.Command):
    pass


class GuardedGroup(_Guarded, click.Group):
    command_class = GuardedCommand


_debug_option = click.option("--debug", is_flag=True, default=None, expose_value=False,
                             help="show the traceback of an internal error")


@click.group(cls=GuardedGroup, context_settings={"help_option_names": ["-h", "--help"]})
@_debug_option
def main() -> None:
    """mozgach: long-context QLoRA fine-tuning of many LoRA experts over one base."""


@main.command("train")
@click.option("--config", "config_path", default=None, help="YAML file with run keys, 'train:' and 'lora:'")
@_apply(_field_options(RunConfig))
@_apply(_field_options(TrainConfig, skip=("lora", "progress")))
@_apply(_field_options(LoRAConfig, prefix="lora_"))
@_debug_option
def train_cmd(config_path: str | None, **cli: Any) -> None:
    """Train one adapter per domain over one base (default: 12 over tiny-stdlib on stdlib12)."""
    from .commands import run_fleet

    yaml_cfg = load_yaml(config_path) if config_path else {}
    run, tcfg = build_configs(cli, yaml_cfg, source=f"--config {config_path}")
    sys.exit(run_fleet(run, tcfg))


@main.command("eval")
@click.option("--out", default=None, help="the run directory to evaluate (fleet evaluation)")
@click.option("--max-batches", type=int, default=None,
              help="held-out samples per domain for the loss table, in the run's batches (default: all)")
@click.option("--route-samples", type=int, default=None,
              help=f"held-out samples per domain for routing (default: all, at most {MAX_SAMPLES})")
@click.option("--sample-tokens", type=int, default=None,
              help=f"tokens per held-out sample, for the loss table and routing (default {SAMPLE_TOKENS})")
@click.option("--split", "split", type=click.Choice(["valid+test", "valid", "test"]), default=None,
              help="held-out splits the samples come from (default valid+test)")
@click.option("--quick", is_flag=True, default=None,
              help=f"a quick look: {QUICK_SAMPLES} samples per domain (wide intervals), loss and tokens routers only")
@click.option("--passkey", is_flag=True, default=None, help="passkey retrieval over --lengths x --depths")
@click.option("--ppl-by-position", is_flag=True, default=None,
              help="perplexity by position bucket on long filler documents (of the largest --lengths)")
@click.option("--model", default=None, help="base model for --passkey / --ppl-by-position (default tiny-stdlib)")
@click.option("--adapter", default=None, help="adapter directory to apply (its RoPE scaling travels with it)")
@click.option("--lengths", default=None, help="prompt lengths in tokens, e.g. 1k,2k,4k (default 1k,2k,4k)")
@click.option("--depths", default=None, help="key depths in [0, 1], e.g. 0,0.25,0.5,0.75,1 (the default)")
@click.option("--trials", type=int, default=None, help="random keys per (length, depth) cell (default 10)")
@click.option("--stride", type=int, default=None, help="ppl sliding-window stride (default window/2)")
@click.option("--bucket", type=int, default=None, help="ppl position bucket in tokens (default 256)")
@_debug_option
def eval_cmd(out: str | None, max_batches: int | None, route_samples: int | None, sample_tokens: int | None,
             split: str | None, quick: bool | None, passkey: bool, ppl_by_position: bool, **long_ctx: Any) -> None:
    """Fleet run: per-domain losses and routing (--out). Long context: --passkey / --ppl-by-position."""
    from .commands import eval_long_context, eval_run

    if passkey or ppl_by_position:
        sys.exit(eval_long_context(passkey=passkey, ppl=ppl_by_position, **long_ctx))
    if out is None:
        raise ConfigError("mozgach eval needs --out RUN (fleet evaluation) or --passkey / --ppl-by-position")
    sys.exit(eval_run(out, max_batches=max_batches, route_samples=route_samples, sample_tokens=sample_tokens,
                      split=split, quick=bool(quick)))


@main.command("report")
@click.option("--out", required=True, help="the run directory to report on")
@_debug_option
def report_cmd(out: str) -> None:
    """Write OUT/report.html (self-contained) and OUT/report/*.png: losses, memory, loss matrix, routing."""
    from pathlib import Path

    from .report import read_eval, write_report

    page = write_report(out)
    click.echo(f"wrote {page} and {page.parent / 'report'}/*.png")
    problem = read_eval(Path(out))[1]
    if problem:
        click.echo(f"note: {problem}")


@main.command("generate")
@click.option("--out", default=None, help="a run directory: its base and adapters")
@click.option("--model", default=None, help="base model (default: the run's, else tiny)")
@click.option("--adapter", default=None, help="adapter name or directory (default: none = base)")
@click.option("--prompt", required=True)
@click.option("--chat/--no-chat", default=None, help="send the prompt as a user message through the chat template "
              "(default: when the base's tokenizer has one of its own)")
@_apply(_field_options(GenerationConfig))
@_debug_option
def generate_cmd(out, model, adapter, prompt, chat, **gen: Any) -> None:
    """Generate text with the base or one adapter."""
    from .commands import generate_text

    cfg = GenerationConfig(**{k: v for k, v in gen.items() if v is not None})
    click.echo(generate_text(out=out, model=model, adapter=adapter, prompt=prompt, gen=cfg, chat=chat))


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
@click.option("--ranks", type=int, default=None, help="also estimate training over this many processes")
@click.option("--link", type=click.Choice(["thunderbolt5", "10gbe", "1gbe"]), default=None,
              help="the link between the ranks (default 10gbe; figures in mozgach_mlx/plan_scale.py)")
@click.option("--link-gbps", type=float, default=None, help="the link's rate in Gbit/s (a measured one)")
@click.option("--context-parallel", is_flag=True, default=None,
              help="one sequence over --ranks machines (ring attention): per-rank memory, bytes sent, step time")
@click.option("--device", default=None, help="device profile: m4, m4-pro, m4-max, m3-max, h100 or this (measured); "
              "--memory-gb is then its RAM")
@click.option("--strategy", default=None, help="memory strategy: auto, none, tile, offload, tile+offload "
              f"(default {TrainConfig.memory_strategy})")
@click.option("--tile-chunk", type=int, default=None, help="tiled block recompute with chunks of N positions")
@click.option("--offload/--no-offload", default=None, help="block inputs in a memory-mapped file on disk")
@click.option("--checkpoint-every", type=int, default=None, help="store only every k-th block input")
@click.option("--solve-context", is_flag=True, default=None, help="find the longest context that fits the budget")
@click.option("--contrast", is_flag=True, default=None, help="the step of a contrastive fleet (train --contrast W)")
@_debug_option
def plan_cmd(model, context, batch_size, quantize, lora_r, memory_gb, gflops, backend, ranks, link, link_gbps,
             context_parallel, device, strategy, tile_chunk, offload, checkpoint_every, solve_context,
             contrast) -> None:
    """Estimate peak memory and step time of LoRA training at a context length."""
    from .plan import plan
    from .plan import solve_context as solve

    if context_parallel and (ranks is None or ranks < 2):
        raise ConfigError("--context-parallel spreads one sequence over several machines, but --ranks is "
                          f"{'not given' if ranks is None else ranks}: give --ranks N with N >= 2 (e.g. --ranks 2)")
    given = {"context": context, "batch_size": batch_size, "lora_rank": lora_r, "memory_gb": memory_gb,
             "gflops": gflops, "backend": backend, "ranks": ranks, "link": link, "device": device,
             "strategy": strategy, "tile_chunk": tile_chunk, "link_gbps": link_gbps,
             "context_parallel": context_parallel, "contrast": contrast}
    kw = {k: v for k, v in given.items() if v is not None}
    if quantize is not None:
        kw["quantize"] = parse_quantize(quantize)
    if offload is not None or checkpoint_every is not None or (tile_chunk is not None and strategy is None):
        kw["strategy"] = {"tile_chunk": tile_chunk, "offload": bool(offload), "checkpoint_every": checkpoint_every or 1}
    if solve_context:
        kw.pop("context", None)
        click.echo(solve(model or RunConfig.model, **kw).table())
        return
    click.echo(plan(model or RunConfig.model, **kw).table())


@main.command("export")
@click.option("--out", required=True, help="the run directory whose adapters to export")
@click.option("--adapter", default=None, help="one adapter of the run (e.g. mozgach108_001) or 'all' (the default: "
              "every finished one)")
@click.option("--to", "to", required=True, type=click.Choice(["peft", "mlx-lm", "gguf-lora", "fused"]),
              help="peft / mlx-lm adapter dirs, llama.cpp's GGUF LoRA, or a fused HF checkpoint (checked)")
@click.argument("dest", metavar="DIR")
@click.option("--quantize", type=click.Choice(["4", "8"]), default=None, help="fused: re-quantize to 4 or 8 bits "
              "(refused when that loses the adapter)")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="fused: weight dtype (default float32)")
@click.option("--force", is_flag=True, default=None, help="replace DIR if it exists and is not empty")
@_debug_option
def export_cmd(out: str, adapter: str | None, to: str, dest: str, quantize: str | None, dtype: str | None,
               force: bool | None) -> None:
    """Export a run's adapters to DIR: PEFT, mlx-lm, llama.cpp GGUF LoRA or fused checkpoints."""
    from .export import export

    result = export(out, to, dest, adapter=adapter, quantize=None if quantize is None else int(quantize),
                    dtype=dtype, force=bool(force))
    click.echo(result.summary())


@main.command("serve")
@click.option("--out", default=None, help="a run directory: serve its base and every finished adapter")
@click.option("--model", default=None, help=f"base model (default: the run's, else {RunConfig.model})")
@click.option("--adapter", "adapters", multiple=True, default=None, help="adapter directory to serve (repeatable); its "
              "directory name is its model name")
@click.option("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every request "
              "(default: $MOZGACH_API_KEY, else none)")
@_apply(_field_options(ServeConfig, skip=("api_key",)))
@_debug_option
def serve_cmd(out, model, adapters, api_key, **opts: Any) -> None:
    """OpenAI-compatible HTTP server: the base, every adapter, 'auto' (routed) and mixes as models."""
    from .serve import serve
    from .settings import api_key as env_api_key

    cfg = ServeConfig(**{k: v for k, v in opts.items() if v is not None},
                      api_key=api_key if api_key is not None else env_api_key())
    code = serve(cfg, out=out, model=model, adapters=list(adapters or ()))
    # The server stopped cleanly (every request finished or cancelled, the scheduler joined).
    # Leave without interpreter teardown: with uvicorn's and anyio's threads still around,
    # destroying MLX's C++ statics aborted ~1 graceful exit in 3 on the dev machine
    # ("terminate called without an active exception", exit -6).
    import os

    import mlx.core as mx

    mx.synchronize()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@main.command("launch", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("-n", "--ranks", type=int, required=True, help="how many ranks (processes) to start on this machine")
@click.option("--port", type=int, default=None, help="rank r listens on PORT + r (default: free ports)")
@click.option("--grace", type=float, default=None, help="seconds between SIGTERM and SIGKILL when ranks are stopped")
@click.option("--verbose", is_flag=True, default=None, help="MLX_RING_VERBOSE=1 in the ranks")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def launch_cmd(ranks: int, port: int | None, grace: float | None, verbose: bool | None,
               command: tuple[str, ...]) -> None:
    """Start N local ranks of COMMAND (ring over 127.0.0.1) with an idle launcher; a failed rank stops them all.

    Example: mozgach launch -n 2 -- mozgach train --distributed adapters --out run1
    """
    from .launch import GRACE_S, launch

    sys.exit(launch(ranks, list(command), port=port, grace=GRACE_S if grace is None else grace,
                    verbose=bool(verbose)))


if __name__ == "__main__":
    main()
