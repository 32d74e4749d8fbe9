"""The report's figures (matplotlib's object API: no pyplot, no global backend change).

Each function takes what :mod:`.collect` read and returns a ``matplotlib.figure.Figure``.
They are drawn to stay readable from 1 to 108+ adapters: small multiples with shared
axes and sparse tick labels, overlays with a median, heatmaps with one cell per
(domain, adapter) and tick labels thinned to about 20.
"""

from __future__ import annotations

import io
import math
import os

import numpy as np

from .collect import ROUTE_METHODS, AdapterCurves, EvalData, PlanCurve

__all__ = ["loss_curves", "loss_matrix", "memory_plan", "overview", "png_bytes", "routing", "short_names"]

TRAIN_COLOR, VALID_COLOR, BASE_COLOR, BAD_COLOR = "#1f77b4", "#ff7f0e", "#7f7f7f", "#d62728"
MAX_TICKS = 20


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def png_bytes(fig, dpi: int = 100) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def short_names(names: list[str]) -> list[str]:
    """Adapter names without their common prefix (``mozgach108_007`` -> ``007``)."""
    if len(names) < 2:
        return list(names)
    prefix = os.path.commonprefix(names)
    cut = max(prefix.rfind("_"), prefix.rfind("-"), prefix.rfind("/")) + 1
    return [n[cut:] or n for n in names]


def tick_positions(n: int) -> list[int]:
    """Every index when there are few, else about MAX_TICKS at a round step (0-based)."""
    if n <= MAX_TICKS + 10:
        return list(range(n))
    step = next(s for s in (2, 5, 10, 20, 25, 50, 100, 200, 500, 1000) if n / s <= MAX_TICKS)
    return [0] + list(range(step - 1, n, step))


def _index_axis(ax, axis: str, labels: list[str]) -> None:
    pos = tick_positions(len(labels))
    rotate = len(labels) > 12 and max(len(s) for s in labels) > 3
    if axis == "x":
        ax.set_xticks(pos, [labels[i] for i in pos], rotation=90 if rotate else 0, fontsize=8)
    else:
        ax.set_yticks(pos, [labels[i] for i in pos], fontsize=8)


def _grid(n: int) -> tuple[int, int]:
    cols = min(12, max(1, math.ceil(math.sqrt(n * 1.5))))
    return math.ceil(n / cols), cols


def loss_curves(adapters: list[AdapterCurves]):
    """Small multiples, one panel per adapter on shared axes: the training loss of every
    optimizer step (line) and the validation loss (dots: the base's at step 0, any
    intermediate evaluations, the final adapter's)."""
    rows, cols = _grid(len(adapters))
    big = len(adapters) > 24
    fig = _figure(cols * (1.25 if big else 2.6), rows * (1.0 if big else 2.0) + 0.9)
    axes = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False)
    ymax = max([max(a.train_loss + [v for _, v in a.valid]) for a in adapters if a.train_loss or a.valid] + [1.0])
    labels = short_names([a.name for a in adapters])
    for i, ax in enumerate(axes.flat):
        if i >= len(adapters):
            ax.set_axis_off()
            continue
        a = adapters[i]
        if a.train_loss:
            ax.plot(a.steps, a.train_loss, color=TRAIN_COLOR, lw=1.0)
        if a.valid:  # connected only through intermediate evaluations (eval_every > 0)
            ax.plot(*zip(*a.valid, strict=True), color=VALID_COLOR, ls="-" if len(a.valid) > 2 else "none", lw=0.8,
                    marker="o", ms=2.5)
        title = labels[i] if big else (a.domain if a.domain.startswith(labels[i]) else f"{labels[i]} {a.domain}")[:28]
        color = "black" if a.status == "done" else BAD_COLOR
        ax.set_title(title if a.status == "done" else f"{title} ({a.status})", fontsize=7 if big else 9,
                     color=color, pad=2)
        ax.set_ylim(0, ymax * 1.05)
        ax.tick_params(labelsize=6 if big else 8, length=2)
        ax.grid(alpha=0.3, lw=0.5)
    for ax in axes[-1]:
        ax.set_xlabel("step", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("loss", fontsize=8)
    fig.suptitle("Loss per adapter (nats/token)\nblue: training, every step; orange: validation "
                 "(step 0: the base)", fontsize=10)
    return fig


def _per_adapter_axis(ax, labels: list[str]) -> None:
    ax.set_xlim(-0.7, len(labels) - 0.3)
    _index_axis(ax, "x", labels)
    ax.set_xlabel("adapter")
    ax.grid(axis="y", alpha=0.3)


def overview(adapters: list[AdapterCurves]):
    """Four panels: every adapter's training loss overlaid with the median, the
    validation loss of the base and of the trained adapter per adapter, training
    throughput (tokens/s) and peak memory per adapter."""
    fig = _figure(13, 7.5)
    (ax_all, ax_val), (ax_tps, ax_mem) = fig.subplots(2, 2)
    labels = short_names([a.name for a in adapters])
    x = np.arange(len(adapters))
    curves = [a for a in adapters if a.train_loss]
    alpha = max(0.08, min(0.8, 4 / max(1, len(curves))))
    for a in curves:
        ax_all.plot(a.steps, a.train_loss, color=TRAIN_COLOR, lw=0.8, alpha=alpha)
    if curves:  # the median at each step over the adapters that reached it
        steps = sorted({s for a in curves for s in a.steps})
        col = {s: i for i, s in enumerate(steps)}
        grid = np.full((len(curves), len(steps)), np.nan)
        for k, a in enumerate(curves):
            grid[k, [col[s] for s in a.steps]] = a.train_loss
        ax_all.plot(steps, np.nanmedian(grid, axis=0), color="black", lw=2, label=f"median of {len(curves)}")
        ax_all.legend()
    ax_all.set(title="Training loss, all adapters overlaid", xlabel="step", ylabel="loss (nats/token)")
    ax_all.grid(alpha=0.3)

    base = np.array([np.nan if a.base_valid_loss is None else a.base_valid_loss for a in adapters])
    final = np.array([np.nan if a.valid_loss is None else a.valid_loss for a in adapters])
    ax_val.vlines(x, final, base, color="#c7c7c7", lw=1)
    ax_val.scatter(x, base, s=12, color=BASE_COLOR, label="base", zorder=3)
    ax_val.scatter(x, final, s=12, color=VALID_COLOR, label="adapter", zorder=3)
    ax_val.set(title="Validation loss on its own domain: base vs trained adapter", ylabel="loss (nats/token)")
    ax_val.set_ylim(bottom=0)
    ax_val.legend()
    _per_adapter_axis(ax_val, labels)

    for ax, values, title, unit in (
            (ax_tps, [a.tokens_per_s for a in adapters], "Training throughput (varies with the machine's load)",
             "tokens / s"),
            (ax_mem, [a.peak_memory_gb for a in adapters], "Peak memory while training", "GB (mx.get_peak_memory)")):
        v = np.array([np.nan if y is None else y for y in values], dtype=float)
        ax.vlines(x, 0, np.nan_to_num(v), color="#aec7e8", lw=1)
        ax.scatter(x, v, s=12, color=TRAIN_COLOR, zorder=3)
        if np.isfinite(v).any():
            med = float(np.nanmedian(v))
            ax.axhline(med, color="black", lw=1, ls=":", label=f"median {med:,.0f}" if med >= 100 else
                       f"median {med:.3g}")
            ax.legend(loc="lower right")
            ax.set_ylim(0, 1.15 * float(np.nanmax(v)))
        ax.set(title=title, ylabel=unit)
        _per_adapter_axis(ax, labels)
    for i, a in enumerate(adapters):
        if a.status != "done":
            for ax in (ax_val, ax_tps, ax_mem):
                ax.annotate(a.status, (i, 0), color=BAD_COLOR, fontsize=7, rotation=90, ha="center", va="bottom")
    return fig


def loss_matrix(ev: EvalData):
    """Two heatmaps of the held-out losses, one cell per (domain, adapter): the losses
    themselves (``ev.matrix``, drawn unchanged) and each loss relative to the base's on
    that domain (< 1: better than the base). The diagonal is each domain's own adapter; a
    red cross marks a domain whose lowest loss is another adapter's."""
    from matplotlib.colors import TwoSlopeNorm

    n_dom, n_ad = ev.matrix.shape
    side = min(7.5, max(3.5, 0.07 * max(n_dom, n_ad) + 2.5))
    fig = _figure(2 * side + 2.5, side + 0.9)
    ax_raw, ax_rel = fig.subplots(1, 2)
    ad_labels, dom_labels = short_names(ev.adapters), short_names(ev.adapters)
    if n_dom <= 16:
        dom_labels = [(d if d.startswith(s) else f"{s} {d}")[:24] for s, d in zip(dom_labels, ev.domains, strict=True)]
    im = ax_raw.imshow(ev.matrix, cmap="viridis_r", interpolation="nearest", aspect="equal")
    fig.colorbar(im, ax=ax_raw, fraction=0.046, pad=0.02, label="loss (nats/token)")
    rel = ev.matrix / ev.base[:, None]
    hi = max(1.05, float(np.nanmax(rel)))
    im2 = ax_rel.imshow(rel, cmap="RdBu_r", norm=TwoSlopeNorm(vmin=min(0.95, float(np.nanmin(rel))), vcenter=1.0,
                                                              vmax=hi), interpolation="nearest", aspect="equal")
    fig.colorbar(im2, ax=ax_rel, fraction=0.046, pad=0.02, label="loss / base loss on that domain")
    best = np.nanargmin(ev.matrix, axis=1)
    wrong = [i for i in range(n_dom) if best[i] != i]
    for ax, title in ((ax_raw, "Held-out loss\n(yellow: low)"),
                      (ax_rel, "Loss relative to the base\n(blue: better, red: worse)")):
        _index_axis(ax, "x", ad_labels)
        _index_axis(ax, "y", dom_labels)
        ax.set_xlabel("adapter")
        ax.set_ylabel("held-out data of domain")
        ax.set_title(title, fontsize=10)
        if wrong:
            ax.scatter(best[wrong], wrong, marker="x", color=BAD_COLOR, s=30, lw=1.5,
                       label="lowest loss is not the own adapter")
    own = int(n_dom - len(wrong))
    fig.suptitle(f"{n_ad} adapters x {n_dom} domains: own adapter (diagonal) lowest on {own}/{n_dom} domains",
                 fontsize=11)
    if wrong:
        ax_raw.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize=8)
    return fig


def routing(ev: EvalData):
    """Where each routed held-out sample went (x: its domain, y: the chosen adapter), by
    loss and by every other router the eval fitted (tokens, probe, signature). Correct
    routes lie on the diagonal (grey); misroutes are red, larger when several samples agree."""
    methods = [(f"by_{m}", f"by {label}", ev.route_accuracy.get(m)) for m, label in ROUTE_METHODS.items()
               if m == "loss" or any(r.get(f"by_{m}") for r in ev.routes)]
    n = len(ev.adapters)
    side = min(6.0, max(3.2, 0.05 * n + 2.5))
    fig = _figure(len(methods) * (side + 0.9), side + 1.4)  # room for two-line titles and labels
    axes = np.atleast_1d(fig.subplots(1, len(methods)))
    index = {a: i for i, a in enumerate(ev.adapters)}
    labels = short_names(ev.adapters)
    for ax, (key, title, acc) in zip(axes, methods, strict=True):
        pairs: dict[tuple[int, int], int] = {}
        for r in ev.routes:
            if r.get(key) in index and r["adapter"] in index:
                p = (index[r["adapter"]], index[r[key]])
                pairs[p] = pairs.get(p, 0) + 1
        ok = [(p, c) for p, c in pairs.items() if p[0] == p[1]]
        bad = [(p, c) for p, c in pairs.items() if p[0] != p[1]]
        ax.plot([-0.5, n - 0.5], [-0.5, n - 0.5], color="#dddddd", lw=0.8, zorder=0)
        if ok:
            ax.scatter([p[0] for p, _ in ok], [p[1] for p, _ in ok], s=8 if n > 30 else 25, color=BASE_COLOR)
        if bad:
            ax.scatter([p[0] for p, _ in bad], [p[1] for p, _ in bad], s=[25 * c for _, c in bad], color=BAD_COLOR,
                       label="misrouted")
            ax.legend(loc="upper left", fontsize=8)
        ax.set_xlim(-0.5, n - 0.5)
        ax.set_ylim(-0.5, n - 0.5)
        ax.set_aspect("equal")
        _index_axis(ax, "x", labels)
        _index_axis(ax, "y", labels)
        ax.set(xlabel="domain of the sample", ylabel="adapter it was routed to")
        shown = "-" if acc is None else f"{100 * acc:.1f}%"
        ax.set_title(f"Routing {title}\n{shown} of {sum(pairs.values())} samples correct", fontsize=10)
        ax.grid(alpha=0.2)
    return fig


def _k(x: float, _pos=None) -> str:
    return f"{x / 1e6:g}M" if x >= 1e6 else f"{x / 1e3:g}K" if x >= 1e3 else f"{x:g}"


def memory_plan(curve: PlanCurve, base: str):
    """The planner's peak-memory estimate against the context length (log-log), its
    largest components, this machine's memory limit, the run's context and its measured
    peak."""
    from matplotlib.ticker import FuncFormatter

    fig = _figure(9.5, 5.5)
    ax = fig.subplots()
    ax.plot(curve.contexts, curve.total_gib, color="black", lw=2.2, label="estimated peak (total)")
    last = {k: v[-1] for k, v in curve.components_gib.items()}
    for k in sorted(last, key=last.get, reverse=True)[:4]:
        ax.plot(curve.contexts, curve.components_gib[k], lw=1, ls="--", label=k)
    ax.axhline(curve.limit_gib, color=BAD_COLOR, lw=1.5, label=curve.limit_label)
    if curve.max_context:
        ax.axvline(curve.max_context, color=BAD_COLOR, lw=0.8, ls=":")
        ax.annotate(f"fits up to ~{curve.max_context:,} tokens", (curve.max_context, curve.limit_gib),
                    xytext=(-8, 8), textcoords="offset points", ha="right", color=BAD_COLOR, fontsize=9)
    if curve.run_context:
        ax.axvline(curve.run_context, color=BASE_COLOR, lw=0.8, ls=":")
        if curve.measured_peak_gib:
            ax.scatter([curve.run_context], [curve.measured_peak_gib], marker="*", s=120, color=VALID_COLOR,
                       zorder=4, label=f"measured peak of this run ({curve.run_context:,} tokens)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(_k))
    ax.set(xlabel="context (tokens per sequence)", ylabel="GiB",
           title=f"Planned peak memory of a LoRA training step vs context, base {base}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left")
    if curve.notes:
        ax.text(0.99, 0.01, "; ".join(curve.notes), transform=ax.transAxes, ha="right", va="bottom", fontsize=8,
                color=BASE_COLOR)
    return fig
