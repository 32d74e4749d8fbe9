"""``mozgach report --out RUN``: a run's report as one self-contained HTML page and PNGs.

Writes ``RUN/report.html`` (the figures inline as base64 PNGs, no external files) and
``RUN/report/*.png``, each atomically. It reads only what the run wrote
(:mod:`.collect`): the manifest, the step logs, ``eval.json`` (``mozgach eval``; without
it the page says how to make it) and the planner's estimate for the run's base.
matplotlib is an optional dependency (``pip install -e ".[report]"``).
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path

from ..errors import MozgachError
from ..io import atomic_write_bytes, atomic_write_text
from .collect import RunData, collect, read_eval

__all__ = ["IMAGES_DIR", "REPORT_HTML", "MissingDependencyError", "RunData", "collect", "make_figures", "read_eval",
           "write_report"]

REPORT_HTML = "report.html"
IMAGES_DIR = "report"
INSTALL_HINT = 'pip install -e ".[report]" (or pip install matplotlib)'


class MissingDependencyError(MozgachError):
    """An optional dependency a command needs is not installed."""


def require_matplotlib() -> None:
    """MissingDependencyError (one line, how to install it) when matplotlib is absent."""
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        raise MissingDependencyError(f"the report needs matplotlib, which is not installed; install it with "
                                     f"{INSTALL_HINT}") from None


def make_figures(data: RunData) -> dict:
    """File name -> matplotlib Figure of every figure the run's data allows."""
    from . import figures as fg

    out = {}
    if data.adapters:
        out["overview.png"] = fg.overview(data.adapters)
        out["loss_curves.png"] = fg.loss_curves(data.adapters)
    if data.eval is not None:
        out["loss_matrix.png"] = fg.loss_matrix(data.eval)
        out["routing.png"] = fg.routing(data.eval)
    if data.plan is not None:
        out["memory_plan.png"] = fg.memory_plan(data.plan, data.base)
    return out


def write_report(out: str | Path, *, dpi: int = 100) -> Path:
    """Write ``out/report.html`` and ``out/report/*.png`` for the run in ``out``; returns
    the HTML's path. Raises MissingDependencyError without matplotlib, ConfigError when
    ``out`` is not a run directory."""
    require_matplotlib()
    from . import figures as fg
    from .page import render

    out = Path(out)
    data = collect(out)
    images = {}
    for name, fig in make_figures(data).items():
        images[name] = fg.png_bytes(fig, dpi=dpi)
        atomic_write_bytes(out / IMAGES_DIR / name, images[name])
    page = out / REPORT_HTML
    atomic_write_text(page, render(data, images, time.strftime("%Y-%m-%d %H:%M:%S %Z")))
    return page
