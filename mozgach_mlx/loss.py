"""Chunked cross-entropy: lm_head + cross-entropy evaluated a chunk of positions at a time.

At long context the logits are the largest array of a training step: for L = 100K tokens
and a 128K vocabulary, (L, vocab) fp32 logits are 51 GB. Here they never exist whole.

For each chunk of ``c`` positions the forward pass of :func:`chunked_cross_entropy`
computes, in fp32,

.. math::

    z = \\mathrm{head}(h_c) \\in \\mathbb{R}^{c \\times V},\\quad
    p = \\mathrm{softmax}(z),\\quad
    \\ell = \\sum_i w_i \\,(\\log \\textstyle\\sum_v e^{z_{iv}} - z_{i, t_i})

and, in the same pass, the gradient of the chunk's loss with respect to its inputs,

.. math::

    \\frac{\\partial \\ell}{\\partial z} = w \\odot (p - \\mathrm{onehot}(t)),\\qquad
    \\frac{\\partial \\ell}{\\partial h_c} = \\mathrm{head}^{\\top}\\!\\left(
        \\frac{\\partial \\ell}{\\partial z}\\right)

(the head's VJP; for ``head(h) = h W^T`` that is ``dz @ W``). The custom VJP then only
scales these by the incoming cotangent. Compared with running each chunk under
``mx.checkpoint`` this needs one exponential pass over (c, V) instead of three and no
recomputation of the head matmul; that matters on the CPU, where ``exp`` over the vocab
costs as much as the matmul itself. Chunks are chained with ``mx.depends`` so the lazy
graph evaluates them one after another.

:func:`row_losses` runs the same chunk loop without gradient work and keeps one sum per
batch row (the adapter bank scores N adapters' rows in one batch with it).

Live memory of the loss: O(c * V) + O(L * d) for the hidden-state gradient, never
O(L * V). Measured: a chunk holds ~4 fp32 (c, V) buffers at once, and MLX's scheduler
lets the next chunk's allocations overlap the running one (at most ~10 buffers in flight,
then it waits), so the loss's peak is <= ~10 * B * c * V * 4 bytes whatever L is. The
default chunk keeps one buffer near 64 MiB (``auto_chunk``).

Measured on this CPU (d=512, V=32000, B=1, value_and_grad w.r.t. the hidden states, peak
above the inputs): this function 300 / 324 / 312 / 314 MiB at L = 2K / 8K / 16K / 32K with
c=256, 640 MiB at 8K with the default c=512, 1004 / 1248 / 1264 / 1280 MiB with c=1024.
Naive full logits (``nn.losses.cross_entropy``): 1004 MiB at 2K, 4012 MiB at 8K (16 GB at
32K). Per-chunk ``mx.checkpoint`` (c=256): 514 MiB at 2K, 955 MiB at 8K, growing with L
(the backward's recomputations overlap). This function was also 2-2.5x faster than both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from . import ops
from .errors import ConfigError

__all__ = ["auto_chunk", "chunked_cross_entropy", "cross_entropy_reference", "row_losses", "sequence_loss",
           "token_losses"]


def _head(model: nn.Module) -> tuple[nn.Module, Callable[[mx.array], mx.array]]:
    """The module holding the output projection and a function ``h -> logits``.

    Uses ``model.logits`` when the model has it (our models); otherwise falls back to the
    mlx-lm convention (``lm_head``, or the tied ``model.embed_tokens.as_linear``), so
    the loss also runs on mlx-lm models (benchmarks).
    """
    if "lm_head" in model:
        module = model.lm_head
    else:
        module = model.model.embed_tokens
    if hasattr(model, "logits"):
        return module, model.logits
    if "lm_head" in model:
        return module, model.lm_head
    return module, module.as_linear


def _chunk_ce(logits: mx.array, tc: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """Unweighted CE of each position of one chunk, plus what its gradient needs.

    Shapes: logits (B, c, V), tc (B, c) int32 ->
    (ce (B, c), e (B, c, V) = exp(z - max z), s (B, c, 1) = sum e).
    """
    z = logits.astype(mx.float32)
    zmax = z.max(axis=-1, keepdims=True)  # (B, c, 1)
    e = ops.exp_pow(z - zmax)  # (B, c, V): the only exponential pass
    s = e.sum(axis=-1, keepdims=True)  # (B, c, 1)
    tgt = mx.take_along_axis(z, tc[..., None], axis=-1)  # (B, c, 1)
    return (mx.log(s) + zmax - tgt)[..., 0], e, s


def _chunk_loss(logits: mx.array, tc: mx.array, wc: mx.array):
    """Summed weighted CE of one chunk, plus what its gradient needs.

    Shapes: logits (B, c, V), tc (B, c) int32, wc (B, c) fp32 ->
    (loss scalar, e (B, c, V) = exp(z - max z), s (B, c, 1) = sum e).
    """
    ce, e, s = _chunk_ce(logits, tc)
    return (ce * wc).sum(), e, s


def _chunk_loss_and_grads(call, params, hc, tc, wc):
    """Loss of one chunk and its gradients w.r.t. ``hc`` and the head's trainable params.

    Shapes: hc (B, c, d), tc (B, c) int32, wc (B, c) fp32 ->
    (scalar, (B, c, d), [like params]).
    """
    logits = call(hc, *params)  # (B, c, V)
    loss, e, s = _chunk_loss(logits, tc, wc)
    # dl/dz = w * (softmax(z) - onehot(t))
    p = e * (wc[..., None] / s)  # (B, c, V)
    p_t = mx.take_along_axis(p, tc[..., None], axis=-1)
    dz = mx.put_along_axis(p, tc[..., None], p_t - wc[..., None], axis=-1).astype(logits.dtype)
    # The head's forward inside vjp is never evaluated (its output is unused), so this
    # costs only the backward matmul(s).
    _, grads = mx.vjp(call, [hc, *params], [dz])
    return loss, grads[0], grads[1:]


def auto_chunk(vocab_size: int, batch: int = 1, *, minimum: int = 64) -> int:
    """Positions per chunk so one fp32 (batch, chunk, vocab) buffer is ~64 MiB: a multiple
    of 64 in [64, 1024] (512 for a 32K vocab, 128 for 128K). Measured on the CPU: chunks
    of 256 and 1024 take the same time, so there is no reason to hold more.

    ``minimum`` is the floor: at 64 (the default, for training batches) the buffer grows
    past 64 MiB once ``batch * vocab`` exceeds 2**18; a smaller floor (the adapter bank
    scores many rows at once) keeps it bounded with chunks under 64 that are not rounded.
    """
    raw = 2**24 // max(vocab_size * batch, 1)
    c = raw // 64 * 64 if raw >= 64 else raw
    return max(minimum, min(1024, c))


def _vocab_size(module: nn.Module) -> int:
    return int(module["weight"].shape[0])  # (V, d) for Linear, Embedding and their quantized forms


class _Setup(NamedTuple):
    """What every path of the chunked loss shares, checked and prepared once."""

    module: nn.Module  # holds the output head's parameters
    head_fn: Callable[[mx.array], mx.array]  # (B, c, d) -> (B, c, V)
    t: mx.array  # (B, L) int32 targets, ignored positions at 0
    w: mx.array  # (B, L) fp32 weights
    bounds: list[tuple[int, int]]  # [start, end) of each chunk along L


def _setup(model: nn.Module, hidden: mx.array, targets: mx.array, mask: mx.array, chunk: int | None) -> _Setup:
    """Check the shapes and the chunk (default ``auto_chunk(vocab, B)``); find the head."""
    if hidden.ndim != 3 or targets.shape != hidden.shape[:2] or mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"expected hidden (B, L, d) and targets/mask (B, L); got hidden {hidden.shape}, "
            f"targets {targets.shape}, mask {mask.shape}"
        )
    module, head_fn = _head(model)
    if chunk is None:
        chunk = auto_chunk(_vocab_size(module), hidden.shape[0])
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ConfigError(f"chunk must be a positive number of positions, got {chunk!r}.")
    w = mx.stop_gradient(mask.astype(mx.float32))
    # Ignored positions may carry -100 and similar: point them at token 0 (weight 0).
    t = mx.stop_gradient(mx.where(w != 0, targets, 0).astype(mx.int32))
    L = hidden.shape[1]
    return _Setup(module, head_fn, t, w, [(s, min(s + chunk, L)) for s in range(0, L, chunk)])


def _forward_sum(st: _Setup, hidden: mx.array, *, per_row: bool) -> mx.array:
    """The loss without gradient work: () summed, or (B,) summed per row with ``per_row``."""
    total = mx.zeros((hidden.shape[0],) if per_row else (), dtype=mx.float32)
    for s, e in st.bounds:
        # Each chunk waits for the previous one, so few (c, V) buffers are alive at once.
        hc = hidden[:, s:e] if s == 0 else mx.depends(hidden[:, s:e], total)
        ce = _chunk_ce(st.head_fn(hc), st.t[:, s:e])[0] * st.w[:, s:e]  # (B, c)
        total = total + (ce.sum(axis=1) if per_row else ce.sum())
    return total


def _fused_sum(st: _Setup, hidden: mx.array) -> mx.array:
    """The summed loss with its gradient computed chunk by chunk in the forward pass and
    handed out by a custom VJP (scaled by the incoming cotangent)."""
    module, head_fn, t, w = st.module, st.head_fn, st.t, st.w
    flat = tree_flatten(module.trainable_parameters())
    names = [k for k, _ in flat]
    params = [v for _, v in flat]

    def call(h, *ps):
        if ps:
            module.update(tree_unflatten(list(zip(names, ps, strict=True))))
        return head_fn(h)

    @mx.custom_function
    def fused(h, *ps):
        total = mx.array(0.0, dtype=mx.float32)
        grads_h, grads_p = [], [None] * len(ps)
        for s, e in st.bounds:
            hc = h[:, s:e]
            if s > 0:
                # Make chunk k+1 depend on everything of chunk k, so the lazy graph runs
                # the chunks in order instead of holding many chunks' (c, V) buffers.
                hc = mx.depends(hc, [total, grads_h[-1], *grads_p])
            loss_c, gh, gp = _chunk_loss_and_grads(call, list(ps), hc, t[:, s:e], w[:, s:e])
            total = total + loss_c
            grads_h.append(gh)
            grads_p = [g if acc is None else acc + g for acc, g in zip(grads_p, gp, strict=True)]
        if ps:
            module.update(tree_unflatten(list(zip(names, ps, strict=True))))
        return (total, mx.concatenate(grads_h, axis=1), *grads_p)

    @fused.vjp
    def fused_vjp(primals, cotangents, outputs):
        if not isinstance(primals, (tuple, list)):  # one argument arrives unwrapped
            primals = (primals,)
        ct = cotangents[0]
        gh = (outputs[1] * ct).astype(primals[0].dtype)
        return (gh, *[(g * ct).astype(p.dtype) for g, p in zip(outputs[2:], primals[1:], strict=True)])

    return fused(hidden, *params)[0]


def chunked_cross_entropy(
    model: nn.Module,
    hidden: mx.array,
    targets: mx.array,
    mask: mx.array,
    chunk: int | None = None,
    *,
    with_grad: bool = True,
) -> tuple[mx.array, mx.array]:
    """Summed cross-entropy of ``model``'s output head on ``hidden``, ``chunk`` positions at a time.

    Args:
        model: a model with ``logits(h)`` (ours) or an mlx-lm model (``lm_head`` or tied
            ``model.embed_tokens``). Trainable head parameters (e.g. tied embeddings
            trained with ``LoRAConfig(train_embeddings=True)``) receive gradients.
        hidden: (B, L, d) final hidden states (after the final norm).
        targets: (B, L) int token ids; positions with ``mask == 0`` may hold anything
            (e.g. -100), they are ignored.
        mask: (B, L) bool or numeric; 1 marks a target that counts in the loss.
            Numeric values act as per-token weights.
        chunk: positions per chunk along L; memory of the loss is O(B * chunk * vocab).
            Default ``auto_chunk(vocab, B)``.
        with_grad: compute the gradient in the forward pass (for training). Pass False
            for evaluation: the value is the same and one matmul per chunk is saved.

    Returns:
        ``(loss_sum, n_tokens)``: fp32 scalars, ``sum_i mask_i * CE_i`` and ``sum_i mask_i``.
        Divide for the mean. Differentiable w.r.t. ``hidden`` and trainable head params;
        the gradient equals that of the naive full-logits cross-entropy.
    """
    st = _setup(model, hidden, targets, mask, chunk)
    n_tokens = st.w.sum()
    if not with_grad:
        return _forward_sum(st, hidden, per_row=False), n_tokens
    return _fused_sum(st, hidden), n_tokens


def row_losses(
    model: nn.Module, hidden: mx.array, targets: mx.array, mask: mx.array, chunk: int | None = None
) -> tuple[mx.array, mx.array]:
    """Per-row summed cross-entropy, for scoring (no gradient work): the chunk loop of
    :func:`chunked_cross_entropy` with ``with_grad=False``, summed over each row alone.

    Args:
        model, hidden, targets, mask, chunk: as :func:`chunked_cross_entropy`; the
            buffer of one chunk is (B, chunk, vocab) fp32.

    Returns:
        ``(loss_sum (B,), n_tokens (B,))`` fp32: ``sum_i mask_bi * CE_bi`` and
        ``sum_i mask_bi`` of each row b.
    """
    st = _setup(model, hidden, targets, mask, chunk)
    return _forward_sum(st, hidden, per_row=True), st.w.sum(axis=1)


def token_losses(model: nn.Module, hidden: mx.array, targets: mx.array, chunk: int | None = None) -> mx.array:
    """Cross-entropy of every position, for scoring (no gradient work): (B, L) fp32, the
    chunk loop of :func:`row_losses` without the sum, so only a (B, chunk, vocab) logits
    buffer is alive at a time (a 100K-token window never builds (L, vocab) logits)."""
    st = _setup(model, hidden, targets, mx.ones(targets.shape, dtype=mx.float32), chunk)
    parts: list[mx.array] = []
    for s, e in st.bounds:
        hc = hidden[:, s:e] if not parts else mx.depends(hidden[:, s:e], parts[-1])
        parts.append(_chunk_ce(st.head_fn(hc), st.t[:, s:e])[0])
    return mx.concatenate(parts, axis=1)


def cross_entropy_reference(
    model: nn.Module, hidden: mx.array, targets: mx.array, mask: mx.array
) -> tuple[mx.array, mx.array]:
    """Naive full-logits cross-entropy (builds (B, L, V) logits): the tests' reference."""
    _, head_fn = _head(model)
    w = mask.astype(mx.float32)
    t = mx.where(w != 0, targets, 0).astype(mx.int32)
    logits = head_fn(hidden).astype(mx.float32)
    ce = nn.losses.cross_entropy(logits, t, reduction="none")
    return (ce * w).sum(), w.sum()


def sequence_loss(
    model: nn.Module,
    inputs: mx.array,
    targets: mx.array,
    mask: mx.array,
    chunk: int | None = None,
    *,
    with_grad: bool = True,
    segment_ids: mx.array | None = None,
) -> tuple[mx.array, mx.array]:
    """``chunked_cross_entropy(model, model.hidden(inputs), targets, mask, chunk, with_grad=...)``.

    Args:
        inputs: (B, L) int token ids; targets (B, L) the next tokens; mask (B, L).
        segment_ids: (B, L) document ids of packed inputs (attention stays inside a
            document), or None; our models only.

    Returns:
        ``(loss_sum, n_tokens)`` as :func:`chunked_cross_entropy`.
    """
    if hasattr(model, "hidden"):
        h = model.hidden(inputs) if segment_ids is None else model.hidden(inputs, segment_ids=segment_ids)
    elif segment_ids is not None:
        raise ConfigError(f"{type(model).__name__} takes no segment_ids (document masks need a mozgach model); "
                          "set attention_mask='causal'.")
    else:  # mlx-lm models: the inner model returns the normed hidden states
        h = model.model(inputs)
    return chunked_cross_entropy(model, h, targets, mask, chunk=chunk, with_grad=with_grad)
