"""The bank's layer: a frozen base linear plus N stacked low-rank deltas, and the
selection (which deltas, with which coefficients) all layers of one bank share."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import mlx.core as mx
import mlx.nn as nn

__all__ = ["BankLinear", "BankView", "Selection", "SelectionState", "stack_deltas"]


@dataclass(frozen=True)
class Selection:
    """What the bank's layers add to the base: ``sum_k coef[r, k] * (x A_idx[r, k]) B_idx[r, k]``
    for batch row r (R = 1: every row alike). ``single`` = (adapter, its rank, coef) when
    the selection is one adapter for all rows (then its unpadded A/B are used, exactly as
    a LoRA layer would)."""

    idx: mx.array  # (R, K) int32
    coef: mx.array  # (R, K) float32
    single: tuple[int, int, float] | None = None


class SelectionState:
    """The selection every :class:`BankLinear` of one bank reads at call time (None: the base alone)."""

    def __init__(self) -> None:
        self.current: Selection | None = None


class BankLinear(nn.Module):
    """A frozen base linear layer plus N stacked low-rank deltas, one of which (or a
    weighted sum, or one per batch row) is applied according to the bank's selection.

    Shapes: x (B, L, in) -> (B, L, out); ``lora_a`` (N, in, r), ``lora_b`` (N, r, out).
    """

    def __init__(self, linear: nn.Module, lora_a: mx.array, lora_b: mx.array, state: SelectionState) -> None:
        super().__init__()
        self.linear = linear
        self.lora_a = lora_a
        self.lora_b = lora_b
        self._state = state  # a plain attribute: not part of the parameter tree
        self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)
        sel = self._state.current
        if sel is None:
            return y
        idx, coef = sel.idx, sel.coef
        rows, k = idx.shape
        if sel.single is not None:
            # One adapter for every row, in LoRALinear's order of operations.
            i, r, c = sel.single
            z = c * ((x @ self.lora_a[i, :, :r]) @ self.lora_b[i, :r, :])  # (B, L, out)
        elif rows == 1:
            # One mixture for every row: the K adapters side by side,
            # (in, K*r) and (K*r, out), so the sum over k happens inside the second matmul.
            a = self.lora_a[idx[0]].transpose(1, 0, 2).reshape(self.lora_a.shape[1], -1)  # (in, K*r)
            b = self.lora_b[idx[0]].reshape(-1, self.lora_b.shape[2])  # (K*r, out)
            c = mx.repeat(coef[0], self.lora_a.shape[2])  # (K*r,)
            z = ((x @ a) * c) @ b  # (B, L, K*r) -> (B, L, out)
        elif k == 1:
            # One adapter per row: gathered batched matmuls, no (B, in, r) copies.
            i = idx[:, 0]
            z = mx.gather_mm(x, self.lora_a, rhs_indices=i)  # (B, L, r)
            z = coef[:, :, None] * mx.gather_mm(z, self.lora_b, rhs_indices=i)  # (B, L, out)
        else:
            a = self.lora_a[idx]  # (B, K, in, r)
            b = self.lora_b[idx]  # (B, K, r, out)
            z = (mx.expand_dims(x, 1) @ a) * coef[:, :, None, None]  # (B, K, L, r)
            z = (z @ b).sum(axis=1)  # (B, L, out)
        return y + z.astype(y.dtype)


def stack_deltas(deltas: dict[int, Sequence[mx.array]], n: int, r: int, in_dims: int, out_dims: int,
                 dtype: mx.Dtype | None = None) -> tuple[mx.array, mx.array]:
    """One layer's adapters as stacks: ``deltas[j] = (A_j (in, r_j), B_j (r_j, out))`` ->
    ``(A (n, in, r), B (n, r, out))``.

    Ranks below ``r`` are zero-padded and an adapter absent from ``deltas`` is a zero
    delta; both are exact (the padded columns of A meet zero rows of B). ``dtype``
    casts the stacks (default: as given).
    """
    a_rows, b_rows = [], []
    for j in range(n):
        a, b = deltas.get(j, (None, None))
        if a is None:  # this adapter leaves the module alone: a zero delta
            a, b = mx.zeros((in_dims, r)), mx.zeros((r, out_dims))
        pad = r - a.shape[1]
        a_rows.append(mx.pad(a, [(0, 0), (0, pad)]) if pad else a)
        b_rows.append(mx.pad(b, [(0, pad), (0, 0)]) if pad else b)
    a_st, b_st = mx.stack(a_rows), mx.stack(b_rows)  # (N, in, r), (N, r, out)
    if dtype is not None:
        a_st, b_st = a_st.astype(dtype), b_st.astype(dtype)
    return a_st, b_st


class BankView(Protocol):
    """What scoring, routing and generation need of an :class:`~mozgach_mlx.bank.AdapterBank`:
    its model and tokenizer, its adapter names, and switching what the model's bank layers
    apply (``adapter``: a name, a Mix, a ``{name: weight}`` dict, None, or a list with one
    per batch row; or a ready :class:`Selection`)."""

    model: nn.Module
    tok: Any
    names: list[str]

    def selection(self, adapters: Any | Sequence[Any]) -> Selection | None: ...

    def use(self, adapter: Any | Sequence[Any] = None) -> contextlib.AbstractContextManager[None]: ...
