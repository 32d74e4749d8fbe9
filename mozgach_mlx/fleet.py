"""Train many domain adapters one after another over one base (the 108).

The base is loaded (and quantized) once. For each domain: a fresh adapter (re-initialised
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
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from . import data as data_mod
from . import lora
from .errors import ConfigError, MozgachError
from .io import atomic_write_json, sha256_file
from .trainer import TrainConfig, evaluate, train_adapter

MANIFEST = "manifest.json"
ADAPTER_PREFIX = "mozgach108_"
ADAPTER_FILES = ("adapter_model.safetensors", "adapters.safetensors", "adapter_config.json")
MANIFEST_VERSION = 1


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


class Manifest:
    """``OUT/manifest.json``: base identity, the config, and one record per adapter."""

    def __init__(self, path: Path, data: dict) -> None:
        self.path = path
        self.data = data

    @classmethod
    def open(cls, out_dir: Path, base: dict, config: dict) -> Manifest:
        path = out_dir / MANIFEST
        if path.exists():
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: corrupt manifest ({e}); move it away to start a new run") from e
            if data.get("base", {}).get("fingerprint") != base["fingerprint"]:
                raise ConfigError(f"{path}: this output dir was trained over a different base model "
                                  f"({data.get('base', {}).get('source')}); use another --out")
            if data.get("config_fingerprint") != _fingerprint(config):
                raise ConfigError(f"{path}: this output dir was trained with a different config; use the "
                                  "same options to resume, or another --out")
        else:
            data = {"version": MANIFEST_VERSION, "base": base, "config": config,
                    "config_fingerprint": _fingerprint(config), "adapters": {}}
        m = cls(path, data)
        m.save()
        return m

    def save(self) -> None:
        atomic_write_json(self.path, self.data)

    def get(self, name: str) -> dict:
        return self.data["adapters"].get(name, {})

    def update(self, name: str, **fields) -> None:
        self.data["adapters"].setdefault(name, {}).update(fields)
        self.save()


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def base_identity(model, source: str) -> dict:
    """What a manifest records of the base: source, architecture, and a weight fingerprint."""
    from mlx.utils import tree_flatten

    h = hashlib.sha256()
    for name, w in sorted(tree_flatten(model.parameters())):
        if "lora_" in name:
            continue
        h.update(name.encode())
        h.update(str(w.shape).encode())
        # A cheap content probe: sums of the first rows (exact for a given checkpoint).
        h.update(f"{float(w.reshape(-1)[:4096].astype(mx.float32).sum().item()):.6e}".encode())
    args = model.args
    arch = dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(vars(args))
    return {"source": source, "model_type": arch.get("model_type"), "args": arch,
            "fingerprint": h.hexdigest()[:16]}


def _file_hashes(adapter_dir: Path) -> dict[str, str]:
    return {f: sha256_file(adapter_dir / f) for f in ADAPTER_FILES if (adapter_dir / f).exists()}


def _verified(adapter_dir: Path, record: dict) -> bool:
    want = record.get("files") or {}
    return bool(want) and all((adapter_dir / f).exists() and sha256_file(adapter_dir / f) == h
                              for f, h in want.items())


def train_fleet(model, tok, domains: list, cfg: TrainConfig, out_dir: str | Path, *,
                base: dict, run_config: dict | None = None,
                on_event: Callable[[str, dict], None] | None = None) -> FleetResult:
    """Train one adapter per domain, sequentially, over one already loaded base.

    Args:
        model, tok: the base model (quantized or not) and its tokenizer, loaded once.
        domains: :class:`mozgach_mlx.data.Domain` objects (each with ``id`` and ``name``).
        cfg: training config shared by all adapters (each adapter's seed is
            ``cfg.seed + domain.id``, so adapters differ but runs are reproducible).
        out_dir: the run directory (``manifest.json``, ``mozgach108_NNN/``, ``logs/``).
        base: :func:`base_identity` of the model (checked on resume).
        run_config: everything else that defines the run, recorded in the manifest.
        on_event: progress hook ``(kind, info)``; kinds: start, skip, done, failed.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "logs").mkdir(exist_ok=True)
    config = {"train": cfg.to_dict(), **(run_config or {})}
    manifest = Manifest.open(out_dir, base, config)
    result = FleetResult(out_dir=str(out_dir))
    events = out_dir / "logs" / "fleet.jsonl"

    def emit(kind: str, info: dict) -> None:
        with open(events, "a", encoding="utf-8") as f:
            f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "event": kind, **info},
                               default=str) + "\n")
        if on_event is not None:
            on_event(kind, info)

    lora.ensure(model, cfg.lora)
    mx.eval(model.parameters())
    gc.collect()
    mx.clear_cache()
    baseline = mx.get_active_memory()
    manifest.data["baseline_active_memory_bytes"] = baseline
    manifest.save()

    for dom in domains:
        name = adapter_dir_name(dom.id)
        adir = out_dir / name
        rec = manifest.get(name)
        if rec.get("status") == "done" and _verified(adir, rec):
            result.skipped.append(name)
            emit("skip", {"name": name, "domain": dom.name})
            continue
        manifest.update(name, domain=dom.name, domain_id=dom.id, status="running",
                        started=time.strftime("%Y-%m-%dT%H:%M:%S%z"), error=None)
        emit("start", {"name": name, "domain": dom.name})
        dcfg = dataclasses.replace(cfg, seed=cfg.seed + dom.id)
        try:
            splits = data_mod.load_domain(dom, tok, max_seq_length=cfg.max_seq_length, pack=cfg.pack,
                                          overlap=cfg.window_overlap, skip_bad_lines=cfg.skip_bad_lines)
            valid = splits.get("valid") or []
            lora.reset(model, seed=dcfg.seed)  # B = 0: the adapter is exactly the base here
            base_loss = evaluate(model, valid, dcfg)[0] if valid else None
            res = train_adapter(model, tok, splits, dcfg, adir, resume=True,
                                log_path=out_dir / "logs" / f"{name}.jsonl")
        except MozgachError as e:
            manifest.update(name, status="failed", error=f"{type(e).__name__}: {e}")
            result.failed.append(name)
            emit("failed", {"name": name, "domain": dom.name, "error": str(e)})
            continue
        finally:
            gc.collect()
            mx.clear_cache()
        active = mx.get_active_memory()
        manifest.update(
            name, status="done", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            train_loss=res.train_loss, valid_loss=res.valid_loss, base_valid_loss=base_loss,
            steps=res.steps, tokens=res.tokens, seconds=round(res.seconds, 3),
            peak_memory_gb=round(res.peak_memory_gb, 4), resumed_from=res.resumed_from,
            active_memory_after_bytes=active,
            active_memory_vs_baseline=round(active / baseline, 4) if baseline else None,
            files=_file_hashes(adir))
        result.done.append(name)
        emit("done", {"name": name, "domain": dom.name, **manifest.get(name)})
    result.manifest = manifest.data
    return result
