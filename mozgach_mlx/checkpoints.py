"""A training run's files: atomic checkpoints (adapter, optimizer state, ``state.json``)
and the per-step JSONL log, as :func:`mozgach_mlx.trainer.train_adapter` writes and
resumes them.

Every ``save_every`` optimizer steps the adapter, the optimizer state and ``state.json``
(step, data position, loss history) are written atomically under ``out_dir/checkpoint``;
``state.json`` is written last and names the step-tagged weight files, so a crash
mid-save leaves the previous checkpoint intact. On resume the log is cut back to the
checkpointed step (later steps are replayed).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from . import lora
from .errors import TrainingError
from .io import atomic_save_safetensors, atomic_write_json, atomic_write_text

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.json"


def checkpoint_dir(out_dir: Path) -> Path:
    """Where a run directory keeps its checkpoint."""
    return out_dir / CHECKPOINT_DIR


def save_checkpoint(out_dir: Path, model, opt: optim.Optimizer, state: dict) -> None:
    """Write the adapter, the optimizer state and ``state`` (the commit point, last)."""
    ck = checkpoint_dir(out_dir)
    ck.mkdir(parents=True, exist_ok=True)
    step = state["step"]
    adapter_name = f"adapter-{step:07d}.safetensors"
    opt_name = f"optimizer-{step:07d}.safetensors"
    atomic_save_safetensors(ck / adapter_name, lora.trainable(model))
    atomic_save_safetensors(ck / opt_name, dict(tree_flatten(opt.state)))
    state = {**state, "adapter_file": adapter_name, "optimizer_file": opt_name}
    atomic_write_json(ck / STATE_FILE, state)  # the commit point
    for old in ck.glob("*.safetensors"):
        if old.name not in (adapter_name, opt_name):
            old.unlink()


def load_checkpoint_state(out_dir: str | Path) -> dict | None:
    """The committed checkpoint state of a run directory, or None if there is none."""
    path = checkpoint_dir(Path(out_dir)) / STATE_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TrainingError(f"{path}: corrupt checkpoint state ({e}); delete {path.parent} to restart "
                            "this adapter from scratch") from e


def restore_checkpoint(out_dir: Path, model, opt: optim.Optimizer, state: dict) -> None:
    """Load a committed checkpoint's adapter and optimizer state into ``model`` / ``opt``."""
    ck = checkpoint_dir(out_dir)
    try:
        weights = mx.load(str(ck / state["adapter_file"]))
        opt_state = mx.load(str(ck / state["optimizer_file"]))
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise TrainingError(f"{ck}: cannot read checkpoint files ({e}); delete {ck} to restart "
                            "this adapter from scratch") from e
    expected = lora.trainable(model)
    if set(weights) != set(expected):
        raise TrainingError(f"{ck}: checkpoint parameters do not match the model's adapter "
                            f"(e.g. {sorted(set(weights) ^ set(expected))[:3]}); delete {ck} to restart")
    model.load_weights(list(weights.items()), strict=False)
    opt.state = tree_unflatten(list(opt_state.items()))


def read_log(path: Path, upto_step: int) -> list[dict]:
    """Log records of a previous attempt up to the checkpointed step (later ones are replayed)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break  # a torn last line from a crash
        if rec.get("step", 0) <= upto_step:
            records.append(rec)
    return records


class RunLog:
    """Append-only JSONL log; rewritten atomically on resume to drop replayed steps."""

    def __init__(self, path: Path, keep: list[dict]) -> None:
        self.path = path
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
        self._f = open(path, "a", encoding="utf-8")

    def write(self, rec: dict) -> None:
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()
