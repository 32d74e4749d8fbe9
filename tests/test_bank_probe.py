"""The linear-probe router (mozgach_mlx/bank/probe.py): its gradient against finite
differences, its fit against the optimality condition of the regularised objective, and
routing through the bank."""

import numpy as np
import pytest
from test_bank import make_adapter

import mozgach_mlx as mz
from mozgach_mlx import synthetic
from mozgach_mlx.bank import AdapterBank
from mozgach_mlx.bank.probe import fit_probe, objective_and_grad
from mozgach_mlx.errors import AdapterError


def test_gradient_equals_finite_differences():
    rng = np.random.default_rng(0)
    z, y = rng.normal(size=(20, 5)), rng.integers(0, 3, 20)
    w, b = rng.normal(size=(3, 5)), rng.normal(size=3)
    _, gw, gb = objective_and_grad(w, b, z, y, l2=0.1)
    eps = 1e-6
    for idx in [(0, 0), (1, 3), (2, 4)]:
        wp, wm = w.copy(), w.copy()
        wp[idx] += eps
        wm[idx] -= eps
        fd = (objective_and_grad(wp, b, z, y, 0.1)[0] - objective_and_grad(wm, b, z, y, 0.1)[0]) / (2 * eps)
        assert gw[idx] == pytest.approx(fd, rel=1e-5, abs=1e-8)
    bp, bm = b.copy(), b.copy()
    bp[1] += eps
    bm[1] -= eps
    fd = (objective_and_grad(w, bp, z, y, 0.1)[0] - objective_and_grad(w, bm, z, y, 0.1)[0]) / (2 * eps)
    assert gb[1] == pytest.approx(fd, rel=1e-5, abs=1e-8)


def test_fit_reaches_the_optimum_and_separates_classes():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(4, 8)) * 3
    embs = [c + rng.normal(size=(30, 8)) for c in centres]
    p = fit_probe(embs, l2=0.1, steps=3000)
    z = (np.concatenate(embs) - p.mean) / p.std
    y = np.repeat(np.arange(4), 30)
    loss, gw, gb = objective_and_grad(p.weight, p.bias, z, y, 0.1)
    _, gw0, _ = objective_and_grad(np.zeros_like(p.weight), np.zeros_like(p.bias), z, y, 0.1)
    assert np.abs(gw).max() < 1e-3 * np.abs(gw0).max() and np.abs(gb).max() < 1e-4  # stationary point
    assert loss < np.log(4)
    held = [c + rng.normal(size=(10, 8)) for c in centres]
    pred = np.concatenate([p.scores(h).argmin(1) for h in held])
    assert (pred == np.repeat(np.arange(4), 10)).mean() >= 0.95
    # scores are -log of a distribution over the adapters
    assert np.exp(-p.scores(held[0])).sum(1) == pytest.approx(np.ones(10))
    with pytest.raises(AdapterError, match="at least one sample"):
        fit_probe([embs[0], np.zeros((0, 8))])


def test_bank_routes_by_probe(tmp_path):
    dirs = [make_adapter(tmp_path / n, seed=i + 1) for i, n in enumerate("abc")]
    corpus = synthetic.default_corpus(n_domains=3, n_train=12, n_valid=6)
    model, tok = mz.load("tiny")
    with AdapterBank(model, tok, dirs) as bank:
        with pytest.raises(AdapterError, match="fit_probe"):
            bank.route("x", method="probe")
        with pytest.raises(AdapterError, match="no samples"):
            bank.fit_probe({"a": corpus[0].train})
        bank.fit_probe({n: d.train for n, d in zip(bank.names, corpus, strict=True)})
        assert "probe" in bank.routers()
        acc = bank.measure_routers({n: d.valid for n, d in zip(bank.names, corpus, strict=True)})
        assert acc["probe"] == 1.0  # disjoint alphabets: the hidden states separate the domains
        assert bank.route(corpus[2].valid[0], method="probe") == ["c"]
        assert bank.last_router == "probe"
