"""Context parallelism (mozgach_mlx.context): layout, ring attention, the training step.

Ring attention is checked without processes by running every rank's ring in one process
(:func:`mozgach_mlx.context.simulate`) against the naive reference attention and its
vjp; the step over 2 real ranks (``mlx.launch -n 2 --backend ring`` on 127.0.0.1,
tests/cp_worker.py) against the 1-process step of the same batch.
"""

import json
import socket
import sys
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mozgach_mlx.attention import reference_attention
from mozgach_mlx.attention.blockwise import s2_heads
from mozgach_mlx.context import Layout, simulate
from mozgach_mlx.context.ring import ring_calls
from mozgach_mlx.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "cp_worker.py"
LAUNCH = Path(sys.executable).parent / "mlx.launch"
sys.path.insert(0, str(WORKER.parent))
from conftest import launched  # noqa: E402
from cp_worker import cp_case, reference_step  # noqa: E402

needs_launch = pytest.mark.skipif(not LAUNCH.exists(), reason="mlx.launch is not installed next to python")


# ----------------------------------------------------------------------------- layout


def test_layouts_cover_the_sequence_once_and_balance_zigzag():
    for L, n, split in [(64, 2, "zigzag"), (67, 3, "zigzag"), (67, 2, "contiguous"), (5, 5, "contiguous")]:
        lay = Layout(L, n, split)
        pos = np.concatenate([lay.positions(r) for r in range(n)])
        assert sorted(pos.tolist()) == list(range(L))
        assert max(lay.local_length(r) for r in range(n)) - min(lay.local_length(r) for r in range(n)) <= 2
        x = mx.arange(L)[None]
        assert lay.unshard([lay.shard(x, r) for r in range(n)]).tolist() == x.tolist()
    assert Layout(8, 2).pieces(0) == ((0, 2), (6, 8)) and Layout(8, 2).pieces(1) == ((2, 4), (4, 6))


def test_a_sequence_shorter_than_the_chunks_is_refused():
    with pytest.raises(ConfigError, match="sequence of 3 tokens is shorter than the 4 chunks"):
        Layout(3, 2, "zigzag")
    with pytest.raises(ConfigError, match="context_split='diagonal'"):
        Layout(30, 2, "diagonal")


# ----------------------------------------------------------------------------- ring in one process


def _ring(L, N, split, *, seg=False, s2=None, window=None, H=4, Hkv=2, D=16, block=(16, 32), kv_chunk=None):
    mx.random.seed(1)
    q, k, v, do = (mx.random.normal((1, h, L, D)) for h in (H, Hkv, Hkv, H))
    segids = None
    if seg:
        cuts = np.sort(np.random.default_rng(0).choice(np.arange(1, L), 4, replace=False))
        segids = mx.array(np.searchsorted(cuts, np.arange(L), side="right")[None].astype(np.int32))
    (o_ref,), g_ref = mx.vjp(lambda q, k, v: reference_attention(q, k, v, window=window, segment_ids=segids,
                                                                 s2_group=s2), [q, k, v], [do])
    lay = Layout(L, N, split)
    calls = [ring_calls(lay, r, H, D, window=window, segment_ids=segids, s2_group=s2, block_size=block,
                        kv_chunk=kv_chunk)
             for r in range(N)]
    halves = [(q, k, v, do)] if len(calls[0]) == 1 else [(*h, d) for h, d in
                                                         zip(s2_heads(q, k, v), (do[:, :H // 2], do[:, H // 2:]),
                                                             strict=True)]
    outs, grads = [], []
    for i, (qh, kh, vh, doh) in enumerate(halves):
        loc = [[lay.shard(x, r, axis=2) for x in (qh, kh, vh, doh)] for r in range(N)]
        fwd = simulate([calls[r][i].forward(*loc[r][:3]) for r in range(N)])
        bwd = simulate([calls[r][i].backward(*loc[r][:3], *fwd[r], loc[r][3]) for r in range(N)])
        outs.append(lay.unshard([f[0] for f in fwd], axis=2))
        grads.append([lay.unshard([b[j] for b in bwd], axis=2) for j in range(3)])
    o = mx.concatenate(outs, axis=1)
    g = [mx.concatenate([gr[j] for gr in grads], axis=1) for j in range(3)]
    return o, g, o_ref, g_ref


@pytest.mark.parametrize("L,N,split", [(64, 2, "zigzag"), (67, 2, "contiguous"), (67, 3, "zigzag"),
                                       (101, 3, "contiguous")])
@pytest.mark.parametrize("mask", ["causal", "document", "s2", "window", "all"])
def test_ring_attention_equals_the_reference_forward_and_backward(L, N, split, mask):
    kw = {"causal": {}, "document": {"seg": True}, "s2": {"s2": 16}, "window": {"window": 10},
          "all": {"seg": True, "s2": 20, "window": 30}}[mask]
    o, g, o_ref, g_ref = _ring(L, N, split, **kw)
    for a, b in [(o, o_ref), *zip(g, g_ref, strict=True)]:
        assert float(mx.abs(a - b).max()) <= 1e-5 * float(mx.abs(b).max())


@pytest.mark.parametrize("L,N,split,chunk", [(67, 2, "zigzag", 7), (101, 3, "contiguous", 16),
                                             (67, 3, "zigzag", 1), (64, 2, "contiguous", 100)])
@pytest.mark.parametrize("mask", ["causal", "document", "all"])
def test_ring_streamed_in_chunks_equals_the_reference(L, N, split, chunk, mask):
    """K/V and dK/dV travelling in units of ``chunk`` keys (the tiled step's ring): uneven
    units, pieces not multiples of the chunk, a chunk of 1 and one larger than a slice."""
    kw = {"causal": {}, "document": {"seg": True}, "all": {"seg": True, "s2": 20, "window": 30}}[mask]
    o, g, o_ref, g_ref = _ring(L, N, split, kv_chunk=chunk, **kw)
    for a, b in [(o, o_ref), *zip(g, g_ref, strict=True)]:
        assert float(mx.abs(a - b).max()) <= 1e-5 * float(mx.abs(b).max())


def test_streamed_units_skip_what_the_mask_hides():
    from mozgach_mlx.attention.masks import MaskSpec
    from mozgach_mlx.context.ring import RingPlan

    # contiguous causal over 2 ranks, units of 128: rank 1's units never travel, rank 0's all do
    rp = RingPlan(Layout(1024, 2, "contiguous"), MaskSpec(True), (64, 128), None, True, chunk=128)
    assert rp.n_units == 4 and [rp.kv_hop(1, 0, j) for j in range(4)] == [True] * 4
    assert not any(rp.kv_hop(1, 1, j) for j in range(4))
    # a window of 100: only the last unit of rank 0 is seen by rank 1's queries
    rp = RingPlan(Layout(1024, 2, "contiguous"), MaskSpec(True, 100), (64, 128), None, True, chunk=128)
    assert [rp.kv_hop(1, 0, j) for j in range(4)] == [False, False, False, True]
    assert [rp.acc_hop(2, 0, j) for j in range(4)] == [False, False, False, True]


def test_masked_blocks_are_not_sent():
    from mozgach_mlx.attention.masks import MaskSpec
    from mozgach_mlx.context.ring import RingPlan

    rp = RingPlan(Layout(1024, 2, "contiguous"), MaskSpec(True), (64, 128), None, True)
    assert rp.need.tolist() == [[True, True], [False, True]]  # rank 0 never sees rank 1's keys
    assert rp.kv_hop(1, 0) and not rp.kv_hop(1, 1)  # so rank 1's K/V never travel
    seg = np.array([[0] * 512 + [1] * 512])  # documents that end at the rank boundary: nothing travels
    rp = RingPlan(Layout(1024, 2, "contiguous"), MaskSpec(True), (64, 128), seg, True)
    assert rp.need.tolist() == [[True, False], [False, True]] and not rp.kv_hop(1, 0)


# ----------------------------------------------------------------------------- 2 ranks


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _launch(*args: str, timeout: int = 600):
    with launched([str(LAUNCH), "-n", "2", "--backend", "ring", "-p", str(_port()), sys.executable, str(WORKER),
                   *args]) as proc:
        yield proc


def _check_against_one_process(out: Path, cases: list[str]) -> None:
    for name in cases:
        got = mx.load(str(out / f"{name}.safetensors"))
        model, cfg, batch = cp_case(name)
        (s, n), g = reference_step(model, cfg, batch)
        assert abs(float(got["loss_sum"]) - float(s)) <= 1e-5 * abs(float(s)), name
        assert float(got["tokens"]) == float(n), name
        flat = dict(tree_flatten(g))
        assert {k[len("grad."):] for k in got if k.startswith("grad.")} == set(flat), name
        for k, ref in flat.items():
            err = float(mx.abs(got[f"grad.{k}"] - ref).max())
            assert err <= 1e-5 * float(mx.abs(ref).max()), (name, k, err)


def _run_cases(tmp_path: Path, cases: list[str], timeout: int) -> None:
    with _launch("grads", str(tmp_path), *cases) as proc:
        out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-2000:]
    _check_against_one_process(tmp_path, cases)


CASES_4K = ["causal-4096", "document-4099-contiguous", "s2-4096-ckpt", "all-4099", "causal-4096-q4-ckpt"]
CASES_16K = ["causal-16384-ckpt", "document-16387", "s2-16384-contiguous-ckpt"]


@needs_launch
def test_two_ranks_equal_one_process_at_4k(tmp_path):
    """Loss, token count and every LoRA gradient of a 2-rank context-parallel step equal
    the 1-process step: causal (zig-zag), documents (contiguous, 4099 tokens: odd, not a
    multiple of the block), S² with checkpointing, documents + S² + sliding window, and
    the 4-bit base with checkpointing."""
    _run_cases(tmp_path, CASES_4K, 300)


@needs_launch
@pytest.mark.slow
def test_two_ranks_equal_one_process_at_16k(tmp_path):
    _run_cases(tmp_path, CASES_16K, 1200)


# ----------------------------------------------------------------------------- with tiled recompute

CASES_TILE = ["causal-4096-tile", "document-4099-contiguous-tile", "s2-4099-tile", "all-2051-tile",
              "causal-2048-q4-tile"]


@pytest.mark.parametrize("name", ["causal-1027-tile", "all-1029-contiguous-tile", "s2-1024-q4-tile"])
def test_tiled_context_step_of_one_rank_equals_the_model_step(name):
    """The tiled step with the context shard installed, world size 1 (LocalTransport): the
    zig-zag split still gives the rank two pieces, so RoPE runs per piece at global
    positions, the ring's units are tile-sized, and tiled phase C differentiates the ring
    -- the same loss and LoRA gradients as the model's own 1-process step."""
    from cp_worker import cp_step_sums

    model, cfg, batch = cp_case(name)
    (s_ref, n_ref), g_ref = reference_step(model, cfg, batch)
    model, cfg, batch = cp_case(name)
    s, n, g, _ = cp_step_sums(model, cfg, batch, None)
    assert abs(s - float(s_ref)) <= 1e-5 * abs(float(s_ref)) and n == int(n_ref)
    flat, ref = dict(tree_flatten(g)), dict(tree_flatten(g_ref))
    assert set(flat) == set(ref)
    for k, r in ref.items():
        assert float(mx.abs(flat[k] - r).max()) <= 1e-5 * float(mx.abs(r).max()), k


@needs_launch
def test_two_ranks_with_tiled_recompute_equal_one_process(tmp_path):
    """Context parallelism composed with tiled block recompute (tiles of 512, the ring's K/V
    streamed in units of 512 keys): loss, token count and every LoRA gradient of the 2-rank
    step equal the 1-process (untiled) step -- causal zig-zag, documents (contiguous, odd
    4099), S² (odd 4099), documents + S² + window, and the 4-bit base."""
    _run_cases(tmp_path, CASES_TILE, 300)
    sent = [json.loads((tmp_path / f"causal-4096-tile.rank{r}.json").read_text()) for r in (0, 1)]
    # zig-zag over 2 ranks: rank 0 holds [0, 1024) + [3072, 4096), rank 1 [1024, 3072); in
    # units of 512 keys each holds 4. Per layer, 3 ring forwards (tiled forward, recompute,
    # phase C's vjp) and one backward. Rank 1's queries see only rank 0's first 2 units, so
    # rank 0 sends 2 K/V units per pass (the whole-slice ring sends all 4) and the 4
    # accumulators of rank 1's units home; rank 1 sends its 4 units and 2 accumulators.
    unit = 2 * 2 * 512 * 16 * 4  # (K, V) x 2 kv heads x 512 keys x head_dim 16, fp32 (= an fp32 dK/dV unit)
    assert [x["messages"] for x in sent] == [2 * (3 * 2 + 2 + 4), 2 * (3 * 4 + 4 + 2)]
    assert [x["bytes_sent"] for x in sent] == [x["messages"] * unit for x in sent]


def test_trainer_runs_tiled_recompute_under_context_parallelism(tmp_path):
    """mozgach train --distributed context with memory_strategy tile is no longer refused: a
    context-parallel run of one process (world 1, two zig-zag pieces, ring units of 64)
    trains with the same losses as the 1-process tiled run."""
    import mozgach_mlx as mz
    from mozgach_mlx import trainer

    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 259, 301).tolist() for _ in range(3)]
    data = {"train": [(s[:-1], s[1:], [1] * 300) for s in seqs]}
    losses = {}
    for cp in (False, True):
        model, tok = mz.load("tiny")
        cfg = mz.TrainConfig(learning_rate=3e-3, warmup_steps=1, max_steps=3, grad_accumulation=1, batch_size=1,
                             max_seq_length=300, eval_every=0, save_every=0, progress=False,
                             memory_strategy="tile", tile_chunk=64, context_parallel=cp)
        res = trainer.train_adapter(model, tok, data, cfg, tmp_path / f"cp{int(cp)}")
        assert res.memory_strategy["tile_chunk"] == 64
        losses[cp] = res.losses
    assert len(losses[True]) == 3
    assert np.allclose(losses[True], losses[False], rtol=1e-5, atol=0), losses
