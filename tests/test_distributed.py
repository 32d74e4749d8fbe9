"""mx.distributed: data-parallel training of one adapter, adapter-parallel fleets, and
``mozgach launch`` (local ranks without a busy launcher).

The 2-rank tests start real processes with ``mlx.launch -n 2 --backend ring`` or
``mozgach launch -n 2`` (``python -m mozgach_mlx.launch``) on 127.0.0.1 (free ports, a
timeout, and every process of the launch killed at the end). The references are the
single-process runs of the same configuration.
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
from conftest import group_pids, launched  # noqa: E402
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
    assert "world size 1" in line and "mozgach launch -n 2 -- mozgach train" in line and "--distributed none" in line
    assert "mlx.launch --hostfile" in line
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


OURS = [sys.executable, "-m", "mozgach_mlx.launch"]


@contextmanager
def _launch(*args: str, n: int = 2, launcher: str = "mlx", env: dict | None = None):
    """``mlx.launch -n N --backend ring`` (or ``mozgach launch -n N`` with ``launcher=
    "ours"``) of ``python ARGS`` in its own process group; every process of the group is
    killed on exit (none is left behind)."""
    if launcher == "ours":
        cmd = [*OURS, "-n", str(n), "--", sys.executable, *args]
    else:
        cmd = [str(LAUNCH), "-n", str(n), "--backend", "ring", "-p", str(_free_ports(n)), sys.executable, *args]
    with launched(cmd, env) as proc:
        yield proc


def _finish(proc: subprocess.Popen) -> tuple[str, str]:
    out, err = proc.communicate(timeout=TIMEOUT)
    deadline = time.time() + 10
    while group_pids(proc.pid) and time.time() < deadline:  # the ranks exit with the launcher
        time.sleep(0.1)
    assert not group_pids(proc.pid), "processes left behind"
    return out, err


def _rank_pid(pgid: int, rank: int) -> int | None:
    for pid in group_pids(pgid):
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


def _part(out: Path, rank: int) -> dict:
    path = out / f"manifest.rank{rank}.json"
    return json.loads(path.read_text())["adapters"] if path.exists() else {}


def test_adapter_parallel_fleet_killed_rank_resumed_on_one_process_equals_one_process(tmp_path):
    common = ["--n-domains", "4", *SMALL, "--max-steps", "4"]  # a checkpoint at step 2
    ref = _cli("--out", str(tmp_path / "ref"), *common)
    ref_out, ref_err = ref.communicate(timeout=TIMEOUT)
    assert ref.returncode == 0, ref_err[-3000:]

    cut = tmp_path / "cut"
    with _launch("-m", "mozgach_mlx.train", "--distributed", "adapters", "--out", str(cut), *common,
                 launcher="ours") as run:
        plan = _wait_for(lambda: next((e["ranks"] for e in _events(cut) if e["event"] == "assign"), None), run,
                         "the assignment")
        assert sorted(len(p) for p in plan) == [2, 2]  # 4 equal domains, 2 each
        first, second = (f"mozgach108_{i:03d}" for i in plan[1])
        _wait_for(lambda: _part(cut, 1).get(first, {}).get("status") == "done", run, "rank 1's first adapter")
        _wait_for((cut / second / "checkpoint" / "state.json").exists, run, "rank 1's second adapter to checkpoint")
        os.kill(_rank_pid(run.pid, 1), signal.SIGKILL)
        _, err = _finish(run)
    done = sum(r["status"] == "done" for part in (_part(cut, 1), json.loads((cut / "manifest.json").read_text())[
        "adapters"]) for r in part.values())
    assert run.returncode == 128 + signal.SIGKILL  # the launcher exits with the rank's code
    assert [x for x in err.splitlines() if "failed" in x] == ["rank 1 failed: killed by SIGKILL"]
    # rank 1's adapters are in its part only: nothing went through the group after the start
    assert first not in json.loads((cut / "manifest.json").read_text())["adapters"]
    assert _part(cut, 1)[first]["status"] == "done" and _part(cut, 1)[second]["status"] == "running"
    assert {e["rank"] for e in _events(cut) if e["event"] == "start"} == {0}  # rank 0 logs its own ...
    assert [json.loads(x)["name"] for x in (cut / "logs" / "fleet.rank1.jsonl").read_text().splitlines()
            if json.loads(x)["event"] == "done"] == [first]  # ... and rank 1 its own

    again = _cli("--distributed", "none", "--out", str(cut), *common)  # resume on another number of ranks
    out, err = again.communicate(timeout=TIMEOUT)
    assert again.returncode == 0, err[-3000:]
    manifest = json.loads((cut / "manifest.json").read_text())["adapters"]
    assert all(r["status"] == "done" for r in manifest.values()) and len(manifest) == 4
    assert manifest[second]["resumed_from"] >= 2
    assert f"{done} already done" in out  # rank 1's finished one taken from its part
    assert not list(cut.glob("manifest.rank*.json"))  # merged, then removed
    assert _hashes(cut) == _hashes(tmp_path / "ref") and len(_hashes(cut)) == 4 * 3


def _fleet_data(tmp: Path) -> Path:
    return mz.synthetic.write_corpus(tmp / "data", n_domains=4, n_train=16, n_valid=4)


def test_adapter_parallel_on_separate_disks_equals_one_process_with_no_collective_while_training(tmp_path):
    from dist_worker import fleet_case

    data = _fleet_data(tmp_path)
    model, tok, domains, cfg = fleet_case(data)
    mz.train_fleet(model, tok, domains, cfg, tmp_path / "ref")  # the 1-process reference
    with _launch(str(WORKER), "fleet", str(tmp_path), "--data", str(data), "--separate-disks",
                 launcher="ours") as run:
        _, err = _finish(run)
    assert run.returncode == 0, err[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert sorted(r0["done"]) == [f"mozgach108_{i:03d}" for i in range(1, 5)] and not r0["failed"]
    assert len(r1["done"]) == 2 and set(r1["done"]) < set(r0["done"])
    # no collective from the first adapter's start to the last one's end, on either rank
    for r in (r0, r1):
        assert len(r["per_adapter"]) == 2
        assert len({n for pair in r["per_adapter"] for n in pair}) == 1, r["per_adapter"]
        assert r["collectives"] > r["per_adapter"][0][0]  # ... but at the end (the merge)
    # rank 0's disk holds every adapter, byte-identical to the 1-process run; rank 1's only its own
    assert _hashes(tmp_path / "disk0") == _hashes(tmp_path / "ref") and len(_hashes(tmp_path / "ref")) == 4 * 3
    assert sorted(p.name for p in (tmp_path / "disk1").glob("mozgach108_*")) == sorted(r1["done"])
    manifest = json.loads((tmp_path / "disk0" / "manifest.json").read_text())["adapters"]
    assert all(rec["status"] == "done" and rec["files"] for rec in manifest.values()) and len(manifest) == 4
    assert not list(tmp_path.glob("disk*/manifest.rank*.json"))


@pytest.mark.parametrize("launcher", ["ours", pytest.param("mlx", marks=needs_launch)])
def test_a_rank_that_raises_mid_training_ends_the_job_within_30s(tmp_path, launcher):
    data = _fleet_data(tmp_path)
    t0 = time.time()  # rank 0 would train 2 x 2000 steps (minutes) if nobody stopped it
    with _launch(str(WORKER), "fleet", str(tmp_path), "--data", str(data), "--steps", "2000", "--fail-rank", "1",
                 "--fail-after", "3", launcher=launcher) as run:
        _, err = _finish(run)
    ended = time.time()
    raised = float((tmp_path / "raised1.txt").read_text())
    assert t0 < raised and ended - raised < 30, ended - raised
    assert not (tmp_path / "rank0.json").exists()  # rank 0 was stopped, not finished
    if launcher == "ours":
        assert run.returncode == 1  # the failed rank's code
        assert [x for x in err.splitlines() if "rank" in x and "failed" in x] == [
            "rank 1 failed: RuntimeError: injected failure on rank 1"]
    else:  # mlx.launch 0.32 stops the others too, but exits 0 and only warns
        assert "Node with rank 1 exited with code 1" in err


# ----------------------------------------------------------------------------- mozgach launch


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


RING_SUM = """import mlx.core as mx, os, json
g = mx.distributed.init(strict=True, backend="ring")
x = mx.distributed.all_sum(mx.array([g.rank() + 1.0]), group=g)
print(json.dumps([g.rank(), g.size(), x.item(), os.environ["MOZGACH_BLAS_THREADS"],
                  json.load(open(os.environ["MLX_HOSTFILE"]))]))
"""


def test_launch_starts_a_ring_group_on_free_local_ports():
    res = subprocess.run([*OURS, "-n", "3", "--", sys.executable, "-c", RING_SUM], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    got = sorted(json.loads(x) for x in res.stdout.splitlines())
    assert [g[:3] for g in got] == [[0, 3, 6.0], [1, 3, 6.0], [2, 3, 6.0]]  # a real group: 1 + 2 + 3
    hosts = got[0][4]
    assert all(g[4] == hosts for g in got) and len({h[0] for h in hosts}) == 3
    assert all(h[0].startswith("127.0.0.1:") for h in hosts)
    assert got[0][3] == str(max(1, (os.cpu_count() or 1) // 3))  # the cores shared out unless set


SEND_TO_MAIN = """import mlx.core as mx, json, sys
from mozgach_mlx import distributed as dist
g = mx.distributed.init(strict=True, backend="ring")
sizes = [0, 3, 70000, 5]  # rank 2 is no neighbour of rank 0 in a ring of 4: its bytes go 2 -> 1 -> 0
data = bytes([g.rank()]) * sizes[g.rank()]
got = dist.send_to_main(data, sizes, g)
print(json.dumps([g.rank(), [[len(b), sorted(set(b))] for b in got]]))
"""


def test_send_to_main_relays_bytes_to_rank_0_only_over_neighbours():
    res = subprocess.run([*OURS, "-n", "4", "--", sys.executable, "-c", SEND_TO_MAIN], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    got = dict(json.loads(x) for x in res.stdout.splitlines())
    assert got[0] == [[0, []], [3, [1]], [70000, [2]], [5, [3]]]
    assert got[1] == got[2] == got[3] == []


OUT_OF_STEP = """import mlx.core as mx
from mozgach_mlx import distributed as dist
g = mx.distributed.init(strict=True, backend="ring")
assert dist.all_gather_json(g.rank(), g) == [0, 1]
if g.rank() == 1:
    dist._calls[0] += 1  # as if rank 1 had made one more collective: its parts are not this call's
try:
    dist.all_gather_json({"x": 1}, g)
except dist.GroupLost as e:
    print(e)
"""


def test_gathered_data_that_is_not_what_a_rank_sent_is_refused():
    res = subprocess.run([*OURS, "-n", "2", "--", sys.executable, "-c", OUT_OF_STEP], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(res.stdout.splitlines()) == [
        "rank 0: the data gathered from rank 1 is not what it sent: a rank left the group (or the ranks run "
        "different code)",
        "rank 1: the data gathered from rank 0 is not what it sent: a rank left the group (or the ranks run "
        "different code)"]


def _until(cond, timeout: float = 30):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline
        time.sleep(0.05)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_launch_idles_while_ranks_run_and_a_failed_rank_stops_the_rest_with_its_code(tmp_path):
    # rank 0 ignores SIGTERM (SIGKILL after --grace); rank 1 says what went wrong and exits 3
    script = ("import os, signal, sys, time\n"
              "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
              "r = os.environ['MLX_RANK']\n"
              "open(os.path.join(sys.argv[1], 'up' + r), 'w').close()\n"
              "print('rank', r, 'up', flush=True)\n"
              "while r == '1' and not os.path.exists(os.path.join(sys.argv[1], 'go')): time.sleep(0.05)\n"
              "if r == '1': print('error: the disk is full', file=sys.stderr); sys.exit(3)\n"
              "time.sleep(600)\n")
    proc = subprocess.Popen([*OURS, "-n", "2", "--grace", "2", "--", sys.executable, "-c", script, str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            start_new_session=True)
    try:
        _until(lambda: (tmp_path / "up0").exists() and (tmp_path / "up1").exists())
        cpu0, t0 = _cpu_s(proc.pid), time.time()
        time.sleep(3)
        idle = _cpu_s(proc.pid) - cpu0  # mlx.launch 0.32: ~1 s of CPU per second here
        assert idle < 0.1 * (time.time() - t0), idle
        (tmp_path / "go").touch()
        out, err = proc.communicate(timeout=60)
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    assert proc.returncode == 3
    assert sorted(out.splitlines()) == ["rank 0 up", "rank 1 up"]  # forwarded, unprefixed
    assert err.splitlines() == ["error: the disk is full", "rank 1 failed: the disk is full"]
    assert not group_pids(proc.pid)  # rank 0 did not outlive the launcher (SIGKILL after the grace)


def test_launch_refuses_bad_input_in_one_line():
    for args, want in ((["-n", "0", "--", "true"], "-n 0: the number of ranks must be 1 or more"),
                       (["-n", "2"], "no command to run; put it after `--`"),
                       (["-n", "2", "--", "/nonexistent/cmd"], "cannot start '/nonexistent/cmd'")):
        res = subprocess.run([*OURS, *args], capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert res.returncode == 2 and want in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


@needs_launch
@pytest.mark.parametrize("extra", [[], ["--contrast", "1"]], ids=["plain", "contrast"])
def test_data_parallel_fleet_from_the_cli_matches_one_process(tmp_path, extra):
    common = ["--n-domains", "2", *SMALL, "--max-steps", "4", "--grad-accumulation", "2", "--lora-dropout", "0.1",
              *extra]
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
    for name in got:  # contrastive: each rank's micro-batches' hinges, summed over the group
        logs = [[json.loads(x) for x in (d / "logs" / f"{name}.jsonl").read_text().splitlines()]
                for d in (tmp_path / "ref", out)]
        assert [("contrast" in r) for r in logs[1]] == [bool(extra)] * 4
        if extra:
            assert [r["contrast"] for r in logs[1]] == pytest.approx([r["contrast"] for r in logs[0]], rel=1e-4,
                                                                     abs=1e-6)
