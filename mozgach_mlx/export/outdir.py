"""The export's output directory, written whole or not at all.

Everything goes into a hidden temp directory beside ``DIR`` first; only when every file
is written (and, for fused models, checked) is it renamed to ``DIR``. An export that
fails leaves nothing behind, and an existing non-empty ``DIR`` is replaced only with
``force`` (the old one is moved aside and removed after the rename).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import ConfigError

__all__ = ["check_dest", "staged"]


def check_dest(dest: str | Path, force: bool, *, protect: tuple[Path, ...] = ()) -> Path:
    """``dest`` as a Path after checking it may be written.

    Raises:
        ConfigError: ``dest`` is a file, a non-empty directory without ``force``, or a
            directory that holds (or is) one of ``protect`` (the run being exported).
    """
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise ConfigError(f"export DIR {dest} is a file; pass a directory path")
    for p in protect:
        if dest.resolve() == p.resolve() or dest.resolve() in p.resolve().parents:
            raise ConfigError(f"export DIR {dest} holds the run {p} itself; pass another DIR")
    if dest.is_dir() and any(dest.iterdir()) and not force:
        raise ConfigError(f"export DIR {dest} exists and is not empty; pass --force to replace it, or another DIR")
    return dest


@contextlib.contextmanager
def staged(dest: str | Path, force: bool) -> Iterator[Path]:
    """Yield an empty temp directory beside ``dest``; on success it becomes ``dest``.

    On an exception the temp directory is removed and ``dest`` is left as it was.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes 0700; DIR gets a directory's usual permissions
    try:
        yield tmp
        check_dest(dest, force)  # again: something may have appeared there meanwhile
        if dest.is_dir() and any(dest.iterdir()):
            old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".old"))
            os.replace(dest, old / dest.name)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)  # rename(2) replaces an empty directory
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
