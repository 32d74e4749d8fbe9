"""The :class:`AdapterBank`: N adapters over one base model, switched, mixed, scored,
routed and decoded per call without reloading; and :class:`Mix`, a handle for a weighted
sum of its adapters. The work itself lives beside it: ``layer.py`` (the stacked layers
and their selection), ``scoring.py``, ``routing.py``, ``generation.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten

from .. import lora
from ..errors import AdapterError, ConfigError
from ..lora.files import apply_adapter_rope
from ..models import paths
from ..models.rope import rope_of
from . import generation, probe, routing, scoring, tokens
from .generation import GenerationConfig
from .layer import BankLinear, Selection, SelectionState, stack_deltas
from .scoring import BATCH_TOKENS

__all__ = ["ROUTERS", "AdapterBank", "Mix"]

# every router, cheapest first (the tie-break of method="auto")
ROUTERS = ("tokens", "signature", "probe", "loss")


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
        self._state = SelectionState()
        self._closed = False
        self._sig_mean: np.ndarray | None = None
        self._centroids: np.ndarray | None = None  # (N, d), from fit_signatures
        self._token_logp: np.ndarray | None = None  # (N, V), from fit_tokens
        self._probe: probe.Probe | None = None  # from fit_probe
        self.router_accuracy: dict[str, float] = {}  # router -> top-1 accuracy, from measure_routers
        self.last_router: str | None = None  # the router the last route / route_scores call used

        per_module, scales, ranks, rope, rope_src = _read_adapters(model, dirs)
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
            a_st, b_st = stack_deltas(per_module[path], n, r, *paths.linear_dims(base), dtype)
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

    def pair_losses(self, seqs: Sequence[Any], pairs: Sequence[tuple[int, Any]],
                    batch_tokens: int = BATCH_TOKENS,
                    on_batch: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Loss of ``seqs[t]`` under adapter ``a`` for every ``(t, a)`` in ``pairs``, run as
        batches of rows (about ``batch_tokens`` rows x positions each) with one adapter per
        row. ``on_batch(pairs_done, pairs_total)`` is called after each batch (progress).

        Returns ``(loss_sum (P,), n_targets (P,))``.
        """
        self._check_open()
        return scoring.pair_losses(self, seqs, pairs, batch_tokens, on_batch)

    def losses(self, texts: Sequence[Any], adapters: Sequence[Any] | None = None,
               batch_tokens: int = BATCH_TOKENS) -> np.ndarray:
        """Mean token loss of every text under every adapter: (T, K) array.

        ``adapters`` defaults to all of the bank's, in bank order; entries may be names,
        Mix handles, dicts or None (the base).
        """
        self._check_open()
        return scoring.losses(self, texts, adapters, batch_tokens)

    def loss(self, text: Any | Sequence[Any], adapter: Any = None) -> float:
        """Mean token loss (nats per target token) of a text or list of texts under
        ``adapter`` (None = base; a list gives one adapter per text)."""
        self._check_open()
        return scoring.mean_loss(self, text, adapter)

    # ------------------------------------------------------------------ routing

    def fit_signatures(self, samples_by_adapter: dict[str, Sequence[Any]]) -> None:
        """Per-adapter signature for ``route(method="signature")``: the centroid of the
        base model's mean final hidden state over a few samples of the adapter's domain
        (texts, records or (ids, mask) pairs), after removing the mean over all samples
        (the part every text shares) and normalising."""
        self._check_open()
        self._sig_mean, self._centroids = routing.fit_signatures(self, samples_by_adapter)

    def fit_tokens(self, samples_by_adapter: dict[str, Sequence[Any]],
                   alpha: float = tokens.DEFAULT_ALPHA) -> None:
        """Per-adapter unigram token model for ``route(method="tokens")``: multinomial
        naive Bayes (McCallum & Nigam 1998) fitted on the token counts of samples of each
        adapter's domain (texts, records or (ids, mask) pairs; its train split), with
        Lidstone smoothing ``alpha``. Routing with it needs no model pass."""
        self._check_open()
        vocab = int(getattr(self.tok, "vocab_size", 0) or 0)
        if vocab <= 0:
            raise ConfigError("fit_tokens: the tokenizer reports no vocab_size")
        self._token_logp = tokens.fit_token_log_probs(samples_by_adapter, self.names, self.tok, vocab, alpha)

    def fit_probe(self, samples_by_adapter: dict[str, Sequence[Any]], l2: float = probe.DEFAULT_L2) -> None:
        """Linear probe for ``route(method="probe")``: softmax regression on the base
        model's mean final hidden state (Alain & Bengio 2016), fitted on samples of each
        adapter's domain (its train split) with L2 penalty ``l2``. One base pass to route."""
        self._check_open()
        self._probe = probe.fit_probe(routing.embed_by_adapter(self, samples_by_adapter, "fit_probe"), l2=l2)

    def routers(self) -> list[str]:
        """The routers usable now, cheapest first: ``tokens``, ``signature`` and ``probe``
        once fitted, ``loss`` always."""
        fitted = {"tokens": self._token_logp is not None, "signature": self._centroids is not None,
                  "probe": self._probe is not None}
        return [m for m in ROUTERS if fitted.get(m, True)]

    def measure_routers(self, samples_by_adapter: dict[str, Sequence[Any]]) -> dict[str, float]:
        """Top-1 accuracy of every usable router on held-out samples (each adapter's
        samples should route to it); kept in ``router_accuracy`` for ``method="auto"``."""
        self._check_open()
        texts = [t for n in self.names for t in samples_by_adapter.get(n, [])]
        owner = np.array([i for i, n in enumerate(self.names) for _ in samples_by_adapter.get(n, [])])
        if not texts:
            raise AdapterError("measure_routers: no held-out samples for any adapter of the bank")
        self.router_accuracy = {m: float(np.mean(self.route_scores(texts, m).argmin(1) == owner))
                                for m in self.routers()}
        return dict(self.router_accuracy)

    def best_router(self) -> str:
        """What ``method="auto"`` uses: the usable router with the best accuracy measured
        by :meth:`measure_routers` (ties: the cheaper), or ``loss`` if none was measured."""
        measured = [m for m in self.routers() if m in self.router_accuracy]
        if not measured:
            return "loss"
        return max(measured, key=lambda m: (self.router_accuracy[m], -ROUTERS.index(m)))

    def route_scores(self, texts: Sequence[Any], method: str = "auto") -> np.ndarray:
        """(T, N) scores, lower = better: mean token loss under each adapter
        (``"loss"``), 1 - cosine similarity to each adapter's signature centroid
        (``"signature"``), mean token NLL under each adapter's unigram model (``"tokens"``),
        ``-log p(adapter | text)`` of the linear probe (``"probe"``),
        or ``"auto"`` (:meth:`best_router`). ``last_router`` names the one used."""
        self._check_open()
        if method == "auto":
            method = self.best_router()
        if method not in ROUTERS:
            raise ConfigError(f"route method must be 'auto', {', '.join(map(repr, ROUTERS))}; got {method!r}")
        self.last_router = method
        if method == "loss":
            return self.losses(texts)
        if method == "signature":
            if self._centroids is None:
                raise AdapterError("route(method='signature') needs signatures: call "
                                   "bank.fit_signatures({name: [sample texts]}) first")
            return routing.signature_scores(self, texts, self._sig_mean, self._centroids)
        if method == "probe":
            if self._probe is None:
                raise AdapterError("route(method='probe') needs a probe: call "
                                   "bank.fit_probe({name: [sample texts]}) first")
            return self._probe.scores(routing.embed_texts(self, texts))
        if self._token_logp is None:
            raise AdapterError("route(method='tokens') needs token statistics: call "
                               "bank.fit_tokens({name: [sample texts]}) first")
        return tokens.token_scores(texts, self.tok, self._token_logp)

    def route(self, text: Any | list[Any], top_k: int = 1, method: str = "auto") -> list[str] | list[list[str]]:
        """The ``top_k`` adapters for a text (best first), or for each text of a list.

        ``method="loss"``: lowest mean token loss (all N adapters in one batched pass);
        ``"signature"``: nearest signature centroid (one base pass; :meth:`fit_signatures`);
        ``"tokens"``: naive Bayes over the text's tokens (no model pass; :meth:`fit_tokens`);
        ``"probe"``: linear probe on the base's hidden state (one base pass; :meth:`fit_probe`);
        ``"auto"`` (default): :meth:`best_router`. ``bank.last_router`` says which ran.
        """
        texts = text if isinstance(text, list) else [text]
        top = routing.top_k(self.route_scores(texts, method), self.names, top_k)
        return top if isinstance(text, list) else top[0]

    # ------------------------------------------------------------------ generation

    def generate(self, prompt: str | list[str], adapter: Any = None,
                 max_tokens: int = GenerationConfig.max_tokens,
                 temperature: float = GenerationConfig.temperature, mix: dict[str, float] | None = None,
                 seed: int | None = None, return_ids: bool = False) -> str | list[str] | list:
        """Continue ``prompt`` with ``adapter`` using the model's KV cache.

        ``temperature`` 0 is greedy decoding, otherwise sampling from softmax(logits / T).
        A list of prompts and/or a list of adapters (one per row; a single prompt is
        repeated) decodes the rows as one batch, grouped by prompt length. Stops at EOS
        or ``max_tokens``. Returns the generated text (a list for list inputs), or the
        generated token ids with ``return_ids``. ``seed`` makes sampling reproducible.
        Defaults: :class:`GenerationConfig`.
        """
        self._check_open()
        if mix is not None:
            if adapter is not None:
                raise ConfigError("pass either adapter= or mix=, not both")
            adapter = self.mix(mix)
        cfg = GenerationConfig(max_tokens=max_tokens, temperature=temperature)
        return generation.generate(self, prompt, adapter, cfg, seed=seed, return_ids=return_ids)


def _read_adapters(model: nn.Module, dirs: list[Path]) -> tuple[dict, list, list, tuple | None, Path | None]:
    """Read and check every adapter: ``(per_module, scales, ranks, rope, rope_src)`` with
    ``per_module[path][i] = [A_i (in, r_i), B_i (r_i, out)]``, the RoPE ``(rope_scaling,
    max_position_embeddings)`` they share (None if none records one) and the first
    directory that records it."""
    per_module: dict[str, dict[int, list]] = {}
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
    return per_module, scales, ranks, rope, rope_src
