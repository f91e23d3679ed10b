"""The HTTP side of `moerge serve`: OpenAI's chat and completion endpoints (streamed or not), the model
list, /health and Prometheus /metrics, API-key checks and OpenAI-style JSON errors.

Every request body is validated here (a bad one is a 400 naming the field, not FastAPI's 422); every
failure inside is answered as JSON with its status, so no request can take the server down.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from moerge.serve.engine import DELTA, DONE, ERROR, Engine, Job, Result
from moerge.serve.models import ModelPool
from moerge.serve.page import PAGE
from moerge.serve.proxy import Upstream
from moerge.serve.schemas import ChatRequest, CompletionRequest, ServeError

OPEN_PATHS = ("/", "/health", "/metrics")  # the page asks for the key itself


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (one per app)."""

    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("moerge_requests", "requests answered", ["model", "status"], registry=self.registry)
        self.tokens = Counter(
            "moerge_tokens", "prompt and completion tokens", ["model", "kind"], registry=self.registry
        )
        self.latency = Histogram(
            "moerge_request_seconds", "time to answer a request", ["model"], registry=self.registry
        )
        self.expert_requests = Counter(
            "moerge_expert_requests", "requests each expert carried weight in", ["expert"], registry=self.registry
        )
        self.batch_rows = Histogram(
            "moerge_batch_rows",
            "rows (choices of requests) decoded together in each step of the shared batch",
            buckets=(1, 2, 4, 8, 16, 32),
            registry=self.registry,
        )
        engine.batch_observers.append(self.batch_rows.observe)
        running = Gauge("moerge_batch_running", "rows in the shared batch now", registry=self.registry)
        running.set_function(lambda: len(engine.rows))
        queue = Gauge("moerge_queue_depth", "requests queued or running", registry=self.registry)
        queue.set_function(lambda: engine.depth)

    def record(self, job: Job, result: Result) -> None:
        self.tokens.labels(job.model, "prompt").inc(result.prompt_tokens)
        self.tokens.labels(job.model, "completion").inc(result.completion_tokens)
        self.latency.labels(job.model).observe(result.seconds)
        for expert, weight in (result.routing or {}).items():
            if weight > 0:
                self.expert_requests.labels(expert).inc()


def create_app(
    pool: ModelPool,
    *,
    api_key: str | None = None,
    max_tokens: int = 512,
    max_queue: int = 64,
    upstream: Upstream | None = None,
) -> FastAPI:
    """The server over `pool`: `max_tokens` caps every request's length, `max_queue` the requests
    waiting or running (more are refused with 429); with `upstream`, generation is forwarded there
    (proxy mode, `moerge.serve.proxy`) after `auto` is routed locally."""
    engine = Engine(pool, max_queue=max_queue)
    metrics = Metrics(engine)
    engine.observers.append(metrics.record)
    app = FastAPI(title="moerge", docs_url=None, redoc_url=None)
    app.state.engine, app.state.pool = engine, pool
    app.router.on_shutdown.append(engine.close)

    @app.middleware("http")
    async def check_key(request: Request, call_next: Any) -> Response:
        if api_key and request.url.path not in OPEN_PATHS:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _error(
                    ServeError(
                        401, "missing or wrong API key (Authorization: Bearer <key>)", kind="authentication_error"
                    )
                )
        return await call_next(request)

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, exc: ServeError) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(ServeError(exc.status_code, str(exc.detail), kind="invalid_request_error"))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(ServeError(400, str(exc.errors()[0].get("msg", "bad request"))))

    @app.exception_handler(Exception)
    async def any_error(request: Request, exc: Exception) -> JSONResponse:
        return _error(ServeError(500, f"{type(exc).__name__}: {exc}", kind="server_error"))

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return PAGE

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "loaded": pool.loaded_names(), "queue_depth": engine.depth}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [pool.describe(name) for name in pool.names()]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> Response:
        return await _answer(request, ChatRequest, "chat.completion")

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Response:
        return await _answer(request, CompletionRequest, "text_completion")

    async def _answer(request: Request, model: type[BaseModel], kind: str) -> Response:
        raw, body = await _parse(request, model)
        if upstream is not None:
            return await _forward(upstream, request.url.path.removeprefix("/v1"), raw, body)
        name = pool.resolve(body.model)
        job = Job(name, body, body.token_limit(max_tokens), asyncio.get_running_loop())
        engine.submit(job)
        reply = Reply(kind, body.model, job)
        try:
            if body.stream:  # the first event decides the status: an error before any text is a plain error
                first = await reply.next_event()
                return StreamingResponse(
                    _counted(reply.stream(first), metrics, body.model), media_type="text/event-stream"
                )
            result = await reply.result()
        except ServeError as exc:
            metrics.requests.labels(body.model, str(exc.status)).inc()
            raise
        metrics.requests.labels(body.model, "200").inc()
        return JSONResponse(reply.body(result))

    async def _forward(upstream: Upstream, path: str, raw: dict[str, Any], body: Any) -> Response:
        """Proxy mode: route `auto` here, let the upstream engine generate, relay its answer."""
        target, weights = await asyncio.to_thread(upstream.target, body)
        payload = {k: v for k, v in raw.items() if k not in ("moerge", "max_completion_tokens")}
        payload.update(model=target, max_tokens=body.token_limit(max_tokens))
        if body.stream:
            status, lines = await upstream.stream(path, payload)
            metrics.requests.labels(body.model, str(status)).inc()
            if status != 200:
                return JSONResponse(lines, status_code=status)
            return StreamingResponse(lines, media_type="text/event-stream")
        status, reply = await asyncio.to_thread(upstream.post, path, payload)
        metrics.requests.labels(body.model, str(status)).inc()
        if status == 200 and weights is not None:
            reply["moerge"] = {"routing": weights, "routed_to": target}
        return JSONResponse(reply, status_code=status)

    return app


async def _counted(events: AsyncIterator[str], metrics: Metrics, model: str) -> AsyncIterator[str]:
    status = "200"
    try:
        async for event in events:
            yield event
    except ServeError as exc:
        status = str(exc.status)
        yield f"data: {json.dumps(exc.body())}\n\n"
    finally:
        metrics.requests.labels(model, status).inc()


async def _parse(request: Request, model: type[BaseModel]) -> tuple[Any, Any]:
    """(the JSON body, the body as `model`); anything else is a 400 naming the field."""
    try:
        raw = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise ServeError(400, "the body is not valid JSON") from None
    try:
        return raw, model.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error["loc"]) or None
        raise ServeError(400, f"{field}: {error['msg']}" if field else error["msg"], param=field) from None


class Reply:
    """Turns a job's events into OpenAI's response objects (one JSON body, or server-sent events)."""

    def __init__(self, kind: str, model: str, job: Job) -> None:
        self.kind, self.model, self.job = kind, model, job
        self.id = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    async def next_event(self) -> tuple[Any, ...]:
        """The job's next event; its error is raised. A client that goes away stops the generation."""
        try:
            event = await self.job.events.get()
        except asyncio.CancelledError:
            self.job.cancelled.set()
            raise
        if event[0] == ERROR:
            raise event[1]
        return event

    async def result(self) -> Result:
        while True:
            kind, *payload = await self.next_event()
            if kind == DONE:
                return payload[0]

    async def stream(self, first: tuple[Any, ...]) -> AsyncIterator[str]:
        event = first
        try:
            while True:
                kind, *payload = event
                if kind == DELTA:
                    yield self._sse(self._chunk(payload[0], payload[1], None))
                elif kind == DONE:
                    result: Result = payload[0]
                    for index, choice in enumerate(result.choices):
                        yield self._sse(self._chunk(index, "", choice.finish_reason, result))
                    yield "data: [DONE]\n\n"
                    return
                event = await self.next_event()
        finally:
            self.job.cancelled.set()  # a no-op when finished; stops the generation of a client that left

    def _chunk(self, index: int, text: str, finish: str | None, result: Result | None = None) -> dict[str, Any]:
        if self.kind == "chat.completion":
            choice = {"index": index, "delta": {"role": "assistant", "content": text}, "finish_reason": finish}
            kind = "chat.completion.chunk"
        else:
            choice = {"index": index, "text": text, "finish_reason": finish, "logprobs": None}
            kind = "text_completion"
        chunk = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": [choice]}
        if result is not None and result.routing is not None:
            chunk["moerge"] = {"routing": result.routing}
        return chunk

    @staticmethod
    def _sse(data: dict[str, Any]) -> str:
        return f"data: {json.dumps(data)}\n\n"

    def body(self, result: Result) -> dict[str, Any]:
        if self.kind == "chat.completion":
            choices = [
                {"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason}
                for i, c in enumerate(result.choices)
            ]
        else:
            choices = [
                {"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
                for i, c in enumerate(result.choices)
            ]
        usage = {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
        }
        body = {"id": self.id, "object": self.kind, "created": self.created, "model": self.model, "choices": choices}
        body["usage"] = usage
        if result.routing is not None:
            body["moerge"] = {"routing": result.routing}
            if result.choices[0].explained is not None:  # per choice, per generated token
                body["moerge"]["tokens"] = [c.explained for c in result.choices]
        return body


def _error(exc: ServeError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)
