"""HTTP: the OpenAI API subset (``/v1/models``, ``/v1/completions``,
``/v1/chat/completions``, server-sent events) over the :class:`~.scheduler.Scheduler`.

Why Starlette + uvicorn: the server must parse HTTP from untrusted clients, stream
server-sent events and notice a client that leaves; both are small, widely used and
actively maintained (Starlette is FastAPI's core; uvicorn is the reference ASGI server,
with the h11 parser), so none of that is hand-written here. FastAPI itself would add
pydantic models and OpenAPI pages the OpenAI format does not need: the request checks
live in :mod:`.protocol`.

Every error leaves in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``:
a body over ``max_body_bytes`` is refused (413) while it is read, before any JSON parsing
or tokenization; a client that disconnects cancels its sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import threading
import time

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..tokenizer import ByteTokenizer
from . import protocol as wire
from .config import ServeConfig
from .models import Served, Target
from .protocol import APIError, GenerationRequest
from .scheduler import Job, Scheduler, Sequence

__all__ = ["build_app", "make_job"]

COMPLETION_DEFAULT_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


class BearerAuth:
    """ASGI middleware: every ``/v1`` request needs ``Authorization: Bearer <key>`` (401
    otherwise); ``/health`` stays open (it reports counts only)."""

    def __init__(self, app, key: str) -> None:
        self.app, self._key = app, key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self._key):
                err = APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                               type="authentication_error", code="invalid_api_key")
                await _error(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def read_json(request: Request, limit: int):
    """The request body as JSON, read at most ``limit`` bytes far (413 beyond)."""
    declared = request.headers.get("content-length")
    too_big = APIError(413, f"the request body exceeds this server's limit of {limit} bytes",
                       param=None, code="request_too_large")
    if declared is not None:
        if not declared.isdigit():
            raise APIError(400, "invalid Content-Length header")
        if int(declared) > limit:
            raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON ({e})", code="invalid_json") from None


class _SSE(StreamingResponse):
    """Server-sent events whose sequence is cancelled however the response ends."""

    def __init__(self, content, seq: Sequence) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._seq = seq

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._seq.cancel()


def make_job(req: GenerationRequest, target: Target, served: Served, cfg: ServeConfig, tok_lock) -> Job:
    """Render, tokenize and check one request against the window and the limits."""
    tok = served.bank.tok
    with tok_lock:
        if req.kind == "chat":
            # a base without a chat template of its own (tiny-stdlib) gets the byte
            # tokenizer's plain one: "<|role|>\ncontent\n" per message, then "<|assistant|>\n"
            render = tok if tok.has_chat_template else ByteTokenizer()
            try:
                prompt = render.apply_chat_template(req.messages, add_generation_prompt=True)
            except Exception as e:  # the template is code that may refuse messages (jinja raise_exception)
                raise APIError(400, f"the chat template refused these messages ({type(e).__name__}: {e})",
                               param="messages") from None
        else:
            prompt = req.prompt
        ids = list(tok.encode(prompt, add_bos=True))
    bos = getattr(tok, "bos_token_id", None)
    if len(ids) > 1 and ids[0] == ids[1] == bos:  # a chat render may carry BOS already: never two
        ids = ids[1:]
    if not ids:
        raise APIError(400, "the prompt is empty", param="prompt")
    window = served.window
    if window is not None and len(ids) >= window:
        raise APIError(400, f"the prompt has {len(ids)} tokens; this model's window is {window}",
                       param="messages" if req.kind == "chat" else "prompt", code="context_length_exceeded")
    if req.max_tokens is not None:
        if req.max_tokens > cfg.max_tokens:
            raise APIError(400, f"max_tokens={req.max_tokens} exceeds this server's limit of {cfg.max_tokens}",
                           param="max_tokens", code="invalid_value")
        if window is not None and len(ids) + req.max_tokens > window:
            raise APIError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({req.max_tokens}) exceeds "
                                f"this model's window of {window} tokens", param="max_tokens",
                           code="context_length_exceeded")
        max_tokens = req.max_tokens
    else:
        max_tokens = COMPLETION_DEFAULT_TOKENS if req.kind == "completion" else cfg.max_tokens
        if window is not None:
            max_tokens = min(max_tokens, window - len(ids))
    route_text = req.prompt if req.kind == "completion" else "\n".join(m["content"] for m in req.messages)
    return Job(ids=ids, target=target, max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
               stop=req.stop, seed=req.seed, route_text=route_text)


class _Endpoints:
    """The request handlers over one served bank and its scheduler."""

    def __init__(self, served: Served, cfg: ServeConfig) -> None:
        self.served, self.cfg = served, cfg
        self.tok_lock = threading.Lock()  # the tokenizer is shared by handlers' threads and the scheduler
        self.scheduler = Scheduler(served, cfg, self.tok_lock)
        self.created = int(time.time())

    async def generate(self, request: Request, req: GenerationRequest) -> Response:
        target = self.served.resolve(req.model, req.adapters)
        job = await run_in_threadpool(make_job, req, target, self.served, self.cfg, self.tok_lock)
        seq = self.scheduler.submit(job, asyncio.get_running_loop())
        rid = wire.new_id(req.kind)
        if req.stream:
            return _SSE(_events(seq, req, rid), seq)
        collect = asyncio.ensure_future(_collect(seq))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            seq.cancel()  # no-op for a finished sequence
            gone.cancel()
        if not collect.done():  # the client left: nobody to answer
            collect.cancel()
            return Response(status_code=499)
        meta, text, end = collect.result()
        use = wire.usage(end["prompt_tokens"], end["completion_tokens"])
        build = wire.chat_response if req.kind == "chat" else wire.completion_response
        return JSONResponse(build(rid, meta["model"], _served_fields(meta), text, end["finish_reason"], use))

    async def completions(self, request: Request) -> Response:
        return await self.generate(request, wire.parse_completion(await read_json(request, self.cfg.max_body_bytes)))

    async def chat(self, request: Request) -> Response:
        return await self.generate(request, wire.parse_chat(await read_json(request, self.cfg.max_body_bytes)))

    def model_card(self, name: str) -> dict:
        kind = "base" if name == self.served.base_name else "router" if name == "auto" else "adapter"
        return {"id": name, "object": "model", "created": self.created, "owned_by": "mozgach", "kind": kind}

    async def list_models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self.model_card(n) for n in self.served.ids()]})

    async def get_model(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in self.served.ids():
            raise APIError(404, f"the model {name[:80]!r} does not exist", param="model", code="model_not_found")
        return JSONResponse(self.model_card(name))

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", **self.scheduler.snapshot()})

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        self.scheduler.start()
        try:
            yield
        finally:
            await run_in_threadpool(self.scheduler.stop)


async def _on_api_error(request: Request, e: APIError) -> Response:
    return _error(e)


async def _on_http_error(request: Request, e: HTTPException) -> Response:
    kind = "not_found" if e.status_code == 404 else "method_not_allowed" if e.status_code == 405 else None
    return _error(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code=kind))


async def _on_internal_error(request: Request, e: Exception) -> Response:
    return _error(APIError(500, f"internal error ({type(e).__name__})", type="server_error", code="internal_error"))


def build_app(served: Served, cfg: ServeConfig) -> Starlette:
    """The ASGI app; its lifespan starts and stops the scheduler thread
    (``app.state.scheduler``)."""
    ep = _Endpoints(served, cfg)
    routes = [Route("/v1/models", ep.list_models, methods=["GET"]),
              Route("/v1/models/{name:path}", ep.get_model, methods=["GET"]),
              Route("/v1/completions", ep.completions, methods=["POST"]),
              Route("/v1/chat/completions", ep.chat, methods=["POST"]),
              Route("/health", ep.health, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=ep.lifespan,
                    exception_handlers={APIError: _on_api_error, HTTPException: _on_http_error,
                                        Exception: _on_internal_error})
    if cfg.api_key is not None:
        app.add_middleware(BearerAuth, key=cfg.api_key)
    app.state.scheduler = ep.scheduler
    app.state.served = served
    return app


def _served_fields(meta: dict) -> dict:
    """The extra response fields that say what answered: the adapter (a name, a
    ``{name: weight}`` mix, or None for the base) and, for ``auto``, the router."""
    return {"adapter": meta["adapter"], "router": meta["router"]}


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body was read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect(seq: Sequence) -> tuple[dict, str, dict]:
    """A whole non-streamed answer: (start meta, text, end info); raises its APIError."""
    meta, parts = {}, []
    while True:
        kind, payload = await seq.events.get()
        if kind == "start":
            meta = payload
        elif kind == "text":
            parts.append(payload)
        elif kind == "end":
            return meta, "".join(parts), payload
        else:
            raise payload


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _events(seq: Sequence, req: GenerationRequest, rid: str):
    """The stream of one sequence as server-sent events, ending in ``data: [DONE]``."""
    meta: dict = {}
    chat = req.kind == "chat"
    try:
        while True:
            kind, payload = await seq.events.get()
            if kind == "start":
                meta = payload
                if chat:
                    yield _sse(wire.chat_chunk(rid, meta["model"], _served_fields(meta), {"role": "assistant",
                                                                                     "content": ""}, None))
            elif kind == "text":
                if chat:
                    yield _sse(wire.chat_chunk(rid, meta["model"], _served_fields(meta), {"content": payload}, None))
                else:
                    yield _sse(wire.completion_chunk(rid, meta["model"], _served_fields(meta), payload, None))
            elif kind == "end":
                fields, finish = _served_fields(meta), payload["finish_reason"]
                use = wire.usage(payload["prompt_tokens"], payload["completion_tokens"])
                if chat:
                    yield _sse(wire.chat_chunk(rid, meta["model"], fields, {}, finish))
                else:
                    yield _sse(wire.completion_chunk(rid, meta["model"], fields, "", finish))
                if req.include_usage:
                    build = wire.chat_chunk if chat else wire.completion_chunk
                    yield _sse(build(rid, meta["model"], fields, {} if chat else "", None, use))
                break
            else:
                yield _sse(payload.body())
                break
        yield "data: [DONE]\n\n"
    finally:
        seq.cancel()
