"""Many adapters over one base: switch, mix, route and generate without reloading.

An :class:`AdapterBank` reads N adapter directories (PEFT or mlx-lm layout, through
:func:`mozgach_mlx.lora.read`) and holds them as *stacked* arrays: for every adapted
linear layer one :class:`BankLinear` wraps the frozen base layer (by composition) with

    lora_a (N, in, r)   lora_b (N, r, out)

and the bank keeps the per-adapter scales ``s`` (N,). Nothing is copied per adapter:
the base exists once, and choosing an adapter is choosing rows of the stacks.

What a forward pass computes is set by a *selection* ``(idx (R, K) int, coef (R, K))``
with R = 1 (every row of the batch alike) or R = batch rows:

.. math::

    y_b = W x_b + \\sum_{k} c_{bk}\\, (x_b A_{i_{bk}}) B_{i_{bk}},\\qquad
    c_{bk} = w_{bk}\\, s_{i_{bk}}

One adapter is K = 1 with ``w = 1``; a mixture ``{name: w}`` is K = its size, so it is the
exact weighted sum of the adapters' deltas (not a layer built from averaged A and B);
per-row adapters (different adapter per batch row) gather each row's A and B, so the N
adapters of :meth:`AdapterBank.losses` run as one batch: the base matmuls once per layer
over all rows, the low-rank parts as a batched matmul. No selection = the base alone.

Adapters may differ in rank (zero-padded to the largest: exact), in targets and in
``num_layers`` (missing modules are zero deltas: exact). They must fit the same base
(else AdapterError) and agree on the RoPE scaling they were trained with, which the bank
applies to the base with ``model.set_rope`` and undoes in :meth:`AdapterBank.close`.

Modules: ``layer`` (:class:`BankLinear`, :class:`Selection`, the shared selection state),
``scoring`` (losses, on :func:`mozgach_mlx.loss.row_losses`), ``routing`` (by loss or by
signature), ``generation`` (:class:`GenerationConfig`, KV-cached decoding) and ``bank``
(:class:`AdapterBank` itself, whose methods delegate to the others).
"""

from .bank import AdapterBank, Mix
from .generation import GenerationConfig
from .layer import BankLinear, Selection
from .scoring import BATCH_TOKENS, Seq

__all__ = ["BATCH_TOKENS", "AdapterBank", "BankLinear", "GenerationConfig", "Mix", "Selection", "Seq"]
