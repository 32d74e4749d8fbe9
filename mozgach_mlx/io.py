"""Atomic file output: every file that matters is written to a temp file in the same
directory, fsynced, then renamed over the target, so a crash leaves either the old or
the new file, never a torn one."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to ``target``; on success fsync it and rename onto target.

    The temp name keeps the target's suffix, so writers that check extensions
    (``mx.save_safetensors`` appends ``.safetensors`` otherwise) write exactly there.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=f".tmp{target.suffix}")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, target)
        _fsync_dir(target.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


# atomic_path's temp names: "." + target name + "." + mkstemp's 8 random characters + ".tmp" + suffix
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp(\.[^.]*)?$")


def remove_stale_temps(directory: str | os.PathLike, depth: int = 3) -> list[Path]:
    """Delete the temp files that :func:`atomic_path` left in ``directory`` and its folders
    down to ``depth`` levels (a run dir's adapters' checkpoints are 2 down) when its process
    was killed between writing and renaming; returns the removed paths.

    Only for the one process that holds the directory (:func:`mozgach_mlx.rundir.locked`):
    a temp file of a writer still running would be deleted under it. Files of other names
    are never touched.
    """
    removed = []
    found = (p for level in range(depth + 1) for p in Path(directory).glob("*/" * level + ".*.tmp*"))
    for path in sorted(found):
        if path.is_file() and not path.is_symlink() and _TEMP_NAME.match(path.name):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(target, text.encode("utf-8"))


def atomic_write_json(target: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(target, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save_safetensors(target: str | os.PathLike, arrays: dict, metadata: dict | None = None) -> None:
    """``mx.save_safetensors`` through a temp file (arrays: name -> mx.array)."""
    import mlx.core as mx

    with atomic_path(target) as tmp:
        mx.save_safetensors(str(tmp), arrays, metadata=metadata or {})


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
