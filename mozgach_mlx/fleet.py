"""Train many domain adapters one after another over one base (the 108).

The base is loaded (and quantized) once. For each domain (:func:`train_adapter` owns the
adapter's lifecycle): a fresh adapter (re-initialised
in place, no reload), its base loss on the domain's validation data, training, the final
evaluation, both adapter layouts saved to ``OUT/mozgach108_{id:03d}/``, memory released,
next. ``OUT/manifest.json`` is rewritten atomically after every state change, so a run
killed at any moment resumes with the same command: finished adapters are skipped after
their file hashes are verified, the interrupted one continues from its last checkpoint,
and a domain whose data is broken is marked failed while the run goes on.

Adapter-parallel (``distributed="adapters"``), rank r > 0 records its adapters in its own
manifest part ``OUT/manifest.rank{r}.json`` (atomically, after every state change) and
logs to ``OUT/logs/fleet.rank{r}.jsonl``; nothing crosses the group while the ranks
train. Rank 0 merges the parts into ``manifest.json`` at the end of the run and at the
start of every run (so a run killed at any moment resumes with any number of ranks, or
one process, from the manifest and the parts), fetching over the group only the adapter
files it does not hold itself (machines without a shared disk), then the parts are
removed.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import gc
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from . import contrast, lora
from . import data as data_mod
from . import distributed as dist
from .errors import ConfigError, MozgachError
from .io import atomic_write_bytes, sha256_file
from .rundir import (
    MANIFEST_FILE,
    AdapterRecord,
    Manifest,
    RunConfig,
    base_identity,
    domain_files,
    fingerprint,
    read_manifest,
)
from .trainer import TrainConfig, TrainResult, check_memory, memory_plan, train_adapter

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
        if m.config_fingerprint != fingerprint(config) and resume_key(m.config) != resume_key(config):
            raise ConfigError(f"{path}: this output dir was trained with a different config; use the "
                              "same options to resume, or another --out")
        m.config, m.config_fingerprint = config, fingerprint(config)  # the config of the run now going on
    else:
        m = Manifest(base=base, config=config, path=path)
    m.save()
    return m


def resume_key(config: dict) -> str:
    """The fingerprint of a manifest's config without how the steps are spread over ranks
    (``context_parallel``, ``context_split``; like :meth:`TrainConfig.fingerprint`): a run
    resumes on another number of ranks."""
    train = {k: v for k, v in config.get("train", {}).items() if k not in ("context_parallel", "context_split")}
    return fingerprint({**config, "train": train})


def _file_hashes(adapter_dir: Path) -> dict[str, str]:
    return {f: sha256_file(adapter_dir / f) for f in ADAPTER_FILES if (adapter_dir / f).exists()}


def _verified(adapter_dir: Path, record: AdapterRecord | None) -> bool:
    want = record.files if record is not None else {}
    return bool(want) and all((adapter_dir / f).exists() and sha256_file(adapter_dir / f) == h
                              for f, h in want.items())


def train_fleet(model, tok, domains: list, cfg: TrainConfig, out_dir: str | Path, *,
                base: dict | None = None, run_config: RunConfig | dict | None = None,
                on_event: Callable[[str, dict], None] | None = None, distributed: str = "none",
                group=None, negative_domains: list | None = None) -> FleetResult:
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
        on_event: progress hook ``(kind, info)``; kinds: start, skip, done, failed
            (called on rank 0 only).
        distributed: ``none``, ``data`` (every adapter data-parallel over the ranks) or
            ``adapters`` (each rank trains its share of the domains, balanced by token
            count); see :mod:`mozgach_mlx.distributed`. Every rank calls this with the
            same arguments (config, base and domains are compared at the start).
        group: the ``mx.distributed`` group (default: ``distributed.init(distributed)``).
        negative_domains: with ``cfg.contrast > 0``, the domains whose training text each
            adapter is trained against (:mod:`mozgach_mlx.contrast`; its own is left out);
            default ``domains``. ``mozgach train`` passes every domain of the corpus, so a
            fleet trained in parts (``--domains 1-10``, then ``11-20``) contrasts alike.

    One process per run directory: the fleet holds ``OUT/.lock`` (:func:`rundir.locked`;
    in a distributed job rank 0 holds it for all ranks) while it runs; a second one
    refuses with ConfigError naming the holder's pid.

    Adapter lifecycle: :func:`train_adapter` owns it (ensure the LoRA config, reset to a
    fresh adapter with the domain's seed, train, save). The fleet only applies the config
    once before the loop, so that the memory baseline includes the adapter's arrays.

    Distributed, only rank 0 writes the manifest and ``logs/fleet.jsonl``, and its
    result lists every rank's adapters; the other ranks' results list their own.
    Adapter-parallel, rank r > 0 writes its records to ``manifest.rank{r}.json`` and its
    events to ``logs/fleet.rank{r}.jsonl`` while it trains, and rank 0 merges the parts at
    the end; every run, distributed or not, first merges the parts a killed run left.
    """
    mode = dist.check_mode(distributed)
    group = None if mode == "none" else (group if group is not None else dist.init(mode))
    with dist.hold(out_dir, group) as out_dir:
        base = base if base is not None else base_identity(model)
        config = _config(cfg, run_config)
        dist.check_same(group, config=fingerprint(config), base=base["fingerprint"],
                        domains=fingerprint([[d.id, d.name] for d in domains]))
        return _train_fleet(model, tok, domains, cfg, out_dir, base, config, on_event, mode, group,
                            negative_domains)


PART_PREFIX = "manifest.rank"


def part_path(out_dir: Path, rank: int) -> Path:
    """Rank ``rank``'s manifest part (adapter-parallel ranks > 0)."""
    return Path(out_dir) / f"{PART_PREFIX}{rank}.json"


def _parts(out_dir: Path) -> list[Path]:
    return sorted(p for p in Path(out_dir).glob(f"{PART_PREFIX}*.json")
                  if p.name[len(PART_PREFIX):-len(".json")].isdigit())


class _Fleet:
    """What the loop of one fleet run shares: the records this rank writes (rank 0: the
    manifest; an adapter-parallel rank r > 0: its part), its event log, the result, and
    how an adapter's outcome is recorded."""

    def __init__(self, out_dir: Path, manifest: Manifest | None, on_event, group, mode: str = "none") -> None:
        self.out_dir, self.manifest, self.on_event, self.group = out_dir, manifest, on_event, group
        self.main = dist.is_main(group)
        self.result = FleetResult(out_dir=str(out_dir))
        me = dist.rank(group)
        self.events = out_dir / "logs" / ("fleet.jsonl" if self.main else f"fleet.rank{me}.jsonl")
        self.logging = self.main or mode == "adapters"

    def emit(self, kind: str, info: dict) -> None:
        if not self.logging:
            return
        with open(self.events, "a", encoding="utf-8") as f:
            f.write(json.dumps({"time": _now(), "event": kind, **info}, default=str) + "\n")
        if self.on_event is not None and self.main:
            self.on_event(kind, info)

    def start(self, dom, **info) -> None:
        name = adapter_dir_name(dom.id)
        if self.manifest is not None:
            self.manifest.update(name, domain=dom.name, domain_id=dom.id, status="running", started=_now(),
                                 error=None, data=domain_files(dom))
        self.emit("start", {"name": name, "domain": dom.name, **info})

    def finish(self, dom, status: str, fields: dict) -> None:
        name = adapter_dir_name(dom.id)
        (self.result.done if status == "done" else self.result.failed).append(name)
        if self.manifest is None:
            return
        rec = self.manifest.update(name, status=status, **fields)
        self.emit_outcome(name, rec)

    def emit_outcome(self, name: str, rec: AdapterRecord, **info) -> None:
        if rec.status == "done":
            self.emit("done", {"name": name, **dataclasses.asdict(rec), **info})
        else:
            self.emit("failed", {"name": name, "domain": rec.domain, "error": rec.error, **info})


def _train_fleet(model, tok, domains: list, cfg: TrainConfig, out_dir: Path, base: dict, config: dict,
                 on_event: Callable[[str, dict], None] | None, mode: str = "none", group=None,
                 negative_domains: list | None = None) -> FleetResult:
    """:func:`train_fleet` with the run directory held."""
    main = dist.is_main(group)
    if main or mode == "adapters":  # adapter-parallel ranks log their own adapters' steps
        (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    manifest = dist.together(group, lambda: open_manifest(out_dir, base, config), main_only=True)
    fleet = _Fleet(out_dir, manifest, on_event, group, mode)
    _merge(fleet, _offers_from_parts(out_dir, base, config, group), at_start=True)

    lora.ensure(model, cfg.lora)
    check_memory(memory_plan(model, cfg))  # refuse before any domain's data is read
    mx.eval(model.parameters())
    release_memory()
    baseline = mx.get_active_memory()
    if main:
        manifest.baseline_active_memory_bytes = baseline
        manifest.save()

    todo = []
    for dom in domains if main else []:
        name = adapter_dir_name(dom.id)
        if (rec := manifest.record(name)) is not None and rec.status == "done" and _verified(out_dir / name, rec):
            fleet.result.skipped.append(name)
            fleet.emit("skip", {"name": name, "domain": dom.name})
        else:
            todo.append(dom.id)
    todo = set(dist.broadcast_json(todo, group))
    todo = [d for d in domains if d.id in todo]
    others = _Shared(negative_domains or domains, tok, cfg) if cfg.contrast > 0 else None
    if mode == "adapters":
        _adapter_parallel(model, tok, todo, cfg, fleet, baseline, base, config, others)
    else:
        ran = {} if group is None else {"distributed": mode, "ranks": dist.size(group)}  # in logs/fleet.jsonl
        for dom in todo:
            fleet.start(dom, **ran)
            fleet.finish(dom, *_fit(model, tok, dom, cfg, out_dir, baseline, group, others))
    fleet.result.manifest = manifest.to_dict() if main else {}
    return fleet.result


def release_memory() -> None:
    """Give back what the last adapter left: Python's cycles, MLX's buffer cache and, with
    glibc, the freed pages inside the heap. MLX's CPU allocator is ``malloc``, and glibc's
    main arena keeps freed buffers mapped when live ones sit between them: a SmolLM2 fleet
    on Linux held 6.7-6.9 GB of RSS with 2.7 GB in use (5.4 GB of ``[heap]``) until
    ``malloc_trim(0)`` returns them. Elsewhere (macOS, musl) the trim is skipped."""
    gc.collect()
    mx.clear_cache()
    if (trim := _malloc_trim()) is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc's, from the process's own symbols
    except (OSError, AttributeError, TypeError):
        return None


def _fit(model, tok, dom, cfg: TrainConfig, out_dir: Path, baseline: int, group=None,
         others: _Shared | None = None) -> tuple[str, dict]:
    """Train one domain's adapter (data-parallel over ``group`` if given): ``("done" |
    "failed", fields of its manifest record)``."""
    name = adapter_dir_name(dom.id)
    adir = out_dir / name
    try:
        res = _train_domain(model, tok, dom, cfg, adir, out_dir / "logs" / f"{name}.jsonl", group, others)
    except dist.GroupLost:  # the group is gone: no other adapter can train in it either
        raise
    except MozgachError as e:
        return "failed", {"error": f"{type(e).__name__}: {e}"}
    finally:
        release_memory()
    active = mx.get_active_memory()
    return "done", dict(
        finished=_now(), train_loss=res.train_loss, valid_loss=res.valid_loss, base_valid_loss=res.base_valid_loss,
        steps=res.steps, tokens=res.tokens, seconds=round(res.seconds, 3),
        peak_memory_gb=round(res.peak_memory_gb, 4), resumed_from=res.resumed_from,
        memory_strategy=res.memory_strategy, active_memory_after_bytes=active,
        active_memory_vs_baseline=round(active / baseline, 4) if baseline else None,
        files=_file_hashes(adir) if dist.is_main(group) else {})


def _adapter_parallel(model, tok, todo: list, cfg: TrainConfig, fleet: _Fleet, baseline: int, base: dict,
                      config: dict, others: _Shared | None = None) -> None:
    """Each rank trains its share of ``todo`` (balanced by :func:`_work`) with no
    collective until all are done: rank 0 records in the manifest, rank r > 0 in its part;
    then rank 0 merges the parts (:func:`_merge`)."""
    group, out_dir = fleet.group, fleet.out_dir
    me, world = dist.rank(group), dist.size(group)
    sizes = {d.id: _work(d, tok, cfg, others) for i, d in enumerate(todo) if i % world == me}
    counts = {int(k): v for part in dist.all_gather_json(sizes, group) for k, v in part.items()}
    plan = dist.balance(counts, world)
    by_id = {d.id: d for d in todo}
    fleet.emit("assign", {"ranks": plan, "work_tokens": counts})
    if not fleet.main:
        fleet.manifest = Manifest(base=base, config=config, path=part_path(out_dir, me))
        fleet.manifest.save()
    for dom_id in plan[me]:
        dom = by_id[dom_id]
        fleet.start(dom, rank=me)
        fleet.finish(dom, *_fit(model, tok, dom, cfg, out_dir, baseline, others=others))  # one process: files hashed
    offers = {} if fleet.main else {name: dataclasses.asdict(rec) for name, rec in fleet.manifest.adapters.items()}
    try:
        _merge(fleet, offers, at_start=False)
    except (RuntimeError, dist.GroupLost) as e:  # a peer left the group (no launcher stopped this rank)
        what = str(e) if isinstance(e, dist.GroupLost) else \
            f"rank {me}: a collective failed ({' '.join(str(e).split())}): a rank left the group"
        raise dist.GroupLost(f"{what}; the end-of-run merge did not happen: the finished adapters are recorded in "
                             f"{out_dir}/manifest.json and {PART_PREFIX}*.json; rerun the same command (any number "
                             "of ranks) to merge them and train the rest") from None


def _offers_from_parts(out_dir: Path, base: dict, config: dict, group) -> dict[str, dict]:
    """The finished adapters recorded in the manifest parts this rank can read whose
    files it holds (verified), as ``{name: record}``; ConfigError for a part of another run."""
    def read() -> dict[str, dict]:
        offers: dict[str, dict] = {}
        for path in _parts(out_dir):
            try:
                part = Manifest.from_dict(json.loads(path.read_text()), path)
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ConfigError(f"{path}: unreadable manifest part ({e}); move it away (its adapters are "
                                  "then retrained)") from None
            if part.base.get("fingerprint") != base["fingerprint"] or resume_key(part.config) != resume_key(config):
                raise ConfigError(f"{path}: this manifest part is from a run with a different base or config; "
                                  "move it away or use another --out")
            for name, rec in part.adapters.items():
                if rec.status == "done" and _verified(out_dir / name, rec):
                    offers.setdefault(name, dataclasses.asdict(rec))
        return offers

    return dist.together(group, read)


def _merge(fleet: _Fleet, offers: dict[str, dict], *, at_start: bool) -> None:
    """Rank 0 takes into its manifest the adapters the ranks offer (``{name: record}``):
    a finished one unless its manifest already has it finished and verified, its files
    fetched from the lowest rank offering it when rank 0 does not hold the same bytes
    (hash) itself; a failed one unless the manifest has it finished. Then every rank
    removes the manifest parts it can see (they are in the manifest now). A collective:
    every rank calls it; the only one of an adapter-parallel run after its start."""
    group, out_dir, main = fleet.group, fleet.out_dir, fleet.main
    everyone = dist.all_gather_json(offers, group)
    need: list[list] = [[] for _ in everyone]  # per rank: [name, file] that rank 0 wants from it
    if main:
        taken = set()
        for r, rank_offers in enumerate(everyone):
            for name, rec in sorted(rank_offers.items()):
                if name in taken or rec["status"] != "done" or _finished(fleet.manifest, out_dir, name):
                    continue
                taken.add(name)
                need[r] += [[name, f] for f, h in sorted(rec["files"].items())
                            if not ((out_dir / name / f).exists() and sha256_file(out_dir / name / f) == h)]
    need = dist.broadcast_json(need, group)
    blobs: list[bytes] = []
    lengths: list[list[int]] = [[] for _ in need]
    if any(need):  # machines without a shared disk: the files go to rank 0, and only there
        me = dist.rank(group)
        files = [(out_dir / name / f).read_bytes() for name, f in need[me]]
        lengths = dist.all_gather_json([len(b) for b in files], group)
        blobs = dist.send_to_main(b"".join(files), [sum(n) for n in lengths], group)

    def record() -> None:
        for r, rank_offers in enumerate(everyone):
            offset = 0
            for (name, f), n in zip(need[r], lengths[r], strict=True):
                data, offset = blobs[r][offset:offset + n], offset + n
                if hashlib.sha256(data).hexdigest() != rank_offers[name]["files"][f]:
                    raise MozgachError(f"{out_dir / name / f}: the bytes received from rank {r} do not match "
                                       "their hash; rerun the same command to merge or retrain this adapter")
                atomic_write_bytes(out_dir / name / f, data)
        for r, rank_offers in enumerate(everyone):
            for name, rec in sorted(rank_offers.items()):
                own = fleet.manifest.record(name)
                if _finished(fleet.manifest, out_dir, name) or (rec["status"] != "done" and own is not None
                                                                 and own.status == "done"):
                    continue
                fields = {k: v for k, v in rec.items() if k not in ("domain", "domain_id")}
                new = fleet.manifest.update(name, domain=rec["domain"], domain_id=rec["domain_id"], **fields)
                if not at_start:
                    (fleet.result.done if new.status == "done" else fleet.result.failed).append(name)
                    fleet.emit_outcome(name, new, rank=r)

    dist.together(group, record, main_only=True)
    for path in _parts(out_dir):  # merged into the manifest (every part this rank sees is this run's)
        path.unlink(missing_ok=True)


def _finished(manifest: Manifest, out_dir: Path, name: str) -> bool:
    rec = manifest.record(name)
    return rec is not None and rec.status == "done" and _verified(out_dir / name, rec)


def _work(dom, tok, cfg: TrainConfig, others: _Shared | None = None) -> int:
    """The tokens a domain's adapter will go through (what the ranks are balanced by):
    its training steps x micro-batches x sequences x the mean training sequence length
    (with ``max_steps`` every adapter takes the same steps, so the total of its data is
    not the measure), plus its validation tokens once per evaluation (base loss, every
    ``eval_every`` steps, final); 0 if its data is broken (its training then fails at once
    and is recorded)."""
    try:
        splits = _splits(dom, tok, cfg, others)
    except MozgachError:
        return 0
    train, valid = splits["train"], splits.get("valid") or []
    if not train:
        return 0
    mean = sum(len(s[0]) for s in train) / len(train)
    steps = cfg.max_steps or cfg.epochs * math.ceil(math.ceil(len(train) / cfg.batch_size) / cfg.grad_accumulation)
    evaluated = sum(len(s[0]) for s in valid)
    if cfg.eval_batches is not None and valid:
        evaluated = min(evaluated, cfg.eval_batches * cfg.batch_size * evaluated / len(valid))
    evals = 2 + (steps // cfg.eval_every if cfg.eval_every else 0)
    return int(steps * cfg.grad_accumulation * min(cfg.batch_size, len(train)) * mean + evals * evaluated)


def _config(cfg: TrainConfig, run_config: RunConfig | dict | None) -> dict:
    """The manifest's ``config``: ``{"train": ..., "run": ...}`` (no "run" without a RunConfig)."""
    if isinstance(run_config, RunConfig):
        return {"train": cfg.to_dict(), "run": run_config.recorded()}
    return {"train": cfg.to_dict(), **(run_config or {})}


def _splits(dom, tok, cfg: TrainConfig, others: _Shared | None) -> dict:
    """A domain's tokenized splits: from the contrastive fleet's cache if there is one."""
    return others.splits(dom) if others is not None else _load(dom, tok, cfg)


def _load(dom, tok, cfg: TrainConfig) -> dict:
    return data_mod.load_domain(dom, tok, max_seq_length=cfg.max_seq_length, pack=cfg.pack,
                                overlap=cfg.window_overlap, skip_bad_lines=cfg.skip_bad_lines)


def _train_domain(model, tok, dom, cfg: TrainConfig, adir: Path, log_path: Path, group=None,
                  others: _Shared | None = None) -> TrainResult:
    """One domain's adapter (seed ``cfg.seed + dom.id``), with its base loss measured first
    (data-parallel over ``group``: every rank loads the domain, a broken one fails on all);
    ``others``: the fleet's :class:`_Shared` domains (``cfg.contrast``)."""
    splits = dist.together(group, lambda: _splits(dom, tok, cfg, others))
    dcfg = dataclasses.replace(cfg, seed=cfg.seed + dom.id)
    return train_adapter(model, tok, splits, dcfg, adir, resume=True, log_path=log_path, base_loss=True,
                         group=group, negatives=others.negatives(dom) if others is not None else None)


class _Shared:
    """A contrastive fleet's tokenized domains: each loaded once (when first needed), for
    its own adapter and as the other adapters' negatives."""

    def __init__(self, domains: list, tok, cfg: TrainConfig) -> None:
        self.domains, self.tok, self.cfg = domains, tok, cfg
        self.cache: dict[int, dict] = {}

    def splits(self, dom) -> dict:
        if dom.id not in self.cache:  # a broken domain raises each time (its adapter fails)
            self.cache[dom.id] = _load(dom, self.tok, self.cfg)
        return self.cache[dom.id]

    def negatives(self, dom) -> list:
        """One lazy pool of train sequences per domain other than ``dom``."""
        return contrast.other_pools(self.domains, dom, lambda d: self.splits(d)["train"] or [])


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
