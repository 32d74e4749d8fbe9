"""What an export reads: a run's finished adapters and its base, or adapter directories
over a named base; and the RoPE the base's own checkpoint declares (to tell a user of
another tool what to set when an adapter was trained with another scaling)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import lora, models
from ..errors import AdapterError, ConfigError, MozgachError
from ..models import gguf as gguf_format
from ..models.checkpoint import read_config, resolve
from ..models.tiny import TINY_CONFIG, TINY_NAME
from ..rundir import load_run_base, read_manifest

__all__ = ["Source", "adapter_block", "base_gguf", "from_dirs", "from_run", "same_rope", "source_rope"]

_LISTED = 6  # adapter names an error lists before "..."


@dataclass
class Source:
    """Adapters to export and how to get their base.

    ``adapters``: name -> adapter directory; ``load_base``: returns a fresh
    ``(model, tokenizer)`` each call (a fused export changes the model it gets);
    ``base``: the base's source (name, path or repo id) as recorded; ``run``: the run
    directory, if the adapters come from one.
    """

    adapters: dict[str, Path]
    load_base: Callable
    base: str | None
    run: Path | None = None


def _names(names: list[str]) -> str:
    return ", ".join(names[:_LISTED]) + (", ..." if len(names) > _LISTED else "")


def from_run(out: str | Path, adapter: str | None = "all") -> Source:
    """The finished adapters of run directory ``out`` (``adapter``: one name, or ``"all"``
    / None for every finished one) over the run's base (rebuilt from its manifest and
    checked against its fingerprint).

    Raises:
        ConfigError: no such run directory or manifest, an adapter name the run does not
            have or that has not finished, no finished adapter at all.
        AdapterError: a finished adapter's files are missing.
    """
    run = Path(out)
    if not run.is_dir():
        raise ConfigError(f"--out {run}: no such run directory; pass the directory `mozgach train --out` wrote")
    manifest = read_manifest(run)
    done = sorted(n for n, rec in manifest.adapters.items() if rec.status == "done")
    if adapter in (None, "all"):
        chosen = done
        if not chosen:
            raise ConfigError(f"--out {run}: no finished adapters to export; train some with "
                              f"`mozgach train --out {run}`")
    else:
        rec = manifest.adapters.get(adapter)
        if rec is None:
            have = sorted(manifest.adapters)
            raise ConfigError(f"--adapter {adapter}: no such adapter in {run} (it has {_names(have) or 'none'}); "
                              "pass one of them or 'all'")
        if rec.status != "done":
            raise ConfigError(f"--adapter {adapter}: its status in {manifest.path} is {rec.status!r}; only finished "
                              f"adapters export (finish it with `mozgach train --out {run}`)")
        chosen = [adapter]
    for name in chosen:
        if not (run / name / lora.CONFIG_FILE).is_file():
            raise AdapterError(f"{run / name}: the manifest says {name} finished but its {lora.CONFIG_FILE} is "
                               f"missing; retrain it with `mozgach train --out {run}` or export another --adapter")
    return Source({n: run / n for n in chosen}, lambda: load_run_base(manifest), manifest.base.get("source"), run)


def from_dirs(base: str | Path, adapters, *, quantize: int | None = None) -> Source:
    """Adapter directories (a list, named by their folder, or a name -> directory mapping)
    over the base ``base`` loaded with ``mz.load(base, quantize=quantize)``."""
    items = adapters.items() if isinstance(adapters, dict) else ((Path(d).name, d) for d in adapters)
    dirs = {str(n): Path(d) for n, d in items}
    if not dirs:
        raise ConfigError("export: no adapter directories given")
    for d in dirs.values():
        if not (d / lora.CONFIG_FILE).is_file():
            raise AdapterError(f"{d}: no {lora.CONFIG_FILE}; pass an adapter directory (PEFT or mlx-lm layout)")
    return Source(dirs, lambda: models.load(base, quantize=quantize), str(base))


def adapter_block(adapter_dir: Path) -> dict:
    """The ``"mozgach"`` block of an adapter's config ({} for an adapter made elsewhere)."""
    try:
        config = json.loads((adapter_dir / lora.CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{adapter_dir / lora.CONFIG_FILE}: not readable JSON ({e}); re-save the adapter") from None
    block = config.get("mozgach") if isinstance(config, dict) else None
    return block if isinstance(block, dict) else {}


def base_gguf(source: str | None) -> Path | None:
    """The base's GGUF file, when its source is one (``smollm2-135m``, a ``.gguf`` path)."""
    if source is None:
        return None
    try:
        path = resolve(source) if source == gguf_format.SMOLLM2_NAME or Path(source).exists() else None
    except MozgachError:
        return None
    return path if path is not None and gguf_format.is_gguf(path) else None


def source_rope(source: str | None) -> tuple[dict | None, int | None] | None:
    """``(rope_scaling, max_position_embeddings)`` the base's own checkpoint declares, as
    another tool loading it gets them; None when it cannot be read here."""
    if source is None:
        return None
    try:
        if source == TINY_NAME:
            config = TINY_CONFIG
        elif (gguf_path := base_gguf(source)) is not None:
            config = gguf_format.model_config(gguf_path)
        else:
            config = read_config(resolve(source))
    except (MozgachError, OSError):
        return None
    return config.get("rope_scaling"), config.get("max_position_embeddings")


def _norm(scaling: dict | None) -> dict | None:
    if not scaling:
        return None
    d = {("rope_type" if k == "type" else k): v for k, v in scaling.items()}
    return None if d.get("rope_type") in (None, "default", "none") else d


def same_rope(a: dict | None, b: dict | None) -> bool:
    """Whether two ``rope_scaling`` dicts are the same scaling (``type`` = ``rope_type``)."""
    return _norm(a) == _norm(b)
