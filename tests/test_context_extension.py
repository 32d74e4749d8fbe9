"""The reduced context-extension experiment (examples/context_extension.py --fast).

Checks the direction of the result (issue 11) at the long length: RoPE-extended and
fine-tuned against plain extrapolation. Perplexity is expected to hold; passkey retrieval
did not at this scale (benchmarks/RESULTS.md, "Context extension"), so that check is an
expected failure that reports when it starts passing. Several minutes on 2 CPU cores: ``-m slow``."""

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
