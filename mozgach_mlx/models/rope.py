"""Rotary position embeddings and every scaling used for context extension.

One factory, :func:`build_rope`, reads a Hugging Face ``rope_scaling`` dict (either the
``type`` or the ``rope_type`` spelling) and returns a small module:

    none / "default"  inv_freq_i = base^(-2i/d)
    "linear"          inv_freq_i / factor                       (Position Interpolation,
                                                                  Chen et al. 2023)
    "dynamic"         base' = base * (factor*L/L0 - (factor-1))^(d/(d-2)), L = max(len, L0)
                                                                 (NTK-aware, recomputed
                                                                  from the current length)
    "yarn"            per-frequency blend of interpolation and extrapolation between the
                      beta_fast/beta_slow correction range, plus an attention factor
                      0.1*ln(factor)+1 (Peng et al. 2023; HF ``_compute_yarn_parameters``)
    "llama3"          low frequencies / factor, high kept, smooth ramp in between
                      (Meta Llama 3.1; HF ``_compute_llama3_parameters``)

Every module has ``.attention_scale`` (HF's ``attention_factor``: the factor by which
yarn scales cos/sin, i.e. q and k; 1.0 for the others) and ``inv_freq(seq_len=None)``
returning the float64 inverse frequencies actually used. The modules only *rotate*;
the model folds ``attention_scale**2`` into the softmax scale, which is the same
arithmetic as scaling q and k (what mlx-lm and HF do) without two extra multiplies.

Shapes: ``rope(x, offset)`` with x (B, H, L, D) -> (B, H, L, D), positions
``offset .. offset+L-1``.
"""

from __future__ import annotations

import math
from numbers import Real

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import ConfigError

SUPPORTED_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
_ALIASES = {"none": "default"}


def scaling_type(scaling: dict | None) -> str:
    """The normalized type name of a ``rope_scaling`` dict ("default" when absent).

    Accepts both spellings (``type`` as in older HF configs, ``rope_type`` as in newer);
    if both are present they must agree.
    """
    if not scaling:
        return "default"
    if not isinstance(scaling, dict):
        raise ConfigError(f"rope_scaling must be a dict like {{'type': 'linear', 'factor': 4.0}}, "
                          f"got {type(scaling).__name__}")
    t1, t2 = scaling.get("type"), scaling.get("rope_type")
    if t1 is not None and t2 is not None and str(t1).lower() != str(t2).lower():
        raise ConfigError(f"rope_scaling has type={t1!r} and rope_type={t2!r}; keep one of them")
    t = t1 if t1 is not None else t2
    if t is None:
        raise ConfigError(f"rope_scaling {scaling} has no 'type' (or 'rope_type'); add one of "
                          f"{', '.join(SUPPORTED_TYPES)}")
    if not isinstance(t, str):
        raise ConfigError(f"rope_scaling type must be a string, got {t!r}")
    t = _ALIASES.get(t.lower(), t.lower())
    if t not in SUPPORTED_TYPES:
        raise ConfigError(f"rope_scaling type {t!r} is not supported; use one of "
                          f"{', '.join(SUPPORTED_TYPES)} (or remove rope_scaling)")
    return t


def _number(scaling: dict, key: str, default=None, *, minimum: float | None = None,
            strict: bool = False) -> float:
    v = scaling.get(key, default)
    if v is None:
        raise ConfigError(f"rope_scaling[{key!r}] is required for type {scaling_type(scaling)!r}")
    if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(float(v)):
        raise ConfigError(f"rope_scaling[{key!r}] must be a finite number, got {v!r}")
    v = float(v)
    if minimum is not None and (v <= minimum if strict else v < minimum):
        op = ">" if strict else ">="
        raise ConfigError(f"rope_scaling[{key!r}] must be {op} {minimum:g}, got {v:g}")
    return v


def default_inv_freq(dims: int, base: float) -> np.ndarray:
    """base^(-2i/d) for i = 0 .. d/2-1, float64."""
    return 1.0 / (base ** (np.arange(0, dims, 2, dtype=np.float64) / dims))


def _yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_parameters(dims: int, base: float, scaling: dict,
                    max_position_embeddings: int | None) -> tuple[np.ndarray, float]:
    """(inv_freq, attention_factor) for YaRN, following HF ``_compute_yarn_parameters``."""
    factor = _number(scaling, "factor", minimum=1.0)
    orig = scaling.get("original_max_position_embeddings") or max_position_embeddings
    if orig is None:
        raise ConfigError("yarn rope_scaling needs original_max_position_embeddings "
                          "(or max_position_embeddings in the config)")
    orig = _number({"original_max_position_embeddings": orig}, "original_max_position_embeddings",
                   minimum=0, strict=True)
    beta_fast = _number(scaling, "beta_fast", 32.0, minimum=0, strict=True)
    beta_slow = _number(scaling, "beta_slow", 1.0, minimum=0, strict=True)
    if beta_fast <= beta_slow:
        raise ConfigError(f"yarn rope_scaling needs beta_fast > beta_slow, got {beta_fast:g} <= {beta_slow:g}")

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_get_mscale(factor, mscale) / _yarn_get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_get_mscale(factor)
    else:
        attention_factor = _number(scaling, "attention_factor", minimum=0, strict=True)

    def correction_dim(num_rotations: float) -> float:
        # the dimension index whose wavelength makes `num_rotations` turns over `orig` tokens
        return dims * math.log(orig / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dims - 1)
    if low == high:
        high += 0.001  # HF: prevent a zero-width ramp
    ramp = np.clip((np.arange(dims // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    extrapolation = 1.0 - ramp  # 1 for high-frequency dims (kept), 0 for low (interpolated)
    inv_extra = default_inv_freq(dims, base)
    inv_inter = inv_extra / factor
    inv_freq = inv_inter * (1.0 - extrapolation) + inv_extra * extrapolation
    return inv_freq, float(attention_factor)


def llama3_inv_freq(dims: int, base: float, scaling: dict) -> np.ndarray:
    """Llama 3.1 frequency-dependent scaling, following HF ``_compute_llama3_parameters``."""
    factor = _number(scaling, "factor", minimum=1.0)
    low_ff = _number(scaling, "low_freq_factor", 1.0, minimum=0, strict=True)
    high_ff = _number(scaling, "high_freq_factor", 4.0, minimum=0, strict=True)
    if high_ff <= low_ff:
        raise ConfigError(f"llama3 rope_scaling needs high_freq_factor > low_freq_factor, "
                          f"got {high_ff:g} <= {low_ff:g}")
    old_len = _number(scaling, "original_max_position_embeddings", 8192, minimum=0, strict=True)
    inv = default_inv_freq(dims, base)
    wavelen = 2 * math.pi / inv
    low_wl, high_wl = old_len / low_ff, old_len / high_ff
    out = np.where(wavelen > low_wl, inv / factor, inv)
    smooth = (old_len / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = (wavelen >= high_wl) & (wavelen <= low_wl)
    return np.where(medium, smoothed, out)


class RoPE(nn.Module):
    """Rotation with fixed inverse frequencies (default, linear, yarn, llama3)."""

    def __init__(self, dims: int, inv_freq: np.ndarray, *, traditional: bool = False,
                 attention_scale: float = 1.0, rope_type: str = "default") -> None:
        super().__init__()
        self.dims = dims
        self.traditional = traditional
        self.attention_scale = float(attention_scale)
        self.rope_type = rope_type
        self._inv = np.asarray(inv_freq, dtype=np.float64)
        # mx.fast.rope takes periods (1 / inv_freq); underscore keeps it out of parameters()
        self._freqs = mx.array((1.0 / self._inv).astype(np.float32))

    def inv_freq(self, seq_len: int | None = None) -> np.ndarray:
        return self._inv.copy()

    def extra_repr(self) -> str:
        return f"{self.dims}, type={self.rope_type}, attention_scale={self.attention_scale:g}"

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        return mx.fast.rope(x, self.dims, traditional=self.traditional, base=None, scale=1.0,
                            offset=offset, freqs=self._freqs)


class DynamicNTKRoPE(nn.Module):
    """NTK-aware scaling whose base grows with the current length (HF "dynamic").

    For total length L <= max_position_embeddings it is the plain RoPE.
    """

    def __init__(self, dims: int, base: float, factor: float, max_position_embeddings: int, *,
                 traditional: bool = False) -> None:
        super().__init__()
        self.dims = dims
        self.base = float(base)
        self.factor = float(factor)
        self.max_position_embeddings = int(max_position_embeddings)
        self.traditional = traditional
        self.attention_scale = 1.0
        self.rope_type = "dynamic"

    def scaled_base(self, seq_len: int) -> float:
        L = max(int(seq_len), self.max_position_embeddings)
        ratio = self.factor * L / self.max_position_embeddings - (self.factor - 1)
        return self.base * ratio ** (self.dims / (self.dims - 2))

    def inv_freq(self, seq_len: int | None = None) -> np.ndarray:
        return default_inv_freq(self.dims, self.scaled_base(seq_len or 0))

    def extra_repr(self) -> str:
        return f"{self.dims}, type=dynamic, factor={self.factor:g}, L0={self.max_position_embeddings}"

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        base = self.scaled_base(x.shape[-2] + int(offset))
        return mx.fast.rope(x, self.dims, traditional=self.traditional, base=base, scale=1.0,
                            offset=offset)


def rope_of(model: nn.Module) -> tuple[dict | None, int | None]:
    """``(rope_scaling, max_position_embeddings)`` of ``model.args`` (None where absent):
    the RoPE a model runs with, as adapters record it and ``model.set_rope`` takes it."""
    args = getattr(model, "args", None)
    return getattr(args, "rope_scaling", None), getattr(args, "max_position_embeddings", None)


def build_rope(dims: int, base: float, scaling: dict | None, max_position_embeddings: int | None,
               traditional: bool = False) -> RoPE | DynamicNTKRoPE:
    """Build the RoPE module for one attention layer.

    Args:
        dims: rotated dimensions (the head dim), even.
        base: ``rope_theta``.
        scaling: HF ``rope_scaling`` dict or None.
        max_position_embeddings: the config's value (dynamic's threshold L0; yarn's
            default original length).
        traditional: rotate interleaved pairs (GPT-J style) instead of halves.

    Raises:
        ConfigError: unknown type, missing/non-numeric/too-small factor, bad dims or base.
    """
    if dims <= 0 or dims % 2:
        raise ConfigError(f"RoPE needs an even positive head dimension, got {dims}")
    if isinstance(base, bool) or not isinstance(base, Real) or not base > 1:
        raise ConfigError(f"rope_theta must be a number > 1, got {base!r}")
    t = scaling_type(scaling)
    if t == "default":
        return RoPE(dims, default_inv_freq(dims, base), traditional=traditional)
    if t == "linear":
        factor = _number(scaling, "factor", minimum=1.0)
        return RoPE(dims, default_inv_freq(dims, base) / factor, traditional=traditional, rope_type=t)
    if t == "dynamic":
        factor = _number(scaling, "factor", minimum=1.0)
        if not max_position_embeddings:
            raise ConfigError("dynamic rope_scaling needs max_position_embeddings (the trained length)")
        return DynamicNTKRoPE(dims, base, factor, max_position_embeddings, traditional=traditional)
    if t == "yarn":
        inv, attn = yarn_parameters(dims, base, scaling, max_position_embeddings)
        return RoPE(dims, inv, traditional=traditional, attention_scale=attn, rope_type=t)
    # llama3 (scaling_type() rejected everything else)
    return RoPE(dims, llama3_inv_freq(dims, base, scaling), traditional=traditional, rope_type=t)
