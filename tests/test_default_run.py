"""The default run end to end (``python -m mozgach_mlx.train`` with no arguments: 12
adapters over the pretrained tiny-stdlib base on the shipped stdlib12 corpus), then its
evaluation. ``slow``: ~5-10 minutes on 2 cores. The thresholds are the issue's (own adapter
lowest on >= 90% of domains, the cheap router >= 80%), plus loss routing well above chance
(1/12) — what the measured runs in benchmarks/RESULTS.md ("The default run") clear."""

import json

import pytest
from click.testing import CliRunner

from mozgach_mlx.cli import main
from mozgach_mlx.evaluate import evaluate_run


@pytest.mark.slow
def test_default_run_trains_twelve_real_text_experts_that_route(tmp_path):
    out = tmp_path / "mozgach108"
    res = CliRunner().invoke(main, ["train", "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["run"]["model"] == "tiny-stdlib" and manifest["config"]["run"]["data"] == "stdlib12"
    recs = manifest["adapters"].values()
    assert len(recs) == 12 and all(r["status"] == "done" for r in recs)
    assert all(r["valid_loss"] < r["base_valid_loss"] for r in recs)

    rep = evaluate_run(out, route_samples=4, sample_tokens=256)
    assert sum(r.own_best for r in rep.rows) >= 11, rep.table()
    assert rep.route_tokens_accuracy >= 0.8, rep.table()
    assert rep.route_loss_accuracy >= 0.5, rep.table()
