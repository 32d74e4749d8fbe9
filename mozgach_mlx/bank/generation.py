"""Generation with a bank's adapters: KV-cached decoding, one batch per prompt length.

:class:`GenerationConfig` is the one source of the decoding defaults (``AdapterBank.generate``
and ``mozgach generate`` take theirs from it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import ConfigError
from ..typecheck import check_fields
from .layer import BankView

__all__ = ["GenerationConfig", "decode", "generate"]


@dataclass
class GenerationConfig:
    """How text is decoded.

    Args:
        max_tokens: most tokens generated per prompt (decoding also stops at EOS).
        temperature: 0 is greedy decoding; otherwise tokens are sampled from
            ``softmax(logits / temperature)``.
    """

    max_tokens: int = field(default=64, metadata={"help": "most tokens to generate per prompt"})
    temperature: float = field(default=0.0, metadata={"help": "sampling temperature (0 = greedy)"})

    def __post_init__(self) -> None:
        check_fields(self)
        if self.max_tokens < 1:
            raise ConfigError(f"GenerationConfig.max_tokens={self.max_tokens} must be >= 1")
        if self.temperature < 0:
            raise ConfigError(f"GenerationConfig.temperature={self.temperature} must be >= 0 (0 = greedy)")


def decode(model: nn.Module, eos: int | None, ids: np.ndarray, cfg: GenerationConfig,
           key: mx.array | None = None) -> list[list[int]]:
    """Generated token ids per row (up to, excluding, EOS) under the model's current
    selection, with its KV cache. ids (B, L) int32: prompts of one length.

    ``key`` makes sampling reproducible (one split per step); greedy ignores it.
    """
    max_tokens, temperature = cfg.max_tokens, cfg.temperature
    cache = model.make_cache()
    rows: list[list[int]] = [[] for _ in range(ids.shape[0])]
    done = np.zeros(ids.shape[0], bool)
    keys = None if key is None or temperature <= 0 else mx.random.split(key, max(max_tokens, 1))
    logits = model(mx.array(ids), cache=cache)[:, -1, :]  # (B, V)
    for step in range(max_tokens):
        if temperature <= 0:
            nxt = mx.argmax(logits, axis=-1)
        else:
            nxt = mx.random.categorical(logits.astype(mx.float32) / temperature,
                                        key=None if keys is None else keys[step])
        nxt_np = np.array(nxt)
        for r, t in enumerate(nxt_np.tolist()):
            if not done[r]:
                if t == eos:
                    done[r] = True
                else:
                    rows[r].append(t)
        if done.all() or step == max_tokens - 1:
            break
        logits = model(nxt.astype(mx.int32)[:, None], cache=cache)[:, -1, :]
        mx.eval(logits, *[s for c in cache for s in c.state])
    return rows


def generate(bank: BankView, prompt: str | list[str], adapter: Any, cfg: GenerationConfig, *,
             seed: int | None = None, return_ids: bool = False) -> str | list[str] | list:
    """Continue ``prompt`` with ``adapter`` (see :meth:`AdapterBank.generate`).

    A list of prompts and/or a list of adapters (one per row; a single prompt is
    repeated) decodes the rows as batches grouped by prompt length. Returns the text (a
    list for list inputs), or the token ids with ``return_ids``.
    """
    prompts = prompt if isinstance(prompt, list) else None
    adapters = adapter if isinstance(adapter, list) else None
    n = len(prompts) if prompts is not None else len(adapters) if adapters is not None else 1
    if prompts is not None and adapters is not None and len(prompts) != len(adapters):
        raise ConfigError(f"{len(prompts)} prompts for {len(adapters)} adapters")
    rows_p = prompts or [prompt] * n
    rows_a = adapters or [adapter] * n
    tok = bank.tok
    # a chat render may carry BOS already (Llama 3's <|begin_of_text|>): never two
    ids = [i[1:] if len(i) > 1 and i[0] == i[1] == tok.bos_token_id else i
           for i in (list(tok.encode(p, add_bos=True)) for p in rows_p)]
    out: list = [""] * n
    key = mx.random.key(seed) if seed is not None else None
    for length in sorted({len(i) for i in ids}):
        group = [r for r in range(n) if len(ids[r]) == length]
        with bank.use(bank.selection([rows_a[r] for r in group])):
            toks = decode(bank.model, tok.eos_token_id, np.array([ids[r] for r in group], np.int32), cfg, key)
        for r, t in zip(group, toks, strict=True):
            out[r] = t if return_ids else tok.decode(t)
    return out if (prompts is not None or adapters is not None) else out[0]
