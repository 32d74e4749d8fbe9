"""What a run report shows, read from a run directory (no plotting here).

Sources, all written by the run itself:

* ``manifest.json``: per adapter its status, domain, base and final validation loss,
  steps, tokens, seconds and peak memory (:mod:`mozgach_mlx.fleet`);
* ``logs/<adapter>.jsonl``: the trainer's step log (training loss, tokens, elapsed
  seconds, peak memory per optimizer step, ``valid_loss`` every ``eval_every`` steps);
* ``eval.json``: ``mozgach eval``'s loss matrix and routing (optional: without it the
  report says how to make it);
* the planner (:func:`mozgach_mlx.plan`) for the run's base and training config.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConfigError, MozgachError
from ..evaluate import REPORT_FILE as EVAL_FILE
from ..memory import MemoryStrategy
from ..plan import GiB, plan
from ..rundir import Manifest, parse_quantize, read_manifest

__all__ = ["AdapterCurves", "EvalData", "PlanCurve", "RunData", "collect", "device_memory_limit", "plan_curve",
           "read_eval", "throughput"]


# the routers an eval.json can hold, in the order they are shown: (key, label)
ROUTE_METHODS = {"loss": "lowest loss", "tokens": "tokens (naive Bayes)", "probe": "linear probe",
                 "signature": "hidden-state signature"}

@dataclass
class AdapterCurves:
    """One adapter's training: step log and the manifest's summary (losses in nats/token)."""

    name: str
    domain: str
    status: str
    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    # validation points (step, loss): the base's at step 0, any eval_every ones, the final one
    valid: list[tuple[int, float]] = field(default_factory=list)
    tokens: int | None = None
    seconds: float | None = None
    tokens_per_s: float | None = None  # training steps only (from the step log's elapsed time)
    peak_memory_gb: float | None = None
    base_valid_loss: float | None = None
    valid_loss: float | None = None
    error: str | None = None


@dataclass
class EvalData:
    """``eval.json``: the (domains x adapters) loss matrix (row i: adapters[i]'s domain)."""

    adapters: list[str]
    domains: list[str]
    matrix: np.ndarray  # (domains, adapters), nats per target token
    base: np.ndarray  # (domains,) the base's loss on each domain
    routes: list[dict]
    route_accuracy: dict[str, float | None]  # router (ROUTE_METHODS) -> top-1 accuracy (None: not run)
    n_route: int


@dataclass
class PlanCurve:
    """The planner's peak-memory estimate over a range of contexts for the run's base."""

    contexts: np.ndarray
    total_gib: np.ndarray
    components_gib: dict[str, np.ndarray]
    limit_gib: float
    limit_label: str
    max_context: int | None
    run_context: int | None
    measured_peak_gib: float | None
    notes: list[str] = field(default_factory=list)


@dataclass
class RunData:
    out: Path
    base: str
    manifest: Manifest
    adapters: list[AdapterCurves]
    eval: EvalData | None
    eval_problem: str | None  # why there is no eval section
    plan: PlanCurve | None
    plan_problem: str | None


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a torn last line of a killed run
    return out


def throughput(log: list[dict]) -> float | None:
    """Training tokens per second over the logged steps. A resumed adapter's log has one
    segment per attempt (its elapsed time restarts at the resume); each segment counts
    the tokens from the step before it to its last step over its own elapsed time."""
    tokens = seconds = 0.0
    before, last = 0, None  # tokens before the current segment; the segment's last record
    for rec in log:
        if rec.get("tokens") is None or rec.get("elapsed_s") is None:
            continue
        if last is not None and rec["elapsed_s"] < last["elapsed_s"]:  # a new attempt
            tokens, seconds = tokens + last["tokens"] - before, seconds + last["elapsed_s"]
            before = last["tokens"]
        last = rec
    if last is not None:
        tokens, seconds = tokens + last["tokens"] - before, seconds + last["elapsed_s"]
    return tokens / seconds if seconds > 0 else None


def _curves(out: Path, name: str, rec) -> AdapterCurves:
    log = _read_jsonl(out / "logs" / f"{name}.jsonl")
    c = AdapterCurves(name=name, domain=rec.domain, status=rec.status, error=rec.error, tokens=rec.tokens,
                      seconds=rec.seconds, peak_memory_gb=rec.peak_memory_gb, base_valid_loss=rec.base_valid_loss,
                      valid_loss=rec.valid_loss)
    for r in log:
        if "step" in r and "loss" in r:
            c.steps.append(int(r["step"]))
            c.train_loss.append(float(r["loss"]))
        if r.get("valid_loss") is not None:
            c.valid.append((int(r["step"]), float(r["valid_loss"])))
    if rec.base_valid_loss is not None:
        c.valid.insert(0, (0, float(rec.base_valid_loss)))
    if rec.valid_loss is not None and rec.status == "done":
        c.valid.append((int(rec.steps or (c.steps[-1] if c.steps else 0)), float(rec.valid_loss)))
    c.tokens_per_s = throughput(log)
    if c.tokens_per_s is None and rec.tokens and rec.seconds:
        c.tokens_per_s = rec.tokens / rec.seconds
    if c.peak_memory_gb is None and log:
        c.peak_memory_gb = max((r.get("peak_memory_gb") or 0.0) for r in log) or None
    return c


def read_eval(out: Path) -> tuple[EvalData | None, str | None]:
    """``OUT/eval.json`` as :class:`EvalData`, or (None, why not)."""
    path = out / EVAL_FILE
    hint = f"run `mozgach eval --out {out}` to add the adapters x domains loss matrix and routing"
    if not path.is_file():
        return None, f"no {EVAL_FILE} yet: {hint}"
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"{path} is unreadable ({e}): {hint}"
    if not d.get("loss_matrix"):
        return None, f"{path} has no loss matrix (written by an older version): {hint}"
    rows = {r["adapter"]: r for r in d.get("rows", [])}
    adapters = list(d["adapters"])
    return EvalData(
        adapters=adapters, domains=[rows[a]["domain"] if a in rows else a for a in adapters],
        matrix=np.array(d["loss_matrix"], dtype=float),
        base=np.array([rows[a]["base_loss"] if a in rows else math.nan for a in adapters], dtype=float),
        routes=list(d.get("routes") or []),
        route_accuracy={m: _num(d.get(f"route_{m}_accuracy")) for m in ROUTE_METHODS},
        n_route=len(d.get("routes") or [])), None


def _num(x) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def device_memory_limit() -> tuple[float, str]:
    """(GiB, label) of the memory MLX may use on this machine (``mx.get_memory_limit``:
    Metal's recommended working set on a Mac, a share of RAM on the CPU)."""
    import mlx.core as mx

    from ..backend import backend

    gib = mx.get_memory_limit() / GiB
    return gib, f"this machine's MLX memory limit ({backend()}, {gib:.1f} GiB)"


def plan_curve(manifest: Manifest, adapters: list[AdapterCurves], n_points: int = 48) -> PlanCurve:
    """The planner's estimate for the run's base and training config, from short contexts
    to past the longest one that fits this machine's memory limit."""
    base, train = manifest.base, manifest.train
    model = base.get("args") or base.get("source")
    if not model:
        raise ConfigError("the manifest records neither the base's config nor its source")
    quant = base.get("quantization") or {}
    lora_cfg = train.get("lora") or {}
    kw = {k: v for k, v in {
        "batch_size": train.get("batch_size"), "lora_rank": lora_cfg.get("r"),
        "lora_targets": tuple(lora_cfg["targets"]) if lora_cfg.get("targets") else None,
        "group_size": quant.get("group_size"), "mlp_chunk": train.get("mlp_chunk"),
        "loss_chunk": train.get("loss_chunk")}.items() if v is not None}
    if "quantization" in base:
        kw["quantize"] = quant.get("bits")
    elif manifest.run is not None:
        kw["quantize"] = parse_quantize(manifest.run.quantize)
    # the strategy the run's steps ran with (auto may have picked the plain step), for every context
    ran = [r.memory_strategy for r in manifest.adapters.values() if getattr(r, "memory_strategy", None)]
    ran_st = MemoryStrategy(**{k: v for k, v in ran[0].items() if k in MemoryStrategy.__dataclass_fields__}) \
        if ran else MemoryStrategy()
    kw["strategy"] = ran_st
    limit, label = device_memory_limit()
    at_limit = plan(model, context=4096, memory_gb=limit, **kw)
    run_ctx = train.get("max_seq_length")
    hi = max(131_072, 2 * (at_limit.max_context or 0), 4 * (run_ctx or 0))
    lo = min(512, run_ctx or 512)
    contexts = np.unique(np.geomspace(lo, hi, n_points).astype(int))
    plans = [plan(model, context=int(n), **kw) for n in contexts]
    names = list(plans[0].components)
    peaks = [a.peak_memory_gb for a in adapters if a.peak_memory_gb]
    return PlanCurve(
        contexts=contexts, total_gib=np.array([p.total_bytes / GiB for p in plans]),
        components_gib={k: np.array([p.components[k] / GiB for p in plans]) for k in names},
        limit_gib=limit, limit_label=label, max_context=at_limit.max_context, run_context=run_ctx,
        measured_peak_gib=max(peaks) * 1e9 / GiB if peaks else None,
        notes=(["the planner assumes gradient checkpointing; this run trained without it"]
               if train.get("grad_checkpoint") is False and ran_st.is_default else []))


def collect(out: str | Path) -> RunData:
    """Everything the report shows about the run in ``out`` (ConfigError if it is not one)."""
    out = Path(out)
    manifest = read_manifest(out)
    if not manifest.adapters:
        raise ConfigError(f"{out}: the run has no adapters yet; train some with `mozgach train --out {out}`")
    adapters = [_curves(out, name, rec) for name, rec in sorted(manifest.adapters.items())]
    ev, ev_problem = read_eval(out)
    curve, plan_problem = None, None
    try:
        curve = plan_curve(manifest, adapters)
    except MozgachError as e:
        plan_problem = f"no memory plan for this base: {e}"
    return RunData(out=out, base=str(manifest.base.get("source") or "?"), manifest=manifest, adapters=adapters,
                   eval=ev, eval_problem=ev_problem, plan=curve, plan_problem=plan_problem)
