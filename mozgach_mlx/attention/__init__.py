"""Attention: a naive reference, the pure-MLX blockwise (flash-style) path and the dispatcher.

``flash_attention`` is the one entry point the model calls (looked up at call time). It
computes ``softmax(scale * q k^T + mask) v`` without ever building an (L, L) array, in the
forward *and* the backward pass:

* forward: queries in blocks of ``block_q`` rows; for each block an online softmax runs
  over key blocks of ``block_k`` columns (FlashAttention), keeping only the running row
  max ``m``, row sum ``l`` and the output accumulator. It saves the output and the
  per-row logsumexp ``lse = m + log(l)`` -- O(L) -- for the backward.
* backward (``mx.custom_function`` VJP, FlashAttention-2): per block pair it recomputes
  ``P = exp(S - lse)``, then ``dV += P^T dO``, ``dP = dO V^T``, ``dS = P * (dP - Delta)``
  with ``Delta = rowsum(dO * O)``, ``dQ += dS K``, ``dK += dS^T Q``.
* masks (:mod:`.masks`, one vocabulary for every path): causal, sliding window, segment
  ids of packed documents (a token sees only its own document) and LongLoRA's S²-Attn
  groups (training only), in any combination. Key blocks that are fully masked for a
  query block are skipped (computed neither forward nor backward); only blocks crossing
  a mask boundary are masked elementwise, by the conditions that cross it.
* GQA: q has H heads, k/v have Hkv (H % Hkv == 0). The ``rep = H // Hkv`` query heads
  that share a KV head are stacked as rows of one matrix, so K/V are never repeated and
  dK/dV come out already summed over the group.

MLX is lazy, and the order in which a big graph is evaluated decides which temporaries
are alive at once. Every block step therefore takes its K/V slice through ``mx.depends``
on the previous step's results: whatever order MLX picks, a block's scores exist only
while that block is processed, so peak memory is O(L * D) + one block (measured in
tests/test_attention.py and benchmarks/bench_attention.py; without the ``mx.depends``
chain, fwd+bwd at L=4K, H=8, Hkv=2, D=64 peaked at 0.76 GiB instead of 0.08 GiB).

Numerics: inputs of any float dtype are computed in float32 (fp32 accumulation); the
output has the dtype of ``q`` and the gradients the dtypes of q, k, v. Internally scores
are kept in base 2 (``s2 = log2(e) * s``) so the exponential is ``2**x``, computed on the
CPU by a vectorisable polynomial ~10x faster than MLX's CPU ``exp`` (``ops.exp2``).

Environment: ``MOZGACH_ATTENTION`` = ``blockwise`` | ``metal`` | ``cuda`` | ``reference``
forces a path (forcing a GPU kernel that cannot run here raises :class:`KernelError`).
Unset: the GPU kernel of the current backend if it passed its first-use self-check (and
a one-off timing against blockwise), otherwise ``blockwise``.

Layout: :mod:`.reference` (the naive attention, tests only), :mod:`.masks` (the mask
vocabulary, S² groups and the block plan), :mod:`.blockwise` (the pure-MLX path, its
custom VJP, block sizes, CPU streams and :func:`computed_pairs`), :mod:`.gpu` (the
Metal/CUDA kernel wrappers: causal and window only), :mod:`.dispatch`
(:func:`flash_attention`, :func:`attention_path` and the first-use self-check and timing
of a GPU kernel against the blockwise path).
"""

from .blockwise import DEFAULT_BLOCK_K, DEFAULT_BLOCK_Q, blockwise_attention, computed_pairs
from .dispatch import attention_path, flash_attention
from .gpu import SUPPORTED_HEAD_DIMS
from .masks import s2_group_tokens
from .reference import reference_attention

__all__ = [
    "DEFAULT_BLOCK_K",
    "DEFAULT_BLOCK_Q",
    "SUPPORTED_HEAD_DIMS",
    "attention_path",
    "blockwise_attention",
    "computed_pairs",
    "flash_attention",
    "reference_attention",
    "s2_group_tokens",
]
