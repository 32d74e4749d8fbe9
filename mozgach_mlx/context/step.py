"""The context-parallel training step: every rank runs the model on its slice of each
sequence, attention as ring attention over the group.

:class:`ContextShard` is what a step installs on every attention layer
(``Attention.context_parallel``, see :mod:`mozgach_mlx.models.llama`): it rotates this
rank's q and k by RoPE at their *global* positions (one ``offset`` per piece of the
layout) and runs :func:`.ring.ring_attention` with the mask of the whole sequence (its
segment ids, S² groups of the whole length, the layer's window). Everything else in a
block is per token and runs on the slice as it is.

:func:`grad_fn` is the trainer's step: it shards inputs, targets and loss mask by the
layout, installs the shard, and runs the model's value-and-grad (the plain step or
per-block checkpointing, or any strategy of :mod:`mozgach_mlx.memory`) on the slice. The
chunked loss of a slice is the sum over its tokens, so the ranks' loss sums,
token counts and LoRA gradients summed over the group (the trainer's
``distributed.sum_step``) are the whole sequence's, normalised by the global token count.

Tiled block recompute under context parallelism (``memory_strategy`` tile, tile+offload,
or auto's tiled candidates): memory.py's phases run on the rank's slice unchanged --
A, B and D per tile of ``tile_chunk`` local positions, and the attention phase
(``memory._Block.core``, with C its vjp) on the slice's whole q, k, v, which the
installed shard turns into RoPE at global positions and ring attention. The ring then
streams K/V in *units* of ``tile_chunk`` keys (``RingPlan(chunk=)``): unit j of every
rank goes all the way round (forward: N - 1 hops; backward: with its fp32 dK/dV
accumulator, home after N) before unit j + 1 starts, so what is in flight per rank is a
few units, O(N x c), instead of a whole remote slice with its accumulator, O(L / N).
Llama-3.1-8B at 512K tokens over 2 ranks in bf16: the remote slice's K/V are 1 GiB per
layer and their fp32 dK/dV 2 GiB, in flight twice (6 GiB of a 36 GiB budget); units of
4096 keys make that ~0.1 GiB (plan_context.ring_bytes).

Why the ring and not "all_gather K/V once per layer, then local query tiles against all
keys": each rank would hold the whole sequence's K/V (2 GiB per layer at 512K in bf16)
and, in the backward, fp32 dK/dV for every key (4 GiB), O(L) per rank instead of
O(L / N); and the dK/dV would have to go home by an all_sum of the whole sequence's
(MLX 0.32.4's ring backend has no reduce_scatter): twice the ring's bytes. With two
ranks one all_gather moves exactly the ring's one hop, so the ring costs no bytes; the
units cost more messages (L / (N c) per hop instead of one), each of c keys x 2 kv_dim,
megabytes, where a link's latency (microseconds) is nothing next to the unit's compute.
Every exchange stays in the one chained lazy graph of :mod:`.transport`, so ranks run
their collectives in the same order: the tiled forward evaluates one block at a time
(its ring with it), the backward recomputes (a second ring forward) and differentiates
(phase C: the custom vjp's ring forward again, then the ring backward) one block at a
time, in the same block order on every rank.

Units also sharpen what a mask saves: a unit no later rank's queries see is not sent (a
zig-zag causal split over two ranks: rank 1's queries never see the last half of rank
0's keys, so half of rank 0's units stay home; tests/test_context_parallel.py counts the
messages). What a rank keeps beyond the 1-process tiled step at its length is the ring's
fp32 dQ of its queries, summed over the units block by block (measured: 0.9 of one
(L / N, q_dim) fp32 width at 8K; plan_context.RING_Q_WIDTHS). Each own unit's compute
waits for the previous unit's results and the pairs of a call share one mask cache: a
lazy graph otherwise ran every unit at once and kept a mask per unit (measured 1.7x the
peak; benchmarks/RESULTS.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import mlx.core as mx
import mlx.nn as nn

from .. import attention as attn
from .. import distributed as dist
from .. import memory
from ..errors import ConfigError
from .layout import Layout
from .ring import ring_attention
from .transport import RingTransport


class LocalTransport:
    """The ring of one process (world size 1): nothing ever travels."""

    bytes_sent = 0
    messages = 0

    def exchange(self, slots, after):
        if any(s.largest for s in slots):
            raise RuntimeError("a ring of one rank has nothing to exchange")
        return [None] * len(slots)

    def settle(self, outputs):
        return outputs


def transport_for(group):
    return LocalTransport() if group is None else RingTransport(group)


class ContextShard:
    """This rank's part of one batch: its layout, the whole batch's segment ids and S²
    group, the transport. ``attention`` is what every attention layer calls."""

    def __init__(self, layout: Layout, rank: int, transport, *, segment_ids: mx.array | None = None,
                 s2_group: int | None = None, block_size: tuple[int, int] | None = None,
                 kv_chunk: int | None = None) -> None:
        self.layout, self.rank, self.transport = layout, rank, transport
        self.segment_ids, self.s2_group, self.block_size = segment_ids, s2_group, block_size
        self.kv_chunk = kv_chunk  # K/V travel in units of this many keys (the tiled step: its tile_chunk)

    def rope(self, rope: nn.Module, x: mx.array) -> mx.array:
        """``x`` (B, H, Lr, D) rotated at this rank's global positions."""
        if hasattr(rope, "scaled_base"):
            raise ConfigError("context parallel: dynamic RoPE scaling depends on the whole sequence length at every "
                              "position; use linear, yarn or llama3 scaling, or --distributed none")
        parts = [rope(x[:, :, off:off + b - a], offset=a)
                 for (a, b), off in zip(self.layout.pieces(self.rank), self.layout.offsets(self.rank), strict=True)]
        return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=2)

    def attention(self, q, k, v, *, rope: nn.Module, scale: float, window: int | None) -> mx.array:
        return ring_attention(self.rope(rope, q), self.rope(rope, k), v, self.layout, self.rank, self.transport,
                              scale=scale, causal=True, window=window, segment_ids=self.segment_ids,
                              s2_group=self.s2_group, block_size=self.block_size, kv_chunk=self.kv_chunk)


@contextlib.contextmanager
def installed(model, shard: ContextShard | None) -> Iterator[None]:
    """Every attention layer of ``model`` runs context-parallel with ``shard`` inside."""
    layers = [layer.self_attn for layer in model.layers]
    if any(not hasattr(a, "context_parallel") for a in layers):
        raise ConfigError(f"context parallel needs a mozgach model (got {type(model).__name__})")
    for a in layers:
        a.context_parallel = shard
    try:
        yield
    finally:
        for a in layers:
            a.context_parallel = None


def shard_batch(layout: Layout, rank: int, *arrays: mx.array) -> list[mx.array]:
    return [layout.shard(a, rank) for a in arrays]


def grad_fn(model, loss_fn: Callable, cfg, strategy: memory.MemoryStrategy, group, *,
            offload_dir=None, block_size: tuple[int, int] | None = None) -> Callable:
    """``(x, y, mask, segment_ids=None) -> ((loss_sum, n), grads)`` of this rank's slice
    of the batch (sums over the slice; the trainer sums them over the group)."""
    rank, n = dist.rank(group), dist.size(group)
    transport = transport_for(group)
    if strategy.runs_model_step:
        vg = nn.value_and_grad(model, lambda x, y, k: loss_fn(model, x, y, k, cfg))
    else:
        vg = memory.value_and_grad(model, strategy, loss_chunk=cfg.loss_chunk, offload_dir=offload_dir)

    def step(x: mx.array, y: mx.array, m: mx.array, segment_ids: mx.array | None = None):
        layout = Layout(x.shape[1], n, cfg.context_split)
        s2 = attn.s2_group_tokens(model.s2_group, x.shape[1]) if model.training else None
        shard = ContextShard(layout, rank, transport, segment_ids=segment_ids, s2_group=s2, block_size=block_size,
                             kv_chunk=strategy.tile_chunk)
        with installed(model, shard):
            return vg(*shard_batch(layout, rank, x, y, m))

    step.transport = transport
    return step
