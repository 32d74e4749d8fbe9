"""The report's HTML: one self-contained page (inline CSS, PNGs as ``data:`` URIs)."""

from __future__ import annotations

import base64
import html
import math
from collections import Counter
from datetime import datetime

from .collect import ROUTE_METHODS, RunData

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px auto;
       max-width: 1320px; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 4px; }
img { max-width: 100%; border: 1px solid #eee; }
table { border-collapse: collapse; font-size: 0.85em; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 2px 8px; text-align: right; }
th { background: #f4f4f4; } td.l, th.l { text-align: left; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 8px 12px; }
.bad { color: #d62728; } .muted { color: #777; }
"""


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _f(x, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _table(head: list[str], rows: list[list[str]], left: int = 2) -> str:
    th = "".join(f'<th class="{"l" if i < left else ""}">{html.escape(h)}</th>' for i, h in enumerate(head))
    body = "".join("<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{c}</td>' for i, c in enumerate(r))
                   + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _adapter_rows(data: RunData) -> str:
    rows = []
    for a in data.adapters:
        status = html.escape(a.status) if a.status == "done" else f'<span class="bad">{html.escape(a.status)}</span>'
        rows.append([html.escape(a.name), html.escape(a.domain), status, _f(a.base_valid_loss), _f(a.valid_loss),
                     str(len(a.steps)), _f(a.tokens, ","), _f(a.seconds, ".1f"), _f(a.tokens_per_s, ",.0f"),
                     _f(a.peak_memory_gb, ".3f"), html.escape(a.error or "")])
    table = _table(["adapter", "domain", "status", "base valid", "valid", "steps", "tokens", "seconds",
                    "tokens/s", "peak GB", "error"], rows, left=3)
    return table if len(rows) <= 12 else f"<details><summary>all {len(rows)} adapters</summary>{table}</details>"


def _summary(data: RunData) -> str:
    st = Counter(a.status for a in data.adapters)
    done = [a for a in data.adapters if a.status == "done"]
    beat = sum(1 for a in done if a.valid_loss is not None and a.base_valid_loss is not None
               and a.valid_loss < a.base_valid_loss)
    secs = sum(a.seconds or 0 for a in done)
    items = [f"run directory <code>{html.escape(str(data.out))}</code>, base <code>{html.escape(data.base)}</code>",
             "adapters: " + ", ".join(f"{n} {html.escape(s)}" for s, n in sorted(st.items())),
             f"{beat}/{len(done)} finished adapters beat the base on their own validation data; "
             f"{secs / 60:.1f} min of training in total ({_f(sum(a.tokens or 0 for a in done), ',')} tokens; "
             f"the sum over adapters, from the manifest){_span(data)}"]
    if data.eval is not None:
        ev = data.eval
        own = sum(int(i == j) for i, j in enumerate(ev.matrix.argmin(1)))
        items.append(f"held-out: the own adapter has the lowest loss on {own}/{len(ev.adapters)} domains; "
                     "routing accuracy " + ", ".join(f"by {label} {_pct(ev.route_accuracy.get(m))}"
                                                     for m, label in ROUTE_METHODS.items()
                                                     if ev.route_accuracy.get(m) is not None)
                     + f" ({ev.n_route} samples)")
    return "<ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>"


def _span(data: RunData) -> str:
    """'; first start to last finish: ...' from the manifest's timestamps (a resumed run's
    span includes the time it was stopped)."""
    recs = data.manifest.adapters.values()
    starts = [r.started for r in recs if r.started]
    ends = [r.finished for r in recs if r.finished]
    if not starts or not ends:
        return ""
    try:
        t0, t1 = (datetime.strptime(t, "%Y-%m-%dT%H:%M:%S%z") for t in (min(starts), max(ends)))
    except ValueError:
        return ""
    return f"; first start to last finish {(t1 - t0).total_seconds() / 60:.1f} min"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _confusions(data: RunData, limit: int = 30) -> str:
    ev = data.eval
    domain = dict(zip(ev.adapters, ev.domains, strict=True))
    rows = []
    for method in ROUTE_METHODS:
        key = f"by_{method}"
        c = Counter((r["adapter"], r[key]) for r in ev.routes if r.get(key) and r[key] != r["adapter"])
        for (true, got), n in c.most_common():
            rows.append([method, f"{html.escape(true)} ({html.escape(domain.get(true, ''))})",
                         f"{html.escape(got)} ({html.escape(domain.get(got, ''))})", str(n)])
    if not rows:
        return "<p>No confusions: every routed sample went to its own domain's adapter.</p>"
    more = "" if len(rows) <= limit else f'<p class="muted">and {len(rows) - limit} more pairs</p>'
    return "<p>Confusions (sample's domain → adapter it was routed to):</p>" + _table(
        ["method", "domain of the sample", "routed to", "samples"], rows[:limit], left=3) + more


def render(data: RunData, images: dict[str, bytes], generated: str) -> str:
    """The page. ``images``: file name -> PNG bytes of the figures that exist."""
    parts = [f"<h1>Run report: {html.escape(data.out.name)}</h1>",
             f'<p class="muted">generated {html.escape(generated)} by <code>mozgach report</code></p>',
             _summary(data), "<h2>Training</h2>"]
    if "overview.png" in images:
        parts += [_img(images["overview.png"], "training overview"), _img(images["loss_curves.png"], "loss curves")]
    parts.append(_adapter_rows(data))
    parts.append("<h2>Held-out loss: every adapter on every domain</h2>")
    if data.eval is None:
        parts.append(f'<p class="note">{html.escape(data.eval_problem or "")}</p>')
    else:
        parts += ["<p>Each domain's held-out samples scored under the base and under every adapter "
                  "(<code>mozgach eval</code>, file <code>eval.json</code>). Row i is the held-out data "
                  "of adapter i's domain: low losses are yellow, so a bright diagonal is what a good fleet looks "
                  "like.</p>", _img(images["loss_matrix.png"], "loss matrix"),
                  "<h2>Routing</h2>", _img(images["routing.png"], "routing"), _confusions(data)]
    parts.append("<h2>Memory plan for this base</h2>")
    if data.plan is None:
        parts.append(f'<p class="note">{html.escape(data.plan_problem or "")}</p>')
    else:
        p = data.plan
        fits = f"about {p.max_context:,} tokens" if p.max_context else "not even a short context"
        parts += [f"<p>The planner's estimate (<code>mz.plan</code>) for this base with the run's training "
                  f"settings; {html.escape(p.limit_label)} allows {fits} per sequence.</p>",
                  _img(images["memory_plan.png"], "memory plan")]
    body = "\n".join(parts)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>mozgach report: "
            f"{html.escape(data.out.name)}</title><style>{CSS}</style></head><body>\n{body}\n</body></html>\n")
