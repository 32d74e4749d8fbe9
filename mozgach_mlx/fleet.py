"""Train many domain adapters one after another over one base (the 108).

The base is loaded (and quantized) once. For each domain (:func:`train_adapter` owns the
adapter's lifecycle): a fresh adapter (re-initialised
in place, no reload), its base loss on the domain's validation data, training, the final
evaluation, both adapter layouts saved to ``OUT/mozgach108_{id:03d}/``, memory released,
next. ``OUT/manifest.json`` is rewritten atomically after every state change, so a run
killed at any moment resumes with the same command: finished adapters are skipped after
their file hashes are verified, the interrupted one continues from its last checkpoint,
and a domain whose data is broken is marked failed while the run goes on.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from . import data as data_mod
from . import lora
from .errors import ConfigError, MozgachError
from .io import sha256_file
from .rundir import (
    MANIFEST_FILE,
    AdapterRecord,
    Manifest,
    RunConfig,
    base_identity,
    domain_files,
    fingerprint,
    locked,
    read_manifest,
)
from .trainer import TrainConfig, TrainResult, train_adapter

__all__ = ["FleetResult", "adapter_dir_name", "base_identity", "parse_domains", "train_fleet"]

ADAPTER_PREFIX = "mozgach108_"
# every file of a saved adapter (hashed in the manifest, verified before a skip)
ADAPTER_FILES = (lora.PEFT_WEIGHTS, lora.MLX_WEIGHTS, lora.MLX_EXTRA_WEIGHTS, lora.CONFIG_FILE)


def adapter_dir_name(domain_id: int) -> str:
    """The seed's naming: mozgach108_001 ... mozgach108_108."""
    return f"{ADAPTER_PREFIX}{domain_id:03d}"


def parse_domains(spec: str | None, available: list[int]) -> list[int]:
    """``"1-10,42"`` -> [1..10, 42], restricted to (and checked against) ``available``."""
    if not spec:
        return list(available)
    chosen: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
                ids = list(range(a, b + 1))
            else:
                ids = [int(part)]
        except ValueError as e:
            raise ConfigError(f"--domains {spec!r}: {part!r} is not a number or a range like 1-10") from e
        for i in ids:
            if i not in available:
                raise ConfigError(f"--domains {spec!r}: domain {i} does not exist (have {available[0]}"
                                  f"..{available[-1]})")
            if i not in chosen:
                chosen.append(i)
    return chosen


@dataclass
class FleetResult:
    out_dir: str
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    manifest: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed


def open_manifest(out_dir: Path, base: dict, config: dict) -> Manifest:
    """The run's manifest: a new one, or the existing one if it is for the same base and
    config (else ConfigError: resuming would mix two runs in one directory)."""
    path = out_dir / MANIFEST_FILE
    if path.exists():
        m = read_manifest(out_dir)
        if m.base.get("fingerprint") != base["fingerprint"]:
            raise ConfigError(f"{path}: this output dir was trained over a different base model "
                              f"({m.base.get('source')}); use another --out")
        if m.config_fingerprint != fingerprint(config):
            raise ConfigError(f"{path}: this output dir was trained with a different config; use the "
                              "same options to resume, or another --out")
    else:
        m = Manifest(base=base, config=config, path=path)
    m.save()
    return m


def _file_hashes(adapter_dir: Path) -> dict[str, str]:
    return {f: sha256_file(adapter_dir / f) for f in ADAPTER_FILES if (adapter_dir / f).exists()}


def _verified(adapter_dir: Path, record: AdapterRecord | None) -> bool:
    want = record.files if record is not None else {}
    return bool(want) and all((adapter_dir / f).exists() and sha256_file(adapter_dir / f) == h
                              for f, h in want.items())


def train_fleet(model, tok, domains: list, cfg: TrainConfig, out_dir: str | Path, *,
                base: dict | None = None, run_config: RunConfig | dict | None = None,
                on_event: Callable[[str, dict], None] | None = None) -> FleetResult:
    """Train one adapter per domain, sequentially, over one already loaded base.

    Args:
        model, tok: the base model (quantized or not) and its tokenizer, loaded once.
        domains: :class:`mozgach_mlx.data.Domain` objects (each with ``id`` and ``name``).
        cfg: training config shared by all adapters (each adapter's seed is
            ``cfg.seed + domain.id``, so adapters differ but runs are reproducible).
        out_dir: the run directory (``manifest.json``, ``mozgach108_NNN/``, ``logs/``).
        base: :func:`base_identity` of the model (checked on resume); default: taken from
            ``model`` now, so pass it if the model already carries adapters.
        run_config: the :class:`RunConfig` the base and data came from, recorded in the
            manifest (``mozgach eval`` / ``generate`` rebuild the base from it; without
            it they use the recorded base identity and each domain's files). A dict
            ``{"run": {...}}`` (the pre-0.2 form) is accepted too.
        on_event: progress hook ``(kind, info)``; kinds: start, skip, done, failed.

    One process per run directory: the fleet holds ``OUT/.lock`` (:func:`rundir.locked`)
    while it runs; a second one refuses with ConfigError naming the holder's pid.

    Adapter lifecycle: :func:`train_adapter` owns it (ensure the LoRA config, reset to a
    fresh adapter with the domain's seed, train, save). The fleet only applies the config
    once before the loop, so that the memory baseline includes the adapter's arrays.
    """
    with locked(out_dir) as out_dir:
        return _train_fleet(model, tok, domains, cfg, out_dir, base if base is not None else base_identity(model),
                            _config(cfg, run_config), on_event)


def _train_fleet(model, tok, domains: list, cfg: TrainConfig, out_dir: Path, base: dict, config: dict,
                 on_event: Callable[[str, dict], None] | None) -> FleetResult:
    """:func:`train_fleet` with the run directory held."""
    (out_dir / "logs").mkdir(exist_ok=True)
    manifest = open_manifest(out_dir, base, config)
    result = FleetResult(out_dir=str(out_dir))
    events = out_dir / "logs" / "fleet.jsonl"

    def emit(kind: str, info: dict) -> None:
        with open(events, "a", encoding="utf-8") as f:
            f.write(json.dumps({"time": _now(), "event": kind, **info}, default=str) + "\n")
        if on_event is not None:
            on_event(kind, info)

    lora.ensure(model, cfg.lora)
    mx.eval(model.parameters())
    gc.collect()
    mx.clear_cache()
    baseline = mx.get_active_memory()
    manifest.baseline_active_memory_bytes = baseline
    manifest.save()

    for dom in domains:
        name = adapter_dir_name(dom.id)
        adir = out_dir / name
        if (rec := manifest.record(name)) is not None and rec.status == "done" and _verified(adir, rec):
            result.skipped.append(name)
            emit("skip", {"name": name, "domain": dom.name})
            continue
        manifest.update(name, domain=dom.name, domain_id=dom.id, status="running", started=_now(), error=None,
                        data=domain_files(dom))
        emit("start", {"name": name, "domain": dom.name})
        try:
            res = _train_domain(model, tok, dom, cfg, adir, out_dir / "logs" / f"{name}.jsonl")
        except MozgachError as e:
            manifest.update(name, status="failed", error=f"{type(e).__name__}: {e}")
            result.failed.append(name)
            emit("failed", {"name": name, "domain": dom.name, "error": str(e)})
            continue
        finally:
            gc.collect()
            mx.clear_cache()
        active = mx.get_active_memory()
        rec = manifest.update(
            name, status="done", finished=_now(),
            train_loss=res.train_loss, valid_loss=res.valid_loss, base_valid_loss=res.base_valid_loss,
            steps=res.steps, tokens=res.tokens, seconds=round(res.seconds, 3),
            peak_memory_gb=round(res.peak_memory_gb, 4), resumed_from=res.resumed_from,
            active_memory_after_bytes=active,
            active_memory_vs_baseline=round(active / baseline, 4) if baseline else None,
            files=_file_hashes(adir))
        result.done.append(name)
        emit("done", {"name": name, **dataclasses.asdict(rec)})
    result.manifest = manifest.to_dict()
    return result


def _config(cfg: TrainConfig, run_config: RunConfig | dict | None) -> dict:
    """The manifest's ``config``: ``{"train": ..., "run": ...}`` (no "run" without a RunConfig)."""
    if isinstance(run_config, RunConfig):
        return {"train": cfg.to_dict(), "run": run_config.recorded()}
    return {"train": cfg.to_dict(), **(run_config or {})}


def _train_domain(model, tok, dom, cfg: TrainConfig, adir: Path, log_path: Path) -> TrainResult:
    """One domain's adapter (seed ``cfg.seed + dom.id``), with its base loss measured first."""
    splits = data_mod.load_domain(dom, tok, max_seq_length=cfg.max_seq_length, pack=cfg.pack,
                                  overlap=cfg.window_overlap, skip_bad_lines=cfg.skip_bad_lines)
    dcfg = dataclasses.replace(cfg, seed=cfg.seed + dom.id)
    return train_adapter(model, tok, splits, dcfg, adir, resume=True, log_path=log_path, base_loss=True)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
