"""``export`` (a run's adapters) and ``export_adapters`` (adapter directories over a named
base): one adapter per entry of the output directory, written whole or not at all."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .. import lora
from ..errors import AdapterError, CheckpointError, ConfigError
from ..io import atomic_write_json
from ..lora.formats import split_weights
from . import source
from .fused import DTYPES, FusedCheck, fuse_and_save
from .gguf_lora import rope_flags, write_gguf_lora
from .outdir import check_dest, staged

__all__ = ["RECORD_FILE", "TARGETS", "ExportResult", "export", "export_adapters", "export_source"]

TARGETS = ("peft", "mlx-lm", "gguf-lora", "fused")
RECORD_FILE = "export.json"  # what was exported from where, and the fused checks
_TOOLS = {"peft": "PEFT", "mlx-lm": "mlx-lm"}


@dataclass
class ExportResult:
    """What an export wrote: ``files`` (adapter name -> paths relative to ``dest``),
    ``checks`` (fused exports: adapter name -> :class:`FusedCheck`) and ``notes`` (what a
    user of the other tool must set, e.g. an adapter's RoPE scaling)."""

    dest: Path
    to: str
    files: dict[str, list[str]] = field(default_factory=dict)
    checks: dict[str, FusedCheck] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = []
        for name, files in self.files.items():
            where = self.dest / (files[0] if self.to == "gguf-lora" else name)
            check = f" (checked: {self.checks[name].line()})" if name in self.checks else ""
            lines.append(f"{name} -> {where}{check}")
        lines += [f"note: {n}" for n in self.notes]
        lines.append(f"exported {len(self.files)} adapter(s) to {self.dest} as {self.to}")
        return "\n".join(lines)

    def record(self, src: source.Source) -> dict:
        return {"format": self.to, "run": None if src.run is None else str(src.run), "base": src.base,
                "adapters": {n: {"files": f} | ({"check": self.checks[n].to_dict()} if n in self.checks else {})
                             for n, f in self.files.items()},
                "notes": self.notes}


def _check_options(to: str, quantize: int | None, dtype: str | None) -> None:
    if to not in TARGETS:
        raise ConfigError(f"--to {to!r}: use one of {', '.join(TARGETS)}")
    if to != "fused" and (quantize is not None or dtype is not None):
        raise ConfigError(f"--quantize / --dtype apply to --to fused only, not --to {to}; drop them")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if quantize is not None and quantize not in (4, 8):
        raise ConfigError(f"--quantize {quantize!r}: use 4 or 8 (or leave it out for an unquantized checkpoint)")


def export(out: str | Path, to: str, dest: str | Path, *, adapter: str | None = "all", quantize: int | None = None,
           dtype: str | None = None, force: bool = False) -> ExportResult:
    """Export the finished adapters of run directory ``out`` to ``dest`` (``mozgach export``).

    Args:
        to: ``"peft"``, ``"mlx-lm"`` (``dest/NAME/``, loadable by PEFT / ``mlx_lm.load(base,
            adapter_path=...)``), ``"gguf-lora"`` (``dest/NAME.gguf``, llama.cpp's LoRA
            adapter for the base's GGUF) or ``"fused"`` (``dest/NAME/``, a Hugging Face
            checkpoint of base + adapter, checked against base + adapter logits).
        adapter: one adapter name of the run, or ``"all"`` (every finished one).
        quantize, dtype: fused only: re-quantize to 4 / 8 bits; weight dtype (default float32).
        force: replace a non-empty ``dest``.

    Returns:
        An :class:`ExportResult`; ``dest/export.json`` records the same.

    Raises:
        ConfigError: bad options, no such run / adapter, ``dest`` not writable as asked.
        AdapterError: an adapter has no form in the target format (trained norms in a
            GGUF LoRA, an unsupported RoPE scaling).
        CheckpointError: a fused checkpoint fails its check (nothing is written).
    """
    _check_options(to, quantize, dtype)
    return export_source(source.from_run(out, adapter), to, dest, quantize=quantize, dtype=dtype, force=force)


def export_adapters(base: str | Path, adapters, to: str, dest: str | Path, *, base_quantize: int | None = None,
                    quantize: int | None = None, dtype: str | None = None, force: bool = False) -> ExportResult:
    """As :func:`export`, for adapter directories (a list, or name -> directory) trained
    over ``base`` (loaded with ``mz.load(base, quantize=base_quantize)``)."""
    _check_options(to, quantize, dtype)
    return export_source(source.from_dirs(base, adapters, quantize=base_quantize), to, dest, quantize=quantize,
                         dtype=dtype, force=force)


def export_source(src: source.Source, to: str, dest: str | Path, *, quantize: int | None = None,
                  dtype: str | None = None, force: bool = False) -> ExportResult:
    """Export the adapters of ``src`` (see :mod:`.source`); what :func:`export` runs."""
    _check_options(to, quantize, dtype)
    dest = check_dest(dest, force, protect=() if src.run is None else (src.run,))
    result = ExportResult(dest, to)
    with staged(dest, force) as tmp:
        if to == "fused":
            _export_fused(src, tmp, result, dtype or "float32", quantize)
        else:
            _export_adapters(src, tmp, result)
        atomic_write_json(tmp / RECORD_FILE, result.record(src))
    return result


def _rope_note(name: str, adapter_dir: Path, own: tuple | None, to: str) -> str | None:
    """What a user of ``to`` must set for the adapter's RoPE scaling, if the base's own
    checkpoint declares another one (None: nothing to set)."""
    block = source.adapter_block(adapter_dir)
    if "rope_scaling" not in block or to == "fused":  # a fused config.json carries it
        return None
    want, max_pos = block.get("rope_scaling"), block.get("max_position_embeddings")
    if own is not None and source.same_rope(want, own[0]):
        return None
    if own is None and want is None:
        return None
    if to == "gguf-lora":
        try:
            flags = "--rope-scaling none" if want is None else rope_flags(want, max_pos)
        except AdapterError as e:
            raise AdapterError(f"{name}: {e}") from None
        return f"{name} was trained with RoPE scaling {want}: run llama.cpp with {flags}"
    return (f"{name} was trained with rope_scaling {want} and max_position_embeddings {max_pos}: set both in "
            f"the base's config.json before loading it with {_TOOLS[to]} (mz.lora.load applies them itself)")


def _export_adapters(src: source.Source, tmp: Path, result: ExportResult) -> None:
    to = result.to
    model, _ = src.load_base()
    own = source.source_rope(src.base)
    base_gguf = source.base_gguf(src.base) if to == "gguf-lora" else None
    for name, d in src.adapters.items():
        note = _rope_note(name, d, own, to)
        if to == "gguf-lora":
            cfg, weights, _ = lora.read(model, d)
            write_gguf_lora(tmp / f"{name}.gguf", weights, cfg, model.args, name=name, base_gguf=base_gguf)
            result.files[name] = [f"{name}.gguf"]
        else:
            _, weights, block = lora.read(model, d)
            extras = sorted(split_weights(weights)[1])
            if to == "mlx-lm" and extras:
                raise AdapterError(f"{name}: trains {extras[0]} in full, which mlx-lm's adapter files cannot carry "
                                   "(mlx-lm would ignore it); export --to peft or --to fused instead")
            lora.load(model, d)
            lora.save(model, tmp / name, format=to, base_model=src.base, training=block.get("training"))
            result.files[name] = sorted(f"{name}/{p.name}" for p in (tmp / name).iterdir())
        if note:
            result.notes.append(note)


def _export_fused(src: source.Source, tmp: Path, result: ExportResult, dtype: str, quantize: int | None) -> None:
    for name, d in src.adapters.items():
        model, tok = src.load_base()  # fusing changes the model: a fresh base for each adapter
        check = fuse_and_save(model, tok, d, tmp / name, dtype=dtype, quantize=quantize)
        if not check.ok:
            raise CheckpointError(check.failure(name, dtype, quantize))
        result.checks[name] = check
        result.files[name] = sorted(f"{name}/{p.name}" for p in (tmp / name).iterdir())
