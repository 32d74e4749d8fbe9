"""The OpenAI wire format at the edge: request bodies checked into typed requests, the
responses and stream chunks built back, and errors in OpenAI's own shape.

Nothing behind this module sees raw JSON. A body that does not fit raises
:class:`APIError`, which the app turns into ``{"error": {"message", "type", "param",
"code"}}`` with its HTTP status. No field is ever used as a file-system path: ``model``
and the ``adapters`` mix are names, looked up among what the server loaded.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MAX_STOPS", "APIError", "GenerationRequest", "chat_chunk", "chat_response", "completion_chunk",
           "completion_response", "parse_chat", "parse_completion", "usage"]

MAX_STOPS = 4  # OpenAI's limit on stop sequences
MAX_MESSAGES = 1024
ROLES = ("system", "user", "assistant")

# Fields OpenAI defines that change the result and that this server does not implement:
# refused (with their neutral values allowed), never silently ignored.
_UNSUPPORTED = {"n": 1, "best_of": 1, "echo": False, "logprobs": None, "top_logprobs": None, "suffix": None,
                "frequency_penalty": 0, "presence_penalty": 0, "logit_bias": None, "tools": None,
                "functions": None}


class APIError(Exception):
    """A request the server refuses, with its HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class GenerationRequest:
    """One completion or chat request, checked. ``prompt`` is the text to continue (for
    chat, rendered later through the tokenizer's chat template from ``messages``)."""

    kind: str  # "completion" | "chat"
    model: str
    prompt: str | None = None
    messages: list[dict] | None = None
    max_tokens: int | None = None  # None: the server's default for the endpoint
    temperature: float = 1.0  # OpenAI's defaults
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    adapters: dict[str, float] | None = None  # a mix {adapter name: weight}


def _bad(message: str, param: str | None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise _bad(f"'{name}' must be a number, got {v!r}", name)
    if not lo <= v <= hi:
        raise _bad(f"'{name}' must be in [{lo:g}, {hi:g}], got {v!r}", name)
    return float(v)


def _integer(body: dict, name: str) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(f"'{name}' must be an integer, got {v!r}", name)
    return v


def _common(body: Any, kind: str) -> GenerationRequest:
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' is required: a name from GET /v1/models", "model")
    for name, neutral in _UNSUPPORTED.items():
        v = body.get(name)
        if v is not None and v != neutral and not (name == "logit_bias" and v == {}):
            raise _bad(f"'{name}' is not supported by this server", name, "unsupported_parameter")
    max_tokens = _integer(body, "max_tokens")
    if kind == "chat" and body.get("max_completion_tokens") is not None:
        max_tokens = _integer(body, "max_completion_tokens")
    if max_tokens is not None and max_tokens < 1:
        raise _bad(f"'max_tokens' must be >= 1, got {max_tokens}", "max_tokens", "invalid_value")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in stop):
        raise _bad(f"'stop' must be a non-empty string or a list of at most {MAX_STOPS} of them", "stop")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("'stream' must be true or false", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise _bad("'stream_options' must be an object", "stream_options")
    seed = _integer(body, "seed")
    if seed is not None and not -(1 << 63) <= seed < 1 << 64:
        raise _bad(f"'seed' must fit in 64 bits, got {seed}", "seed")
    adapters = body.get("adapters")
    if adapters is not None:
        if not isinstance(adapters, dict) or not adapters:
            raise _bad("'adapters' must be a non-empty object {adapter name: weight}", "adapters")
        for k, w in adapters.items():
            if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w):
                raise _bad(f"'adapters': the weight of {k!r} must be a finite number, got {w!r}", "adapters")
        adapters = {str(k): float(w) for k, w in adapters.items()}
    return GenerationRequest(kind=kind, model=model, max_tokens=max_tokens,
                             temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                             top_p=_number(body, "top_p", 1.0, 0.0, 1.0), stop=stop, seed=seed, stream=stream,
                             include_usage=bool(opts.get("include_usage", False)), adapters=adapters)


def parse_completion(body: Any) -> GenerationRequest:
    """``POST /v1/completions``: ``prompt`` is a string (or a list holding one)."""
    req = _common(body, "completion")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _bad("'prompt' must be a string (one prompt per request)", "prompt")
    req.prompt = prompt
    return req


def parse_chat(body: Any) -> GenerationRequest:
    """``POST /v1/chat/completions``: ``messages`` with roles system / user / assistant
    (``developer`` is read as system) and text content (a string or text parts)."""
    req = _common(body, "chat")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or len(messages) > MAX_MESSAGES:
        raise _bad(f"'messages' must be a non-empty list (at most {MAX_MESSAGES})", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object with 'role' and 'content'", "messages")
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role not in ROLES:
            raise _bad(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m.get('role')!r}", "messages")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise _bad(f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise _bad(f"messages[{i}].content must be a string", "messages")
        out.append({"role": role, "content": content})
    req.messages = out
    return req


# ----------------------------------------------------------------------------- responses


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _envelope(rid: str, obj: str, model: str, served: dict) -> dict:
    # `served`: the extra fields that say what answered (adapter, router)
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, **served}


def completion_response(rid: str, model: str, served: dict, text: str, finish: str, use: dict) -> dict:
    return {**_envelope(rid, "text_completion", model, served),
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}], "usage": use}


def chat_response(rid: str, model: str, served: dict, text: str, finish: str, use: dict) -> dict:
    return {**_envelope(rid, "chat.completion", model, served),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish}], "usage": use}


def completion_chunk(rid: str, model: str, served: dict, text: str, finish: str | None,
                     use: dict | None = None) -> dict:
    choices = [] if use is not None else [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]
    chunk = {**_envelope(rid, "text_completion", model, served), "choices": choices}
    if use is not None:
        chunk["usage"] = use
    return chunk


def chat_chunk(rid: str, model: str, served: dict, delta: dict, finish: str | None,
               use: dict | None = None) -> dict:
    choices = [] if use is not None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    chunk = {**_envelope(rid, "chat.completion.chunk", model, served), "choices": choices}
    if use is not None:
        chunk["usage"] = use
    return chunk
