"""The reduced context-extension experiment (examples/context_extension.py --fast).

Checks the direction of the result (issue 11) at the long length: RoPE-extended and
fine-tuned against plain extrapolation. Perplexity is expected to hold; passkey retrieval
did not at this scale (benchmarks/RESULTS.md, "Context extension"), so that check is an
expected failure that reports when it starts passing. Several minutes on 2 CPU cores: ``-m slow``
(the --base-cache test at the end is fast and runs by default)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


@pytest.fixture(scope="module")
def result():
    import context_extension as ce

    r = ce.run(ce.fast_setup(), log=lambda m: None)
    extrap = next(v for v in r["zero_shot"] if v["name"] == "extrapolation")
    ft_pi = next(v for v in r["fine_tuned"] if v["name"] == "FT PI")
    return extrap, ft_pi


@pytest.mark.slow
def test_fine_tuned_pi_keeps_perplexity_low_where_extrapolation_explodes(result):
    extrap, ft_pi = result
    assert ft_pi["ppl"]["ppl"][-1] < extrap["ppl"]["ppl"][-1]


@pytest.mark.slow
@pytest.mark.xfail(reason="passkey is not recovered by 60 LoRA steps at this scale (RESULTS.md)", strict=False)
def test_fine_tuned_pi_retrieves_better_than_extrapolation(result):
    extrap, ft_pi = result
    assert ft_pi["long_digit"] > extrap["long_digit"]


def test_base_cache_is_written_then_reused_and_refused_for_other_settings(tmp_path):
    import context_extension as ce
    import mlx.core as mx
    from mlx.utils import tree_flatten

    s = ce.Setup(tokenizer="word", window=64, hidden=32, layers=1, heads=2, pre_steps=2, pre_batch=2, trials=4)
    tok = ce.make_tokenizer(s)
    cache = str(tmp_path / "base.safetensors")
    first, info = ce.pretrained(tok, s, cache, log=lambda m: None)
    again, info2 = ce.pretrained(tok, s, cache, log=lambda m: None)
    assert info2["steps"] == info["steps"] == 2
    a, b = dict(tree_flatten(first.parameters())), dict(tree_flatten(again.parameters()))
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]).item() for k in a)
    s.pre_lr = 1e-3
    with pytest.raises(SystemExit, match="pre_lr"):
        ce.pretrained(tok, s, cache, log=lambda m: None)
