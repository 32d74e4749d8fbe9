"""Routing by token statistics (mozgach_mlx/bank/tokens.py) and the bank's router choice.

Expected log-probabilities and scores are recomputed here directly from the definition
(count tokens with a Python Counter, smooth, take logs) rather than through the module."""

import math
from collections import Counter

import numpy as np
import pytest
from test_bank import make_adapter

import mozgach_mlx as mz
from mozgach_mlx import synthetic
from mozgach_mlx.bank import AdapterBank
from mozgach_mlx.bank.tokens import fit_token_log_probs, token_counts, token_scores
from mozgach_mlx.errors import AdapterError, ConfigError
from mozgach_mlx.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
V = TOK.vocab_size


def test_token_log_probs_equal_the_smoothed_counts():
    samples = {"a": ["abba", "cab"], "b": ["zzz", "yz"]}
    alpha = 0.5
    logp = fit_token_log_probs(samples, ["a", "b"], TOK, V, alpha)
    for row, name in enumerate(["a", "b"]):
        c = Counter(b for text in samples[name] for b in text.encode())
        total = sum(c.values())
        for byte in (ord("a"), ord("b"), ord("z"), ord("q")):
            want = math.log((c[byte] + alpha) / (total + alpha * V))
            assert logp[row, byte] == pytest.approx(want, rel=1e-6)
        # a proper distribution over the vocabulary
        assert np.exp(logp[row].astype(np.float64)).sum() == pytest.approx(1.0, abs=1e-5)
    assert token_counts(["ab"], TOK, V)[TOK.bos_token_id] == 0  # BOS is not counted


def test_token_scores_are_the_mean_negative_log_likelihood():
    samples = {"a": ["abab" * 5], "b": ["xyxy" * 5]}
    logp = fit_token_log_probs(samples, ["a", "b"], TOK, V)
    scores = token_scores(["abx", "yyy"], TOK, logp)
    for i, text in enumerate(["abx", "yyy"]):
        for j in range(2):
            want = -np.mean([logp[j, b] for b in text.encode()])
            assert scores[i, j] == pytest.approx(want, rel=1e-6)
    assert scores[0].argmin() == 0 and scores[1].argmin() == 1
    with pytest.raises(AdapterError, match="no samples"):
        fit_token_log_probs({"a": ["x"]}, ["a", "b"], TOK, V)
    with pytest.raises(ConfigError, match="alpha"):
        fit_token_log_probs(samples, ["a", "b"], TOK, V, alpha=0.0)


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok_adapters")
    return [make_adapter(root / n, seed=i + 1) for i, n in enumerate("abc")]


def test_bank_routes_by_tokens_and_auto_picks_the_best_measured(three):
    corpus = synthetic.default_corpus(n_domains=3, n_train=8, n_valid=6)
    model, tok = mz.load("tiny")
    with AdapterBank(model, tok, three) as bank:
        assert bank.routers() == ["loss"] and bank.best_router() == "loss"
        bank.route(corpus[0].valid[0])
        assert bank.last_router == "loss"
        with pytest.raises(AdapterError, match="fit_tokens"):
            bank.route("x", method="tokens")
        bank.fit_tokens({n: d.train for n, d in zip(bank.names, corpus, strict=True)})
        for name, dom in zip(bank.names, corpus, strict=True):
            assert [r[0] for r in bank.route(dom.valid, method="tokens")] == [name] * len(dom.valid)
        assert bank.last_router == "tokens"
        # the synthetic domains' alphabets are disjoint: tokens route all held-out samples
        # right, the random adapters' losses do not, so auto picks tokens
        acc = bank.measure_routers({n: d.valid for n, d in zip(bank.names, corpus, strict=True)})
        assert set(acc) == {"tokens", "loss"} and acc["tokens"] == 1.0
        assert bank.best_router() == "tokens"
        bank.route(corpus[1].valid[0])
        assert bank.last_router == "tokens"
        with pytest.raises(ConfigError, match="route method"):
            bank.route("x", method="nearest")
