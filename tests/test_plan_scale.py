"""The scale-out estimate (plan_scale.py): ring all-reduce traffic against a literal
simulation of the ring algorithm, and what the planner says per link."""

import numpy as np
import pytest

import mozgach_mlx as mz
from mozgach_mlx.errors import ConfigError
from mozgach_mlx.plan_scale import LINKS, allreduce_seconds, scale_out

LLAMA_8B = {"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336, "num_attention_heads": 32,
            "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
            "tie_word_embeddings": False}


def _ring_allreduce(arrays: list[np.ndarray]) -> tuple[list[np.ndarray], list[int], int]:
    """The ring algorithm, message by message: reduce-scatter then all-gather of p chunks.
    Returns (each rank's result, bytes each rank sent, messages per rank)."""
    p = len(arrays)
    chunks = [np.array_split(a.astype(np.float32).copy(), p) for a in arrays]
    sent, msgs = [0] * p, 0
    for s in range(p - 1):  # reduce-scatter: rank r sends chunk (r - s) to r + 1
        outgoing = [(r, (r - s) % p, chunks[r][(r - s) % p].copy()) for r in range(p)]
        for r, c, data in outgoing:
            chunks[(r + 1) % p][c] += data
            sent[r] += data.nbytes
        msgs += 1
    for s in range(p - 1):  # all-gather: rank r sends its complete chunk (r + 1 - s) on
        outgoing = [(r, (r + 1 - s) % p, chunks[r][(r + 1 - s) % p].copy()) for r in range(p)]
        for r, c, data in outgoing:
            chunks[(r + 1) % p][c] = data
            sent[r] += data.nbytes
        msgs += 1
    return [np.concatenate(c) for c in chunks], sent, msgs


@pytest.mark.parametrize("p", [2, 3, 4])
def test_allreduce_time_counts_the_bytes_and_messages_of_the_ring(p):
    n = 1200
    rng = np.random.default_rng(p)
    arrays = [rng.normal(size=n).astype(np.float32) for _ in range(p)]
    results, sent, msgs = _ring_allreduce(arrays)
    for res in results:  # the simulation is a correct all-reduce
        np.testing.assert_allclose(res, np.sum(arrays, axis=0), rtol=1e-5, atol=1e-6)
    nbytes = n * 4
    # bandwidth term: the bytes through each rank's link; latency term: its messages
    gbps, lat = 8.0, 1e-3  # 1 GB/s
    assert allreduce_seconds(nbytes, p, gbps, 0.0) == pytest.approx(max(sent) / 1e9)
    assert allreduce_seconds(0, p, gbps, lat) == pytest.approx(msgs * lat)
    assert allreduce_seconds(nbytes, 1, gbps, lat) == 0.0


def test_adapter_traffic_is_negligible_at_long_context_and_limits_short_fast_steps():
    lora_n = 32 * 16 * ((4096 + 4096) * 2 + (4096 + 1024) * 2)  # r=16 on q, k, v, o of a Llama-3-8B
    long = mz.plan(LLAMA_8B, 100_000, backend="metal", ranks=2, link="1gbe")
    assert long.scale.grad_bytes == lora_n * 4
    assert long.scale.verdict == "negligible" and long.scale.data_parallel_speedup > 1.98
    assert any("negligible" in n for n in long.notes)
    for link in LINKS:  # the faster the link, the less it costs
        short = mz.plan(LLAMA_8B, 2048, backend="cuda", ranks=4, link=link).scale
        assert short.seconds_per_step == pytest.approx(short.compute_seconds_per_step
                                                       + short.allreduce_seconds_per_step)
    tb5, gbe = (mz.plan(LLAMA_8B, 2048, backend="cuda", ranks=4, link=k).scale for k in ("thunderbolt5", "1gbe"))
    assert tb5.allreduce_seconds_per_step < gbe.allreduce_seconds_per_step
    assert gbe.verdict == "limits the speed-up" and gbe.data_parallel_speedup < 3  # of 4
    assert mz.plan(LLAMA_8B, 2048).scale is None  # one process: no scale-out estimate


def test_scale_out_compute_splits_over_ranks_and_bad_links_are_errors():
    s = scale_out(2.0, 1000, 4, "10gbe", grad_accumulation=8)
    assert s.compute_seconds_per_step == pytest.approx(4.0) and s.single_seconds_per_step == pytest.approx(16.0)
    assert s.adapter_parallel_speedup == 4
    assert scale_out(2.0, 1000, 2, "1gbe", link_gbps=0.5).gbps == 0.5
    with pytest.raises(ConfigError, match="link 'wifi' is not one of"):
        scale_out(1.0, 1, 2, "wifi")
