"""What the server serves: one base and its adapters in one :class:`AdapterBank`, the
``model`` names a request may use (``GET /v1/models``), and how a name resolves.

A name is looked up among the loaded ones and nothing else: a request can never make the
server open a file. ``auto`` is routed by the bank (:meth:`AdapterBank.route`) with the
run's best router as ``mozgach eval`` measured it (``OUT/eval.json``), fitted at start-up
on the run's train data, or by loss when nothing was measured (exact, no fit: every
adapter's loss on the prompt).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import lora
from ..bank import AdapterBank
from ..bank.bank import ROUTERS
from ..errors import ConfigError
from .protocol import APIError

__all__ = ["AUTO", "Served", "Target", "load_served"]

AUTO = "auto"
FIT_RECORDS = 64  # train records per adapter a router is fitted on at start-up (its samples are cut at 1024)
FIT_TOKENS = 1024


@dataclass(frozen=True)
class Target:
    """What a request asked for: ``spec`` is what :meth:`AdapterBank.selection` takes for
    one row (None = base, an adapter name, or a ``{name: weight}`` mix), or None with
    ``auto`` (routed when it is scheduled). ``label`` is the response's ``model``."""

    spec: Any
    label: str
    auto: bool = False


class Served:
    """A bank opened over a base, with its public names.

    Args:
        bank: the open bank (the server owns it from now on and closes it).
        base_name: the base's model name (a plain name, not a path).
        router: the router of ``auto`` (one of the bank's usable routers).
    """

    def __init__(self, bank: AdapterBank, base_name: str, router: str = "loss") -> None:
        if base_name in bank.names or base_name == AUTO:
            base_name = f"{base_name}-base"
        self.bank, self.base_name, self.router = bank, base_name, router

    @property
    def window(self) -> int | None:
        """Most positions a sequence may hold (the base's max_position_embeddings, with the
        adapters' RoPE scaling applied), or None when the config has none."""
        return getattr(self.bank.model.args, "max_position_embeddings", None)

    def ids(self) -> list[str]:
        """Every name ``model`` may take: the base, each adapter, and ``auto`` (with adapters)."""
        return [self.base_name, *self.bank.names, *([AUTO] if len(self.bank) else [])]

    def resolve(self, model: str, adapters: dict[str, float] | None = None) -> Target:
        """The target of a request's ``model`` (and ``adapters`` mix).

        Raises:
            APIError: 400 for a ``model`` that looks like a path or a bad mix; 404 for a name
                that is not loaded.
        """
        shown = model if len(model) <= 80 else model[:77] + "..."
        if adapters is not None:
            if model != self.base_name:
                raise APIError(400, f"a mix ('adapters') applies over the base: set 'model' to {self.base_name!r}",
                               param="model", code="invalid_model")
            unknown = [n for n in adapters if n not in self.bank.names]
            if unknown:
                raise APIError(404, f"'adapters': no adapter named {unknown[0][:80]!r} is loaded (see GET /v1/models)",
                               param="adapters", code="model_not_found")
            return Target(dict(adapters), self.base_name)
        if model == self.base_name:
            return Target(None, model)
        if model in self.bank.names:
            return Target(model, model)
        if model == AUTO and len(self.bank):
            return Target(None, AUTO, auto=True)
        if "/" in model or "\\" in model or model.startswith((".", "~")):
            raise APIError(400, f"model {shown!r} looks like a file path; this server never opens paths: "
                                "use a name from GET /v1/models", param="model", code="invalid_model")
        raise APIError(404, f"the model {shown!r} does not exist; available: {', '.join(self.ids()[:8])}"
                            f"{' ...' if len(self.ids()) > 8 else ''}", param="model", code="model_not_found")

    def close(self) -> None:
        self.bank.close()


def load_served(*, out: str | None = None, model: str | None = None, adapters: list[str] | None = None,
                router: str | None = None) -> Served:
    """Open what ``mozgach serve`` serves: a run's base and every finished adapter
    (``out``), or ``model`` (default tiny-stdlib) with the adapter directories given.

    Raises:
        ConfigError: no such run / adapter directory, or a router that cannot be used.
    """
    from .. import models
    from ..rundir import RunConfig, load_run_base, read_manifest

    adapters = list(adapters or [])
    if out is not None:
        manifest = read_manifest(out)
        base, tok = load_run_base(manifest, model=model)
        source = model or manifest.base.get("source") or "base"
        done = sorted(n for n, rec in manifest.adapters.items()
                      if rec.status == "done" and (Path(out) / n / lora.CONFIG_FILE).is_file())
        dirs = [Path(out) / n for n in done]
    else:
        source = model or RunConfig.model
        base, tok = models.load(source)
        dirs = []
    for a in adapters:
        p = Path(a)
        if not p.is_dir() and out is not None and (Path(out) / a).is_dir():
            p = Path(out) / a
        if not (p / lora.CONFIG_FILE).is_file():
            raise ConfigError(f"--adapter {a}: not an adapter directory (no {lora.CONFIG_FILE})")
        if p.resolve() not in [d.resolve() for d in dirs]:
            dirs.append(p)
    bank = AdapterBank(base, tok, dirs)
    try:
        method = _setup_router(bank, out, router)
    except Exception:
        bank.close()
        raise
    return Served(bank, Path(str(source)).name or "base", method)


def _setup_router(bank: AdapterBank, out: str | None, router: str | None) -> str:
    """The router ``auto`` uses: ``router`` if given, else the run's best measured one
    (``eval.json``), else loss; tokens, signature and probe are fitted on the run's train
    data here."""
    measured = _measured_accuracy(out)
    if router is None:
        router = max(measured, key=lambda m: (measured[m], -ROUTERS.index(m))) if measured else "loss"
    if router == "loss" or not len(bank):
        return "loss"
    if out is None:
        raise ConfigError(f"--router {router} is fitted on a run's train data: use it with --out RUN "
                          "(or --router loss)")
    samples = _fit_samples(bank, out)
    {"tokens": bank.fit_tokens, "signature": bank.fit_signatures, "probe": bank.fit_probe}[router](samples)
    # what eval measured, for the routers usable now: the bank's own method="auto" agrees
    bank.router_accuracy = {m: a for m, a in measured.items() if m in bank.routers()}
    return router


def _measured_accuracy(out: str | None) -> dict[str, float]:
    """``{router: accuracy}`` from ``OUT/eval.json`` (empty when there is none)."""
    if out is None or not (Path(out) / "eval.json").is_file():
        return {}
    try:
        report = json.loads((Path(out) / "eval.json").read_text())
    except (OSError, ValueError):
        return {}
    got = {m: report.get(f"route_{m}_accuracy") for m in ROUTERS}
    return {m: float(a) for m, a in got.items() if isinstance(a, int | float) and math.isfinite(a)}


def _fit_samples(bank: AdapterBank, out: str) -> dict[str, list]:
    """Per adapter, up to ``FIT_RECORDS`` (ids, mask) windows of its domain's train split."""
    from .. import data
    from ..rundir import read_manifest, run_domains

    manifest = read_manifest(out)
    domains = run_domains(manifest, out)
    samples: dict[str, list] = {}
    for name in bank.names:
        rec = manifest.adapters.get(name)
        dom = None if rec is None else domains.get(rec.domain_id)
        if dom is None:
            raise ConfigError(f"{out}: adapter {name} has no domain data to fit the router on; use --router loss")
        train = data.load_domain(dom, bank.tok, 1 << 40, pack=False).get("train") or []
        wins = [(np.asarray(ids), np.asarray(mask)) for ids, mask, *_ in train[:FIT_RECORDS]
                for ids, mask in data.windows(ids, mask, FIT_TOKENS - 1)]
        if not wins:
            raise ConfigError(f"{out}: adapter {name}'s domain has no train records; use --router loss")
        samples[name] = wins
    return samples
