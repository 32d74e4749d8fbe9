"""Contrastive adapters: each adapter of a fleet is also trained not to help the other
domains' text (``TrainConfig.contrast``).

Why: trained on one topic each, a fleet's adapters over a real base all learn mostly the
same thing -- the genre, which every topic shares -- and a little of their topic. The loss
router's argmin over adapters then compares adapters that differ by noise in how much of
the genre each picked up, not by topic (issue 28: over SmolLM2 on Wikipedia, the own
adapter was lowest on the per-topic mean but the per-sample argmin right half the time).

What: with ``contrast = w > 0`` every micro-batch of the own domain is followed by
``batch_size`` sequences of the other domains' training text (for each row a domain drawn
uniformly, then one of its sequences, fixed by ``(seed, step, micro-batch)``, so a resumed
run replays them), and the step's summed objective becomes

.. math::

    \\sum_{\\text{own tokens}} \\ell \\; + \\; w \\sum_{r \\in \\text{others}}
        \\max\\bigl(0,\\; S_0(r) - S_a(r)\\bigr)

where ``S_a(r)`` is the adapter's summed token loss on sequence ``r`` and ``S_0(r)`` the
base's (the fresh adapter's, B = 0, so trainable norms and embeddings are at their base
values too), divided by the own target tokens as always. An adapter may then improve its
own topic's text freely, but every other topic's sequence that it makes *more* likely
than the base does is pushed back: what is left is what is particular to the topic. It
is a hinge form of the discriminative training of per-class models (maximum mutual
information estimation, Bahl et al. 1986, ICASSP, "Maximum mutual information estimation
of hidden Markov model parameters for speech recognition"), with the base as the shared
competitor so that the adapters still train one after another.

How: the gradient of the hinge is ``-w * grad S_a(r)`` for the rows at or below the base
and 0 for the others. "At" matters: the fresh adapter *is* the base, and with the
subgradient 0 there the first step would be the plain one, whose direction (the shared
genre) AdamW's momentum then carries on for ~10 steps -- longer than a short fleet's
schedule (measured on the tiny model: with 0 at the kink an adapter trained against its
own domain's text as negatives still fell from 6.91 to 5.08 nats/token; with 1, 6.55).
Each other-domain row runs through the step's own gradient function (every memory
strategy and the compiled step serve it unchanged) and is added to the step's gradient
with weight ``-w`` when it is at or below the base. The base's losses are
computed per micro-batch with the fresh adapter's weights swapped in (no gradient). Cost
per micro-batch: the own forward-backward, plus ``batch_size`` rows' forward-backward and
forward (measured about 3x a plain step: 24-26 s vs 8.1-8.9 s per SmolLM2 step of 4 x 256
tokens; the rows run one at a time). The logged ``loss`` stays the own
domain's; ``contrast`` is the hinge's term per own token, ``contrast_active`` the share of
the step's other-domain rows held (at or below the base: all in the first steps, about
half later). Deciding on a forward alone and running the backward only for held rows was
measured and not kept: a step 1.03-1.14x faster with 0-1 of 4 rows held, 0.82x with all
held (``benchmarks/RESULTS.md``, "Skipping the backward of rows above the base").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map

from . import data as data_mod
from .errors import ConfigError, MozgachError

# a constant in the negatives' random key, so that they never share a stream with the
# epoch order (data.batching.epoch_order seeds with [seed, epoch])
_STREAM = 0x6E6567
# a row is "at the base" within this relative difference (fp32 rounding of two code paths:
# the fresh adapter's training-mode sum vs the base's evaluation sum)
AT_BASE = 1e-5
NO_NEGATIVES = ("TrainConfig.contrast > 0 needs other domains' training text: train a fleet of at least 2 domains "
                "with data (or pass negatives= to train_adapter), or set contrast to 0")


class Negatives:
    """The other domains' sequences of one adapter's contrastive training, and its base.

    ``pools``: one entry per other domain: its tokenized sequences, or a function that
    returns them, called when the domain is first drawn (a fleet of 108 domains loads only
    those an adapter's short schedule draws); a domain that turns out empty is drawn
    again. :meth:`capture_base` must be called on the fresh adapter (before a checkpoint
    is restored); :meth:`penalty` then gives a micro-batch's hinge and its gradient.
    """

    def __init__(self, model, pools: Sequence[Sequence | Callable[[], Sequence]], cfg) -> None:
        self.model, self.cfg = model, cfg
        self.pools: list = list(pools)
        if cfg.contrast > 0 and not self.pools:
            raise ConfigError(NO_NEGATIVES)
        self.base_weights: list | None = None

    def _pool(self, i: int) -> list:
        p = self.pools[i]
        if callable(p):
            p = self.pools[i] = list(p())
        return p

    def capture_base(self) -> None:
        """Keep the fresh adapter's trainable weights (B = 0: exactly the base)."""
        self.base_weights = tree_flatten(self.model.trainable_parameters())

    def rows(self, step: int, micro: int) -> list:
        """The other-domain sequences that go with micro-batch ``micro`` of step ``step``."""
        rng = np.random.default_rng([int(self.cfg.seed), _STREAM, int(step), int(micro)])
        out = []
        for _ in range(self.cfg.batch_size):
            while not (pool := self._pool(int(rng.integers(len(self.pools))))):
                if not any(callable(p) or p for p in self.pools):
                    raise ConfigError(NO_NEGATIVES)
            out.append(pool[int(rng.integers(len(pool)))])
        return out

    def _batches(self, rows: list) -> list[tuple]:
        """One ``(x, y, mask, segment_ids or None)`` batch per row (in order)."""
        docs = self.cfg.attention_mask == "document"
        out = []
        for seq in rows:
            b = next(data_mod.batches([seq], 1, shuffle=False, segments=docs))
            out.append(b if docs else (*b, None))
        return out

    def base_sums(self, batches: list[tuple], eval_fn: Callable, seg_kwargs: Callable) -> list[float]:
        """The base's summed loss of each batch: the fresh adapter's weights swapped in."""
        if self.base_weights is None:
            raise RuntimeError("Negatives.capture_base() was not called on the fresh adapter")
        model = self.model
        now = tree_flatten(model.trainable_parameters())
        was_training = model.training
        model.load_weights(self.base_weights, strict=False)
        model.eval()
        try:
            sums = []
            for x, y, m, seg in batches:
                s, _ = eval_fn(model, x, y, m, self.cfg, **seg_kwargs(seg))
                mx.eval(s)
                sums.append(s.item())
        finally:
            model.load_weights(now, strict=False)
            if was_training:
                model.train()
        return sums

    def penalty(self, grad_fn: Callable, eval_fn: Callable, seg_kwargs: Callable, step: int,
                micro: int) -> tuple[float, object | None, int]:
        """``(hinge, gradient or None, rows at or below the base)`` of micro-batch ``micro``
        of step ``step``: the hinge is ``w * sum max(0, S_0 - S_a)`` in summed-token-loss
        units, the gradient ``-w * sum grad S_a`` over the rows at or below the base (the
        subgradient 1 at the kink: see the module's docstring)."""
        w = float(self.cfg.contrast)
        batches = self._batches(self.rows(step, micro))
        base = self.base_sums(batches, eval_fn, seg_kwargs)
        hinge, acc, active = 0.0, None, 0
        for (x, y, m, seg), s0 in zip(batches, base, strict=True):
            (s, _), g = grad_fn(x, y, m, **seg_kwargs(seg))
            mx.eval(s, g)
            sa = s.item()
            if sa > s0 + AT_BASE * abs(s0):
                continue
            active += 1
            hinge += w * max(0.0, s0 - sa)  # (a row within AT_BASE above the base adds 0)
            g = tree_map(lambda t: -w * t, g)
            acc = g if acc is None else tree_map(mx.add, acc, g)
        if acc is not None:
            mx.eval(acc)
        return hinge, acc, active


def of_fresh_adapter(model, negatives: Sequence[Sequence] | None, cfg) -> Negatives | None:
    """The :class:`Negatives` of a run with ``cfg.contrast > 0`` (None otherwise), its base
    captured from ``model``'s adapter, which must be fresh (B = 0)."""
    if not cfg.contrast:
        return None
    neg = Negatives(model, negatives or [], cfg)
    neg.capture_base()
    return neg


def other_pools(domains: Sequence, me, load: Callable) -> list[Callable[[], list]]:
    """One lazy pool per domain of ``domains`` other than ``me`` (by id): ``load(domain) ->
    train sequences`` when first drawn; a domain whose data fails to load is an empty pool
    (its own adapter fails and is recorded)."""
    def pool(dom) -> list:
        try:
            return load(dom)
        except MozgachError:
            return []

    return [partial(pool, d) for d in domains if d.id != me.id]
