"""Context parallelism in the planner: one sequence of L tokens over N ranks
(``mz.plan(..., ranks=N, context_parallel=True, link=)``, ``mozgach plan --ranks N
--context-parallel``), the way ring attention runs it (``mozgach_mlx/context/``).

Each rank holds r = ceil(L / N) tokens of every sequence (a contiguous slice, or the
zig-zag split: chunks i and 2N - 1 - i of 2N, which balances a causal mask). Per rank:

    weights, adapter   replicated: the 1-process terms
    checkpoints, block, mlp, loss, head
                       the 1-process terms at r tokens (every activation is per token; the
                       attention's softmax statistics and K/V copies are per local token)
    ring               the K/V blocks in flight while one layer's attention runs: the
                       block being computed and the one arriving (2 blocks of r tokens x
                       kv_dim for K and for V), and in the backward their dK/dV
                       accumulators, which travel with them:
                       RING_BLOCKS x B x r x 2 kv_dim x (kv_bytes + dkv_bytes)
                       With tiled recompute (tile_chunk c) the ring streams units of
                       u = min(c, r) keys instead of whole slices (context/step.py): the
                       unit computed and the all_gather's N messages of one unit,
                       (N + 1) x B x u x 2 kv_dim x (kv_bytes + dkv_bytes)
                       plus the ring's fp32 dQ of the rank's queries, summed over the units
                       block by block, which the 1-process tiled step keeps in the compute
                       dtype: RING_Q_WIDTHS x B x r x q_dim x 4 (measured on the CPU in fp32:
                       a rank of the tiled step at 8K tokens holds 0.9 of these widths more
                       than the 1-process tiled step at 8K; benchmarks/RESULTS.md)

The ring term is live only while attention runs, so it joins the block phase of the peak
(``plan.peak_of``). At N = 1 there is no ring and r = L: the 1-process plan exactly.

Bytes each rank sends per step (one micro-batch, forward and backward), closed form:

    K/V     n_layers x (F + 1) x (N - 1) x B r 2 kv_dim x kv_bytes
    dK/dV   n_layers x (N - 1) x B r 2 kv_dim x dkv_bytes
    LoRA    2 (N - 1) / N x lora_params x 4         (ring all-reduce of the fp32 gradients)

F is the number of attention forwards in a step (1 plain, 2 with checkpointing -- the
backward recomputes the block --, 3 with tiled recompute, + (k-1)/k with checkpoint_every
k: the FLOP model's own count); each forward passes K/V round the ring (N - 1 hops, one
(2, B, Hkv, r, D) message in the compute dtype), the backward passes them once more with
the fp32 dK/dV accumulators, which start at the owner's neighbour and reach home after
N - 1 hops (``context/ring.py``). These are the busiest rank's bytes: the ring skips hops
that no later rank needs (a contiguous causal split never sends the last rank's K/V),
which lowers the other ranks' traffic, not the busiest one's.

Time per step: the rank's compute (its r tokens' linear FLOPs and its share of the
attention pairs: 1/N with the zig-zag split; a contiguous split leaves the last rank
(2N - 1)/N of the mean on a causal mask) at the device's throughput, plus what the link
adds, as ``context/transport.py`` runs it: no overlap (each exchange is evaluated before
the block it brings is computed), and since MLX's ring backend sends synchronously, even
ranks send then receive and odd ranks receive then send, so one hop takes 2 message times
with an even number of ranks and 3 with an odd one (the chain of waits closes through the
odd rank); the LoRA all-reduce follows. ``overlapped_seconds`` is what a double-buffered
ring would expose instead (hop i + 1's transfer during block i's compute; only a
transfer's excess shows): the gain left to an asynchronous transport. Masks that hide
whole blocks (documents, windows) compute fewer pairs but are assumed to send every hop.
A model, not a measurement: nobody here has two Macs.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError
from .plan_scale import allreduce_seconds, get_link

RING_BLOCKS = 2  # K/V blocks in flight per layer: the one computed, the one arriving
RING_Q_WIDTHS = 1.0  # the tiled ring's fp32 (B, r, q_dim) dQ (module docstring)
LAYOUTS = ("zigzag", "contiguous")


def local_tokens(context: int, ranks: int) -> int:
    """Tokens a rank holds: ceil(L / N) (the largest slice of an uneven split)."""
    return -(-context // ranks)


def ring_bytes(batch: int, tokens: int, kv_dim: int, kv_bytes: int, dkv_bytes: int, ranks: int,
               chunk: int | None = None, q_dim: int = 0) -> int:
    """In-flight K/V blocks and their dK/dV accumulators of one layer (module docstring);
    ``chunk``: the tiled step's units of ``min(chunk, tokens)`` keys, plus its fp32
    query-side state (``q_dim``: the query heads' width)."""
    if ranks <= 1:
        return 0
    if chunk:
        return (ranks + 1) * batch * min(chunk, tokens) * 2 * kv_dim * (kv_bytes + dkv_bytes) \
            + int(RING_Q_WIDTHS * batch * tokens * q_dim * 4)
    return RING_BLOCKS * batch * tokens * 2 * kv_dim * (kv_bytes + dkv_bytes)


def attention_forwards(strategy) -> float:
    """Attention forwards per step (F): the forward, the checkpointed recompute, the tiled
    step's extra one, checkpoint_every's partial group recompute (plan._step_flops)."""
    if strategy.plain:
        return 1.0
    k = strategy.checkpoint_every
    return 2.0 + (1.0 if strategy.tile_chunk else 0.0) + (k - 1) / k


def sent_bytes(*, n_layers: int, batch: int, tokens: int, kv_dim: int, kv_bytes: int, dkv_bytes: int,
               ranks: int, forwards: float, lora_params: int) -> dict[str, float]:
    """Bytes one rank sends per step, by kind (the closed form of the module docstring)."""
    if ranks <= 1:
        return {"kv": 0.0, "dkv": 0.0, "lora": 0.0}
    block = batch * tokens * 2 * kv_dim
    return {"kv": n_layers * (forwards + 1) * (ranks - 1) * block * kv_bytes,
            "dkv": float(n_layers * (ranks - 1) * block * dkv_bytes),
            "lora": 2 * (ranks - 1) / ranks * lora_params * 4}


def attention_share(ranks: int, layout: str, causal_only: bool) -> float:
    """The busiest rank's share of the attention pairs: 1/N balanced (zig-zag, or any
    mask but plain causal), (2N - 1)/N^2 for the last rank of a contiguous causal split."""
    if layout not in LAYOUTS:
        raise ConfigError(f"context_split={layout!r} is not one of {', '.join(LAYOUTS)}")
    if layout == "contiguous" and causal_only:
        return (2 * ranks - 1) / ranks**2
    return 1.0 / ranks


@dataclass
class ContextParallel:
    """One step of context parallelism over ``ranks`` ranks (bytes, seconds; per rank)."""

    ranks: int
    link: str
    gbps: float
    latency: float
    layout: str
    tokens_per_rank: int
    ring_bytes: int
    sent: dict  # kind -> bytes sent per step by one rank
    compute_seconds: float
    link_seconds: float  # the ring's exchanges as the transport runs them (no overlap)
    overlapped_seconds: float  # what a double-buffered ring would leave of them
    allreduce_seconds: float
    single_seconds: float  # the same step in one process
    link_source: str = ""

    @property
    def sent_bytes(self) -> float:
        return sum(self.sent.values())

    @property
    def seconds_per_step(self) -> float:
        return self.compute_seconds + self.link_seconds + self.allreduce_seconds

    @property
    def speedup(self) -> float:
        return self.single_seconds / self.seconds_per_step

    def note(self) -> str:
        gib = 2**30
        s = self.sent
        return (f"context parallel: {self.ranks} ranks over {self.link} ({self.gbps:.3g} Gbit/s, "
                f"{self.link_source}), {self.tokens_per_rank:,} tokens per rank ({self.layout}); "
                f"each rank sends {self.sent_bytes / gib:.2f} GiB per step (K/V {s['kv'] / gib:.2f}, dK/dV "
                f"{s['dkv'] / gib:.2f}, LoRA all-reduce {s['lora'] / 2**20:.1f} MiB); step = compute "
                f"{_secs(self.compute_seconds)} + ring exchanges {_secs(self.link_seconds)} (synchronous, not "
                f"overlapped; {_secs(self.overlapped_seconds)} if they were) + all-reduce "
                f"{_secs(self.allreduce_seconds)}; {self.speedup:.2f}x one process")


def _secs(x: float) -> str:
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:,.1f} s"


def estimate(*, ranks: int, link: str, link_gbps: float | None, layout: str, n_layers: int, batch: int,
             context: int, kv_dim: int, kv_bytes: int, dkv_bytes: int, forwards: float, lora_params: int,
             compute_seconds: float, attention_pass_seconds: float, single_seconds: float,
             chunk: int | None = None, q_dim: int = 0) -> ContextParallel:
    """The step over ``ranks`` ranks. ``compute_seconds``: one rank's compute;
    ``attention_pass_seconds``: one rank's attention forward over all layers (its pairs,
    4 D FLOPs each: the backward is 10/4 of it); ``chunk``: the tiled step's ring units
    (a hop is ceil(r / chunk) messages, each paying the link's latency; ``q_dim``: the
    query heads' width, for the ring term)."""
    lk = get_link(link, link_gbps)
    r = local_tokens(context, ranks)
    sent = sent_bytes(n_layers=n_layers, batch=batch, tokens=r, kv_dim=kv_dim, kv_bytes=kv_bytes,
                      dkv_bytes=dkv_bytes, ranks=ranks, forwards=forwards, lora_params=lora_params)
    bw = lk.gbps * 1e9 / 8
    block = batch * r * 2 * kv_dim
    units = -(-r // chunk) if chunk else 1
    t_kv, t_dkv = block * kv_bytes / bw + units * lk.latency, block * dkv_bytes / bw + units * lk.latency
    fwd_block = attention_pass_seconds / n_layers / ranks  # one hop's compute in a forward
    hops, serial = ranks - 1, 2 if ranks % 2 == 0 else 3  # message times per hop (module docstring)
    if ranks > 1:
        overlapped = n_layers * hops * (forwards * max(0.0, t_kv - fwd_block)
                                        + max(0.0, t_kv + t_dkv - 2.5 * fwd_block))
        on_link = n_layers * hops * serial * ((forwards + 1) * t_kv + t_dkv)
    else:
        overlapped = on_link = 0.0
    grad = allreduce_seconds(lora_params * 4, ranks, lk.gbps, lk.latency)
    return ContextParallel(ranks=ranks, link=link, gbps=lk.gbps, latency=lk.latency, layout=layout,
                           tokens_per_rank=r,
                           ring_bytes=ring_bytes(batch, r, kv_dim, kv_bytes, dkv_bytes, ranks, chunk, q_dim),
                           sent=sent, compute_seconds=compute_seconds, link_seconds=on_link,
                           overlapped_seconds=overlapped,
                           allreduce_seconds=grad, single_seconds=single_seconds, link_source=lk.source)


def check(ranks: int, context_parallel: bool, strategy=None) -> None:
    """One-line errors for the ranks of a plan (every memory strategy composes with
    context parallelism; ``context_parallel`` and ``strategy`` are kept for callers)."""
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise ConfigError(f"--ranks {ranks}: the number of processes must be a whole number >= 1 "
                          "(e.g. --ranks 2)")


def usable(candidates: list, ranks: int) -> list:
    """The memory strategies a context-parallel step over ``ranks`` ranks can run: all of
    them (tiled recompute included: the ring streams tile-sized units, context/step.py)."""
    return list(candidates)
