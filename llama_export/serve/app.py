"""An OpenAI-compatible HTTP front end on an `Engine` (Starlette, an ASGI app; `serve.run` serves it
with uvicorn).

    POST /v1/completions, /v1/chat/completions   JSON, or Server-Sent Events with "stream": true
    GET  /v1/models                               the one model served
    GET  /health                                  200 while serving, 503 after the engine failed
    GET  /metrics                                 Prometheus text format

/v1 routes need the API key when one is set; /health and /metrics do not (probes and scrapers).
Every refusal is OpenAI's error object (`schemas.ApiError`): 400 for a malformed body or a bad value,
401 without the API key (when one is set), 404/405 for an unknown route or method, 413 for a body over
the limit, 429 (with Retry-After) when the queue is full. Requests run on the engine's thread; the
handlers only wait for their tokens, so one server process serves any number of clients. A client that
disconnects mid-stream has its request cancelled (`Engine.cancel`): its slot is free before the next
step.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator

import anyio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import iterate_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llama_export.engine.engine import Completion, Engine, Handle
from llama_export.engine.generate import SamplingConfig
from llama_export.errors import LlamaExportError
from llama_export.serve.schemas import ApiError, ChatRequest, CompletionRequest, parse

MAX_BODY_BYTES = 4 << 20  # a prompt far beyond any context still fits; larger bodies are refused (413)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _Metrics:
    """The server's Prometheus metrics (a registry of its own, so several apps in one process do not clash)."""

    def __init__(self, engine: Engine) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("llama_export_requests", "Requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("llama_export_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.generated_tokens = Counter("llama_export_generated_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("llama_export_time_to_first_token_seconds", "Time from request to its first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("llama_export_inter_token_latency_seconds", "Time between a request's tokens",
                             buckets=_LATENCY_BUCKETS, registry=r)
        Gauge("llama_export_queue_depth", "Requests waiting for a slot", registry=r).set_function(lambda: engine.queued)
        Gauge("llama_export_active_slots", "Requests in KV cache slots", registry=r).set_function(lambda: engine.active)


def create_app(engine: Engine, *, model_name: str, api_key: str | None = None, max_queue: int = 256,
               max_body_bytes: int = MAX_BODY_BYTES) -> Starlette:
    """The ASGI app serving `engine` as model `model_name`; `api_key`: required as a Bearer token;
    `max_queue`: waiting requests beyond which new ones get 429."""
    metrics = _Metrics(engine)
    created = int(time.time())

    def check_key(request: Request) -> None:
        """Every /v1 route needs the key, when there is one (compared in constant time)."""
        if api_key is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                raise ApiError(401, "a valid API key is required (Authorization: Bearer KEY)",
                               type="authentication_error", code="invalid_api_key")

    async def body_of(request: Request, model: type) -> object:
        check_key(request)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise ApiError(413, f"the request body is over {max_body_bytes} bytes", code="request_too_large")
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > max_body_bytes:
                raise ApiError(413, f"the request body is over {max_body_bytes} bytes", code="request_too_large")
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})") from None
        req = parse(model, data)
        if req.model != model_name:
            raise ApiError(404, f"the model {req.model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        if engine.queued >= max_queue:
            raise ApiError(429, f"the queue is full ({engine.queued} requests waiting); retry later",
                           type="rate_limit_error", headers={"Retry-After": "1"})
        return req

    defaults = default_sampling(engine.tokenizer.generation if engine.tokenizer is not None else None)

    def sampling_of(req) -> SamplingConfig:
        """The request's sampling; what it leaves out comes from the model's defaults. Without a seed,
        a fresh one per request."""
        return SamplingConfig(temperature=defaults.temperature if req.temperature is None else req.temperature,
                              top_p=defaults.top_p if req.top_p is None else req.top_p,
                              top_k=defaults.top_k if req.top_k is None else req.top_k,
                              seed=req.seed if req.seed is not None else uuid.uuid4().int >> 65)

    def submit(prompt, req, max_tokens: int | None) -> Handle:
        """Queue the request; without `max_tokens`, as many as the slot has room for."""
        if engine.failed is not None:
            raise ApiError(503, f"the model failed and is not serving: {engine.failed}", type="server_error")
        try:
            r = engine.request(prompt, max_tokens=1, sampling=sampling_of(req), stop=req.stop or (),
                               stop_ids=() if req.ignore_eos else None)
            room = max(1, engine.capacity - len(r.prompt))
            return engine.submit(dataclasses.replace(r, max_tokens=max_tokens or room))
        except LlamaExportError as e:
            raise ApiError(400, str(e), param="prompt" if "prompt" in str(e) else None) from None

    async def completions(request: Request) -> Response:
        req = await body_of(request, CompletionRequest)
        handle = submit(req.prompt, req, req.max_tokens or 16)
        return await answer(request, handle, req, chat=False)

    async def chat_completions(request: Request) -> Response:
        req = await body_of(request, ChatRequest)
        if engine.tokenizer is None or not engine.tokenizer.has_chat_template:
            raise ApiError(400, f"the model {model_name!r} has no chat template; use /v1/completions")
        messages = [{"role": m.role, "content": m.content} for m in req.messages]
        try:
            ids = engine.tokenizer.chat(messages)
        except LlamaExportError as e:
            raise ApiError(400, str(e), param="messages") from None
        handle = submit(ids, req, req.max_completion_tokens or req.max_tokens)
        return await answer(request, handle, req, chat=True)

    async def answer(request: Request, handle: Handle, req, *, chat: bool) -> Response:
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        metrics.prompt_tokens.inc(len(handle.request.prompt))
        metrics.requests.labels(request.url.path, "200").inc()
        if req.stream:
            return StreamingResponse(stream(request, handle, req, rid, chat=chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            done = await wait_for(request, handle)
        except LlamaExportError as e:
            raise ApiError(500, f"the model failed: {e}", type="server_error") from None
        return JSONResponse(final_object(rid, done, chat=chat))

    async def wait_for(request: Request, handle: Handle) -> Completion:
        """The completion, timing its tokens; the request is cancelled if the client goes away."""
        start, last = time.monotonic(), None
        try:
            async for _token, _text in iterate_in_threadpool(iter(handle)):
                now = time.monotonic()
                (metrics.ttft.observe(now - start) if last is None else metrics.itl.observe(now - last))
                last = now
            return await anyio.to_thread.run_sync(handle.result)
        finally:
            if not handle.finished:
                engine.cancel(handle)

    async def stream(request: Request, handle: Handle, req, rid: str, *, chat: bool) -> AsyncIterator[str]:
        start, last = time.monotonic(), None
        kind = "chat.completion.chunk" if chat else "text_completion"
        try:
            if chat:
                yield _sse(_chunk(rid, kind, created, model_name, {"role": "assistant", "content": ""}, None, chat))
            async for token, text in iterate_in_threadpool(iter(handle)):
                now = time.monotonic()
                (metrics.ttft.observe(now - start) if last is None else metrics.itl.observe(now - last))
                last = now
                # every token is an event, also one whose text is held back (half a character) or that
                # has none (a model served without a tokenizer): clients see each token as it comes
                yield _sse(_chunk(rid, kind, created, model_name, {"content": text} if chat else text, None, chat))
            done = handle.result()
            count(done)
            yield _sse(_chunk(rid, kind, created, model_name, {} if chat else "", done.finish_reason, chat))
            if req.stream_options is not None and req.stream_options.include_usage:
                yield _sse({"id": rid, "object": kind, "created": created, "model": model_name, "choices": [],
                            "usage": _usage(done)})
            yield "data: [DONE]\n\n"
        except LlamaExportError as e:
            yield _sse(ApiError(500, f"the model failed: {e}", type="server_error").body())
        finally:
            if not handle.finished:  # the client went away (or the stream broke): free the slot
                engine.cancel(handle)

    def count(done: Completion) -> None:
        metrics.generated_tokens.inc(len(done.tokens))

    def final_object(rid: str, done: Completion, *, chat: bool) -> dict:
        count(done)
        text = done.text if done.text is not None else ""
        choice = {"index": 0, "finish_reason": done.finish_reason, "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": model_name, "choices": [choice], "usage": _usage(done)}

    async def models(request: Request) -> Response:
        check_key(request)
        return JSONResponse({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": created, "owned_by": "llama_export"}]})

    async def health(request: Request) -> Response:
        if engine.failed is not None:
            return JSONResponse({"status": "error", "error": str(engine.failed)}, status_code=503)
        return JSONResponse({"status": "ok", "active": engine.active, "queued": engine.queued})

    async def metrics_page(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def api_error(request: Request, exc: ApiError) -> Response:
        metrics.requests.labels(request.url.path, str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        what = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return await api_error(request, ApiError(exc.status_code, what.get(exc.status_code, str(exc.detail)),
                                                 code="not_found" if exc.status_code == 404 else None))

    app = Starlette(routes=[
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics_page, methods=["GET"]),
    ], exception_handlers={ApiError: api_error, HTTPException: http_error})
    app.state.metrics = metrics
    return app


def default_sampling(generation) -> SamplingConfig:
    """What a request gets for the sampling fields it leaves out: the model's generation_config.json
    (`text.files.GenerationConfig`: greedy unless do_sample, as transformers reads it), or OpenAI's
    defaults (temperature 1, top_p 1) for a model without one."""
    if generation is None:
        return SamplingConfig(temperature=1.0, top_p=1.0)
    if not generation.do_sample:
        return SamplingConfig(temperature=0.0)
    return SamplingConfig(temperature=generation.temperature, top_p=generation.top_p, top_k=generation.top_k)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, allow_nan=False)}\n\n"


def _chunk(rid: str, kind: str, created: int, model: str, delta, finish: str | None, chat: bool) -> dict:
    choice = {"index": 0, "finish_reason": finish, "logprobs": None}
    choice.update({"delta": delta} if chat else {"text": delta})
    return {"id": rid, "object": kind, "created": created, "model": model, "choices": [choice]}


def _usage(done: Completion) -> dict:
    return {"prompt_tokens": len(done.prompt), "completion_tokens": len(done.tokens),
            "total_tokens": len(done.prompt) + len(done.tokens)}

