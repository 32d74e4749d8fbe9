"""The reduced context-extension experiment (examples/context_extension.py --fast).

Asserts the direction only (issue 11): at the long length, RoPE-extended and
fine-tuned beats plain extrapolation. Several minutes on 2 CPU cores: ``-m slow``."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


@pytest.mark.slow
def test_extended_and_fine_tuned_beats_extrapolation():
    import context_extension as ce

    r = ce.run(ce.fast_setup(), log=lambda m: None)
    extrap = next(v for v in r["zero_shot"] if v["name"] == "extrapolation")
    ft_pi = next(v for v in r["fine_tuned"] if v["name"] == "FT PI")
    assert ft_pi["long_digit"] > extrap["long_digit"]
    assert ft_pi["ppl"]["ppl"][-1] < extrap["ppl"]["ppl"][-1]
