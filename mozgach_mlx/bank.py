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
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten

from . import data as data_mod
from . import lora
from .errors import AdapterError, ConfigError
from .lora.files import apply_adapter_rope
from .models import paths
from .models.rope import rope_of

__all__ = ["AdapterBank", "BankLinear", "Mix"]

Seq = tuple[np.ndarray, np.ndarray]  # (ids int32 (n,), target mask bool (n,))

# Rows x positions per forward pass of the batched loss / signature paths: large enough to
# keep the CPU's GEMMs efficient, small enough for the (rows, L, vocab) logits of a chunk.
BATCH_TOKENS = 4096
LOGITS_BYTES = 1 << 28


@dataclass(frozen=True)
class Selection:
    """What the bank's layers add to the base: ``sum_k coef[r, k] * (x A_idx[r, k]) B_idx[r, k]``
    for batch row r (R = 1: every row alike). ``single`` = (adapter, its rank, coef) when
    the selection is one adapter for all rows (then its unpadded A/B are used, exactly as
    a LoRA layer would)."""

    idx: mx.array  # (R, K) int32
    coef: mx.array  # (R, K) float32
    single: tuple[int, int, float] | None = None


class _State:
    """The selection every :class:`BankLinear` of one bank reads at call time."""

    def __init__(self) -> None:
        self.current: Selection | None = None


class BankLinear(nn.Module):
    """A frozen base linear layer plus N stacked low-rank deltas, one of which (or a
    weighted sum, or one per batch row) is applied according to the bank's selection.

    Shapes: x (B, L, in) -> (B, L, out); ``lora_a`` (N, in, r), ``lora_b`` (N, r, out).
    """

    def __init__(self, linear: nn.Module, lora_a: mx.array, lora_b: mx.array, state: _State) -> None:
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


class Mix:
    """A weighted sum of a bank's adapters, usable wherever ``adapter=`` is taken, and as
    a context manager that makes plain ``model(x)`` calls use it."""

    def __init__(self, bank: AdapterBank, weights: dict[str, float]) -> None:
        if not isinstance(weights, dict) or not weights:
            raise ConfigError("mix needs a non-empty {adapter name: weight} dict")
        self.bank = bank
        self.weights = {str(k): float(v) for k, v in weights.items()}
        self.components = [(bank.index(n), w) for n, w in self.weights.items()]
        self._ctx: contextlib.AbstractContextManager | None = None

    def __repr__(self) -> str:
        return f"Mix({self.weights})"

    def __enter__(self) -> Mix:
        self._ctx = self.bank.use(self)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            ctx.__exit__(*exc)


class AdapterBank:
    """N adapters over one base model, switched per call without reloading.

    Args:
        model: the base (quantized or not; if it carries LoRA layers, the bank uses their
            base layers and bypasses their own adapters until :meth:`close`).
        tok: its tokenizer.
        dirs: adapter directories (PEFT or mlx-lm layout).
        names: one name per adapter (default: each directory's name).
        dtype: dtype of the stacked A/B (default: as stored, fp32 for our adapters).

    The bank installs its layers into ``model`` (so ``model`` itself runs with whatever
    :meth:`use` selects, the base by default) and puts it in eval mode; :meth:`close` (or
    leaving a ``with`` block) puts the original layers and RoPE back.

    Raises:
        AdapterError: unreadable adapters, adapters for another base, adapters that train
            embeddings/norms, disagreeing RoPE scalings, duplicate names.
    """

    def __init__(self, model: nn.Module, tok, dirs: Sequence[str | Path], names: Sequence[str] | None = None,
                 *, dtype: mx.Dtype | None = None) -> None:
        self.model, self.tok = model, tok
        dirs = [Path(d) for d in dirs]
        names = [d.name for d in dirs] if names is None else [str(n) for n in names]
        if len(names) != len(dirs):
            raise ConfigError(f"AdapterBank: {len(names)} names for {len(dirs)} adapter directories")
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise AdapterError(f"AdapterBank: duplicate adapter names {dup}; pass names=[...]")
        if any(isinstance(m, BankLinear) for _, m in model.named_modules()):
            raise AdapterError("the model already holds an open AdapterBank; close it first (bank.close())")
        self.names = names
        self._index = {n: i for i, n in enumerate(names)}
        self._state = _State()
        self._closed = False
        self._centroids: np.ndarray | None = None

        per_module: dict[str, dict[int, tuple[mx.array, mx.array]]] = {}
        scales, ranks, rope, rope_src = [], [], None, None
        for i, d in enumerate(dirs):
            cfg, weights, block = lora.read(model, d)
            extra = sorted(k for k in weights if not k.endswith((".lora_a", ".lora_b")))
            if extra:
                raise AdapterError(f"{d}: the adapter also trains {extra[0]} (embeddings/norms); an "
                                   "AdapterBank holds low-rank deltas only; use mz.lora.load for it")
            if "rope_scaling" in block or "max_position_embeddings" in block:
                this = (block.get("rope_scaling"), block.get("max_position_embeddings"))
                if rope is not None and this != rope:
                    raise AdapterError(f"{d}: trained with rope_scaling={this[0]!r}, max_position_embeddings="
                                       f"{this[1]!r} but {rope_src} with {rope[0]!r}, {rope[1]!r}; a bank's "
                                       "adapters must share one RoPE scaling (make one bank per scaling)")
                rope, rope_src = this, d
            scales.append(cfg.scale)
            ranks.append(cfg.r)
            for k, v in weights.items():
                path, leaf = k.rsplit(".", 1)
                entry = per_module.setdefault(path, {}).setdefault(i, [None, None])
                entry[leaf == "lora_b"] = v
        self.scales = np.asarray(scales, np.float32)  # (N,)
        self._scale_py = [float(x) for x in scales]
        self.ranks = ranks

        self._rope_before = rope_of(model)
        self._was_training = model.training
        if rope is not None:
            apply_adapter_rope(model, {"rope_scaling": rope[0], "max_position_embeddings": rope[1]}, rope_src)

        try:
            layers = self._build_layers(per_module, len(dirs), max(ranks, default=1), dtype)
        except Exception:
            if rope_of(model) != self._rope_before:
                model.set_rope(*self._rope_before)
            raise
        if layers:
            model.update_modules(tree_unflatten(layers))
        model.eval()

    def _build_layers(self, per_module: dict, n: int, r: int, dtype) -> list[tuple[str, BankLinear]]:
        """One BankLinear per adapted module path; remembers the modules it replaces."""
        model = self.model
        self._originals: list[tuple[str, nn.Module]] = []
        layers = []
        for path in sorted(per_module, key=paths.natural_key):
            module = paths.get_module(model, path)
            base = module.linear if isinstance(module, lora.LoRALinear) else module
            if not paths.is_linear(base):
                raise AdapterError(f"{path} is a {type(module).__name__}, not a linear layer; cannot hold adapters")
            in_dims, out_dims = paths.linear_dims(base)
            a_rows, b_rows = [], []
            for j in range(n):
                a, b = per_module[path].get(j, (None, None))
                if a is None:  # this adapter leaves the module alone: a zero delta
                    a, b = mx.zeros((in_dims, r)), mx.zeros((r, out_dims))
                pad = r - a.shape[1]
                a_rows.append(mx.pad(a, [(0, 0), (0, pad)]) if pad else a)
                b_rows.append(mx.pad(b, [(0, pad), (0, 0)]) if pad else b)
            a_st, b_st = mx.stack(a_rows), mx.stack(b_rows)  # (N, in, r), (N, r, out)
            if dtype is not None:
                a_st, b_st = a_st.astype(dtype), b_st.astype(dtype)
            mx.eval(a_st, b_st)
            self._originals.append((path, module))
            layers.append((path, BankLinear(base, a_st, b_st, self._state)))
        return layers

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Put the model's original layers, RoPE scaling and train/eval mode back (idempotent)."""
        if self._closed:
            return
        if self._originals:
            self.model.update_modules(tree_unflatten(self._originals))
        if rope_of(self.model) != self._rope_before and hasattr(self.model, "set_rope"):
            self.model.set_rope(*self._rope_before)
        if self._was_training:
            self.model.train()
        self._state.current = None
        self._closed = True

    def __enter__(self) -> AdapterBank:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"AdapterBank({len(self)} adapters, r<={max(self.ranks, default=0)}, closed={self._closed})"

    def _check_open(self) -> None:
        if self._closed:
            raise AdapterError("this AdapterBank is closed; build a new one")

    # ------------------------------------------------------------------ selections

    def index(self, name: str) -> int:
        """Row of adapter ``name`` in the stacks."""
        try:
            return self._index[name]
        except KeyError:
            raise AdapterError(f"no adapter named {name!r} in the bank (have {len(self)}: "
                               f"{', '.join(self.names[:5])}{'...' if len(self) > 5 else ''})") from None

    def mix(self, weights: dict[str, float]) -> Mix:
        """A handle for the exact weighted sum ``sum_i w_i s_i (x A_i) B_i`` of adapters'
        deltas (weights need not sum to 1); pass it as ``adapter=`` or use it in ``with``."""
        self._check_open()
        return Mix(self, weights)

    def _components(self, adapter: Any) -> list[tuple[int, float]]:
        if adapter is None:
            return []
        if isinstance(adapter, Mix):
            if adapter.bank is not self:
                raise AdapterError("this Mix belongs to another AdapterBank")
            return adapter.components
        if isinstance(adapter, dict):
            return Mix(self, adapter).components
        if isinstance(adapter, str):
            return [(self.index(adapter), 1.0)]
        raise ConfigError(f"adapter must be a name, a Mix, a {{name: weight}} dict or None, got {adapter!r}")

    def selection(self, adapters: Any | Sequence[Any]) -> Selection | None:
        """The selection for one adapter (every row alike) or a list with one per row."""
        rows = [self._components(a) for a in adapters] if isinstance(adapters, list) else [
            self._components(adapters)]
        if not any(rows):
            return None
        if all(r == rows[0] for r in rows):
            rows = rows[:1]
        k = max(len(r) for r in rows)
        idx = np.zeros((len(rows), k), np.int32)
        coef = np.zeros((len(rows), k), np.float32)  # padding: adapter 0 with weight 0
        for i, comps in enumerate(rows):
            for j, (a, w) in enumerate(comps):
                idx[i, j], coef[i, j] = a, w * self.scales[a]
        single = None
        if len(rows) == 1 and k == 1:
            a, w = rows[0][0]
            single = (a, self.ranks[a], w * self._scale_py[a])
        return Selection(mx.array(idx), mx.array(coef), single)

    @contextlib.contextmanager
    def use(self, adapter: Any | Sequence[Any] = None) -> Iterator[None]:
        """Within the block, ``model(...)`` runs with ``adapter`` (a name, a Mix, a dict,
        None = base, or a list with one of those per batch row)."""
        self._check_open()
        before = self._state.current
        self._state.current = adapter if isinstance(adapter, Selection) else self.selection(adapter)
        try:
            yield
        finally:
            self._state.current = before

    # ------------------------------------------------------------------ losses

    def _encode(self, item: Any) -> Seq:
        if isinstance(item, str):
            return data_mod.encode_record({"text": item}, self.tok)
        if isinstance(item, dict):
            return data_mod.encode_record(item, self.tok)
        if isinstance(item, tuple) and len(item) == 2:
            return np.asarray(item[0], np.int32), np.asarray(item[1], bool)
        raise ConfigError(f"expected a text, a JSONL record or an (ids, mask) pair, got {type(item).__name__}")

    def _row_losses(self, seqs: list[Seq], sel: Selection | None) -> tuple[np.ndarray, np.ndarray]:
        """Summed target-token loss and target count of each sequence (one row each)."""
        length = max(len(ids) for ids, _ in seqs)
        ids = np.zeros((len(seqs), length), np.int32)
        w = np.zeros((len(seqs), length), np.float32)
        for r, (i, m) in enumerate(seqs):
            ids[r, : len(i)] = i
            w[r, : len(m)] = m
        x, y, w = mx.array(ids[:, :-1]), mx.array(ids[:, 1:]), mx.array(w[:, 1:])
        with self.use(sel):
            h = self.model.hidden(x)  # (R, L, d)
            vocab = self.model.logits(h[:1, :1]).shape[-1]
            chunk = max(1, LOGITS_BYTES // (4 * vocab * len(seqs)))
            total = mx.zeros((len(seqs),))
            for s in range(0, x.shape[1], chunk):
                lg = self.model.logits(h[:, s : s + chunk]).astype(mx.float32)  # (R, c, V)
                ce = mx.logsumexp(lg, axis=-1) - mx.take_along_axis(lg, y[:, s : s + chunk, None], -1)[..., 0]
                total = total + (ce * w[:, s : s + chunk]).sum(axis=1)
                mx.eval(total)
        return np.array(total), np.array(w.sum(axis=1))

    def pair_losses(self, seqs: Sequence[Any], pairs: Sequence[tuple[int, Any]],
                    batch_tokens: int = BATCH_TOKENS,
                    on_batch: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Loss of ``seqs[t]`` under adapter ``a`` for every ``(t, a)`` in ``pairs``, run as
        batches of rows (about ``batch_tokens`` rows x positions each) with one adapter per
        row. ``on_batch(pairs_done, pairs_total)`` is called after each batch (progress).

        Returns ``(loss_sum (P,), n_targets (P,))``.
        """
        self._check_open()
        enc = [self._encode(s) for s in seqs]
        order = sorted(range(len(pairs)), key=lambda p: len(enc[pairs[p][0]][0]))
        sums, counts = np.zeros(len(pairs)), np.zeros(len(pairs))
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order) and (end - start + 1) * len(enc[pairs[order[end]][0]][0]) <= batch_tokens:
                end += 1
            batch = order[start:end]
            s, c = self._row_losses([enc[pairs[p][0]] for p in batch],
                                    self.selection([pairs[p][1] for p in batch]))
            sums[batch], counts[batch] = s, c
            start = end
            if on_batch is not None:
                on_batch(end, len(order))
        return sums, counts

    def losses(self, texts: Sequence[Any], adapters: Sequence[Any] | None = None,
               batch_tokens: int = BATCH_TOKENS) -> np.ndarray:
        """Mean token loss of every text under every adapter: (T, K) array.

        ``adapters`` defaults to all of the bank's, in bank order; entries may be names,
        Mix handles, dicts or None (the base).
        """
        adapters = list(self.names) if adapters is None else list(adapters)
        pairs = [(t, a) for t in range(len(texts)) for a in adapters]
        s, c = self.pair_losses(texts, pairs, batch_tokens)
        return (s / np.maximum(c, 1)).reshape(len(texts), len(adapters))

    def loss(self, text: Any | Sequence[Any], adapter: Any = None) -> float:
        """Mean token loss (nats per target token) of a text or list of texts under
        ``adapter`` (None = base; a list gives one adapter per text)."""
        texts = list(text) if isinstance(text, list) else [text]
        rows = adapter if isinstance(adapter, list) else [adapter] * len(texts)
        if len(rows) != len(texts):
            raise ConfigError(f"{len(rows)} adapters for {len(texts)} texts")
        s, c = self.pair_losses(texts, list(enumerate(rows)))
        return float(s.sum() / max(c.sum(), 1))

    # ------------------------------------------------------------------ routing

    def _embed(self, seqs: list[Seq], batch_tokens: int = BATCH_TOKENS) -> np.ndarray:
        """Mean base final hidden state over each sequence's tokens after BOS: (T, d)."""
        out = []
        i = 0
        while i < len(seqs):
            j = i + 1
            while j < len(seqs) and (j - i + 1) * max(len(s[0]) for s in seqs[i: j + 1]) <= batch_tokens:
                j += 1
            part = seqs[i:j]
            length = max(len(s[0]) for s in part)
            ids = np.zeros((len(part), length), np.int32)
            w = np.zeros((len(part), length, 1), np.float32)
            for r, (s, _) in enumerate(part):
                ids[r, : len(s)] = s
                w[r, 1 : len(s)] = 1.0
            with self.use(None):
                h = self.model.hidden(mx.array(ids)).astype(mx.float32)  # (R, L, d)
            wm = mx.array(w)
            e = (h * wm).sum(axis=1) / mx.maximum(wm.sum(axis=1), 1.0)
            out.append(np.array(e))
            i = j
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def fit_signatures(self, samples_by_adapter: dict[str, Sequence[Any]]) -> None:
        """Per-adapter signature for ``route(method="signature")``: the centroid of the
        base model's mean final hidden state over a few samples of the adapter's domain
        (texts, records or (ids, mask) pairs), after removing the mean over all samples
        (the part every text shares) and normalising."""
        self._check_open()
        missing = [n for n in self.names if not samples_by_adapter.get(n)]
        if missing:
            raise AdapterError(f"fit_signatures: no samples for {len(missing)} adapter(s), e.g. {missing[0]!r}")
        embs = [self._embed([self._encode(s) for s in samples_by_adapter[n]]) for n in self.names]
        self._sig_mean = np.concatenate(embs).mean(0)
        cents = [_unit(_unit(e - self._sig_mean).mean(0)) for e in embs]
        self._centroids = np.stack(cents)  # (N, d)

    def route_scores(self, texts: Sequence[Any], method: str = "loss") -> np.ndarray:
        """(T, N) scores, lower = better: mean token loss under each adapter
        (``"loss"``), or 1 - cosine similarity to each adapter's signature centroid."""
        self._check_open()
        if method == "loss":
            return self.losses(texts)
        if method == "signature":
            if self._centroids is None:
                raise AdapterError("route(method='signature') needs signatures: call "
                                   "bank.fit_signatures({name: [sample texts]}) first")
            e = _unit(self._embed([self._encode(t) for t in texts]) - self._sig_mean)
            return 1.0 - e @ self._centroids.T
        raise ConfigError(f"route method must be 'loss' or 'signature', got {method!r}")

    def route(self, text: Any | list[Any], top_k: int = 1, method: str = "loss") -> list[str] | list[list[str]]:
        """The ``top_k`` adapters for a text (best first), or for each text of a list.

        ``method="loss"``: lowest mean token loss (all N adapters in one batched pass);
        ``"signature"``: nearest signature centroid (one base pass; see :meth:`fit_signatures`).
        """
        texts = text if isinstance(text, list) else [text]
        scores = self.route_scores(texts, method)
        top = [[self.names[i] for i in np.argsort(row, kind="stable")[:top_k]] for row in scores]
        return top if isinstance(text, list) else top[0]

    # ------------------------------------------------------------------ generation

    def generate(self, prompt: str | list[str], adapter: Any = None, max_tokens: int = 64,
                 temperature: float = 0.0, mix: dict[str, float] | None = None,
                 seed: int | None = None, return_ids: bool = False) -> str | list[str] | list:
        """Continue ``prompt`` with ``adapter`` using the model's KV cache.

        ``temperature`` 0 is greedy decoding, otherwise sampling from softmax(logits / T).
        A list of prompts and/or a list of adapters (one per row; a single prompt is
        repeated) decodes the rows as one batch, grouped by prompt length. Stops at EOS
        or ``max_tokens``. Returns the generated text (a list for list inputs), or the
        generated token ids with ``return_ids``. ``seed`` makes sampling reproducible.
        """
        self._check_open()
        if mix is not None:
            if adapter is not None:
                raise ConfigError("pass either adapter= or mix=, not both")
            adapter = self.mix(mix)
        prompts = prompt if isinstance(prompt, list) else None
        adapters = adapter if isinstance(adapter, list) else None
        n = len(prompts) if prompts is not None else len(adapters) if adapters is not None else 1
        if prompts is not None and adapters is not None and len(prompts) != len(adapters):
            raise ConfigError(f"{len(prompts)} prompts for {len(adapters)} adapters")
        rows_p = prompts or [prompt] * n
        rows_a = adapters or [adapter] * n
        ids = [list(self.tok.encode(p, add_bos=True)) for p in rows_p]
        out: list = [""] * n
        key = mx.random.key(seed) if seed is not None else None
        for length in sorted({len(i) for i in ids}):
            group = [r for r in range(n) if len(ids[r]) == length]
            toks = self._decode(np.array([ids[r] for r in group], np.int32),
                                self.selection([rows_a[r] for r in group]), max_tokens, temperature, key)
            for r, t in zip(group, toks, strict=True):
                out[r] = t if return_ids else self.tok.decode(t)
        return out if (prompts is not None or adapters is not None) else out[0]

    def _decode(self, ids: np.ndarray, sel: Selection | None, max_tokens: int, temperature: float,
                key: mx.array | None) -> list[list[int]]:
        """Generated token ids per row (up to, excluding, EOS). ids (B, L)."""
        eos = self.tok.eos_token_id
        cache = self.model.make_cache()
        rows: list[list[int]] = [[] for _ in range(ids.shape[0])]
        done = np.zeros(ids.shape[0], bool)
        keys = None if key is None or temperature <= 0 else mx.random.split(key, max(max_tokens, 1))
        with self.use(sel):
            logits = self.model(mx.array(ids), cache=cache)[:, -1, :]  # (B, V)
            for step in range(max_tokens):
                if temperature <= 0:
                    nxt = mx.argmax(logits, axis=-1)
                else:
                    nxt = mx.random.categorical(logits.astype(mx.float32) / temperature,
                                                key=None if keys is None else keys[step])
                nxt_np = np.array(nxt)
                for r, t in enumerate(nxt_np.tolist()):
                    if not done[r]:
                        if t == eos:
                            done[r] = True
                        else:
                            rows[r].append(t)
                if done.all() or step == max_tokens - 1:
                    break
                logits = self.model(nxt.astype(mx.int32)[:, None], cache=cache)[:, -1, :]
                mx.eval(logits, *[s for c in cache for s in c.state])
        return rows


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows (or a vector) scaled to unit L2 norm."""
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-12)
