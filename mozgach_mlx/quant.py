"""4-bit / 8-bit group-wise quantization of the base model (the "Q" of QLoRA).

MLX's affine quantization: each group of ``group_size`` consecutive input weights of a
row shares an fp scale and bias, w ~ scale * q + bias with q in [0, 2^bits).

On the CPU backend ``mx.quantized_matmul`` has no fast kernel (~2 GFLOP/s), while
dequantizing the weight and running an fp32 GEMM through OpenBLAS is fast. Measured on
the 2-core dev machine (4-bit, group 64, fp32 activations; see benchmarks/RESULTS.md):

    x rows  weight        quantized_matmul   dequantize + fp32 matmul
    1       2048 x 2048     7.7 ms             21.4 ms
    4       2048 x 2048    33.0 ms             33.7 ms
    8       2048 x 2048    66.6 ms             31.1 ms
    16      2048 x 2048    84.3 ms             24.5 ms
    512     2048 x 2048  2401 ms               62.2 ms   (39x)
    2048     256 x  768   411 ms               14.1 ms   (29x)

so our :class:`QuantizedLinear` dequantizes per call when the input has at least
``DEQUANT_MIN_ROWS`` rows (training, prefill) and keeps ``quantized_matmul`` for decoding
a token at a time. On Metal / CUDA it always uses ``quantized_matmul``.
Override with ``MOZGACH_QMATMUL=dequant|quantized|auto``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path

from . import backend as _backend
from . import settings as _settings
from .errors import ConfigError

DEQUANT_MIN_ROWS = 8
BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64  # when quantizing full-precision weights and no group size is given


def _use_dequant(rows: int) -> bool:
    mode = _settings.qmatmul()
    if mode == "dequant":
        return True
    if mode == "quantized":
        return False
    return rows >= DEQUANT_MIN_ROWS and _backend.backend() == "cpu"


class QuantizedLinear(nn.QuantizedLinear):
    """``nn.QuantizedLinear`` (same parameters: weight, scales, biases[, bias]) whose
    forward picks the faster of ``quantized_matmul`` and dequantize + fp32 matmul.

    Shapes: x (..., input_dims) -> (..., output_dims).
    """

    def __call__(self, x: mx.array) -> mx.array:
        rows = x.size // x.shape[-1]
        if not _use_dequant(rows):
            return super().__call__(x)
        w = dequantized_weight(self).astype(x.dtype)  # (out, in)
        y = x @ w.T
        if "bias" in self:
            y = y + self["bias"]
        return y


def dequantized_weight(q: nn.Module) -> mx.array:
    """The full-precision weight of a quantized Linear or Embedding (MLX's or ours)."""
    return mx.dequantize(q["weight"], q["scales"], q.get("biases"), group_size=q.group_size, bits=q.bits,
                         mode=q.mode)


class QuantizedEmbedding(nn.QuantizedEmbedding):
    """``nn.QuantizedEmbedding`` whose ``as_linear`` (the tied head) follows the same
    dequantize-on-CPU rule as :class:`QuantizedLinear`."""

    def as_linear(self, x: mx.array) -> mx.array:
        rows = x.size // x.shape[-1]
        if not _use_dequant(rows):
            return super().as_linear(x)
        w = dequantized_weight(self).astype(x.dtype)  # (V, d)
        return x @ w.T


@dataclass
class QuantReport:
    bits: int
    group_size: int
    n_quantized: int  # modules replaced
    bytes_before: int  # all model parameters, before
    bytes_after: int

    @property
    def ratio(self) -> float:
        return self.bytes_before / max(self.bytes_after, 1)

    def __str__(self) -> str:
        return (f"quantized {self.n_quantized} modules to {self.bits}-bit (group {self.group_size}): "
                f"{self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB "
                f"({self.ratio:.2f}x smaller)")


def model_bytes(model: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def check_settings(bits: int, group_size: int) -> None:
    if bits not in BITS:
        raise ConfigError(f"quantize bits must be one of {BITS}, got {bits!r}")
    if group_size not in GROUP_SIZES:
        raise ConfigError(f"quantization group_size must be one of {GROUP_SIZES}, got {group_size!r}")


def _is_embedding_path(path: str) -> bool:
    return path.endswith("embed_tokens") or path.endswith("lm_head")


def quantize_modules(model: nn.Module,
                     settings: Callable[[str, nn.Module], tuple[int, int] | None]) -> int:
    """Replace every Linear / Embedding for which ``settings(path, module)`` returns
    ``(group_size, bits)`` by our quantized class, in place. Returns how many."""
    count = 0

    def swap(path: str, m: nn.Module):
        nonlocal count
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            return m
        if not isinstance(m, (nn.Linear, nn.Embedding)):
            return m
        s = settings(path, m)
        if s is None:
            return m
        group_size, bits = s
        count += 1
        if isinstance(m, nn.Linear):
            return QuantizedLinear.from_linear(m, group_size, bits)
        return QuantizedEmbedding.from_embedding(m, group_size, bits)

    leaves = tree_map_with_path(swap, model.leaf_modules(), is_leaf=nn.Module.is_module)
    model.update_modules(leaves)
    return count


def quantize_model(model: nn.Module, bits: int = 4, group_size: int = 64,
                   quantize_embeddings: bool = False) -> QuantReport:
    """Quantize every Linear of ``model`` in place (embeddings and lm_head too when
    ``quantize_embeddings``). Layers whose input width is not a multiple of
    ``group_size`` stay in full precision.
    """
    check_settings(bits, group_size)
    before = model_bytes(model)

    def settings(path: str, m: nn.Module):
        if _is_embedding_path(path) and not quantize_embeddings:
            return None
        in_dims = m.weight.shape[-1]
        return (group_size, bits) if in_dims % group_size == 0 else None

    n = quantize_modules(model, settings)
    mx.eval(model.parameters())
    return QuantReport(bits, group_size, n, before, model_bytes(model))


def quantization_config(model: nn.Module) -> dict | None:
    """The ``"quantization"`` entry of config.json describing ``model`` (mlx-lm format):
    ``{"group_size", "bits", "mode"}`` of the quantized modules, None if there are none.
    Modules that differ from the most common setting get a per-path entry."""
    found = {path: (m.group_size, m.bits, m.mode) for path, m in model.named_modules()
             if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))}
    if not found:
        return None
    settings = list(found.values())
    gs, bits, mode = max(set(settings), key=settings.count)
    config: dict = {"group_size": gs, "bits": bits, "mode": mode}
    for path, s in found.items():
        if s != (gs, bits, mode):
            config[path] = {"group_size": s[0], "bits": s[1], "mode": s[2]}
    return config
