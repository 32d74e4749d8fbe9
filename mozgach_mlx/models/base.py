"""Pieces shared by every architecture: the KV cache and attention masks."""

from __future__ import annotations

import mlx.core as mx


class KVCache:
    """Keys and values of one attention layer for incremental decoding.

    Storage grows in steps of ``step`` positions so that decoding one token at a time
    does not copy the whole cache every step.

    Shapes: keys/values (B, Hkv, offset, D); ``offset`` is the number of cached positions.
    """

    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    @property
    def empty(self) -> bool:
        return self.offset == 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append (B, Hkv, L, D) keys/values; return all cached ones (B, Hkv, offset+L, D)."""
        L = keys.shape[2]
        end = self.offset + L
        if self.keys is None or end > self.keys.shape[2]:
            B, H, _, Dk = keys.shape
            n = ((L + self.step - 1) // self.step) * self.step
            new_k = mx.zeros((B, H, n, Dk), keys.dtype)
            new_v = mx.zeros((B, H, n, values.shape[3]), values.dtype)
            if self.keys is not None:
                new_k = mx.concatenate([self.keys[:, :, : self.offset], new_k], axis=2)
                new_v = mx.concatenate([self.values[:, :, : self.offset], new_v], axis=2)
            self.keys, self.values = new_k, new_v
        self.keys[:, :, self.offset : end] = keys
        self.values[:, :, self.offset : end] = values
        self.offset = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    @property
    def state(self) -> list[mx.array]:
        """Arrays to pass to ``mx.eval`` between decoding steps."""
        if self.keys is None:
            return []
        return [self.keys, self.values]


def causal_mask(L: int, offset: int, window: int | None = None) -> mx.array:
    """Boolean (L, offset+L) mask: query i (absolute position offset+i) sees key j iff
    j <= offset+i and, with a sliding window, offset+i - j < window."""
    q = mx.arange(offset, offset + L)[:, None]
    k = mx.arange(offset + L)[None, :]
    mask = k <= q
    if window is not None:
        mask = mask & (q - k < window)
    return mask
