"""evaluate_run / ``mozgach eval`` on a small fake run directory: a manifest, a 3-domain
data dir and 3 adapters made here. Expected numbers come from an independent path: the
held-out samples cut from the raw JSONL texts as ``benchmarks/bench_routing.py`` cuts
them, a fresh base with each adapter loaded by ``lora.load`` and a numpy cross-entropy.
The Wilson interval is checked against published values and scipy's."""

import importlib.util
import inspect
import json
import math
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

import mozgach_mlx as mz
from mozgach_mlx import data, evaluate, lora, synthetic
from mozgach_mlx.evaluate import evaluate_run, held_out_samples, wilson_interval

N_VALID = 8  # valid records per domain (80-160 bytes each): 3 full 256-token samples and a rest
N_ROUTE = 3
TOKENS = 40
REPO = Path(__file__).resolve().parents[1]


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


def _texts(path):
    return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]


def _windows(tok, texts, length):
    """bench_routing.py's samples, written out again: BOS + consecutive ``length``-token
    windows of the texts joined as training packs them (BOS, text, EOS each; the first BOS
    is the window's); here also the shorter rest (the loss table keeps it)."""
    ids = [i for t in texts for i in [tok.bos_token_id, *tok.encode(t, add_bos=False), tok.eos_token_id]][1:]
    return [np.array([tok.bos_token_id, *ids[s: s + length]], np.int32) for s in range(0, len(ids), length)]


def _reference(run_dir, length):
    """Per (model, domain): each held-out sample's (loss sum, target count, full length?),
    under the base and each adapter loaded alone with lora.load."""
    base, tok = mz.load("tiny")
    doms = data.discover_domains(run_dir / "data")
    samples = {d.id: _windows(tok, _texts(d.valid), length) for d in doms}

    def ce(model, ids):  # every token but BOS is a target
        logits = np.array(model(mx.array(ids[None, :-1]))[0], np.float64)
        mx_ = logits.max(1, keepdims=True)
        logp = logits - mx_ - np.log(np.exp(logits - mx_).sum(1, keepdims=True))
        target = ids[1:] != tok.bos_token_id
        nll = -logp[np.arange(len(ids) - 1), ids[1:]]
        return float(nll[target].sum()), float(target.sum()), len(ids) == length + 1

    models = {"base": base}
    for d in doms:
        m, _ = mz.load("tiny")
        lora.load(m, run_dir / f"mozgach108_{d.id:03d}")
        models[d.id] = m
    return doms, {(k, d.id): [ce(m, i) for i in samples[d.id]] for k, m in models.items() for d in doms}


def test_evaluate_run_table_matches_independent_reference(run_dir):
    # max_batches: a loss table over every held-out sample (the routed ones alone by default)
    rep = evaluate_run(run_dir, max_batches=100, route_samples=N_ROUTE, sample_tokens=TOKENS, signature_samples=2)
    doms, ref = _reference(run_dir, TOKENS)
    assert [r.adapter for r in rep.rows] == ["mozgach108_001", "mozgach108_002", "mozgach108_003"]
    assert rep.not_evaluated == {"mozgach108_004": "status failed"}
    assert rep.n_adapters == 3 and rep.sample_tokens == TOKENS and rep.held_out == ["valid", "test"]
    ids = [d.id for d in doms]
    correct = 0
    for row, d in zip(rep.rows, doms, strict=True):

        def mean(key, d=d):  # over every held-out token: all samples, the shorter rest too
            s = np.array([x[:2] for x in ref[(key, d.id)]])
            return s[:, 0].sum() / s[:, 1].sum()

        n_tokens = sum(len(t.encode()) + 1 for t in _texts(d.valid))  # + each text's EOS
        assert row.domain == d.name and row.samples == len(ref[("base", d.id)]) and row.tokens == n_tokens
        assert row.base_loss == pytest.approx(mean("base"), abs=1e-4)
        assert row.own_loss == pytest.approx(mean(d.id), abs=1e-4)
        others = {f"mozgach108_{k:03d}": mean(k) for k in ids if k != d.id}
        best = min(others, key=others.get)
        assert row.best_other == best
        assert row.best_other_loss == pytest.approx(others[best], abs=1e-4)
        assert row.own_best == (mean(d.id) < others[best])
        # routing by loss: per-sample argmin over the adapters, the first N_ROUTE samples
        per = np.array([[a / c for a, c, _ in ref[(k, d.id)][:N_ROUTE]] for k in ids])  # (adapters, samples)
        assert all(full for _, _, full in ref[("base", d.id)][:N_ROUTE])
        assert row.route_n == N_ROUTE
        assert row.route_loss_correct == int((per.argmin(0) == ids.index(d.id)).sum())
        correct += row.route_loss_correct
        assert row.route_signature_correct is not None
    assert rep.route_loss_accuracy == pytest.approx(correct / (3 * N_ROUTE))
    # the whole matrix (domain of adapters[i] x adapter k) and every routed sample
    assert rep.adapters == [f"mozgach108_{k:03d}" for k in ids]
    want = [[np.sum(ref[(k, d)], 0)[0] / np.sum(ref[(k, d)], 0)[1] for k in ids] for d in ids]
    np.testing.assert_allclose(rep.loss_matrix, want, atol=1e-4)

    def routed(d, s):  # the adapter with the lowest mean loss on sample s of domain d
        return ids[int(np.argmin([ref[(k, d)][s][0] / ref[(k, d)][s][1] for k in ids]))]

    routes = [(f"mozgach108_{d:03d}", f"mozgach108_{routed(d, s):03d}") for d in ids for s in range(N_ROUTE)]
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
    assert saved["route_samples"] == 3 * N_ROUTE and saved["route_loss_correct"] == correct
    assert saved["route_loss_interval"] == pytest.approx(list(wilson_interval(correct, 3 * N_ROUTE)))


def test_every_router_is_counted_consistently_and_probe_routes_as_its_bank_does(run_dir):
    from mozgach_mlx.bank import AdapterBank

    rep = evaluate_run(run_dir, route_samples=N_ROUTE, sample_tokens=TOKENS, signature_samples=2, write=False)
    for m in ("loss", "signature", "tokens", "probe"):
        hits = [r[f"by_{m}"] == r["adapter"] for r in rep.routes]
        assert getattr(rep, f"route_{m}_accuracy") == pytest.approx(np.mean(hits)), m
        assert sum(getattr(r, f"route_{m}_correct") for r in rep.rows) == sum(hits), m
        assert rep.route_counts(m) == (sum(hits), len(hits)), m
    assert rep.probe_fit_seconds > 0 and rep.route_probe_ms_per_sample > 0
    assert "by linear probe" in rep.table() and "by tokens (naive Bayes)" in rep.table()
    # the probe: fit on every train record of each domain (as bench_routing.py fits it), as a bank does
    base, tok = mz.load("tiny")
    names = rep.adapters
    doms = {d.id: d for d in data.discover_domains(run_dir / "data")}
    fit = {n: _texts(doms[int(n[-3:])].train) for n in names}
    held = [(w, np.arange(len(w)) > 0) for n in names for w in _windows(tok, _texts(doms[int(n[-3:])].valid),
                                                                         TOKENS)[:N_ROUTE]]
    with AdapterBank(base, tok, [run_dir / n for n in names], names=names) as bank:
        bank.fit_probe(fit)
        want = [names[i] for i in bank.route_scores(held, method="probe").argmin(1)]
    assert [r["by_probe"] for r in rep.routes] == want


def test_defaults_route_every_full_256_token_sample_of_the_held_out_text(run_dir, monkeypatch):
    params = inspect.signature(evaluate_run).parameters
    assert params["sample_tokens"].default == evaluate.SAMPLE_TOKENS == 256
    assert params["splits"].default == ("valid", "test") and params["route_samples"].default is None
    rep = evaluate_run(run_dir, signature_samples=0, probe_samples=0, write=False)
    _, tok = mz.load("tiny")
    for row, d in zip(rep.rows, data.discover_domains(run_dir / "data"), strict=True):
        texts = _texts(d.valid)
        n_bytes = sum(len(t.encode()) for t in texts)  # the byte tokenizer: one token per byte
        n = n_bytes + 2 * len(texts) - 1  # + each text's EOS, + the BOS of every text after the first
        assert row.route_n == n // 256 >= 2  # every full sample (the fixture has no test split)
        assert row.samples == row.route_n + (n % 256 > 0) and row.tokens == n_bytes + len(texts)  # EOS: targets
    assert len(rep.routes) == sum(r.route_n for r in rep.rows)
    assert "of 256 tokens" in rep.table()
    # at most MAX_SAMPLES per domain
    monkeypatch.setattr(evaluate, "MAX_SAMPLES", 2)
    capped = evaluate_run(run_dir, signature_samples=0, probe_samples=0, write=False)
    assert [r.route_n for r in capped.rows] == [2, 2, 2] and [r.samples for r in capped.rows] == [2, 2, 2]


def test_held_out_samples_are_bench_routings_windows_on_the_shipped_corpus():
    """On stdlib12 (the default run's data) with tiny-stdlib's BPE, the eval's samples are
    exactly the ones ``benchmarks/bench_routing.py`` routes for its headline numbers."""
    spec = importlib.util.spec_from_file_location("bench_routing", REPO / "benchmarks" / "bench_routing.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    _, tok = mz.load("tiny-stdlib")
    corpus = Path(mz.__file__).parent / "corpora" / "stdlib12"
    total = 0
    for d in data.discover_domains(corpus)[:4]:
        splits = data.load_domain(d, tok, 1 << 40, pack=False)
        got, n_full = held_out_samples([*splits["valid"], *splits["test"]], tok, 256)
        want = bench.windows(tok, bench.read_jsonl(d.valid) + bench.read_jsonl(d.test), 256)
        assert n_full == len(want) and len(got) == n_full + 1
        for (ids, mask), (w_ids, w_mask) in zip(got, want, strict=False):
            np.testing.assert_array_equal(ids, w_ids)
            np.testing.assert_array_equal(mask, w_mask)
        total += n_full
    assert total == 15 + 19 + 19 + 12  # argparse, datetime, decimal, http_client (RESULTS.md: 196 in all)


def test_held_out_samples_keep_the_target_mask_and_the_document_separators():
    _, tok = mz.load("tiny")
    bos, eos = tok.bos_token_id, tok.eos_token_id
    recs = [{"prompt": "ab", "completion": "cd"}, {"text": "efg"}]
    docs = [data.encode_record(r, tok) for r in recs]
    samples, n_full = held_out_samples(docs, tok, 3)
    # joined as packed for training: a b c d <eos> <bos> e f g <eos> (the first BOS is the samples')
    assert n_full == 3 and len(samples) == 4
    np.testing.assert_array_equal(samples[0][0], [bos, *b"abc"])
    np.testing.assert_array_equal(samples[0][1], [False, False, False, True])  # the prompt is not a target
    np.testing.assert_array_equal(samples[1][0], [bos, ord("d"), eos, bos])
    np.testing.assert_array_equal(samples[1][1], [False, True, True, False])  # EOS ends the completion; BOS: context
    np.testing.assert_array_equal(samples[2][0], [bos, *b"efg"])
    np.testing.assert_array_equal(samples[3][0], [bos, eos])  # the rest: the text's EOS, a target
    np.testing.assert_array_equal(samples[3][1], [False, True])
    # a window with no target is not a sample
    samples, n_full = held_out_samples([data.encode_record({"prompt": "abcdef", "completion": "g"}, tok)], tok, 3)
    assert n_full == 0 and len(samples) == 1
    np.testing.assert_array_equal(samples[0][0], [bos, *b"g", eos])


def test_max_batches_sets_the_loss_samples(run_dir):
    rep = evaluate_run(run_dir, max_batches=1, route_samples=1, sample_tokens=TOKENS, signature_samples=0,
                       write=False)
    assert [r.samples for r in rep.rows] == [2, 2, 2]  # 1 batch x batch_size 2
    assert [r.route_n for r in rep.rows] == [1, 1, 1]
    assert rep.route_signature_accuracy is None and rep.rows[0].route_signature_correct is None
    no_route = evaluate_run(run_dir, route_samples=0, sample_tokens=TOKENS, write=False)
    assert [r.samples for r in no_route.rows] == [r.samples for r in evaluate_run(
        run_dir, sample_tokens=TOKENS, signature_samples=0, probe_samples=0, write=False).rows]
    assert [r.route_n for r in no_route.rows] == [0, 0, 0]
    assert no_route.route_signature_accuracy is None and "by loss: -" in no_route.table()


# Newcombe (1998), Statistics in Medicine 17:857-872, Table II, method 3 (Wilson score),
# to the 4 decimals printed there
NEWCOMBE = {(81, 263): (0.2553, 0.3662), (15, 148): (0.0624, 0.1605), (0, 20): (0.0, 0.1611),
            (1, 29): (0.0061, 0.1718)}
# scipy 1.17.1: scipy.stats.binomtest(k, n).proportion_ci(0.95, method="wilson"), to 6 decimals
SCIPY = {(81, 263): (0.255289, 0.366210), (179, 196): (0.865500, 0.945143), (194, 196): (0.963564, 0.997197),
         (5, 5): (0.565518, 1.0), (1, 29): (0.006113, 0.171755)}


def test_wilson_interval_equals_published_values_and_scipy():
    for (k, n), (lo, hi) in NEWCOMBE.items():
        got = wilson_interval(k, n)
        assert round(got[0], 4) == lo and round(got[1], 4) == hi, (k, n, got)
    for (k, n), (lo, hi) in SCIPY.items():
        assert wilson_interval(k, n) == pytest.approx((lo, hi), abs=1e-6), (k, n)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 1.0
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_wilson_interval_equals_scipy_on_a_grid():
    stats = pytest.importorskip("scipy.stats")
    for n in (1, 2, 7, 24, 196, 1000):
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            ci = stats.binomtest(k, n).proportion_ci(0.95, method="wilson")
            assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-12), (k, n)


def test_mozgach_eval_cli_prints_counts_and_intervals(run_dir):
    from mozgach_mlx.cli import main

    res = CliRunner().invoke(main, ["eval", "--out", str(run_dir), "--sample-tokens", str(TOKENS)])
    assert res.exit_code in (0, 1), res.output
    assert "own adapter lowest" in res.output and "mozgach108_003" in res.output
    saved = json.loads((run_dir / "eval.json").read_text())
    n = saved["route_samples"]
    assert n == sum(r["route_n"] for r in saved["rows"])
    assert f"over {n} held-out samples of {TOKENS} tokens" in res.output
    for label, m in (("loss", "loss"), ("tokens \\(naive Bayes\\)", "tokens"), ("linear probe", "probe"),
                     ("signature", "signature")):
        hit = re.search(rf"by {label}: (\d+\.\d)% \((\d+)/(\d+), (\d+\.\d)-(\d+\.\d)%;", res.output)
        assert hit, (label, res.output)
        pct, k, total, lo, hi = hit.groups()
        assert (int(k), int(total)) == (saved[f"route_{m}_correct"], n)
        want = wilson_interval(int(k), n)
        assert (float(lo), float(hi)) == (round(100 * want[0], 1), round(100 * want[1], 1))
        assert float(pct) == round(100 * int(k) / n, 1)

    quick = CliRunner().invoke(main, ["eval", "--out", str(run_dir), "--sample-tokens", str(TOKENS), "--quick"])
    assert quick.exit_code in (0, 1), quick.output
    assert f"over {3 * evaluate.QUICK_SAMPLES} held-out samples" in quick.output
    assert "by tokens (naive Bayes)" in quick.output and "by linear probe" not in quick.output  # no fits
    valid = CliRunner().invoke(main, ["eval", "--out", str(run_dir), "--split", "valid", "--route-samples", "1"])
    assert valid.exit_code in (0, 1) and "the valid records" in valid.output, valid.output
    bad = CliRunner().invoke(main, ["eval", "--out", str(run_dir / "nope")])
    assert bad.exit_code == 2 and "no manifest" in bad.output
