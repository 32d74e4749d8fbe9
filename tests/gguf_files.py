"""Tiny GGUF files for the tests, written the way llama.cpp's ``convert_hf_to_gguf.py``
writes them, with the ``gguf`` package (llama.cpp's own Python writer and quantizers).

``write_gguf(path, cfg, weights)`` takes a Hugging Face config dict and HF-named float32
weights (numpy), permutes the q/k rows of Llama/Mistral for llama.cpp's interleaved RoPE
(``LlamaModel.permute``), renames the tensors and quantizes the matrices as asked.
The tokenizer is byte-level BPE over :data:`VOCAB` ids (bytes 0-255 as GPT-2's byte
characters, so id = byte value as in :class:`mozgach_mlx.tokenizer.ByteTokenizer`, then
``<s>``, ``</s>``, ``<pad>`` and one merge, two spaces).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the gguf package writes the test files (test extra)")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import quantize  # noqa: E402

NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
         "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
         "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down"}


VOCAB = 260  # the models' vocab_size must be this


def gguf_name(hf: str) -> str:
    if hf == "rope_freqs.weight":  # llama.cpp's own name (Llama 3.x)
        return hf
    stem, suffix = hf.rsplit(".", 1)
    if stem.startswith("model.layers."):
        _, _, layer, rest = stem.split(".", 3)
        return f"blk.{layer}.{NAMES[rest]}.{suffix}"
    return f"{NAMES[stem]}.{suffix}"


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: each head's rotate-half rows -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def bytes_to_unicode() -> list[str]:
    """GPT-2's printable character for each byte value 0..255."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs, strict=True))
    return [chr(table[b]) for b in range(256)]


def random_k_blocks(rows: int, cols: int, qtype, seed: int = 0) -> np.ndarray:
    """Valid random K-quant blocks (any bits are valid data) with small super-block scales,
    as raw bytes (rows, cols // 256 * block_bytes)."""
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows * cols // block, nbytes), dtype=np.uint8)
    d = np.array([2e-3], np.float16).view(np.uint8)
    if qtype == Q.Q4_K:  # d, dmin (fp16) come first
        raw[:, 0:2] = d
        raw[:, 2:4] = np.array([1e-3], np.float16).view(np.uint8)
    elif qtype == Q.Q6_K:  # d (fp16) comes last
        raw[:, -2:] = d
    else:
        raise ValueError(qtype)
    return raw.reshape(rows, -1)


def write_gguf(path: Path, cfg: dict, weights: dict[str, np.ndarray], *, arch: str | None = None,
               types: dict[str, object] | None = None, default=Q.F32, raw: dict[str, tuple] | None = None,
               meta: dict | None = None) -> Path:
    """Write ``weights`` (HF names, float32) as a GGUF file.

    ``types``: HF name -> GGML type for that matrix (default ``default``; 1-D tensors are
    always F32). ``raw``: HF name -> (raw bytes, type) written as given (random K-quant
    blocks). ``meta``: extra key -> value pairs (ints/floats/strings).
    """
    model_type = cfg["model_type"]
    arch = arch or {"mistral": "llama"}.get(model_type, model_type)
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg.get("max_position_embeddings", 2048))
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-5))
    w.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    w.add_rope_dimension_count(head_dim)
    if cfg.get("head_dim"):  # llama.cpp writes the head size when it is not hidden / heads
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(1)
    tokens = bytes_to_unicode() + ["<s>", "</s>", "<pad>", "ĠĠ"]
    assert cfg["vocab_size"] == len(tokens) == VOCAB, cfg["vocab_size"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * 256 + [3, 3, 3, 1])
    w.add_token_merges(["Ġ Ġ"])
    w.add_bos_token_id(256)
    w.add_eos_token_id(257)
    w.add_pad_token_id(258)
    w.add_add_bos_token(True)
    for k, v in (meta or {}).items():
        if isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        else:
            w.add_uint32(k, int(v))
    types, raw = types or {}, raw or {}
    for hf, x in weights.items():
        x = np.asarray(x, np.float32)
        if arch == "llama" and ".self_attn.q_proj." in hf:
            x = permute(x, heads)
        elif arch == "llama" and ".self_attn.k_proj." in hf:
            x = permute(x, kv)
        name = gguf_name(hf)
        if hf in raw:
            data, qtype = raw[hf]
            w.add_tensor(name, data, raw_dtype=qtype)
            continue
        qtype = Q.F32 if x.ndim == 1 else types.get(hf, default)
        if qtype == Q.F32:
            w.add_tensor(name, x)
        elif qtype == Q.F16:
            w.add_tensor(name, x.astype(np.float16))
        else:
            w.add_tensor(name, quantize(x, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
