"""``mozgach report`` on a small real run: 3 adapters trained here over the tiny model
(a few steps, intermediate validation), then ``mozgach eval``. What the figures draw is
checked against the files the run wrote (the step logs, eval.json) and against the
planner called directly; the page must be self-contained and its PNGs must decode."""

import base64
import io
import json
import shutil
import sys
from html.parser import HTMLParser

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

import mozgach_mlx as mz
from mozgach_mlx import data, lora, synthetic
from mozgach_mlx.cli import main
from mozgach_mlx.evaluate import evaluate_run
from mozgach_mlx.fleet import base_identity, train_fleet
from mozgach_mlx.plan import GiB
from mozgach_mlx.report import collect, make_figures, write_report
from mozgach_mlx.report.figures import short_names, tick_positions

matplotlib = pytest.importorskip("matplotlib")
from matplotlib.image import imread  # noqa: E402

STEPS = 4


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 3-adapter run with eval.json; a copy of it without eval.json."""
    root = tmp_path_factory.mktemp("report")
    synthetic.write_corpus(root / "data", n_domains=3, n_train=8, n_valid=2)
    doms = data.discover_domains(root / "data")
    model, tok = mz.load("tiny", quantize=4)
    cfg = mz.TrainConfig(learning_rate=3e-3, warmup_steps=1, max_steps=STEPS, grad_accumulation=1, batch_size=2,
                         max_seq_length=64, eval_every=2, save_every=0, grad_checkpoint=False, progress=False,
                         lora=lora.LoRAConfig(r=4, alpha=8, dropout=0.0))
    out = root / "run"
    res = train_fleet(model, tok, doms, cfg, out, base=base_identity(model, "tiny"))
    assert res.ok and len(res.done) == 3
    evaluate_run(out, route_samples=2, sample_tokens=32, signature_samples=2)
    bare = root / "bare"
    shutil.copytree(out, bare, ignore=shutil.ignore_patterns("eval.json"))
    return out, bare


class _Refs(HTMLParser):
    """Every URL-carrying attribute of a page, and its tags."""

    def __init__(self):
        super().__init__()
        self.urls, self.tags = [], set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.urls += [(tag, k, v) for k, v in attrs if k in ("src", "href", "data", "poster", "srcset")]


def test_report_is_self_contained_and_its_pngs_decode(run):
    out, _ = run
    res = CliRunner().invoke(main, ["report", "--out", str(out)])
    assert res.exit_code == 0, res.output
    page = out / "report.html"
    assert str(page) in res.output and "note:" not in res.output
    text = page.read_text()
    refs = _Refs()
    refs.feed(text)
    assert not refs.tags & {"script", "link", "iframe", "object", "embed"}
    assert refs.urls and all(t == "img" and k == "src" and v.startswith("data:image/png;base64,")
                             for t, k, v in refs.urls), refs.urls
    assert "url(" not in text and "@import" not in text
    pngs = sorted(p.name for p in (out / "report").glob("*.png"))
    assert pngs == ["loss_curves.png", "loss_matrix.png", "memory_plan.png", "overview.png", "routing.png"]
    inline = [base64.b64decode(v.split(",", 1)[1]) for _, _, v in refs.urls]
    files = [(out / "report" / n).read_bytes() for n in pngs]
    assert sorted(inline) == sorted(files)  # the page carries exactly the PNG files
    for b in files:
        img = imread(io.BytesIO(b), format="png")
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200
        assert img[..., :3].std() > 0.05  # not a blank canvas
    for name in ("mozgach108_001", "mozgach108_003", "Routing", "Memory plan"):
        assert name in text
    assert not list(out.glob(".report*")) and not list((out / "report").glob(".*"))  # no temp files left


def test_heatmap_draws_the_eval_matrix(run):
    out, _ = run
    saved = json.loads((out / "eval.json").read_text())
    figs = make_figures(collect(out))
    raw, rel = (ax.images[0].get_array() for ax in figs["loss_matrix.png"].axes if ax.images)
    want = np.array(saved["loss_matrix"])
    assert want.shape == (3, 3)
    np.testing.assert_array_equal(np.asarray(raw), want)
    base = np.array([r["base_loss"] for r in saved["rows"]])
    np.testing.assert_allclose(np.asarray(rel), want / base[:, None], rtol=1e-12)
    # the eval's own rows agree with the matrix: its diagonal is each domain's own adapter
    np.testing.assert_allclose(np.diag(want), [r["own_loss"] for r in saved["rows"]], rtol=1e-12)
    # routing panels: one point per (domain, routed adapter) pair, counted from eval.json
    ax = figs["routing.png"].axes[0]
    drawn = {tuple(map(int, p)) for c in ax.collections for p in c.get_offsets()}
    idx = {a: i for i, a in enumerate(saved["adapters"])}
    assert drawn == {(idx[r["adapter"]], idx[r["by_loss"]]) for r in saved["routes"]}


def test_loss_curves_andthroughput_come_from_the_step_logs(run):
    out, _ = run
    d = collect(out)
    assert [a.name for a in d.adapters] == ["mozgach108_001", "mozgach108_002", "mozgach108_003"]
    manifest = json.loads((out / "manifest.json").read_text())["adapters"]
    for a in d.adapters:
        log = [json.loads(line) for line in (out / "logs" / f"{a.name}.jsonl").read_text().splitlines()]
        assert a.train_loss == [r["loss"] for r in log] and a.steps == list(range(1, STEPS + 1))
        rec = manifest[a.name]
        # base at step 0, eval_every=2 gives step 2 (the last step is the final evaluation)
        assert a.valid == [(0, rec["base_valid_loss"]), (2, log[1]["valid_loss"]), (STEPS, rec["valid_loss"])]
        assert a.tokens_per_s == pytest.approx(log[-1]["tokens"] / log[-1]["elapsed_s"])
        assert a.peak_memory_gb == rec["peak_memory_gb"]
    fig = make_figures(d)["loss_curves.png"]
    first = fig.axes[0].lines
    np.testing.assert_array_equal(first[0].get_ydata(), d.adapters[0].train_loss)
    np.testing.assert_array_equal(first[1].get_ydata(), [v for _, v in d.adapters[0].valid])


def test_memory_plan_curve_is_the_planners(run):
    out, _ = run
    curve = collect(out).plan
    model, _ = mz.load("tiny", quantize=4)
    # the strategy the run's steps ran with (auto chose the plain step for this small run), at every context
    ran = {r["memory_strategy"]["plain"] for r in json.loads((out / "manifest.json").read_text())["adapters"].values()}
    assert ran == {True}
    kw = dict(batch_size=2, lora_rank=4, quantize=4, strategy="plain")
    for i in (0, len(curve.contexts) // 2, len(curve.contexts) - 1):
        p = mz.plan("tiny", context=int(curve.contexts[i]), **kw)
        assert curve.total_gib[i] == pytest.approx(p.total_bytes / GiB, rel=1e-9)
    assert curve.limit_gib == pytest.approx(mx.get_memory_limit() / GiB)
    assert curve.max_context == mz.plan("tiny", memory_gb=curve.limit_gib, **kw).max_context
    assert curve.contexts[-1] > curve.max_context and curve.run_context == 64
    ax = make_figures(collect(out))["memory_plan.png"].axes[0]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), curve.total_gib)
    assert any(np.allclose(line.get_ydata(), curve.limit_gib) for line in ax.lines[1:])
    del model


def test_report_without_eval_says_how_to_make_it(run):
    _, bare = run
    res = CliRunner().invoke(main, ["report", "--out", str(bare)])
    assert res.exit_code == 0, res.output
    assert f"mozgach eval --out {bare}" in res.output
    text = (bare / "report.html").read_text()
    assert f"mozgach eval --out {bare}" in text and "mozgach108_003" in text
    assert sorted(p.name for p in (bare / "report").glob("*.png")) == ["loss_curves.png", "memory_plan.png",
                                                                       "overview.png"]


def test_missing_matplotlib_is_one_line_exit_2(run, monkeypatch):
    out, _ = run
    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    res = CliRunner().invoke(main, ["report", "--out", str(out)])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and 'pip install -e ".[report]"' in lines[0] and "Traceback" not in res.output
    with pytest.raises(mz.MozgachError, match="matplotlib"):
        write_report(out)


def test_not_a_run_directory(tmp_path):
    res = CliRunner().invoke(main, ["report", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "no manifest" in res.output and len(res.output.strip().splitlines()) == 1


def test_short_names_and_ticks_stay_readable_at_108():
    names = [f"mozgach108_{i:03d}" for i in range(1, 109)]
    assert short_names(names)[:2] == ["001", "002"] and short_names(["a"]) == ["a"]
    pos = tick_positions(108)
    assert len(pos) <= 21 and pos[0] == 0 and pos[1] == 9  # 001, 010, 020, ...
    assert tick_positions(12) == list(range(12))


def test_figures_at_108_adapters_thin_their_ticks():
    from mozgach_mlx.report.collect import AdapterCurves, EvalData
    from mozgach_mlx.report.figures import loss_curves, loss_matrix, routing

    n = 108
    names = [f"mozgach108_{i:03d}" for i in range(1, n + 1)]
    rng = np.random.default_rng(0)
    m = rng.uniform(6, 8, (n, n))
    np.fill_diagonal(m, 1.0)
    m[5, 7] = 0.5  # domain 6's lowest loss is adapter 8's
    routes = [{"adapter": a, "by_loss": a, "by_signature": names[(i + 1) % n] if i < 3 else a}
              for i, a in enumerate(names)]
    ev = EvalData(adapters=names, domains=[f"{i:03d}_d" for i in range(1, n + 1)], matrix=m, base=np.full(n, 7.0),
                  routes=routes, route_accuracy={"loss": 1.0, "signature": (n - 3) / n}, n_route=n)
    fig = loss_matrix(ev)
    for ax in [a for a in fig.axes if a.images]:
        assert 10 <= len(ax.get_xticks()) <= 21 and 10 <= len(ax.get_yticks()) <= 21
        assert [t.get_text() for t in ax.get_xticklabels()][:3] == ["001", "010", "020"]
        crosses = [c for c in ax.collections if len(c.get_offsets())]
        assert [tuple(map(int, p)) for c in crosses for p in c.get_offsets()] == [(7, 5)]
    assert "lowest on 107/108" in fig.texts[0].get_text()
    sig = routing(ev).axes[1]
    red = [c for c in sig.collections if c.get_label() == "misrouted"]
    assert len(red) == 1 and len(red[0].get_offsets()) == 3
    curves = [AdapterCurves(name=a, domain=a, status="done", steps=[1, 2], train_loss=[3.0, 2.0],
                            valid=[(0, 3.5), (2, 1.5)]) for a in names]
    grid = loss_curves(curves)
    visible = [ax for ax in grid.axes if ax.axison]
    assert len(visible) == n and visible[0].get_title() == "001" and visible[-1].get_title() == "108"


def testthroughput_of_a_resumed_log_counts_each_attempt_from_its_own_start():
    from mozgach_mlx.report.collect import throughput

    # steps 1-2 in 2 s (200 tokens); killed after a checkpoint at step 2; steps 3-4 replayed
    # in a new process whose clock restarts: 150 more tokens in 3 s
    log = [{"step": 1, "tokens": 100, "elapsed_s": 1.0}, {"step": 2, "tokens": 200, "elapsed_s": 2.0},
           {"step": 3, "tokens": 280, "elapsed_s": 1.5}, {"step": 4, "tokens": 350, "elapsed_s": 3.0}]
    assert throughput(log) == pytest.approx(350 / 5.0)
    assert throughput(log[:2]) == pytest.approx(100.0) and throughput([]) is None
