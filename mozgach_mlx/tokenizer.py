"""Tokenizers: a built-in byte-level tokenizer (the tiny model's) and a thin wrapper
over Hugging Face tokenizers (``tokenizer.json`` fast tokenizers, ``tokenizer.model``
sentencepiece, chat templates from ``tokenizer_config.json``).

Both expose the same small interface, which is all the rest of the library uses:

    encode(text, add_bos=True) -> list[int]   (BOS only if add_bos_token)
    decode(ids) -> str
    bos_token_id, eos_token_id, pad_token_id, vocab_size, add_bos_token
    has_chat_template
    apply_chat_template(messages, add_generation_prompt=False) -> str
    save(out_dir)
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import TokenizerError

BYTE_TOKENIZER_FILE = "mozgach_byte_tokenizer.json"


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; then BOS, EOS, PAD.

    The default chat template renders each message as ``<|role|>\\ncontent\\n`` and ends
    assistant turns with EOS at tokenization time (see data/encode.py)."""

    vocab_size = 259
    bos_token_id = 256
    eos_token_id = 257
    pad_token_id = 258
    add_bos_token = True
    has_chat_template = True

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids] if add_bos else ids

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        parts = [f"<|{m['role']}|>\n{m['content']}\n" for m in messages]
        if add_generation_prompt:
            parts.append("<|assistant|>\n")
        return "".join(parts)

    def save(self, out_dir: str | Path) -> None:
        from .io import atomic_write_json

        atomic_write_json(Path(out_dir) / BYTE_TOKENIZER_FILE, {"type": "byte", "vocab_size": self.vocab_size})


class HFTokenizer:
    """Wraps a transformers tokenizer (``AutoTokenizer`` of a local directory, or one built
    from a GGUF file's metadata by :mod:`.models.gguf_tokenizer`).

    ``add_bos_token`` says whether the model puts BOS in front of text, so whether
    ``encode(text, add_bos=True)`` does: many models define a BOS token and never use it
    that way (SmolLM2's BOS is ``<|im_start|>``; Qwen2 has none). By default it is read off
    transformers' own ``encode(..., add_special_tokens=True)``; a GGUF passes its
    ``tokenizer.ggml.add_bos_token``."""

    def __init__(self, tok, add_bos_token: bool | None = None) -> None:
        self._tok = tok
        self.bos_token_id = tok.bos_token_id
        self.eos_token_id = tok.eos_token_id
        pad = tok.pad_token_id
        self.pad_token_id = pad if pad is not None else tok.eos_token_id
        self.vocab_size = len(tok)
        if add_bos_token is None:
            add_bos_token = tok.encode("a", add_special_tokens=True)[:1] == [self.bos_token_id]
        self.add_bos_token = bool(add_bos_token) and self.bos_token_id is not None

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._tok, "chat_template", None))

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False)
        if add_bos and self.add_bos_token:
            ids = [self.bos_token_id, *ids]
        return list(ids)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        if not self.has_chat_template:
            raise TokenizerError("this tokenizer has no chat_template; add one to tokenizer_config.json "
                                 "or use {'prompt','completion'} data instead of {'messages'}")
        return self._tok.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)

    def save(self, out_dir: str | Path) -> None:
        self._tok.save_pretrained(str(out_dir))


def bos_ids(tok) -> list[int]:
    """``[bos]`` when the model puts BOS in front of a document (``add_bos_token``), else
    ``[]``: what training documents, prompts and eval sequences start with."""
    bos = getattr(tok, "bos_token_id", None)
    return [bos] if bos is not None and getattr(tok, "add_bos_token", True) else []


def load_tokenizer(path: str | Path):
    """Load the tokenizer stored in a model directory."""
    path = Path(path)
    if (path / BYTE_TOKENIZER_FILE).exists():
        try:
            spec = json.loads((path / BYTE_TOKENIZER_FILE).read_text())
        except json.JSONDecodeError as e:
            raise TokenizerError(f"{path / BYTE_TOKENIZER_FILE}: invalid JSON ({e}); "
                                 "delete it or re-save the model") from e
        if spec.get("type") != "byte":
            raise TokenizerError(f"{path / BYTE_TOKENIZER_FILE}: unknown type {spec.get('type')!r}; expected 'byte'")
        return ByteTokenizer()
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise TokenizerError(f"{path}: no tokenizer.json, tokenizer.model or tokenizer_config.json; "
                             "copy the tokenizer files of the base model into this directory")
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises many unrelated types here
        raise TokenizerError(f"{path}: cannot load tokenizer ({type(e).__name__}: {e})") from e
    return HFTokenizer(tok)
