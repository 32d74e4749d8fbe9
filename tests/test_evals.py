"""mozgach_mlx.evals: passkey prompts and scoring, ppl by position, and the CLI flags.

Expected values come from independent naive computations: greedy decoding by repeated
full forward passes, and one forward pass per scored token for the sliding window."""

import math

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

import mozgach_mlx as mz
from mozgach_mlx import evals
from mozgach_mlx.cli import main
from mozgach_mlx.errors import ConfigError
from mozgach_mlx.evals.passkey import KEY_LINE, QUESTION, random_key


@pytest.fixture(scope="module")
def tiny():
    model, tok = mz.load("tiny")
    model.eval()
    return model, tok


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_prompt_has_the_length_and_the_key_at_the_depth(depth):
    from mozgach_mlx.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    p = evals.make_prompt(tok, 500, depth, "12345", filler_offset=7)
    assert len(p.tokens) == 500 and p.tokens[0] == tok.bos_token_id
    text = tok.decode(p.tokens)
    line = KEY_LINE.format(key="12345")
    assert text.count(line) == 1 and text.endswith(QUESTION)
    n_fill = 500 - 1 - len(line) - len(QUESTION)
    assert text.index(line) == round(depth * n_fill)  # bytes = tokens after the BOS
    assert p.key_pos == 1 + text.index(line)
    assert tok.decode(p.answer) == "12345"
    if depth == 1.0:  # the key line sits right before the question
        assert text.endswith(line + QUESTION)


def test_prompt_too_short_is_a_config_error():
    from mozgach_mlx.tokenizer import ByteTokenizer

    with pytest.raises(ConfigError, match="too short"):
        evals.make_prompt(ByteTokenizer(), 40, 0.5, "12345")


def test_parse_lengths_and_depths():
    assert evals.parse_lengths("1k, 2k,4096") == [1024, 2048, 4096]
    assert evals.parse_depths("0,0.25,1") == [0.0, 0.25, 1.0]
    for bad in ("1x", "", "0", "1.5"):
        with pytest.raises(ConfigError, match="--lengths"):
            evals.parse_lengths(bad)
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        evals.parse_depths("0,1.5")


def _greedy(model, ids, n):
    out = list(ids)
    for _ in range(n):
        out.append(int(mx.argmax(model(mx.array([out]))[0, -1]).item()))
    return out[len(ids):]


def test_passkey_scoring_matches_naive_greedy_decoding(tiny):
    model, tok = tiny
    rng = np.random.default_rng(3)
    prompts = [evals.make_prompt(tok, 120, d, random_key(rng, 3)) for d in (0.0, 0.5, 1.0)]
    exact, digit = evals.score_prompts(model, prompts, batch_size=2)
    for p, ex, dg in zip(prompts, exact, digit, strict=True):
        assert ex == (_greedy(model, p.tokens, len(p.answer)) == p.answer)
        naive = [int(mx.argmax(model(mx.array([p.tokens + p.answer[:i]]))[0, -1]).item()) == p.answer[i]
                 for i in range(len(p.answer))]
        assert dg.tolist() == naive
    # the model predicting its own greedy output as the key: exact by construction
    p = prompts[0]
    p.answer = _greedy(model, p.tokens, 3)
    assert evals.score_prompts(model, [p])[0].all()


def test_passkey_grid_shape_and_table(tiny):
    model, tok = tiny
    g = evals.passkey_grid(model, tok, [112, 128], [0.0, 1.0], trials=2, digits=3)
    assert g.exact.shape == (2, 2) and ((0 <= g.per_digit) & (g.per_digit <= 1)).all()
    table = evals.format_grid(g, "t")
    assert "| 128 |" in table and "d=0" in table and "d=1" in table


def _naive_nll(model, doc, window, stride):
    """Token t is scored by the first window (starts 0, stride, 2*stride, ...) that
    reaches it, with that window's tokens before it as context."""
    out = []
    for t in range(1, len(doc)):
        k = max(0, math.ceil((t - window + 1) / stride))
        ctx = doc[k * stride: t]
        logits = model(mx.array([ctx]))[0, -1].astype(mx.float32)
        out.append(float(mx.logsumexp(logits) - logits[doc[t]]))
    return np.array(out)


@pytest.mark.parametrize("n,window,stride", [(30, 12, 5), (30, 40, 10), (25, 8, 7)])
def test_token_nll_matches_per_token_loop(tiny, n, window, stride):
    model, _ = tiny
    doc = np.random.default_rng(n).integers(0, 256, n).tolist()
    got = evals.token_nll(model, doc, window=window, stride=stride)
    np.testing.assert_allclose(got, _naive_nll(model, doc, window, stride), rtol=1e-4, atol=1e-4)


def test_ppl_by_position_buckets(tiny):
    model, _ = tiny
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 256, 30).tolist(), rng.integers(0, 256, 21).tolist()]
    t = evals.ppl_by_position(model, docs, window=12, stride=5, bucket=10)
    per = [_naive_nll(model, d, 12, 5) for d in docs]
    assert t.edges == [0, 10, 20, 30]
    for b in range(3):
        vals = np.concatenate([a[max(0, t.edges[b] - 1): t.edges[b + 1] - 1] for a in per])
        assert t.tokens[b] == len(vals)
        np.testing.assert_allclose(t.nll[b], vals.mean(), rtol=1e-4)
    assert "| m |" in evals.format_position_table({"m": t})


def test_filler_documents_have_the_length(tiny):
    _, tok = tiny
    docs = evals.filler_documents(tok, 700, 2, key_every=200)
    assert [len(d) for d in docs] == [700, 700]
    assert "The pass key is" in tok.decode(docs[0])


def _one_line_exit_2(res):
    assert res.exit_code == 2, res.output
    assert len(res.output.strip().splitlines()) == 1, res.output
    return res.output


def test_cli_bad_values_are_one_line_exit_2():
    run = CliRunner().invoke
    assert "--lengths" in _one_line_exit_2(run(main, ["eval", "--passkey", "--lengths", "1q,2k"]))
    assert "--depths" in _one_line_exit_2(run(main, ["eval", "--passkey", "--depths", "0,2"]))
    assert "--passkey" in _one_line_exit_2(run(main, ["eval"]))
    assert "--adapter" in _one_line_exit_2(run(main, ["eval", "--passkey", "--adapter", "/nonexistent"]))


def test_cli_passkey_and_ppl_on_tiny():
    res = CliRunner().invoke(main, ["eval", "--passkey", "--ppl-by-position", "--lengths", "128,160",
                                    "--depths", "0,1", "--trials", "1", "--bucket", "64"])
    assert res.exit_code == 0, res.output
    assert "| 160 |" in res.output and "passkey tiny" in res.output and "64-128" in res.output
