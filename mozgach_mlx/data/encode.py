"""Tokenization with loss masks: one record (any of the three formats) into one sequence.

A *sequence* is ``(ids, mask)``: ``ids`` int32 ``(n,)`` and ``mask`` bool ``(n,)`` where
``mask[i]`` says whether predicting ``ids[i]`` (from ``ids[:i]``) counts in the loss, so
``mask[0]`` is never used.
"""

from __future__ import annotations

import numpy as np

from ..errors import DataError, TokenizerError
from ..tokenizer import bos_ids
from .jsonl import record_format

Seq = tuple[np.ndarray, np.ndarray]  # (ids int32 (n,), mask bool (n,))


def _enc(tok, text: str) -> list[int]:
    return list(tok.encode(text, add_bos=False))


def _render(tok, messages: list[dict], add_generation_prompt: bool) -> str:
    try:
        return tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    except TokenizerError as e:
        raise DataError(str(e)) from e
    except Exception as e:  # jinja templates raise arbitrary types (e.g. on role order)
        raise DataError(f"the tokenizer's chat template failed on these messages "
                        f"({type(e).__name__}: {e})") from e


def _encode_messages(msgs: list[dict], tok) -> tuple[list[int], list[bool]]:
    """Assistant spans from rendering prefixes of the conversation.

    For each assistant turn i the span is ``[len(render(msgs[:i], gen_prompt)),
    len(render(msgs[:i+1])))`` in tokens. That is only valid if the template renders
    conversations incrementally (each prefix's tokens are a prefix of the whole); a
    template that rewrites earlier turns (e.g. drops past reasoning) breaks it -> DataError.
    """
    if not getattr(tok, "has_chat_template", False):
        raise DataError("'messages' data needs a tokenizer with a chat template; use "
                        "{'prompt','completion'} data or a tokenizer_config.json with chat_template")
    full_text = _render(tok, msgs, False)
    full = _enc(tok, full_text)
    eos = tok.eos_token_id
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        pre_text = _render(tok, msgs[:i], True)
        upto_text = _render(tok, msgs[: i + 1], False)
        if not (full_text.startswith(upto_text) and upto_text.startswith(pre_text)):
            raise DataError(f"the chat template does not render conversations incrementally (the text "
                            f"up to assistant turn {i} is not a prefix of the whole conversation), so "
                            "assistant tokens cannot be located; use {'prompt','completion'} data or a "
                            "template that keeps earlier turns unchanged")
        pre, upto = _enc(tok, pre_text), _enc(tok, upto_text)
        if upto[: len(pre)] != pre or full[: len(upto)] != upto:
            raise DataError(f"tokenizing the chat template's output is not prefix-stable at assistant "
                            f"turn {i} (tokens merge across the turn boundary), so assistant tokens cannot "
                            "be located exactly; use {'prompt','completion'} data instead")
        spans.append((len(pre), len(upto)))
    ids: list[int] = []
    mask: list[bool] = []
    pos = 0
    for a, b in spans:
        ids += full[pos:b]
        mask += [False] * (a - pos) + [True] * (b - a)
        # Templates of chat models end a turn with their end-of-turn token (usually EOS);
        # the byte tokenizer's template doesn't, so EOS is inserted to teach stopping.
        if eos is not None and eos not in full[a:b]:
            ids.append(eos)
            mask.append(True)
        pos = b
    ids += full[pos:]
    mask += [False] * (len(full) - pos)
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
        mask.append(False)
    return ids, mask


def encode_record(record: dict, tok) -> Seq:
    """Tokenize one record into ``(ids int32 (n,), mask bool (n,))``.

    BOS (if the model uses one: ``tokenizer.bos_ids``) starts the document and EOS ends it (after the
    completion; after each assistant turn unless the chat template already emits EOS).
    ``mask`` marks tokens that count in the loss as targets: all tokens but BOS for
    ``text``; completion + EOS for ``prompt/completion``; assistant turns (their content
    and the template's end-of-turn tokens, not the role header) for ``messages``.
    """
    try:
        fmt = record_format(record)
    except ValueError as e:
        raise DataError(f"bad record: {e}") from None
    eos, head = tok.eos_token_id, bos_ids(tok)
    if eos is None:
        raise DataError("the tokenizer has no eos_token_id; documents cannot be separated")
    if fmt == "text":
        body = _enc(tok, record["text"])
        ids, mask = body + [eos], [True] * (len(body) + 1)
    elif fmt == "completion":
        p, c = record["prompt"], record["completion"]
        prompt = _enc(tok, p)
        joint = _enc(tok, p + c)
        # Tokenize jointly when the prompt's tokens survive (natural tokenization at the
        # boundary); otherwise concatenate separately tokenized parts.
        body = joint if joint[: len(prompt)] == prompt else prompt + _enc(tok, c)
        ids = body + [eos]
        mask = [False] * len(prompt) + [True] * (len(body) - len(prompt) + 1)
    else:
        ids, mask = _encode_messages(record["messages"], tok)
    if head and (not ids or ids[0] != head[0]):
        ids, mask = [*head, *ids], [False, *mask]
    return np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=bool)
