"""llama.cpp's LoRA adapter GGUF: what its ``convert_lora_to_gguf.py`` writes, and what
``llama-cli --lora FILE``, Ollama (``ADAPTER``) and LM Studio load over the base GGUF.

Metadata (checked by llama.cpp's ``llama_adapter_lora_init``): ``general.architecture``
equal to the base's, ``general.type = "adapter"``, ``adapter.type = "lora"`` and
``adapter.lora.alpha`` (float32). llama.cpp computes ``y = W x + (alpha / r) B (A x)`` with
``r`` read from B's shape, so alpha is written as ``scale * r``: our exact scale, rsLoRA's
``alpha / sqrt(r)`` included.

Tensors, for each adapted linear layer whose base tensor is ``NAME`` (``blk.3.attn_q.weight``):
``NAME.lora_a`` with ggml shape ``ne = [in, r]`` (numpy ``(r, in)``, PEFT's ``lora_A``) and
``NAME.lora_b`` with ``ne = [r, out]`` (numpy ``(out, r)``, PEFT's ``lora_B``), float32 as
the converter's default. llama.cpp's converter permutes the rows of q and k of
Llama/Mistral bases for its interleaved RoPE (``models/gguf.py``); B makes those rows, so
B's rows are permuted the same way and A is untouched:
``permute(W + s B^T A^T) = permute(W) + s permute(B^T) A^T``.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import AdapterError, CheckpointError, ConfigError
from ..lora import LoRAConfig
from ..models import gguf as gguf_format
from ..models.paths import natural_key

__all__ = ["GGUF_ARCHITECTURES", "gguf_lora_tensors", "rope_flags", "write_gguf_lora"]

# our model_type -> the general.architecture llama.cpp's converter writes for it
# (convert_hf_to_gguf.py converts MistralForCausalLM with its Llama class)
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}


def _architecture(model_type: str, base_arch: str | None) -> str:
    if model_type not in GGUF_ARCHITECTURES:
        raise ConfigError(f"--to gguf-lora: model_type {model_type!r} has no llama.cpp architecture here "
                          f"(supported: {', '.join(GGUF_ARCHITECTURES)}); export --to peft or --to fused instead")
    return base_arch or GGUF_ARCHITECTURES[model_type]


def gguf_lora_tensors(weights: dict[str, mx.array], args, *, permuted: bool) -> dict[str, np.ndarray]:
    """Our adapter tensors in llama.cpp's naming and layout.

    Args:
        weights: ``<layer path>.lora_a`` (in, r) and ``.lora_b`` (r, out), as
            :func:`mozgach_mlx.lora.read` returns them; nothing else.
        args: the base's ``ModelArgs`` (head counts for the q/k permutation).
        permuted: whether the base GGUF has llama.cpp's q/k row permutation (Llama/Mistral).

    Returns:
        ``{"blk.N.attn_q.weight.lora_a": (r, in), "....lora_b": (out, r)}``, float32 numpy
        (numpy's shape is ggml's ``ne`` reversed).
    """
    heads = {"self_attn.q_proj": args.num_attention_heads, "self_attn.k_proj": args.num_key_value_heads}
    out = {}
    for key, v in weights.items():
        path, leaf = key.rsplit(".", 1)
        if leaf not in ("lora_a", "lora_b"):
            raise AdapterError(f"{key}: trained in full, which llama.cpp's LoRA format cannot carry (it ignores "
                               "norms and needs low-rank embeddings); export --to fused or --to peft instead")
        name = gguf_format.gguf_name(f"{path}.weight")
        if name is None:
            raise AdapterError(f"{path}: no llama.cpp tensor corresponds to this layer; export --to fused or "
                               "--to peft instead")
        t = np.asarray(v.astype(mx.float32).T)  # A: (r, in); B: (out, r)
        proj = path.split(".", 3)[-1] if path.startswith("model.layers.") else None
        if leaf == "lora_b" and permuted and proj in heads:
            t = gguf_format.permute_rows(t, heads[proj])
        out[f"{name}.{leaf}"] = np.ascontiguousarray(t, dtype=np.float32)
    return dict(sorted(out.items(), key=lambda kv: natural_key(kv[0])))


def rope_flags(scaling: dict | None, max_position_embeddings: int | None) -> str:
    """The llama.cpp options that give a base the RoPE scaling an adapter was trained with.

    Raises:
        AdapterError: llama.cpp has no such scaling (dynamic NTK, llama3 without the
            base's rope_freqs): the GGUF LoRA alone could not reproduce the adapter.
    """
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
    factor = (scaling or {}).get("factor")
    if kind == "linear":
        return f"--rope-scaling linear --rope-scale {factor:g}"
    if kind == "yarn":
        orig = scaling.get("original_max_position_embeddings") or max_position_embeddings
        return f"--rope-scaling yarn --rope-scale {factor:g}" + (f" --yarn-orig-ctx {orig}" if orig else "")
    raise AdapterError(f"the adapter was trained with {kind} RoPE scaling, which llama.cpp cannot apply to a base "
                       "from the command line; export --to fused (its config.json carries the scaling) instead")


def write_gguf_lora(path: str | Path, weights: dict[str, mx.array], cfg: LoRAConfig, args, *,
                    name: str | None = None, base_gguf: str | Path | None = None) -> Path:
    """Write one adapter as a llama.cpp LoRA GGUF file at ``path``.

    Args:
        weights, args: as :func:`gguf_lora_tensors`.
        cfg: the adapter's config (its scale becomes ``adapter.lora.alpha = scale * r``).
        name: ``general.name``.
        base_gguf: the base's own GGUF file, when it has one: its ``general.architecture``
            is used and every tensor the adapter names must be in it (llama.cpp refuses
            the adapter otherwise).

    Raises:
        CheckpointError: the ``gguf`` package is missing, or ``base_gguf`` lacks a tensor.
        AdapterError / ConfigError: the adapter or the model family has no GGUF LoRA form.
    """
    try:
        import gguf
    except ImportError as e:
        raise CheckpointError("--to gguf-lora writes with the gguf package (llama.cpp's own writer); install it "
                              "with `pip install gguf`") from e
    base_arch, base_names = None, None
    if base_gguf is not None:
        meta, types = gguf_format.read_header(base_gguf)
        base_arch, base_names = meta.get("general.architecture"), set(types)
    arch = _architecture(args.model_type, base_arch)
    permuted = gguf_format.ARCHITECTURES.get(arch, (None, False))[1]
    tensors = gguf_lora_tensors(weights, args, permuted=permuted)
    if base_names is not None:
        missing = sorted({t.rsplit(".", 1)[0] for t in tensors} - base_names, key=natural_key)
        if missing:
            raise CheckpointError(f"{base_gguf}: has no tensor {missing[0]} that the adapter adapts; the adapter "
                                  "was trained over another base")
    w = gguf.GGUFWriter(str(path), arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    if name:
        w.add_name(name)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(cfg.scale * cfg.r))
    for key, t in tensors.items():
        w.add_tensor(key, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
