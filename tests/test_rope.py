"""RoPE variants against the published formulas.

Expected inverse frequencies are computed here, independently of mozgach_mlx.models.rope,
straight from the formulas as written in the papers / Hugging Face
``modeling_rope_utils.py`` (``_compute_{default,linear_scaling,dynamic_ntk,yarn,llama3}
_parameters``), in float64 numpy.
"""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mozgach_mlx.errors import ConfigError
from mozgach_mlx.models import Model, ModelArgs
from mozgach_mlx.models.rope import build_rope, rope_of, scaling_type

D, BASE = 64, 10000.0


def plain(d=D, base=BASE):
    # RoFormer (Su et al. 2021): theta_i = base^(-2i/d), i = 0 .. d/2-1
    return np.array([base ** (-2.0 * i / d) for i in range(d // 2)])


def test_default_and_both_spellings():
    for scaling in (None, {"type": "default"}, {"rope_type": "none"}):
        r = build_rope(D, BASE, scaling, 4096)
        np.testing.assert_allclose(r.inv_freq(), plain(), rtol=1e-12)
        assert r.attention_scale == 1.0
    a = build_rope(D, BASE, {"type": "linear", "factor": 4.0}, 4096)
    b = build_rope(D, BASE, {"rope_type": "linear", "factor": 4}, 4096)
    np.testing.assert_allclose(a.inv_freq(), b.inv_freq())


def test_linear_position_interpolation():
    # Chen et al. 2023: position m -> m / s, i.e. every inverse frequency / s
    r = build_rope(D, BASE, {"type": "linear", "factor": 8.0}, 4096)
    np.testing.assert_allclose(r.inv_freq(), plain() / 8.0, rtol=1e-12)


def test_dynamic_ntk():
    # HF: base' = base * ((s * L / L0) - (s - 1)) ** (d / (d - 2)), L = max(len, L0)
    r = build_rope(D, BASE, {"type": "dynamic", "factor": 4.0}, 2048)
    np.testing.assert_allclose(r.inv_freq(100), plain(), rtol=1e-12)  # below L0: unchanged
    np.testing.assert_allclose(r.inv_freq(2048), plain(), rtol=1e-12)
    L = 8192
    base2 = BASE * ((4.0 * L / 2048) - 3.0) ** (64 / 62)  # = 10000 * 13^(32/31)
    assert base2 == pytest.approx(10000 * 13 ** (32 / 31))
    np.testing.assert_allclose(r.inv_freq(L), plain(base=base2), rtol=1e-12)


def yarn_expected(d, base, factor, orig, beta_fast=32.0, beta_slow=1.0):
    # Peng et al. 2023 (YaRN), "NTK-by-parts": dims whose wavelength fits > beta_fast
    # rotations in the original context are extrapolated (kept), < beta_slow are
    # interpolated (/ factor), linear ramp between.
    def dim_of(rot):
        return d * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(math.floor(dim_of(beta_fast)), 0), min(math.ceil(dim_of(beta_slow)), d - 1)
    inv = plain(d, base)
    out = []
    for i in range(d // 2):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        keep = 1.0 - ramp
        out.append(inv[i] / factor * (1 - keep) + inv[i] * keep)
    return np.array(out), low, high


def test_yarn_frequencies_and_ramp_bounds():
    exp, low, high = yarn_expected(D, BASE, 8.0, 4096)
    # by hand: 64*ln(4096/(32*2pi))/(2 ln 1e4) = 10.47 -> 10; 64*ln(4096/(2pi))/(2 ln 1e4) = 22.51 -> 23
    assert (low, high) == (10, 23)
    r = build_rope(D, BASE, {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096}, 32768)
    np.testing.assert_allclose(r.inv_freq(), exp, rtol=1e-12)
    np.testing.assert_allclose(r.inv_freq()[:10], plain()[:10], rtol=1e-12)  # extrapolated
    np.testing.assert_allclose(r.inv_freq()[23:], plain()[23:] / 8.0, rtol=1e-12)  # interpolated
    # custom betas
    exp2, low2, high2 = yarn_expected(D, BASE, 4.0, 2048, beta_fast=16.0, beta_slow=2.0)
    r2 = build_rope(D, BASE, {"rope_type": "yarn", "factor": 4.0, "beta_fast": 16, "beta_slow": 2,
                              "original_max_position_embeddings": 2048}, 8192)
    np.testing.assert_allclose(r2.inv_freq(), exp2, rtol=1e-12)
    # original length defaults to the config's max_position_embeddings (HF)
    r3 = build_rope(D, BASE, {"type": "yarn", "factor": 8.0}, 4096)
    np.testing.assert_allclose(r3.inv_freq(), exp, rtol=1e-12)


def test_yarn_attention_factor():
    # YaRN sqrt(1/t) = 0.1 ln(s) + 1; with mscale and mscale_all_dim both set (DeepSeek)
    # the ratio (0.1 m ln s + 1) / (0.1 m_all ln s + 1); an explicit attention_factor wins
    base_cfg = {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096}
    assert build_rope(D, BASE, base_cfg, None).attention_scale == pytest.approx(0.1 * math.log(8) + 1)
    assert 1.2079 < 0.1 * math.log(8) + 1 < 1.2080
    r = build_rope(D, BASE, {**base_cfg, "mscale": 0.707, "mscale_all_dim": 0.5}, None)
    assert r.attention_scale == pytest.approx((0.0707 * math.log(8) + 1) / (0.05 * math.log(8) + 1))
    r = build_rope(D, BASE, {**base_cfg, "mscale": 1.0, "mscale_all_dim": 1.0}, None)
    assert r.attention_scale == pytest.approx(1.0)
    r = build_rope(D, BASE, {**base_cfg, "attention_factor": 1.5}, None)
    assert r.attention_scale == 1.5


def test_llama3():
    # Meta Llama 3.1 (HF _compute_llama3_parameters), written out per frequency
    factor, lo, hi, old = 8.0, 1.0, 4.0, 8192
    exp = []
    for f in plain(D, 500000.0):
        wl = 2 * math.pi / f
        if wl < old / hi:
            exp.append(f)  # high frequency: unchanged
        elif wl > old / lo:
            exp.append(f / factor)  # low frequency: interpolated
        else:
            s = (old / wl - lo) / (hi - lo)
            exp.append((1 - s) * f / factor + s * f)
    exp = np.array(exp)
    cfg = {"rope_type": "llama3", "factor": factor, "low_freq_factor": lo, "high_freq_factor": hi,
           "original_max_position_embeddings": old}
    r = build_rope(D, 500000.0, cfg, 131072)
    got = r.inv_freq()
    np.testing.assert_allclose(got, exp, rtol=1e-12)
    assert (got == plain(D, 500000.0)).any() and (got == plain(D, 500000.0) / 8).any()  # all 3 regions


def _rotate_reference(x, inv, offset, traditional=False):
    """Rotate (B, H, L, D) by angle (offset + l) * inv_freq, HF rotate_half convention
    (pairs (i, i + D/2)), or interleaved pairs (2i, 2i+1) when traditional."""
    L, d = x.shape[2], x.shape[3]
    ang = (offset + np.arange(L))[:, None] * inv[None, :]  # (L, D/2)
    cos, sin = np.cos(ang), np.sin(ang)
    if traditional:
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = a * cos - b * sin
        out[..., 1::2] = a * sin + b * cos
        return out
    a, b = x[..., : d // 2], x[..., d // 2 :]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize("scaling", [
    None,
    {"type": "linear", "factor": 4.0},
    {"type": "dynamic", "factor": 4.0},
    {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64},
    {"type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64},
])
def test_rotation_uses_the_frequencies(scaling, traditional):
    d, L0 = 32, 16
    r = build_rope(d, BASE, scaling, L0, traditional=traditional)
    x = np.random.default_rng(0).normal(size=(1, 2, 40, d)).astype(np.float32)
    for offset in (0, 7):
        got = np.array(r(mx.array(x), offset=offset))
        exp = _rotate_reference(x.astype(np.float64), r.inv_freq(40 + offset), offset, traditional)
        np.testing.assert_allclose(got, exp, atol=2e-4)


@pytest.mark.parametrize("scaling, match", [
    ({"type": "su_magic", "factor": 2.0}, "type 'su_magic' is not supported"),
    ({"type": "linear", "rope_type": "yarn", "factor": 2.0}, "keep one of them"),
    ({"factor": 2.0}, "has no 'type'"),
    ({"type": "linear"}, r"rope_scaling\['factor'\] is required"),
    ({"type": "linear", "factor": "8"}, "must be a finite number"),
    ({"type": "linear", "factor": True}, "must be a finite number"),
    ({"type": "dynamic", "factor": float("nan")}, "must be a finite number"),
    ({"type": "linear", "factor": 0.5}, "must be >= 1"),
    ({"type": "yarn", "factor": -2.0}, "must be >= 1"),
    ({"type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0}, "high_freq_factor >"),
    ({"type": "yarn", "factor": 8.0, "beta_fast": 1, "beta_slow": 32}, "beta_fast > beta_slow"),
    ("linear", "must be a dict"),
])
def test_bad_scaling_is_one_line_config_error(scaling, match):
    with pytest.raises(ConfigError, match=match) as e:
        build_rope(D, BASE, scaling, 4096)
    assert "\n" not in str(e.value)


def test_bad_dims_and_base():
    with pytest.raises(ConfigError, match="even positive head dimension"):
        build_rope(33, BASE, None, None)
    with pytest.raises(ConfigError, match="rope_theta"):
        build_rope(D, 0.5, None, None)
    with pytest.raises(ConfigError, match="needs max_position_embeddings"):
        build_rope(D, BASE, {"type": "dynamic", "factor": 2.0}, None)
    assert scaling_type({"rope_type": "LLAMA3", "factor": 2}) == "llama3"


def test_rope_of_reads_the_model_args():
    args = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1, "intermediate_size": 64,
            "num_attention_heads": 2, "vocab_size": 16, "max_position_embeddings": 512}  # fmt: skip
    model = Model(ModelArgs.from_dict(args))
    assert rope_of(model) == (None, 512)
    model.set_rope({"type": "linear", "factor": 4.0}, 2048)
    assert rope_of(model) == ({"type": "linear", "factor": 4.0}, 2048)
    assert rope_of(nn.Linear(2, 2)) == (None, None)  # no .args: nothing recorded
