"""The batched forward of the server: sequences at different positions decoded as one batch.

A :class:`SlotCache` keeps the keys and values of every live sequence, one *slot* (row)
each, per layer ``(S, Hkv, T, D)``. Slots ``0 .. n-1`` are the live sequences in batch
order; when one ends, the last moves into its slot (one row copied), so the batch is
always a plain slice, and with no sequence left the buffers are dropped.

Prefill (:func:`prefill`) runs the model's own forward over a group of new prompts,
right-padded: attention is causal, so a real token never sees the padding after it, and
its keys/values land in fresh slots. Decoding (:func:`decode_step`) cannot use the
model's call as it is, since the model's KV cache has one position for the whole batch:
it walks the same modules (the model's own layers, RoPE, norms and head) with one
position per row, RoPE at per-row offsets and a mask that hides every slot position a
row has not reached. Each row's adapter comes from the bank's selection, as in any forward.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..models.rope import RoPE

__all__ = ["SlotCache", "decode_step", "prefill"]


class SlotCache:
    """Keys and values of up to S sequences, per layer ``(S, Hkv, T, D)``; capacity grows in
    steps of ``rows_step`` slots and ``step`` positions, shrinks to the longest live
    sequence once that is less than half of it, and is released when empty.

    ``lengths[i]`` is how many positions slot i holds (its next token's position)."""

    step = 256
    rows_step = 8

    def __init__(self, n_layers: int) -> None:
        self.n_layers = n_layers
        self.keys: list[mx.array | None] = [None] * n_layers
        self.values: list[mx.array | None] = [None] * n_layers
        self.lengths: list[int] = []

    @property
    def live(self) -> int:
        return len(self.lengths)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.keys + self.values if a is not None)

    def _reserve(self, rows: int, positions: int, like: list[tuple[mx.array, mx.array]]) -> None:
        """Capacity for ``rows`` slots of ``positions`` positions (``like``: per layer a
        (k, v) whose head count, head dim and dtype the buffers take)."""
        for i in range(self.n_layers):
            k, v = self.keys[i], self.values[i]
            have = (0, 0) if k is None else (k.shape[0], k.shape[2])
            if rows <= have[0] and positions <= have[1]:
                continue
            s = max(have[0], -(-rows // self.rows_step) * self.rows_step)
            t = max(have[1], -(-positions // self.step) * self.step)
            ref_k, ref_v = like[i]
            new_k = mx.zeros((s, ref_k.shape[1], t, ref_k.shape[3]), ref_k.dtype)
            new_v = mx.zeros((s, ref_v.shape[1], t, ref_v.shape[3]), ref_v.dtype)
            if k is not None:
                new_k[: have[0], :, : have[1]] = k
                new_v[: have[0], :, : have[1]] = v
            self.keys[i], self.values[i] = new_k, new_v

    def add(self, kv: list[tuple[mx.array, mx.array]], lengths: list[int]) -> None:
        """Append ``len(lengths)`` sequences whose per-layer keys/values are ``kv[i] =
        (k, v)`` (R, Hkv, L, D) with row r valid up to ``lengths[r]``."""
        n, r, L = self.live, len(lengths), kv[0][0].shape[2]
        self._reserve(n + r, L, kv)
        for i, (k, v) in enumerate(kv):
            self.keys[i][n : n + r, :, :L] = k
            self.values[i][n : n + r, :, :L] = v
        self.lengths.extend(lengths)

    def write(self, layer: int, k: mx.array, v: mx.array, pos: mx.array, upto: int) -> tuple[mx.array, mx.array]:
        """Write one new position per live slot (k, v (n, Hkv, 1, D) at ``pos`` (n,)) and
        return the slots' keys/values up to ``upto`` positions, (n, Hkv, upto, D)."""
        n = self.live
        rows = mx.arange(n)
        self.keys[layer][rows, :, pos] = k[:, :, 0]
        self.values[layer][rows, :, pos] = v[:, :, 0]
        return self.keys[layer][:n, :, :upto], self.values[layer][:n, :, :upto]

    def ensure(self, positions: int) -> None:
        """Room for ``positions`` positions in every slot (before a decode step)."""
        if self.keys[0] is not None:
            self._reserve(self.live, positions, list(zip(self.keys, self.values, strict=True)))

    def remove(self, slot: int) -> int | None:
        """Free ``slot``; the last slot moves into it (returns the index it came from, or
        None when ``slot`` was the last). With no slot left the buffers are released."""
        last = self.live - 1
        moved = None
        if slot != last:
            for i in range(self.n_layers):
                self.keys[i][slot] = self.keys[i][last]
                self.values[i][slot] = self.values[i][last]
            self.lengths[slot] = self.lengths[last]
            moved = last
        self.lengths.pop()
        if not self.lengths:
            self.keys = [None] * self.n_layers
            self.values = [None] * self.n_layers
        elif self.keys[0].shape[2] > 2 * self.step and 2 * (max(self.lengths) + 1) < self.keys[0].shape[2]:
            # the longest sequence left: give back what no live one needs any more
            t = -(-(max(self.lengths) + 1) // self.step) * self.step
            self.keys = [k[:, :, :t] for k in self.keys]
            self.values = [v[:, :, :t] for v in self.values]
        return moved

    def state(self) -> list[mx.array]:
        return [a for a in self.keys + self.values if a is not None]


def prefill(model: nn.Module, ids: np.ndarray, lengths: list[int]) -> tuple[mx.array, list[tuple]]:
    """Run prompts (R, L) int32, right-padded, row r real up to ``lengths[r]``, through the
    model's own forward under its current selection. Returns the logits at each row's
    last real token (R, V) and per layer (keys, values) (R, Hkv, L, D)."""
    cache = model.make_cache()
    h = model.hidden(mx.array(ids), cache=cache)  # (R, L, d)
    last = mx.array(np.asarray(lengths, np.int32) - 1)
    logits = model.logits(h[mx.arange(len(lengths)), last])  # (R, V)
    L = ids.shape[1]
    return logits, [(c.keys[:, :, :L], c.values[:, :, :L]) for c in cache]


def _rope(rope: nn.Module, x: mx.array, pos: mx.array, pos_list: list[int]) -> mx.array:
    """RoPE at one offset per row: x (n, H, 1, D). Fixed-frequency RoPE takes a vector of
    offsets at once; dynamic NTK (its base depends on the length) goes row by row."""
    if isinstance(rope, RoPE):
        return rope(x, offset=pos)
    return mx.concatenate([rope(x[r : r + 1], offset=p) for r, p in enumerate(pos_list)])


def decode_step(model: nn.Module, cache: SlotCache, tokens: list[int]) -> mx.array:
    """One token for every live slot: ``tokens[r]`` goes in at position
    ``cache.lengths[r]`` of slot r. Returns the next-token logits (n, V) and advances the
    lengths. Mirrors the model's block (``x + attn(n1 x)``, then ``h + mlp(n2 h)``)."""
    n = cache.live
    pos_list = list(cache.lengths)
    upto = max(pos_list) + 1
    cache.ensure(upto)
    pos = mx.array(np.asarray(pos_list, np.int32))
    key_pos = mx.arange(upto)[None, :]  # (1, T)
    visible = key_pos <= pos[:, None]  # (n, T): a row sees its own positions only
    h = model.model.embed_tokens(mx.array(np.asarray(tokens, np.int32))[:, None])  # (n, 1, d)
    for i, layer in enumerate(model.layers):
        a = layer.self_attn
        x = layer.input_layernorm(h)
        q = a.q_proj(x).reshape(n, 1, a.n_heads, -1).transpose(0, 2, 1, 3)  # (n, H, 1, D)
        k = a.k_proj(x).reshape(n, 1, a.n_kv_heads, -1).transpose(0, 2, 1, 3)  # (n, Hkv, 1, D)
        v = a.v_proj(x).reshape(n, 1, a.n_kv_heads, -1).transpose(0, 2, 1, 3)
        q, k = _rope(a.rope, q, pos, pos_list), _rope(a.rope, k, pos, pos_list)
        keys, values = cache.write(i, k, v, pos, upto)  # (n, Hkv, T, D)
        mask = visible if a.window is None else visible & (pos[:, None] - key_pos < a.window)
        o = mx.fast.scaled_dot_product_attention(q, keys, values, scale=a.scale, mask=mask[:, None, None, :])
        h = h + a.o_proj(o.transpose(0, 2, 1, 3).reshape(n, 1, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    cache.lengths = [p + 1 for p in pos_list]
    return model.logits(model.model.norm(h))[:, 0]  # (n, V)
