"""The LoRA layer: a frozen linear map plus a trainable low-rank update, by composition."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from .. import quant
from ..errors import ConfigError
from ..models.paths import is_linear, linear_dims
from .config import LoRAConfig, scale_of

__all__ = ["LoRALinear"]


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update.

    .. math::

        y = \\mathrm{linear}(x) + s \\cdot (\\mathrm{dropout}(x)\\, A)\\, B,\\qquad
        A \\in \\mathbb{R}^{d_{in} \\times r},\\; B \\in \\mathbb{R}^{r \\times d_{out}},\\;
        s = \\alpha / r \\text{ (or } \\alpha/\\sqrt{r}\\text{)}

    Args:
        linear: the base layer (``nn.Linear``, ``nn.QuantizedLinear`` or a subclass such as
            ``quant.QuantizedLinear``); kept as ``self.linear`` and frozen.
        r: rank.
        alpha: scale numerator.
        dropout: dropout probability on the adapter input (active in training mode only).
        rslora: use ``alpha / sqrt(r)``.

    The defaults of ``r``, ``alpha``, ``dropout`` and ``rslora`` are :class:`LoRAConfig`'s.
        key: PRNG key for ``lora_a``'s initialisation (default: the global generator).

    Shapes: x (..., in) -> (..., out); ``lora_a`` (in, r) uniform in ±1/sqrt(in),
    ``lora_b`` (r, out) zero.
    """

    def __init__(
        self,
        linear: nn.Module,
        r: int = LoRAConfig.r,
        alpha: float = LoRAConfig.alpha,
        dropout: float = LoRAConfig.dropout,
        rslora: bool = LoRAConfig.rslora,
        *,
        key: mx.array | None = None,
    ) -> None:
        super().__init__()
        if not is_linear(linear):
            raise ConfigError(f"LoRA wraps Linear or QuantizedLinear layers, got {type(linear).__name__}.")
        self.linear = linear
        self.linear.freeze()
        self.input_dims, self.output_dims = linear_dims(linear)
        self.r, self.alpha, self.rslora = r, float(alpha), rslora
        self.scale = scale_of(r, alpha, rslora)
        self.dropout = nn.Dropout(p=dropout)
        self.reset_parameters(key)

    def reset_parameters(self, key: mx.array | None = None) -> None:
        """Fresh adapter: ``lora_a`` ~ U(±1/sqrt(in)), ``lora_b`` = 0 (fp32)."""
        bound = 1.0 / math.sqrt(self.input_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (self.input_dims, self.r), key=key)
        self.lora_b = mx.zeros((self.r, self.output_dims))

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)  # (..., out)
        z = (self.dropout(x) @ self.lora_a) @ self.lora_b  # (..., r) -> (..., out)
        return y + (self.scale * z).astype(y.dtype)

    def delta_weight(self) -> mx.array:
        """The update in the base weight's layout: ``s * B^T A^T``, (out, in), fp32."""
        return self.scale * (self.lora_b.T @ self.lora_a.T)

    def fuse(self, dequantize: bool = False) -> nn.Module:
        """A plain layer computing the same map: ``W + s B^T A^T`` (bias kept).

        A quantized base is dequantized, updated and re-quantized with its own settings
        (same class, group size, bits, mode), unless ``dequantize``, which returns an
        fp32 ``nn.Linear``. A float base keeps its dtype.
        """
        linear = self.linear
        quantized = isinstance(linear, nn.QuantizedLinear)
        w = quant.dequantized_weight(linear) if quantized else linear.weight
        dtype = mx.float32 if quantized else w.dtype
        fused = nn.Linear(self.input_dims, self.output_dims, bias="bias" in linear)
        fused.weight = (w.astype(mx.float32) + self.delta_weight()).astype(dtype)
        if "bias" in linear:
            fused.bias = linear.bias
        if quantized and not dequantize:
            fused = type(linear).from_linear(fused, linear.group_size, linear.bits, mode=linear.mode)
        fused.freeze()
        return fused
