"""mx.distributed: data-parallel training of one adapter and adapter-parallel fleets.

The 2-rank tests start real processes with ``mlx.launch -n 2 --backend ring`` on
127.0.0.1 (free ports, a timeout, and every process of the launch killed at the end).
The references are the single-process runs of the same configuration.
"""

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner

import mozgach_mlx as mz
from mozgach_mlx import distributed as dist
from mozgach_mlx import trainer
from mozgach_mlx.cli import main
from mozgach_mlx.errors import ConfigError
from mozgach_mlx.io import sha256_file

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "dist_worker.py"
LAUNCH = Path(sys.executable).parent / "mlx.launch"
TIMEOUT = 300
SMALL = ["--model", "tiny", "--max-steps", "6", "--save-every", "2", "--batch-size", "2", "--max-seq-length", "64",
         "--warmup-steps", "1", "--quiet"]

sys.path.insert(0, str(WORKER.parent))
from dist_worker import data_parallel_case  # noqa: E402

needs_launch = pytest.mark.skipif(not LAUNCH.exists(), reason="mlx.launch is not installed next to python")


# ----------------------------------------------------------------------------- no group needed


def test_balance_is_within_lpt_bound_of_the_best_assignment():
    for seed in range(20):
        sizes = {i: (seed * 7919 + i * 104729) % 97 + 1 for i in range(1, 8)}
        for n in (2, 3):
            plan = dist.balance(sizes, n)
            assert sorted(i for p in plan for i in p) == sorted(sizes)
            makespan = max(sum(sizes[i] for i in p) for p in plan)
            best = min(max(sum(sizes[i] for i, r in zip(sizes, a, strict=True) if r == k) for k in range(n))
                       for a in itertools.product(range(n), repeat=len(sizes)))  # brute force
            assert makespan <= best * (4 / 3 - 1 / (3 * n)) + 1e-9  # Graham's LPT bound
    assert dist.balance({1: 10, 2: 10, 3: 10, 4: 10}, 2) == [[1, 3], [2, 4]]


def test_gradient_buckets_are_few_and_by_dtype():
    import mlx.core as mx

    tree = {"a": mx.zeros((1000,)), "b": [mx.zeros((10, 10)), mx.zeros((3,), dtype=mx.int32)]}
    assert dist.count_all_sum_calls(tree) == 2  # fp32 together, int32 alone
    assert dist.count_all_sum_calls(tree, bucket_bytes=400) == 3
    assert dist.all_sum_tree(tree, None) is tree


def test_sizes_that_do_not_divide_are_refused():
    class Two:
        def rank(self):
            return 0

        def size(self):
            return 2

    dist.check_data_parallel(4, Two())
    with pytest.raises(ConfigError, match="--grad-accumulation 3 is not a multiple of the 2 ranks.*use "
                                          "--grad-accumulation 4"):
        dist.check_data_parallel(3, Two())
    assert dist.my_micro_batches(4, Two()) == [0, 2]


@pytest.mark.parametrize("mode", ["data", "adapters"])
def test_distributed_without_mlx_launch_is_one_line_exit_2(tmp_path, mode):
    res = CliRunner().invoke(main, ["train", "--distributed", mode, "--out", str(tmp_path / "o"), "--quiet"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    line, = res.output.strip().splitlines()
    assert "world size 1" in line and "mlx.launch -n 2 --backend ring" in line and "--distributed none" in line
    res = CliRunner().invoke(main, ["train", "--distributed", "both", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "not one of none, data, adapters" in res.output


# ----------------------------------------------------------------------------- 2 ranks, ring over 127.0.0.1


def _free_ports(n: int = 2) -> int:
    """A base port p with p .. p+n-1 free on 127.0.0.1 (the ring listens on one per rank)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        socks = [socket.socket() for _ in range(n)]
        try:
            for q, sock in enumerate(socks):
                sock.bind(("127.0.0.1", p + q))
            return p
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no free ports")


@contextmanager
def _launch(*args: str, n: int = 2):
    """``mlx.launch -n N --backend ring`` of ``python ARGS`` in its own process group;
    every process of the group is killed on exit (none is left behind)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [str(LAUNCH), "-n", str(n), "--backend", "ring", "-p", str(_free_ports(n)), sys.executable, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            start_new_session=True)
    try:
        yield proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()


def _finish(proc: subprocess.Popen) -> tuple[str, str]:
    out, err = proc.communicate(timeout=TIMEOUT)
    deadline = time.time() + 10
    while _group_pids(proc.pid) and time.time() < deadline:  # the ranks exit with the launcher
        time.sleep(0.1)
    assert not _group_pids(proc.pid), "processes left behind"
    return out, err


def _group_pids(pgid: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def _rank_pid(pgid: int, rank: int) -> int | None:
    for pid in _group_pids(pgid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if f"MLX_RANK={rank}".encode() in env and b"python" in cmd:
            return pid
    return None


def _wait_for(cond, proc, what: str):
    deadline = time.time() + TIMEOUT
    while not (value := cond()):
        if proc.poll() is not None:
            pytest.fail(f"the launch ended before {what}: {proc.communicate()[1][-3000:]}")
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def _plain_loss(model, *a, **kw):  # the worker's loss_fn, without its kill switch
    return trainer.default_loss(model, *a, **kw)


@needs_launch
def test_data_parallel_two_ranks_equal_one_process_and_resume_after_a_rank_is_killed(tmp_path):
    model, tok, splits, cfg = data_parallel_case(tmp_path / "ref")
    ref = trainer.train_adapter(model, tok, splits, cfg, tmp_path / "ref" / "adapter", loss_fn=_plain_loss)
    out = tmp_path / "dp"
    # rank 1 is killed at its 7th micro-batch (step 4: the step-2 checkpoint is committed,
    # the step-4 one cannot be, it needs rank 1's gradients)
    with _launch(str(WORKER), "data", str(out), "--checks", "--kill-rank", "1", "--kill-after", "7") as run:
        _, err = _finish(run)
    assert not (out / "rank0.json").exists(), err[-3000:]
    state = json.loads((out / "adapter" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2
    checks = [json.loads((out / f"checks{r}.json").read_text()) for r in (0, 1)]
    for c in checks:  # both ranks refused, with the same one-line reason
        assert "rank 1 and rank 0 disagree on the config" in c["mismatch"]
        assert "--grad-accumulation 3 is not a multiple of the 2 ranks" in c["divide"]
        assert c["lock"] is not None and "in use by another mozgach process" in c["lock"]

    with _launch(str(WORKER), "data", str(out)) as run:
        _, err = _finish(run)
    assert (out / "rank1.json").exists(), err[-3000:]
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["resumed_from"] == 2 and r0["steps"] == 6
    assert r0["losses"] == r1["losses"]  # identical on every rank
    assert r0["losses"] == pytest.approx(ref.losses, rel=1e-5, abs=1e-6)
    assert r0["valid_loss"] == pytest.approx(ref.valid_loss, rel=1e-5)
    assert r0["base_valid_loss"] is None and r0["tokens"] == ref.tokens
    # only the LoRA gradients travel: one all_sum of (adapter + 2 scalars) per step trained here
    n_lora = sum(v.size for _, v in mz.lora.trainable(model).items())
    per_step = [s for s in r0["all_sum_sizes"] if s == n_lora + 2]
    assert len(per_step) == 4 and max(r0["all_sum_sizes"]) <= 3 * n_lora + 2
    # only rank 0 wrote: one log with steps 1..6, the adapter, equal to the 1-process one
    steps = [json.loads(x)["step"] for x in (out / "adapter" / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))
    import mlx.core as mx

    got = mx.load(str(out / "adapter" / mz.lora.MLX_WEIGHTS))
    want = mx.load(str(tmp_path / "ref" / "adapter" / mz.lora.MLX_WEIGHTS))
    assert set(got) == set(want)
    # Adam divides by sqrt(v): a gradient element near 0 turns fp32 summation-order noise
    # into an update difference of up to ~lr; bound it by a small fraction of lr
    worst = max(mx.abs(got[k] - want[k]).max().item() for k in want)
    assert worst <= 0.05 * cfg.learning_rate, worst


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mozgach_mlx.train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


def _hashes(out: Path) -> dict:
    return {f"{d.name}/{f.name}": sha256_file(f) for d in sorted(out.glob("mozgach108_*"))
            for f in sorted(d.iterdir()) if f.suffix in (".safetensors", ".json") and f.name != "result.json"}


def _events(out: Path) -> list[dict]:
    path = out / "logs" / "fleet.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@needs_launch
def test_adapter_parallel_fleet_killed_rank_resumed_on_one_process_equals_one_process(tmp_path):
    common = ["--n-domains", "4", *SMALL, "--max-steps", "4"]  # a checkpoint at step 2
    ref = _cli("--out", str(tmp_path / "ref"), *common)
    ref_out, ref_err = ref.communicate(timeout=TIMEOUT)
    assert ref.returncode == 0, ref_err[-3000:]

    cut = tmp_path / "cut"
    with _launch("-m", "mozgach_mlx.train", "--distributed", "adapters", "--out", str(cut), *common) as run:
        plan = _wait_for(lambda: next((e["ranks"] for e in _events(cut) if e["event"] == "assign"), None), run,
                         "the assignment")
        assert sorted(len(p) for p in plan) == [2, 2]  # 4 equal domains, 2 each
        second = plan[1][1]  # rank 1's second adapter: its first one went to rank 0 through the group
        state = cut / f"mozgach108_{second:03d}" / "checkpoint" / "state.json"
        _wait_for(state.exists, run, "rank 1's second adapter to checkpoint")
        first = f"mozgach108_{plan[1][0]:03d}"
        _wait_for(lambda: json.loads((cut / "manifest.json").read_text())["adapters"][first]["status"] == "done",
                  run, "rank 0 to record rank 1's first adapter")
        os.kill(_rank_pid(run.pid, 1), signal.SIGKILL)
        _finish(run)
    manifest = json.loads((cut / "manifest.json").read_text())["adapters"]
    assert manifest[f"mozgach108_{plan[1][0]:03d}"]["status"] == "done"
    assert manifest[f"mozgach108_{second:03d}"]["status"] == "running"
    assert [e["rank"] for e in _events(cut) if e["event"] == "start"][:2] == [0, 1]

    again = _cli("--distributed", "none", "--out", str(cut), *common)  # resume on another number of ranks
    out, err = again.communicate(timeout=TIMEOUT)
    assert again.returncode == 0, err[-3000:]
    manifest = json.loads((cut / "manifest.json").read_text())["adapters"]
    assert all(r["status"] == "done" for r in manifest.values()) and len(manifest) == 4
    assert manifest[f"mozgach108_{second:03d}"]["resumed_from"] >= 2
    assert _hashes(cut) == _hashes(tmp_path / "ref") and len(_hashes(cut)) == 4 * 3


@needs_launch
def test_data_parallel_fleet_from_the_cli_matches_one_process(tmp_path):
    common = ["--n-domains", "2", *SMALL, "--max-steps", "4", "--grad-accumulation", "2", "--lora-dropout", "0.1"]
    ref = _cli("--out", str(tmp_path / "ref"), *common)
    _, ref_err = ref.communicate(timeout=TIMEOUT)
    assert ref.returncode == 0, ref_err[-3000:]
    out = tmp_path / "dp"
    with _launch("-m", "mozgach_mlx.train", "--distributed", "data", "--out", str(out), *common) as run:
        stdout, err = _finish(run)
    assert "exited with code" not in err, err[-3000:]
    assert stdout.count("2 trained, 0 already done, 0 failed") == 1  # only rank 0 prints the summary
    want = json.loads((tmp_path / "ref" / "manifest.json").read_text())["adapters"]
    got = json.loads((out / "manifest.json").read_text())["adapters"]
    assert set(got) == set(want)
    for name, rec in got.items():
        assert rec["status"] == "done" and rec["tokens"] == want[name]["tokens"]
        for key in ("train_loss", "valid_loss", "base_valid_loss"):
            assert rec[key] == pytest.approx(want[name][key], rel=1e-5), (name, key)
        for f, h in rec["files"].items():
            assert sha256_file(out / name / f) == h
    assert [e["event"] for e in _events(out)] == ["start", "done", "start", "done"]  # one writer
