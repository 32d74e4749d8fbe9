"""A fused checkpoint: one adapter merged into a dequantized copy of its base, saved in
the Hugging Face layout, and checked before anyone can use it.

``W' = dequantize(W) + s B^T A^T`` for every adapted layer (``lora.fuse(dequantize=True)``),
every other quantized layer dequantized too, trained norms / embeddings kept, the RoPE
scaling the adapter was trained with in config.json; then cast to ``dtype`` and, if asked,
re-quantized (``bits``, the base's group size).

The check: logits on a fixed probe input of (a) the base, (b) the base with the adapter
(what training optimised) and (c) the fused checkpoint *as written*, re-loaded from disk.
All three are computed in float32, so only the stored weights can differ.

* A lossless export (float32, not re-quantized) must give (b) up to float32 rounding:
  ``max|c - b| <= FP32_RTOL * max|b|``. A sum of n float32 terms computed in two orders
  differs by up to ``n eps`` relative (Higham, 3.1); 1e-4 is ``n = 840`` there, and the
  measured gap is ~1e-6 (tests/test_export.py).
* A lossy export (float16 / bfloat16, or re-quantized to 4 or 8 bits) must keep the
  adapter: ``max|c - b| <= LOSSY_FRACTION * max|b - a|``. Re-quantizing a 4-bit base plus a
  small update to 4 bits with the same groups snaps most weights back to the base's grid,
  so (c) falls back to (a): the adapter silently dropped, which mlx-lm users report from
  its fuse; here it is an error that names the way out.
"""

from __future__ import annotations

import gc
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .. import lora, models, quant
from ..errors import ConfigError
from ..models.paths import embedding_path, get_module

__all__ = ["DTYPES", "FP32_RTOL", "LOSSY_FRACTION", "PROBE_TOKENS", "FusedCheck", "fuse_and_save", "probe_tokens"]

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
PROBE_TOKENS = 64  # one sequence; >= quant.DEQUANT_MIN_ROWS, so the CPU takes its dequantize path
FP32_RTOL = 1e-4
LOSSY_FRACTION = 0.25


@dataclass
class FusedCheck:
    """The fused checkpoint's logits against base + adapter on the probe input.

    ``max_diff``: max |fused - (base + adapter)|; ``adapter_effect``: max |(base +
    adapter) - base|; ``allowed``: the bound ``max_diff`` must stay under; ``lossless``:
    float32 and not re-quantized (the fp32 bound applies).
    """

    max_diff: float
    adapter_effect: float
    allowed: float
    lossless: bool

    @property
    def ok(self) -> bool:
        return bool(self.max_diff <= self.allowed)  # False for NaN

    def to_dict(self) -> dict:
        return asdict(self) | {"ok": self.ok}

    def line(self) -> str:
        return (f"max |logits - (base + adapter)| = {self.max_diff:.3g} (allowed {self.allowed:.3g}); "
                f"the adapter moves them by {self.adapter_effect:.3g}")

    def failure(self, name: str, dtype: str, quantize: int | None) -> str:
        if quantize is not None:
            fix = (f"{quantize}-bit re-quantization loses the adapter (its error is over {LOSSY_FRACTION:.0%} of "
                   "the adapter's effect); export without --quantize")
            fix += " or with --quantize 8" if quantize == 4 else ""
        elif not self.lossless:
            fix = (f"{dtype} weights lose the adapter (their error is over {LOSSY_FRACTION:.0%} of the adapter's "
                   "effect); export with --dtype float32")
        else:
            fix = "this is a bug in mozgach's fuse; please report it with the adapter"
        return f"fused {name}: {self.line()}: {fix}; nothing was written"


def probe_tokens(vocab_size: int, n: int = PROBE_TOKENS, seed: int = 0) -> mx.array:
    """``(1, n)`` token ids drawn from numpy's seeded generator (the same on every machine)."""
    return mx.array(np.random.default_rng(seed).integers(0, vocab_size, (1, n)), dtype=mx.int32)


def _logits(model: nn.Module, tokens: mx.array) -> mx.array:
    out = model(tokens).astype(mx.float32)
    mx.eval(out)
    return out


def _group_size(qcfg: dict | None) -> int:
    g = (qcfg or {}).get("group_size")
    return g if g in quant.GROUP_SIZES else quant.DEFAULT_GROUP_SIZE


def fuse_and_save(model: nn.Module, tok, adapter_dir: str | Path, dest: str | Path, *, dtype: str = "float32",
                  quantize: int | None = None) -> FusedCheck:
    """Fuse the adapter at ``adapter_dir`` into ``model`` (a fresh base; changed in place
    and released), save it to ``dest`` with ``tok``, re-load it and check its logits.

    Args:
        dtype: floating dtype of the saved weights (``float32``, ``float16``, ``bfloat16``).
        quantize: 4 or 8 to re-quantize the fused weights (the base's group size, or 64;
            embeddings too if the base's were quantized).

    Returns:
        The :class:`FusedCheck`; the caller refuses the export when it is not ``ok``.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if quantize is not None:
        quant.check_settings(quantize, quant.DEFAULT_GROUP_SIZE)
    tokens = probe_tokens(model.args.vocab_size)
    model.set_dtype(mx.float32)  # floating parameters, quantization scales included
    base = _logits(model, tokens)
    lora.load(model, adapter_dir)
    ref = _logits(model, tokens)
    qcfg = quant.quantization_config(model)
    embeddings_quantized = isinstance(get_module(model, embedding_path(model)), nn.QuantizedEmbedding)
    lora.fuse(model, dequantize=True)
    model.set_dtype(DTYPES[dtype])
    if quantize is not None:
        quant.quantize_model(model, quantize, _group_size(qcfg), quantize_embeddings=embeddings_quantized)
    models.save(model, tok, dest)
    del model
    gc.collect()
    fused, _ = models.load(dest)  # what was written, not what is in memory
    fused.set_dtype(mx.float32)
    got = _logits(fused, tokens)
    del fused
    lossless = dtype == "float32" and quantize is None
    diff = float(mx.abs(got - ref).max())
    effect = float(mx.abs(ref - base).max())
    tol = FP32_RTOL * max(float(mx.abs(ref).max()), 1.0)
    return FusedCheck(diff, effect, tol if lossless else max(tol, LOSSY_FRACTION * effect), lossless)
