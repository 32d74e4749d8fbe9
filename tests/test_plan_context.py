"""The context-parallel planner (plan_context.py): the per-rank formula, the bytes each rank
sends against a literal simulation of the ring, --solve-context over ranks and memory, the
CLI's one-line errors, and the measured per-rank peaks of benchmarks/results_context_parallel.json."""

import dataclasses
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import mozgach_mlx as mz
from mozgach_mlx import devices
from mozgach_mlx import plan_context as pc
from mozgach_mlx.cli import main
from mozgach_mlx.plan import solve_context
from mozgach_mlx.plan_scale import LINKS

SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 300, "tie_word_embeddings": True}
RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results_context_parallel.json"


@pytest.mark.parametrize("kw", [{"backend": "metal", "strategy": "none"}, {"backend": "cpu", "strategy": "tile"},
                                {"backend": "metal", "strategy": "auto", "device": "m4-pro"},
                                {"backend": "cpu", "strategy": "plain", "attention": {"document_length": 4096}}])
def test_one_rank_is_the_one_process_plan_exactly(kw):
    one = mz.plan("llama-3.1-8b", 65_536, **kw)
    cp1 = mz.plan("llama-3.1-8b", 65_536, ranks=1, context_parallel=True, **kw)
    assert cp1.components == one.components and cp1.total_bytes == one.total_bytes
    assert cp1.max_context == one.max_context and cp1.strategy == one.strategy
    assert cp1.flops_per_step == one.flops_per_step and cp1.seconds_per_step == one.seconds_per_step
    assert cp1.context_parallel.sent_bytes == 0 and cp1.context_parallel.ring_bytes == 0


@pytest.mark.parametrize("ranks,L", [(2, 200_000), (3, 100_001), (4, 1_000_000)])
def test_per_rank_terms_are_the_one_process_terms_at_the_local_slice_plus_the_ring(ranks, L):
    """Base weights and adapter replicated, every activation term at ceil(L / N) tokens, and
    the ring's 2 in-flight K/V blocks with their fp32 dK/dV accumulators (bf16 K/V on Metal)."""
    for strategy in ("none", "offload"):
        p = mz.plan("llama-3.1-8b", L, backend="metal", strategy=strategy, ranks=ranks, context_parallel=True)
        r = -(-L // ranks)
        local = mz.plan("llama-3.1-8b", r, backend="metal", strategy=p.strategy)
        ring = p.components.pop("ring")
        assert p.components == local.components
        assert ring == 2 * r * 2 * (8 * 128) * (2 + 4)  # blocks x tokens x (K, V) x kv_dim x (bf16 + fp32)
        assert p.total_bytes == local.total_bytes + ring  # the ring joins the block phase, which is the peak


def test_tiled_recompute_under_context_parallelism_streams_tile_sized_units():
    """Tiles compose with context parallelism: the per-rank terms are the tiled 1-process
    terms at ceil(L / N) tokens, and the ring holds (N + 1) units of tile_chunk keys with
    their fp32 dK/dV, not whole slices; each hop pays the latency once per unit."""
    L, c = 524_288, 4096
    for ranks in (2, 4):
        p = mz.plan("llama-3.1-8b", L, backend="metal", strategy="tile+offload", ranks=ranks, context_parallel=True,
                    link="thunderbolt5")
        local = mz.plan("llama-3.1-8b", L // ranks, backend="metal", strategy=p.strategy)
        ring = p.components.pop("ring")
        assert p.strategy["tile_chunk"] == c and p.components == local.components
        # (N + 1) units of c keys x (K, V) x kv_dim x (bf16 + fp32), and an fp32 dQ of q_dim per local token
        assert ring == (ranks + 1) * c * 2 * (8 * 128) * (2 + 4) + (L // ranks) * 4096 * 4
        assert p.context_parallel.ring_bytes == ring
        whole = mz.plan("llama-3.1-8b", L, backend="metal", strategy="offload", ranks=ranks, context_parallel=True)
        units = (ranks + 1) * c * 2 * (8 * 128) * (2 + 4)
        assert whole.components["ring"] == 2 * (L // ranks) * 2 * (8 * 128) * (2 + 4) > 10 * units
        cp = p.context_parallel
        # the same bytes as whole slices
        assert cp.sent["kv"] == 32 * (3 + 1) * (ranks - 1) * (L // ranks) * 2 * 1024 * 2
    # issue 25's line: Llama-3.1-8B at 512K or more on two 48 GB Macs, at Metal's default
    # 36 GiB (one Mac: ~314K); 524,288 tokens need ~35.1 GiB a rank
    two = solve_context("llama-3.1-8b", device="m4-pro", memory_gb=48, ranks=2, context_parallel=True,
                        link="thunderbolt5")
    one = solve_context("llama-3.1-8b", device="m4-pro", memory_gb=48)
    assert two.fits and two.strategy.get("tile_chunk") and two.context >= 524_288 > 1.6 * one.context
    need = mz.plan("llama-3.1-8b", 524_288, device="m4-pro", memory_gb=48, ranks=2, context_parallel=True)
    assert need.fits and 34 * 2**30 < need.total_bytes <= 36 * 2**30
    raised = dataclasses.replace(devices.device("m4-pro", 48), limit_gb=40)  # sudo sysctl iogpu.wired_limit_mb=40960
    at40 = solve_context("llama-3.1-8b", device=raised, ranks=2, context_parallel=True, link="thunderbolt5")
    assert at40.context > two.context


def _ring_traffic(ranks: int, layers: int, forwards: int, block: int, kv_bytes: int, dkv_bytes: int) -> list[int]:
    """Bytes each rank sends, message by message, in a step of ring attention: each forward
    passes every K/V block round the ring; the backward passes them again together with the
    dK/dV accumulators, which start at the owner's neighbour and go on until they are home."""
    sent = [0] * ranks
    for _layer in range(layers):
        for _pass in range(forwards + 1):  # the forwards, then the backward's K/V
            held = list(range(ranks))  # rank i holds block held[i]
            for _hop in range(ranks - 1):
                for i in range(ranks):
                    sent[i] += block * kv_bytes
                held = [held[(i - 1) % ranks] for i in range(ranks)]
            assert held == [(i + 1) % ranks for i in range(ranks)]  # every block visited every rank
        acc = [(i - 1) % ranks for i in range(ranks)]  # rank i starts the accumulator of rank i-1's keys...
        while acc != list(range(ranks)):  # ...and they travel until each is home
            for i in range(ranks):
                sent[i] += block * dkv_bytes
            acc = [acc[(i - 1) % ranks] for i in range(ranks)]
    return sent


@pytest.mark.parametrize("ranks", [2, 3, 5])
def test_bytes_sent_follow_the_closed_form(ranks):
    L, d, layers, kv_dim = 1_000, 64, 2, 2 * 16  # SMALL: 2 kv heads x head_dim 64/4
    r = -(-L // ranks)
    p = mz.plan(SMALL, L, backend="cpu", strategy="none", ranks=ranks, context_parallel=True, link="1gbe")
    cp = p.context_parallel
    by_hand = _ring_traffic(ranks, layers, forwards=2, block=r * 2 * kv_dim, kv_bytes=4, dkv_bytes=4)
    assert by_hand[0] == layers * (3 * (ranks - 1) + (ranks - 1)) * r * 2 * kv_dim * 4
    assert len(set(by_hand)) == 1
    assert cp.sent["kv"] + cp.sent["dkv"] == by_hand[0]
    lora = layers * 16 * ((d + d) + (d + kv_dim) + (d + kv_dim) + (d + d))  # r=16 on q, k, v, o
    assert cp.sent["lora"] == pytest.approx(2 * (ranks - 1) / ranks * lora * 4)
    plain = mz.plan(SMALL, L, backend="cpu", strategy="plain", ranks=ranks, context_parallel=True).context_parallel
    assert plain.sent["kv"] + plain.sent["dkv"] == _ring_traffic(ranks, layers, 1, r * 2 * kv_dim, 4, 4)[0]


def test_step_time_is_compute_plus_what_the_link_adds():
    times = {}
    for link in LINKS:
        p = mz.plan("llama-3.1-8b", 32_768, device="m4-pro", strategy="none", ranks=4, context_parallel=True,
                    link=link)
        cp = p.context_parallel
        assert p.seconds_per_step == pytest.approx(cp.compute_seconds + cp.link_seconds + cp.allreduce_seconds)
        assert 0 <= cp.overlapped_seconds < cp.link_seconds
        gbps = LINKS[link].gbps  # synchronous sends, 4 ranks: every hop's message twice in time
        assert cp.link_seconds == pytest.approx(2 * (cp.sent["kv"] + cp.sent["dkv"]) * 8 / (gbps * 1e9), rel=0.05)
        times[link] = p.seconds_per_step
        assert cp.speedup < 4
    assert times["thunderbolt5"] < times["10gbe"] < times["1gbe"]
    one = mz.plan("llama-3.1-8b", 32_768, device="m4-pro", strategy="none")
    tb5 = mz.plan("llama-3.1-8b", 32_768, device="m4-pro", strategy="none", ranks=4, context_parallel=True,
                  link="thunderbolt5")
    assert tb5.context_parallel.compute_seconds == pytest.approx(one.seconds_per_step / 4, rel=1e-3)
    contiguous = mz.plan("llama-3.1-8b", 32_768, device="m4-pro", strategy="none", ranks=4, context_parallel=True,
                         link="thunderbolt5", context_split="contiguous")
    # a contiguous split leaves the last rank 7/16 of a causal mask's pairs, not 4/16 (18 D FLOPs a pair)
    pairs = mz.attention.computed_pairs(32_768, heads=32)
    extra = 18.0 * 32 * 128 * pairs * (7 / 16 - 1 / 4)
    assert contiguous.flops_per_step - tb5.flops_per_step == pytest.approx(extra, rel=1e-9)
    assert contiguous.seconds_per_step > tb5.seconds_per_step
    assert any("context parallel: 4 ranks over thunderbolt5" in n for n in tb5.notes)


def test_solve_context_is_monotone_in_ranks_and_memory_and_fits_exactly():
    by_ranks = []
    for n in (2, 3, 4):
        p = solve_context("llama-3.1-8b", device="m4-pro", ranks=n, context_parallel=n > 1, link="thunderbolt5")
        assert p.fits
        over = mz.plan("llama-3.1-8b", p.context + 1024, device="m4-pro", ranks=n, context_parallel=n > 1,
                       strategy=p.strategy)
        assert not over.fits
        by_ranks.append(p.context)
    assert by_ranks == sorted(by_ranks) and by_ranks[2] > 1.9 * by_ranks[0]
    by_memory = [solve_context("llama-3.1-8b", device="m4-pro", memory_gb=gb, ranks=2, context_parallel=True).context
                 for gb in (24, 36, 48, 64)]
    assert by_memory == sorted(by_memory) and by_memory[0] < by_memory[-1]


@pytest.mark.parametrize("args,flag,fix", [
    (["--ranks", "0"], "--ranks 0", ">= 1"),
    (["--ranks", "2", "--link", "wifi"], "'--link'", "'thunderbolt5', '10gbe', '1gbe'"),
    (["--context-parallel"], "--context-parallel", "--ranks N with N >= 2"),
    (["--ranks", "1", "--context-parallel"], "--ranks is 1", "--ranks N with N >= 2"),
    (["--ranks", "2", "--context-parallel", "--link-gbps", "-3"], "--link-gbps", "positive rate"),
])
def test_bad_input_is_one_line_naming_the_flag_and_the_fix(args, flag, fix):
    res = CliRunner().invoke(main, ["plan", "--model", "llama-3.1-8b", *args])
    assert res.exit_code == 2 and "Traceback" not in res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and flag in lines[0] and fix in lines[0], lines


def test_cli_context_parallel_plan_and_solve():
    res = CliRunner().invoke(main, ["plan", "--model", "llama-3.1-8b", "--device", "m4-pro", "--ranks", "2",
                                    "--context-parallel", "--link", "thunderbolt5", "--solve-context"])
    assert res.exit_code == 0, res.output
    want = solve_context("llama-3.1-8b", device="m4-pro", ranks=2, context_parallel=True, link="thunderbolt5")
    assert res.output.strip() == want.table().strip()
    assert "ring" in res.output and "per rank" in res.output and "each rank sends" in res.output


def _measured_rows() -> list[dict]:
    """The rows of benchmarks/results_context_parallel.json (bench_context_parallel.py): per
    measured step, the model's config, ``L`` tokens, ``N`` ranks, ``plan`` (the ``mz.plan``
    arguments that describe that step), the 1-process peak and every rank's peak."""
    if not RESULTS.exists():
        pytest.skip(f"{RESULTS.name} is absent: run benchmarks/bench_context_parallel.py")
    return json.loads(RESULTS.read_text())["rows"]


def test_plan_matches_the_measured_per_rank_peaks_within_10_percent():
    rows = [r for r in _measured_rows() if "one_process_local" not in r]
    assert {r["L"] for r in rows} >= {16384, 32768} and all(r["N"] >= 2 for r in rows)
    for row in rows:
        kw = {**row["plan"], "lora_targets": tuple(row["plan"]["lora_targets"])}
        one = mz.plan(row["model"], row["L"], backend="cpu", **kw)
        per_rank = mz.plan(row["model"], row["L"], ranks=row["N"], context_parallel=True, backend="cpu", **kw)
        measured = max(r["peak_bytes"] for r in row["ranks"])
        assert 0.9 <= per_rank.total_bytes / measured <= 1.1, (row["case"], per_rank.total_bytes, measured)
        assert 0.9 <= one.total_bytes / row["one_process"]["peak_bytes"] <= 1.1, row["case"]
        # and what the issue asks of the ranks themselves: at most 0.6x of one process's peak
        assert measured <= 0.6 * row["one_process"]["peak_bytes"], row["case"]


def test_plan_of_a_tiled_rank_is_the_tiled_one_process_plan_at_its_length_plus_the_ring_as_measured():
    """Tiled rows (bench_context_parallel.py --strategy tile) measure a rank of the tiled
    context-parallel step, the tiled 1-process step at L and at a rank's length ceil(L / N).
    The planner's claim for context parallelism -- a rank is the 1-process step at its
    length plus the ring -- must hold within 10% of what was measured: plan(rank) /
    plan(1 process at ceil(L / N)) against measured(rank) / measured(1 process at ceil(L / N)).
    (The 1-process tiled plan itself is off on this d=64 model: its blockwise attention
    keeps ~20 MiB of score blocks whatever the length, which the tile terms, calibrated on
    d >= 256 models in benchmarks/calibration.jsonl, leave out: RESULTS.md.)"""
    rows = [r for r in _measured_rows() if "one_process_local" in r]
    if not rows:
        pytest.skip("no tiled rows: run benchmarks/bench_context_parallel.py --strategy tile")
    for row in rows:
        kw = {**row["plan"], "lora_targets": tuple(row["plan"]["lora_targets"])}
        assert kw["strategy"].get("tile_chunk"), row["case"]
        local = row["one_process_local"]
        assert local["L"] == -(-row["L"] // row["N"])
        per_rank = mz.plan(row["model"], row["L"], ranks=row["N"], context_parallel=True, backend="cpu", **kw)
        plan_local = mz.plan(row["model"], local["L"], backend="cpu", **kw)
        measured = max(r["peak_bytes"] for r in row["ranks"])
        planned_ratio = per_rank.total_bytes / plan_local.total_bytes
        measured_ratio = measured / local["peak_bytes"]
        assert 0.9 <= planned_ratio / measured_ratio <= 1.1, (row["case"], planned_ratio, measured_ratio)
        assert measured < row["one_process"]["peak_bytes"], row["case"]  # a rank holds less than one process


def test_the_model_counts():
    from mozgach_mlx.memory import MemoryStrategy as S

    assert pc.local_tokens(1001, 4) == 251 and pc.local_tokens(1000, 1) == 1000
    assert [pc.attention_forwards(s) for s in (S(plain=True), S(), S(tile_chunk=64), S(checkpoint_every=2))] \
        == [1.0, 2.0, 3.0, 2.5]
    assert pc.attention_share(4, "zigzag", True) == 0.25 and pc.attention_share(4, "contiguous", True) == 7 / 16
    assert pc.attention_share(4, "contiguous", False) == 0.25 and pc.ring_bytes(1, 100, 8, 2, 4, 1) == 0
    assert pc.usable(mz.memory.auto_candidates(1000), 2) == mz.memory.auto_candidates(1000)
    with pytest.raises(mz.errors.ConfigError, match="context_split=.stripes."):
        mz.plan(SMALL, 1000, ranks=2, context_parallel=True, context_split="stripes")
