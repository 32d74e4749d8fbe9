"""evaluate_run / ``mozgach eval`` on a small fake run directory: a manifest, a 3-domain
data dir and 3 adapters made here. Expected numbers come from an independent path: a
fresh base with each adapter loaded by ``lora.load`` and a numpy cross-entropy."""

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

import mozgach_mlx as mz
from mozgach_mlx import data, lora, synthetic
from mozgach_mlx.evaluate import evaluate_run

N_VALID = 3
TOKENS = 40


def _adapter(path, seed, r=4, sigma=0.3):
    model, _ = mz.load("tiny")
    lora.apply(model, lora.LoRAConfig(r=r, alpha=2.0 * r, dropout=0.0), seed=seed)
    flat = [(k, v) for k, v in tree_flatten(model.trainable_parameters()) if k.endswith("lora_b")]
    keys = mx.random.split(mx.random.key(seed + 1000), len(flat))
    model.load_weights([(k, sigma * mx.random.normal(v.shape, key=kk)) for (k, v), kk in zip(flat, keys, strict=True)],
                       strict=False)
    lora.save(model, path, format="both")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    data_dir = synthetic.write_corpus(out / "data", n_domains=3, n_train=4, n_valid=N_VALID)
    adapters = {}
    for dom in data.discover_domains(data_dir):
        name = f"mozgach108_{dom.id:03d}"
        _adapter(out / name, seed=dom.id)
        adapters[name] = {"domain": dom.name, "domain_id": dom.id, "status": "done"}
    adapters["mozgach108_004"] = {"domain": "004_x", "domain_id": 4, "status": "failed", "error": "DataError: x"}
    manifest = {"version": 1, "base": {"source": "tiny"}, "adapters": adapters,
                "config": {"run": {"model": "tiny", "data": str(data_dir), "out": "elsewhere", "quantize": "none",
                                   "group_size": 64, "n_domains": 3},
                           "train": {"max_seq_length": 128, "batch_size": 2}}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def _reference(run_dir, n):
    """(base, per-adapter) per-sample (loss sum, count) on each domain's first n held-out
    samples cut to TOKENS tokens, each adapter loaded alone with lora.load."""
    base, tok = mz.load("tiny")
    doms = data.discover_domains(run_dir / "data")
    samples = {}
    for d in doms:
        texts = [json.loads(line)["text"] for line in d.valid.read_text().splitlines()][:n]
        ids = [np.array(tok.encode(t) + [tok.eos_token_id])[:TOKENS] for t in texts]
        samples[d.id] = [(i, np.arange(len(i)) > 0) for i in ids]  # every token but BOS is a target

    def ce(model, ids, mask):
        logits = np.array(model(mx.array(ids[None, :-1]))[0], np.float64)
        mx_ = logits.max(1, keepdims=True)
        logp = logits - mx_ - np.log(np.exp(logits - mx_).sum(1, keepdims=True))
        w = mask[1:].astype(np.float64)
        return float(-(logp[np.arange(len(ids) - 1), ids[1:]] * w).sum()), float(w.sum())

    models = {"base": base}
    for d in doms:
        m, _ = mz.load("tiny")
        lora.load(m, run_dir / f"mozgach108_{d.id:03d}")
        models[d.id] = m
    return doms, {(k, d.id): [ce(m, i, w) for i, w in samples[d.id]] for k, m in models.items() for d in doms}


def test_evaluate_run_table_matches_independent_reference(run_dir):
    rep = evaluate_run(run_dir, route_samples=N_VALID, sample_tokens=TOKENS, signature_samples=2)
    doms, ref = _reference(run_dir, N_VALID)
    assert [r.adapter for r in rep.rows] == ["mozgach108_001", "mozgach108_002", "mozgach108_003"]
    assert rep.not_evaluated == {"mozgach108_004": "status failed"}
    assert rep.n_adapters == 3
    ids = [d.id for d in doms]
    correct = 0
    for row, d in zip(rep.rows, doms, strict=True):

        def mean(key, d=d):
            s = np.array(ref[(key, d.id)])
            return s[:, 0].sum() / s[:, 1].sum()

        assert row.domain == d.name and row.samples == N_VALID
        assert row.base_loss == pytest.approx(mean("base"), abs=1e-4)
        assert row.own_loss == pytest.approx(mean(d.id), abs=1e-4)
        others = {f"mozgach108_{k:03d}": mean(k) for k in ids if k != d.id}
        best = min(others, key=others.get)
        assert row.best_other == best
        assert row.best_other_loss == pytest.approx(others[best], abs=1e-4)
        assert row.own_best == (mean(d.id) < others[best])
        # routing by loss: per-sample argmin over the adapters
        per = np.array([[a / c for a, c in ref[(k, d.id)]] for k in ids])  # (adapters, samples)
        assert row.route_n == N_VALID
        assert row.route_loss_correct == int((per.argmin(0) == ids.index(d.id)).sum())
        correct += row.route_loss_correct
        assert row.route_signature_correct is not None
    assert rep.route_loss_accuracy == pytest.approx(correct / (3 * N_VALID))
    # the whole matrix (domain of adapters[i] x adapter k) and every routed sample
    assert rep.adapters == [f"mozgach108_{k:03d}" for k in ids]
    want = [[np.sum(ref[(k, d)], 0)[0] / np.sum(ref[(k, d)], 0)[1] for k in ids] for d in ids]
    np.testing.assert_allclose(rep.loss_matrix, want, atol=1e-4)
    def routed(d, s):  # the adapter with the lowest mean loss on sample s of domain d
        return ids[int(np.argmin([ref[(k, d)][s][0] / ref[(k, d)][s][1] for k in ids]))]

    routes = [(f"mozgach108_{d:03d}", f"mozgach108_{routed(d, s):03d}") for d in ids for s in range(N_VALID)]
    assert [(r["adapter"], r["by_loss"]) for r in rep.routes] == routes
    assert all(r["by_signature"] in rep.adapters for r in rep.routes)
    assert rep.all_own_best == all(r.own_best for r in rep.rows)
    assert rep.route_loss_ms_per_sample > 0 and rep.route_signature_ms_per_sample > 0

    table = rep.table()
    for r in rep.rows:
        assert r.adapter in table and r.domain[:22] in table
    assert "routing top-1 accuracy" in table and "mozgach108_004 (status failed)" in table
    saved = json.loads((run_dir / "eval.json").read_text())
    assert saved["rows"][0]["own_loss"] == pytest.approx(rep.rows[0].own_loss)
    assert saved["all_own_best"] == rep.all_own_best
    assert saved["loss_matrix"] == rep.loss_matrix and saved["routes"] == rep.routes


def test_every_router_is_counted_consistently_and_probe_routes_as_its_bank_does(run_dir):
    from mozgach_mlx.bank import AdapterBank
    from mozgach_mlx.evaluate import PROBE_SAMPLES

    rep = evaluate_run(run_dir, route_samples=N_VALID, sample_tokens=TOKENS, signature_samples=2, write=False)
    for m in ("loss", "signature", "tokens", "probe"):
        hits = [r[f"by_{m}"] == r["adapter"] for r in rep.routes]
        assert getattr(rep, f"route_{m}_accuracy") == pytest.approx(np.mean(hits)), m
        assert sum(getattr(r, f"route_{m}_correct") for r in rep.rows) == sum(hits), m
    assert rep.probe_fit_seconds > 0 and rep.route_probe_ms_per_sample > 0
    assert "by linear probe" in rep.table() and "by tokens (naive Bayes)" in rep.table()
    # the probe: fit on the first PROBE_SAMPLES train windows of each domain, as a bank does
    base, tok = mz.load("tiny")
    names = rep.adapters
    doms = {d.id: d for d in data.discover_domains(run_dir / "data")}
    fit, held = {}, []
    for n in names:
        splits = data.load_domain(doms[int(n[-3:])], tok, TOKENS - 1, pack=False)
        fit[n] = [(ids, mask) for ids, mask, *_ in splits["train"] if len(ids) >= 2 and mask[1:].any()][:PROBE_SAMPLES]
        held += [(ids, mask) for ids, mask, *_ in splits["valid"] if ids[0] == tok.bos_token_id][:N_VALID]
    with AdapterBank(base, tok, [run_dir / n for n in names], names=names) as bank:
        bank.fit_probe(fit)
        want = [names[i] for i in bank.route_scores(held, method="probe").argmin(1)]
    assert [r["by_probe"] for r in rep.routes] == want


def test_max_batches_sets_the_loss_samples(run_dir):
    rep = evaluate_run(run_dir, max_batches=1, route_samples=1, sample_tokens=TOKENS, signature_samples=0,
                       write=False)
    assert [r.samples for r in rep.rows] == [2, 2, 2]  # 1 batch x batch_size 2
    assert [r.route_n for r in rep.rows] == [1, 1, 1]
    assert rep.route_signature_accuracy is None and rep.rows[0].route_signature_correct is None
    no_route = evaluate_run(run_dir, route_samples=0, sample_tokens=TOKENS, write=False)
    assert [r.samples for r in no_route.rows] == [2, 2, 2] and [r.route_n for r in no_route.rows] == [0, 0, 0]
    assert no_route.route_signature_accuracy is None and "by loss -" in no_route.table()


def test_mozgach_eval_cli(run_dir):
    from mozgach_mlx.cli import main

    res = CliRunner().invoke(main, ["eval", "--out", str(run_dir), "--route-samples", "1"])
    assert res.exit_code in (0, 1), res.output
    assert "own adapter lowest" in res.output and "mozgach108_003" in res.output
    bad = CliRunner().invoke(main, ["eval", "--out", str(run_dir / "nope")])
    assert bad.exit_code == 2 and "no manifest" in bad.output
