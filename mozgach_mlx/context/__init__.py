"""Context parallelism: one long sequence over the ranks of an ``mx.distributed`` group.

Each rank holds a slice of every sequence (:mod:`.layout`: contiguous, or the zig-zag
split that balances causal work), so its activations, block checkpoints and loss chunks
are O(L / N). Every block is per token except attention, which runs as ring attention
(:mod:`.ring`): K/V blocks travel round the ring by send/recv (:mod:`.transport`), each
rank combines them with its queries by the online softmax, and the backward passes the
K/V round again with their dK/dV accumulators -- exact to fp32 rounding. Masks
(causal, packed documents, S²-Attn groups, sliding windows) are those of the whole
sequence; blocks a mask hides are neither computed nor sent. :mod:`.step` is the
training step the trainer runs with ``TrainConfig.context_parallel`` (``mozgach train
--distributed context``): RoPE at global positions, the chunked loss on the slice, the
LoRA gradients, loss sums and token counts summed over the group. Every memory strategy
composes with it: under tiled block recompute the attention phase of memory.py runs the
ring on the slice, and the ring streams K/V in units of one tile's keys (:mod:`.step`).

Why a ring of send/recv and not all_gather or Ulysses (all-to-all over heads): MLX
0.32.4 has no all_to_all and its ring backend has no sum_scatter, so Ulysses and an
all_gather design would both have to move dK/dV with an all_sum of the whole sequence's
gradients (twice the bytes of a ring, and O(L) memory per rank for the gathered K/V);
the ring holds one remote block at a time and can skip blocks a mask hides
(benchmarks/bench_context_parallel.py measures both; benchmarks/RESULTS.md).
"""

from .layout import Layout
from .ring import ring_attention
from .step import ContextShard, grad_fn, installed
from .transport import RingTransport, simulate

__all__ = ["ContextShard", "Layout", "RingTransport", "grad_fn", "installed", "ring_attention", "simulate"]
