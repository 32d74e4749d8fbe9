import json

import mlx.core as mx
import pytest

from mozgach_mlx.io import atomic_path, atomic_save_safetensors, atomic_write_json, sha256_file


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "m.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in target.parent.iterdir()] == ["m.json"]


def test_failed_write_keeps_old_file(tmp_path):
    target = tmp_path / "m.json"
    atomic_write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("{partial")
            raise RuntimeError("crash mid-write")
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_safetensors_roundtrip_and_hash(tmp_path):
    target = tmp_path / "w.safetensors"
    atomic_save_safetensors(target, {"x": mx.arange(6).reshape(2, 3).astype(mx.float32)})
    back = mx.load(str(target))
    assert back["x"].tolist() == [[0, 1, 2], [3, 4, 5]]
    h1 = sha256_file(target)
    atomic_save_safetensors(target, {"x": mx.arange(6).reshape(2, 3).astype(mx.float32)})
    assert sha256_file(target) == h1  # deterministic bytes: resume verification relies on it


def test_written_files_get_normal_permissions(tmp_path):
    import os

    target = tmp_path / "m.json"
    atomic_write_json(target, {})
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_killed_writers_temp_file_is_removed_when_the_run_dir_is_next_held(tmp_path):
    import subprocess
    import sys

    from mozgach_mlx.rundir import locked

    target = tmp_path / "run" / "mozgach108_001" / "adapter_model.safetensors"
    # a process killed after writing its temp file and before the rename (os._exit skips the cleanup)
    code = ("import os, sys; from mozgach_mlx.io import atomic_path\n"
            "with atomic_path(sys.argv[1]) as tmp:\n    tmp.write_bytes(b'half'); os._exit(9)\n")
    assert subprocess.run([sys.executable, "-c", code, str(target)]).returncode == 9
    left = [p.name for p in target.parent.iterdir()]
    assert len(left) == 1 and left[0].startswith(".adapter_model.safetensors.") and not target.exists()
    keep = [target.parent / ".notes.tmp", target.parent / "mine.tmp.safetensors", tmp_path / "run" / ".lock2"]
    for p in keep:
        p.write_text("user file")
    with locked(tmp_path / "run"):
        assert sorted(p.name for p in target.parent.iterdir()) == sorted(p.name for p in keep[:2])
    assert all(p.read_text() == "user file" for p in keep)
    ckpt = target.parent / "checkpoint" / ".state.json.k2_9abcd.tmp.json"  # 2 folders down: a checkpoint's
    deep = tmp_path / "run" / "a" / "b" / "c" / "d" / ".x.json.abcdefgh.tmp.json"  # 4 down: not a run's
    for p in (ckpt, deep):
        p.parent.mkdir(parents=True)
        p.write_text("{}")
    with locked(tmp_path / "run"):
        assert not ckpt.exists() and deep.exists()
