"""Memory strategies of a training step: tiled block recompute, checkpoint offload,
checkpointing every k blocks, checkpoints in a smaller dtype.

The default step (``nn.value_and_grad`` over the model with ``mx.checkpoint`` around each
block) keeps one (B, L, d) input per block and recomputes a whole block at once in the
backward, so at long context its peak is ``N x L x d`` checkpoints plus a block's
working set of ~24 ``L x d`` arrays (plan.py). :func:`value_and_grad` runs the same step
block by block instead, evaluating as it goes, so the live set is controlled exactly:

* forward: embed, then each block; after each block its input is stored (in memory, or
  in a memory-mapped file with ``offload``) and the graph is dropped;
* the chunked loss on the last hidden state, with its gradient (``loss.py``);
* backward, last block first: reload the block's input, recompute, differentiate, free.

Tiled block recompute (``tile_chunk = c``): a block's recompute-and-differentiate runs
over chunks of ``c`` positions for everything that is per-token -- RMSNorms, q/k/v/o
projections with LoRA over the (quantized) base, residuals and the MLP -- and only
attention's core runs over the whole sequence, on materialised q, k, v (pre-RoPE), its
output and their gradients (RoPE runs on the whole q and k, so every scaling, dynamic
NTK included, is the untiled one). Phases of one block's backward, ``x`` its input and
``dy`` the gradient of its output:

    A  per chunk: q_c, k_c, v_c = proj(norm1(x_c))                 -> q, k, v (B, L, .)
    -  o = attention(rope(q), rope(k), v)                            (B, L, q_dim)
    B  per chunk: vjp of y_c = h_c + mlp(norm2(h_c)), h_c = x_c + o_proj(o_c), by dy_c
       -> dx_c, do_c and the chunk's parameter gradients
    C  vjp of the attention by do -> dq, dk, dv                      (B, L, .)
    D  per chunk: vjp of phase A by (dq_c, dk_c, dv_c) -> dx_c += ..., parameter gradients

The forward runs the same phases A, attention, B, so the block's output is bitwise the
one the backward differentiates. One block's working set is O(c x (d + intermediate))
plus O(L x (d + q_dim + 2 kv_dim)) (x, dy, dx, q/k/v, o, do, dq/dk/dv) instead of ~24 L x d.
The attention's forward runs once more than in the default step (phase C's vjp
recomputes it before its backward): 22 instead of 18 D FLOPs per (query, key) pair;
phase A's projections run twice (A and D's vjp).

Exactness: all strategies but ``checkpoint_dtype`` compute the same function as the
default step; gradients agree to fp32 rounding (tests/test_memory.py, rel. err <= 1e-5),
and ``offload`` is bitwise equal to the same strategy in memory. Dropout: the random
state is re-seeded per block from the global generator before its forward and again
before its recompute, so the recompute sees the forward's dropout masks (the default
``mx.checkpoint`` step draws fresh masks in its recompute).

Offload: block inputs go to one ``np.memmap`` file of (N, B, L, d) in ``offload_dir``
(the run's directory when training), written after each block's forward and read back
in the backward; on a Mac the CPU and GPU share memory, so disk is what frees it. The
file is deleted at the end of the step (also on an exception); a crash that kills the
process leaves ``mozgach-offload-<pid>-*.bin``, which :func:`clean_stale_offload`
removes (the trainer calls it on start). MLX has no asynchronous host I/O, so the
writes and reads are not overlapped with compute; benchmarks/bench_memory.py measures
their cost.

``checkpoint_every = k``: only every k-th block input is stored; the backward of a group
of k blocks first recomputes the group's forward from its stored input (keeping its k
inputs in memory), then differentiates it: N/k + k stored inputs instead of N, for one
more forward of (k-1)/k of the blocks. ``checkpoint_dtype``: block inputs stored in
``float16``/``bfloat16`` (on a GPU the compute dtype already is, and this is a no-op);
not exact on fp32 compute -- the error is measured in the tests.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map_with_path, tree_unflatten

from . import attention as attn
from . import loss as loss_mod
from .errors import ConfigError
from .typecheck import check_fields

OFFLOAD_PREFIX = "mozgach-offload-"
CHECKPOINT_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class MemoryStrategy:
    """How a training step trades compute and disk for memory (all off = the default step).

    Attributes:
        plain: the plain step: no block checkpointing and the MLP whole (every block's
            activations kept for the backward pass; the fastest step, the most memory).
            Excludes the other fields.
        tile_chunk: tiled block recompute with chunks of this many positions (None = off).
        offload: keep block inputs in a memory-mapped file instead of memory.
        checkpoint_every: store only every k-th block input (1 = every block).
        checkpoint_dtype: store block inputs in this dtype (None = the compute dtype).
    """

    plain: bool = False
    tile_chunk: int | None = None
    offload: bool = False
    checkpoint_every: int = 1
    checkpoint_dtype: str | None = None

    def __post_init__(self) -> None:
        check_fields(self)
        if self.tile_chunk is not None and self.tile_chunk < 1:
            raise ConfigError(f"MemoryStrategy.tile_chunk={self.tile_chunk} is invalid: use a positive number "
                              "of positions or None")
        if self.checkpoint_every < 1:
            raise ConfigError(f"MemoryStrategy.checkpoint_every={self.checkpoint_every} is invalid: use >= 1")
        if self.plain and (self.tile_chunk or self.offload or self.checkpoint_every > 1 or self.checkpoint_dtype):
            raise ConfigError("MemoryStrategy.plain keeps every activation: it does not combine with tile_chunk, "
                              "offload, checkpoint_every or checkpoint_dtype")
        if self.checkpoint_dtype is not None and self.checkpoint_dtype not in CHECKPOINT_DTYPES:
            raise ConfigError(f"MemoryStrategy.checkpoint_dtype={self.checkpoint_dtype!r} is invalid: use one of "
                              f"{', '.join(CHECKPOINT_DTYPES)} or None")

    @property
    def is_default(self) -> bool:
        return self == MemoryStrategy()

    @property
    def runs_model_step(self) -> bool:
        """The model's own value-and-grad runs it (the default step or the plain step),
        not the block-by-block engine of this module."""
        return self.is_default or self.plain

    def describe(self) -> str:
        if self.plain:
            return "plain step (no checkpointing, the MLP whole)"
        parts = []
        if self.tile_chunk:
            parts.append(f"tiled recompute (chunk {self.tile_chunk:,})")
        if self.offload:
            parts.append("checkpoint offload to disk")
        if self.checkpoint_every > 1:
            parts.append(f"checkpoint every {self.checkpoint_every} blocks")
        if self.checkpoint_dtype:
            parts.append(f"checkpoints in {self.checkpoint_dtype}")
        return ", ".join(parts) or "per-block checkpointing (default)"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# tiles of the "tile" strategy and of auto's tiled candidates (min(this, context))
DEFAULT_TILE_CHUNK = 4096
# strategy="auto" tries these in order of increasing cost, with the tile chunk
# min(DEFAULT_TILE_CHUNK, context); the fastest that fits wins.
AUTO_CANDIDATES = ({"plain": True}, {}, {"tile": True}, {"tile": True, "checkpoint_every": 2},
                   {"tile": True, "offload": True}, {"offload": True})
STRATEGY_WORDS = ("tile", "offload")

def parse_strategy(strategy: Any, context: int, tile_chunk: int | None = None) -> MemoryStrategy | None:
    """A MemoryStrategy from ``strategy``: None/"none" (the default step), "auto" (-> None,
    chosen by the planner), "tile", "offload" or "tile+offload" (tiles of ``tile_chunk``,
    default DEFAULT_TILE_CHUNK), a MemoryStrategy or a dict of its fields."""
    if strategy is None or strategy == "none" or strategy == {}:
        return MemoryStrategy()
    if strategy == "auto":
        return None
    if strategy == "plain":
        return MemoryStrategy(plain=True)
    if isinstance(strategy, str):
        words = set(strategy.split("+"))
        if not words <= set(STRATEGY_WORDS):
            raise ConfigError(f"memory strategy {strategy!r}: use auto, plain, none, tile, offload or tile+offload")
        return MemoryStrategy(tile_chunk=min(tile_chunk or DEFAULT_TILE_CHUNK, context) if "tile" in words else None,
                              offload="offload" in words)
    if isinstance(strategy, MemoryStrategy):
        return strategy
    if isinstance(strategy, dict):
        names = {f.name for f in dataclasses.fields(MemoryStrategy)}
        bad = sorted(set(strategy) - names)
        if bad:
            raise ConfigError(f"plan(): unknown strategy key(s) {bad}; use {sorted(names)}")
        return MemoryStrategy(**strategy)
    raise ConfigError(f"plan(): strategy={strategy!r}; use 'auto', 'plain', 'none', a MemoryStrategy or a dict of "
                      "its fields")


def auto_candidates(context: int, tile_chunk: int | None = None, plain: bool = True) -> list[MemoryStrategy]:
    """The strategies ``strategy="auto"`` tries, cheapest first (:data:`AUTO_CANDIDATES`;
    ``plain=False`` leaves the plain step out)."""
    c = min(tile_chunk or DEFAULT_TILE_CHUNK, context)
    out = []
    for cand in AUTO_CANDIDATES:
        if cand.get("plain") and not plain:
            continue
        kw = {k: v for k, v in cand.items() if k != "tile"}
        out.append(MemoryStrategy(tile_chunk=c if cand.get("tile") else None, **kw))
    return out


def clean_stale_offload(directory: str | Path) -> list[Path]:
    """Remove offload files of processes that no longer run (a crash mid-step); returns them."""
    removed = []
    for p in Path(directory).glob(f"{OFFLOAD_PREFIX}*.bin"):
        try:
            pid = int(p.name[len(OFFLOAD_PREFIX):].split("-")[0])
        except ValueError:
            continue
        if pid == os.getpid() or _alive(pid):
            continue  # a running step's file: removed by the step that owns it
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CheckpointStore:
    """Block inputs of one step, by block index: in memory, or in a memory-mapped file.

    ``put`` evaluates the array and stores it (cast to ``dtype`` if given); ``get``
    returns it in ``compute_dtype``. ``close`` deletes the file.
    """

    def __init__(self, n: int, shape: tuple, compute_dtype, *, offload_dir: str | Path | None = None,
                 dtype: str | None = None) -> None:
        self.compute_dtype = compute_dtype
        self.dtype = getattr(mx, dtype) if dtype else compute_dtype
        self._mem: dict[int, mx.array] = {}
        self.path = None
        self._map = None
        if offload_dir is not None:
            Path(offload_dir).mkdir(parents=True, exist_ok=True)
            self.path = Path(offload_dir) / f"{OFFLOAD_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}.bin"
            np_dtype = np.float32 if self.dtype == mx.float32 else np.uint16  # 16-bit floats as raw bits
            self._map = np.memmap(self.path, dtype=np_dtype, mode="w+", shape=(n, *shape))

    def put(self, i: int, x: mx.array) -> None:
        x = x.astype(self.dtype)
        mx.eval(x)
        if self._map is None:
            self._mem[i] = x
            return
        self._map[i] = np.asarray(x if self.dtype == mx.float32 else x.view(mx.uint16))

    def get(self, i: int) -> mx.array:
        if self._map is None:
            x = self._mem[i]
        else:
            x = mx.array(np.ascontiguousarray(self._map[i]))
            if self.dtype != mx.float32:
                x = x.view(self.dtype)
        return x.astype(self.compute_dtype)

    def drop(self, i: int) -> None:
        self._mem.pop(i, None)

    def close(self) -> None:
        self._mem.clear()
        if self._map is not None:
            del self._map
            self._map = None
            self.path.unlink(missing_ok=True)


# ------------------------------------------------------------------ differentiating pieces

def _vjp(fn: Callable, params: dict, inputs: list[mx.array], cotangents: list[mx.array]):
    """``mx.vjp`` of ``fn(params, *inputs)`` (outputs a tuple) by flat arrays:
    returns (outputs, param gradients as a flat {name: array}, input gradients)."""
    flat = tree_flatten(params)
    names = [k for k, _ in flat]

    def f(*arrays):
        p = tree_unflatten(list(zip(names, arrays[:len(names)], strict=True)))
        return fn(p, *arrays[len(names):])

    outs, grads = mx.vjp(f, [v for _, v in flat] + list(inputs), cotangents)
    return outs, dict(zip(names, grads[:len(names)], strict=True)), grads[len(names):]


def _add_into(acc: dict, grads: dict, prefix: str = "") -> None:
    for k, g in grads.items():
        key = prefix + k
        acc[key] = g if key not in acc else acc[key] + g


def _bounds(L: int, chunk: int | None) -> list[tuple[int, int]]:
    c = L if not chunk else chunk
    return [(s, min(s + c, L)) for s in range(0, L, c)]


class _Block:
    """One transformer block as the phases of the module docstring (A, attention, B)."""

    def __init__(self, layer: nn.Module, kw: dict) -> None:
        self.layer, self.kw = layer, kw
        self.attn = layer.self_attn

    def qkv(self, params: dict, x: mx.array):
        """Phase A on positions x (B, c, d) -> pre-RoPE q (B, c, q_dim), k, v (B, c, kv_dim)."""
        self.layer.update(params)
        n = self.layer.input_layernorm(x)
        return self.attn.q_proj(n), self.attn.k_proj(n), self.attn.v_proj(n)

    def core(self, q: mx.array, k: mx.array, v: mx.array) -> mx.array:
        """Attention over the whole sequence: (B, L, .) pre-RoPE -> (B, L, q_dim). Under
        context parallelism (``Attention.context_parallel`` installed, :mod:`.context`)
        q, k, v are this rank's slice and the shard runs RoPE at global positions and
        ring attention over the group (its K/V streamed in tile-sized units)."""
        a, (B, L, _) = self.attn, q.shape
        q = q.reshape(B, L, a.n_heads, -1).transpose(0, 2, 1, 3)  # (B, H, L, D)
        k = k.reshape(B, L, a.n_kv_heads, -1).transpose(0, 2, 1, 3)  # (B, Hkv, L, D)
        v = v.reshape(B, L, a.n_kv_heads, -1).transpose(0, 2, 1, 3)
        shard = getattr(a, "context_parallel", None)
        if shard is not None:
            o = shard.attention(q, k, v, rope=a.rope, scale=a.scale, window=a.window)
        else:
            o = attn.flash_attention(a.rope(q), a.rope(k), v, scale=a.scale, causal=True, window=a.window,
                                     segment_ids=self.kw.get("segment_ids"), s2_group=self.kw.get("s2_group"))
        return o.transpose(0, 2, 1, 3).reshape(B, L, -1)

    def rest(self, params: dict, x: mx.array, o: mx.array) -> mx.array:
        """Phase B on positions: x (B, c, d), o (B, c, q_dim) -> block output (B, c, d)."""
        self.layer.update(params)
        h = x + self.attn.o_proj(o)
        return h + self.layer.mlp(self.layer.post_attention_layernorm(h))


def _qkv_whole(blk: _Block, params: dict, x: mx.array, spans: list) -> list[mx.array]:
    """Phase A over all chunks: the whole pre-RoPE q, k, v, evaluated."""
    parts = list(zip(*[blk.qkv(params, x[:, s:e]) for s, e in spans], strict=True))
    out = [mx.concatenate(p, axis=1) for p in parts]
    del parts
    mx.eval(out)
    return out


def _tiled_forward(blk: _Block, params: dict, x: mx.array, chunk: int) -> mx.array:
    spans = _bounds(x.shape[1], chunk)
    q, k, v = _qkv_whole(blk, params, x, spans)
    o = blk.core(q, k, v)
    del q, k, v
    mx.eval(o)
    outs = []
    for s, e in spans:
        y = blk.rest(params, x[:, s:e], o[:, s:e])
        mx.eval(y)
        outs.append(y)
    return mx.concatenate(outs, axis=1)


def _tiled_backward(blk: _Block, params: dict, x: mx.array, dy_box: list, chunk: int, seed: int):
    """(dx, flat parameter gradients) of one block by phases A, B, C, D (module docstring);
    ``dy_box`` = [dy], emptied so that dy can be freed as soon as phase B is done."""
    spans = _bounds(x.shape[1], chunk)
    mx.random.seed(seed)
    q, k, v = _qkv_whole(blk, params, x, spans)
    o = blk.core(q, k, v)
    mx.eval(o)
    grads: dict = {}
    dxs, dos = [], []
    dy = dy_box.pop()  # the caller dropped its reference: dy dies with phase B
    for s, e in spans:  # phase B
        _, g, (dxc, doc) = _vjp(lambda p, xc, oc: (blk.rest(p, xc, oc),), params, [x[:, s:e], o[:, s:e]],
                                [dy[:, s:e]])
        _add_into(grads, g)
        mx.eval(dxc, doc, grads)
        dxs.append(dxc)
        dos.append(doc)
    del o, dy
    do = mx.concatenate(dos, axis=1)
    mx.eval(do)
    del dos
    _, dqkv = mx.vjp(blk.core, [q, k, v], [do])  # phase C
    del do, q, k, v
    mx.eval(dqkv)
    mx.random.seed(seed)  # phase D replays phase A's dropout draws
    for i, (s, e) in enumerate(spans):
        _, g, (dxc,) = _vjp(blk.qkv, params, [x[:, s:e]], [d[:, s:e] for d in dqkv])
        _add_into(grads, g)
        dxs[i] = dxs[i] + dxc
        mx.eval(dxs[i], grads)
    return mx.concatenate(dxs, axis=1), grads


def _block_fn(layer: nn.Module, kw: dict):
    def f(params, x):
        layer.update(params)
        return (layer(x, **kw),)

    return f


def block_forward(layer: nn.Module, params: dict, x: mx.array, kw: dict, strategy: MemoryStrategy,
                  seed: int) -> mx.array:
    """One block's output (evaluated), the way its backward will recompute it."""
    mx.random.seed(seed)
    if strategy.tile_chunk:
        return _tiled_forward(_Block(layer, kw), params, x, strategy.tile_chunk)
    y = _block_fn(layer, kw)(params, x)[0]
    mx.eval(y)
    return y


def block_backward(layer: nn.Module, params: dict, x: mx.array, dy_box: list, kw: dict,
                   strategy: MemoryStrategy, seed: int):
    """(dx, flat parameter gradients) of one block at input ``x`` by the output gradient
    in ``dy_box`` = [dy] (taken out, so the caller holds no reference to it)."""
    if strategy.tile_chunk:
        return _tiled_backward(_Block(layer, kw), params, x, dy_box, strategy.tile_chunk, seed)
    mx.random.seed(seed)
    _, g, (dx,) = _vjp(_block_fn(layer, kw), params, [x], [dy_box.pop()])
    mx.eval(dx, g)
    return dx, g


# ------------------------------------------------------------------ the step

def value_and_grad(model: nn.Module, strategy: MemoryStrategy, *, loss_chunk: int | None = None,
                   offload_dir: str | Path | None = None) -> Callable:
    """A drop-in for ``nn.value_and_grad(model, sequence_loss)`` that runs the step with
    ``strategy``: ``fn(inputs, targets, mask, segment_ids=None) -> ((loss_sum, n_tokens),
    grads)``, grads shaped like ``model.trainable_parameters()``.

    The model's own switches apply as in its forward (``mlp_chunk`` for untiled blocks,
    ``s2_group`` in training mode); ``grad_checkpoint`` is implied. ``offload_dir``
    (required with ``strategy.offload``) holds the step's memory-mapped file.
    """
    if strategy.offload and offload_dir is None:
        raise ConfigError("MemoryStrategy(offload=True) needs a directory for its file: pass offload_dir=")
    if not hasattr(model, "model") or not hasattr(model.model, "layers") or not hasattr(model, "hidden"):
        raise ConfigError(f"memory strategies need a mozgach model (got {type(model).__name__}); "
                          "use the default strategy")

    def step(inputs: mx.array, targets: mx.array, mask: mx.array, segment_ids: mx.array | None = None):
        trainable = model.trainable_parameters()
        try:
            (loss, n), grads = _step(model, strategy, inputs, targets, mask, segment_ids, loss_chunk,
                                     offload_dir if strategy.offload else None, trainable)
        finally:
            model.update(trainable)  # the vjps left their own copies of the parameters in the model
        out = tree_map_with_path(lambda path, p: grads.get(path, mx.zeros_like(p)), trainable)
        return (loss, n), out

    return step


def _step(model, strategy, inputs, targets, mask, segment_ids, loss_chunk, offload_dir, trainable):
    inner, layers = model.model, model.model.layers
    N, k, (B, L) = len(layers), strategy.checkpoint_every, inputs.shape
    s2 = attn.s2_group_tokens(model.s2_group, L) if model.training else None
    kw = dict(mlp_chunk=model.mlp_chunk, segment_ids=segment_ids, s2_group=s2)
    flat = dict(tree_flatten(trainable))
    outer = tree_unflatten([(n, v) for n, v in flat.items() if not n.startswith("model.layers.")])
    lparams = [layer.trainable_parameters() for layer in layers]
    seeds = [int(s) for s in np.asarray(mx.random.randint(0, 2**31 - 1, (N,)))]

    def embed(p):
        model.update(p)
        return (inner.embed_tokens(inputs),)

    def head(p, h):
        model.update(p)
        return (loss_mod.chunked_cross_entropy(model, inner.norm(h), targets, mask, chunk=loss_chunk)[0],)

    h = embed(outer)[0]
    store = CheckpointStore(-(-N // k), (B, L, inner.norm.weight.shape[0]), h.dtype, offload_dir=offload_dir,
                            dtype=strategy.checkpoint_dtype)
    try:
        for i, layer in enumerate(layers):
            if i % k == 0:
                store.put(i // k, h)
            h = block_forward(layer, lparams[i], h, kw, strategy, seeds[i])
        (loss,), grads, (dh,) = _vjp(head, outer, [h], [mx.array(1.0)])
        del h
        mx.eval(loss, dh, grads)
        for start in reversed(range(0, N, k)):
            xs = {start: store.get(start // k)}
            store.drop(start // k)
            end = min(start + k, N)
            for i in range(start, end - 1):  # the group's other inputs, recomputed
                xs[i + 1] = block_forward(layers[i], lparams[i], xs[i], kw, strategy, seeds[i])
            for i in reversed(range(start, end)):
                box, dh = [dh], None
                dh, g = block_backward(layers[i], lparams[i], xs.pop(i), box, kw, strategy, seeds[i])
                _add_into(grads, g, f"model.layers.{i}.")
        if tree_flatten(outer):
            _, g, _ = _vjp(lambda p: embed(p), outer, [], [dh])
            _add_into(grads, g)
            mx.eval(grads)
    finally:
        store.close()
    n_tokens = mask.astype(mx.float32).sum()
    return (loss, n_tokens), grads
