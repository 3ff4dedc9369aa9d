"""The HTTP layer of `safe-llava serve`: a FastAPI app, the same in front of every `ServingBackend`.

Routes: `POST /v1/chat/completions` (JSON or SSE), `POST /v1/moderations`, `GET /v1/models`, `GET /v1/models/{id}`,
`GET /health` (200 once the backend is loaded, 503 while loading or shutting down) and `GET /metrics` (Prometheus).
Every response body of a `/v1` route carries a top-level `safety` object (moderation: one per result).

Errors follow OpenAI's schema `{"error": {"message", "type", "param", "code"}}`: 400 (bad value, malformed JSON),
401 (API key), 404 (unknown model or path), 405, 413 (body cap), 422 (wrong type, missing field), 429 / 503 with
`Retry-After` (queue full, loading, shutting down), 500 (a generic message; the traceback only in the log). Logs
hold no image bytes, and no prompt text unless the server runs with `--log-requests`.

A client that disconnects stops its work (`backend.py`, promise 8): while its answer is awaited, a watcher reads the
connection; on `http.disconnect` it sets `ChatRequest.client_gone` and cancels the awaited call (a queued request
leaves the queue), and a stream's response sets `client_gone` when it ends. Such a request is logged with status 499.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import threading
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .backend import ChatCompletionResult, ChatRequest, ServiceUnavailable, ServingBackend, ServingError, StreamEvent
from .metrics import ServingMetrics
from .schemas import RequestLimits, parse_chat_request, parse_moderation_request


logger = logging.getLogger("modeling_safe_llava.serving")
ENDPOINTS = ("/v1/chat/completions", "/v1/moderations", "/v1/models", "/health", "/metrics")


@dataclass
class ServerConfig:
    """
    Attributes:
        api_keys (`list[str]`): accepted keys (`Authorization: Bearer <key>`); empty: no authentication.
        limits (`RequestLimits`): what one request may ask for (tokens, images, n, image forms and caps).
        max_body_bytes (`int`): request body cap (413 past it).
        log_requests (`bool`): log prompt text (never image bytes); off by default.
        freeze_gc (`bool`): once the backend is loaded, collect garbage and move every object left to the garbage
            collector's permanent generation (`gc.freeze()`), which it never scans again. A loaded server holds
            hundreds of thousands of objects (model, tokenizer, web framework); without this, a full collection
            triggered by a stream's allocations stalls every stream for ~200 ms on a CPU. `safe-llava serve` sets
            it; off by default (an app built inside another process, as in tests, leaves that process's collector
            alone).
    """

    api_keys: list[str] = field(default_factory=list)
    limits: RequestLimits = field(default_factory=RequestLimits)
    max_body_bytes: int = 20 * 1024 * 1024
    log_requests: bool = False
    freeze_gc: bool = False


class BodyTooLarge(ServingError):
    status = 413
    code = "request_too_large"


class ClientClosedRequest(ServingError):
    """The client went away before its answer was ready (status 499, as nginx logs it; nobody reads the body)."""

    status = 499
    code = "client_closed_request"


def create_app(load_backend: Callable[[], ServingBackend], config: ServerConfig, on_load_error=None) -> FastAPI:
    """
    The app. `load_backend()` runs in a worker thread once the server starts (`/health` answers `loading` until
    it returns); if it raises, the error is kept in `app.state.load_error` and `on_load_error(error)` is called
    (the command stops the server then).
    """
    metrics = ServingMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.create_task(_load(app, load_backend, metrics, on_load_error))
        yield
        app.state.status = "shutting_down"
        await asyncio.shield(loading)
        if app.state.backend is not None:
            await app.state.backend.close()

    app = FastAPI(title="SafeLlava", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.backend, app.state.load_error, app.state.status = None, None, "loading"
    app.state.config, app.state.metrics = config, metrics
    _install_error_handlers(app)
    _add_routes(app)
    app.add_middleware(_RequestGuard, metrics=metrics, max_body_bytes=config.max_body_bytes)
    return app


async def _load(app, load_backend, metrics, on_load_error):
    try:
        backend = await asyncio.to_thread(load_backend)
    except Exception as error:  # noqa: BLE001 - reported by the command as one line, exit code 2
        logger.debug("loading the backend failed", exc_info=True)  # the command reports it as one line
        app.state.load_error, app.state.status = error, "failed"
        if on_load_error is not None:
            on_load_error(error)
        return
    backend.metrics = metrics
    metrics.track_queue_depth(backend.queue_depth)
    metrics.track_arrivals(backend.arrivals.count)
    if app.state.config.freeze_gc:
        freeze_loaded_objects()
    app.state.backend = backend  # closed at shutdown, even when the shutdown began while it loaded
    if app.state.status == "loading":
        app.state.status = "ready"
    logger.info("ready: serving %s", backend.model_id)


def freeze_loaded_objects():
    """`gc.collect()`, then `gc.freeze()`: the objects of the loaded server leave the collector's generations for good
    (see `ServerConfig.freeze_gc`)."""
    gc.collect()
    gc.freeze()


# ------------------------------------------------------------------------------------------------------------------
# Errors, authentication, body cap
# ------------------------------------------------------------------------------------------------------------------


MAX_ERROR_MESSAGE = 1000  # characters: an error that quotes a client's value never echoes a huge one


def error_response(error: ServingError) -> JSONResponse:
    body = error.to_dict()
    if len(body["error"]["message"]) > MAX_ERROR_MESSAGE:
        body["error"]["message"] = body["error"]["message"][:MAX_ERROR_MESSAGE] + " [...]"
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after is not None else None
    if error.status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return JSONResponse(body, status_code=error.status, headers=headers)


def _install_error_handlers(app: FastAPI):
    @app.exception_handler(ServingError)
    async def serving_error(request, error: ServingError):
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, error: StarletteHTTPException):
        message = {404: f"Unknown path {request.url.path}.", 405: f"{request.method} is not allowed on {request.url.path}."}
        status = error.status_code
        return error_response(ServingError(message.get(status, str(error.detail)), status=status, code=None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, error: RequestValidationError):
        return error_response(ServingError("The request is not valid.", status=422, code="invalid_type"))


def check_api_key(request: Request, api_keys: list[str]):
    """401 unless `Authorization: Bearer <key>` holds one of `api_keys` (compared in constant time)."""
    if not api_keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    given_bytes = given.strip().encode() if scheme.lower() == "bearer" else b""
    matched = False
    for key in api_keys:  # every key compared, whichever matches
        matched |= hmac.compare_digest(given_bytes, key.encode())
    if not matched:
        raise ServingError(
            "Missing or wrong API key: send 'Authorization: Bearer <key>'.", status=401, code="invalid_api_key"
        )


class _RequestGuard:
    """ASGI middleware: body cap (413), per-request metrics and one log line, and a last line of defence that turns
    any unexpected exception into a generic 500 (the traceback goes to the log, never to the client)."""

    def __init__(self, app, metrics: ServingMetrics, max_body_bytes: int):
        self.app, self.metrics, self.max_body_bytes = app, metrics, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, state = time.monotonic(), {"status": 500, "started": False}
        endpoint = _endpoint(scope["path"])
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await _discard_body(receive, limit=8 * self.max_body_bytes)  # so that the client reads the 413
            await _send_error(send, self._too_large())
            return self._observe(endpoint, 413, start, scope)

        async def limited_receive():
            message = await receive()
            if message["type"] == "http.request":
                state["received"] = state.get("received", 0) + len(message.get("body", b""))
                if state["received"] > self.max_body_bytes:
                    raise self._too_large()
            return message

        async def tracking_send(message):
            if message["type"] == "http.response.start":
                state["status"], state["started"] = message["status"], True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except Exception:  # noqa: BLE001 - never a traceback to the client
            logger.exception("unexpected error on %s %s", scope["method"], scope["path"])
            if not state["started"]:
                await _send_error(send, ServingError("Internal server error.", status=500, type="server_error", code=None))
        self._observe(endpoint, state["status"], start, scope)

    def _too_large(self):
        return BodyTooLarge(f"The request body is larger than this server's cap of {self.max_body_bytes} bytes.")

    def _observe(self, endpoint, status, start, scope):
        seconds = time.monotonic() - start
        self.metrics.observe_request(endpoint, status, seconds)
        logger.info("%s %s %d %.3fs", scope["method"], scope["path"], status, seconds)


async def _discard_body(receive, limit: int):
    """Reads and drops a request body (up to `limit` bytes; past that the connection is simply closed)."""
    seen = 0
    while seen <= limit:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            return
        seen += len(message.get("body", b""))


async def _send_error(send, error: ServingError):
    body = json.dumps(error.to_dict()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _endpoint(path: str) -> str:
    if path.startswith("/v1/models"):
        return "/v1/models"
    return path if path in ENDPOINTS else "other"


# ------------------------------------------------------------------------------------------------------------------
# Routes
# ------------------------------------------------------------------------------------------------------------------


def _ready_backend(request: Request) -> ServingBackend:
    state = request.app.state
    if state.backend is None or state.status != "ready":
        what = "still loading" if state.status == "loading" else "not serving (shutting down or failed to load)"
        raise ServiceUnavailable(f"The model is {what}; retry later.")
    check_api_key(request, state.config.api_keys)
    return state.backend


async def read_json(request: Request):
    body = await request.body()
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as error:
        raise ServingError(f"The request body is not valid JSON ({_short(error)}).", code="invalid_json") from None
    except RecursionError:
        raise ServingError("The request body is nested too deeply.", code="invalid_json") from None


def _reject_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def _short(error: Exception) -> str:
    return str(error).splitlines()[0][:200]


class ClientWatch:
    """Watches one request's connection (its body already read) for `http.disconnect`.

    `gone` is set when the client disconnects; `await watch.run(awaitable)` gives the awaitable's result, or cancels
    it and raises `ClientClosedRequest` if the client leaves first. `stop()` ends the watch (before the response is
    sent: uvicorn answers `http.disconnect` once a response is complete).
    """

    def __init__(self, request: Request, gone: threading.Event | None = None):
        self.gone = gone if gone is not None else threading.Event()
        self._task = asyncio.ensure_future(self._watch(request.receive))

    async def _watch(self, receive):
        await _until_disconnect(receive)
        self.gone.set()

    async def run(self, awaitable):
        work = asyncio.ensure_future(awaitable)
        await asyncio.wait({work, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            return work.result()
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError, ServingError):
            await work
        raise ClientClosedRequest("The client closed the connection before the answer was ready.")

    def stop(self):
        self._task.cancel()


class _EventStream(Response):
    """A lean SSE response: one ASGI `send` per item of `chunks` (an async iterator of bytes, each holding one or more
    whole events), without Starlette's `StreamingResponse` layers. A task watches the connection meanwhile: when the
    client disconnects, the sending stops (it is cancelled, as Starlette cancels a streaming response). However the
    response ends, it sets `gone`, and the backend then stops the request's rows."""

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncIterator[bytes], gone: threading.Event, headers: dict | None = None):
        self.chunks, self.gone = chunks, gone
        self.status_code, self.background = 200, None
        self.init_headers(headers)

    async def __call__(self, scope, receive, send):
        sending = asyncio.ensure_future(self._send_all(send))
        watching = asyncio.ensure_future(_until_disconnect(receive))
        try:
            await asyncio.wait({sending, watching}, return_when=asyncio.FIRST_COMPLETED)
            if not sending.done():  # the client left
                sending.cancel()
                await asyncio.wait({sending})
            if not sending.cancelled():
                sending.result()  # its error, if any
        finally:
            sending.cancel()
            watching.cancel()
            self.gone.set()
        if self.background is not None:
            await self.background()

    async def _send_all(self, send):
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for chunk in self.chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _until_disconnect(receive):
    """Returns once the connection's `receive` gives `http.disconnect` (anything else, e.g. body parts, is skipped)."""
    while (await receive())["type"] != "http.disconnect":
        continue


def _add_routes(app: FastAPI):
    @app.get("/health")
    async def health(request: Request):
        state = request.app.state
        if state.status != "ready":
            return JSONResponse({"status": state.status}, status_code=503, headers={"Retry-After": "5"})
        return {"status": "ready", "model": state.backend.model_id, **state.backend.describe()}

    @app.get("/metrics")
    async def metrics(request: Request):
        registry = request.app.state.metrics
        return Response(registry.render(), media_type=registry.content_type)

    @app.get("/v1/models")
    async def models(request: Request):
        return {"object": "list", "data": [_model_card(_ready_backend(request))]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        backend = _ready_backend(request)
        if model_id != backend.model_id:
            raise ServingError(f"The model {model_id!r} does not exist; this server serves {backend.model_id!r}.", status=404, param="model", code="model_not_found")
        return _model_card(backend)

    @app.post("/v1/moderations")
    async def moderations(request: Request):
        backend = _ready_backend(request)
        config = request.app.state.config
        with backend.arrivals.admitted():
            body = await read_json(request)
            inputs = await asyncio.to_thread(parse_moderation_request, body, backend.model_id, backend.risky_types, config.limits)
            if config.log_requests:
                logger.info("moderation texts: %s", json.dumps([item.text for item in inputs]))
            watch = ClientWatch(request)
            try:
                verdicts = await watch.run(backend.moderate(inputs))
            finally:
                watch.stop()
        for verdict in verdicts:
            request.app.state.metrics.observe_verdict("/v1/moderations", verdict.safety)
        results = [moderation_result(verdict.safety, backend.risky_types, backend.type_names) for verdict in verdicts]
        return JSONResponse({"id": f"modr-{uuid.uuid4().hex}", "model": backend.model_id, "results": results})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        backend = _ready_backend(request)
        config = request.app.state.config
        with backend.arrivals.admitted():  # company for the batchers until its work is queued
            body = await read_json(request)
            chat = await asyncio.to_thread(parse_chat_request, body, backend.model_id, backend.risky_types, config.limits)
            if config.log_requests:
                logger.info("%s messages: %s", chat.request_id, json.dumps(chat.messages))
            if chat.stream:
                return await _stream_response(request, backend, chat)
            watch = ClientWatch(request, chat.client_gone)
            try:
                result = await watch.run(backend.complete(chat))
            finally:
                watch.stop()
        request.app.state.metrics.observe_verdict("/v1/chat/completions", result.safety)
        return JSONResponse(completion_json(chat, result, backend.model_id))  # plain JSON: no FastAPI encoding pass


def _model_card(backend: ServingBackend) -> dict:
    return {"id": backend.model_id, "object": "model", "created": backend.created, "owned_by": "safe-llava"}


# ------------------------------------------------------------------------------------------------------------------
# Response bodies
# ------------------------------------------------------------------------------------------------------------------


def completion_json(chat: ChatRequest, result: ChatCompletionResult, model_id: str) -> dict:
    choices = [
        {
            "index": choice.index,
            "message": {"role": "assistant", "content": choice.text, "refusal": None},
            "logprobs": None,
            "finish_reason": choice.finish_reason,
        }
        for choice in result.choices
    ]
    return {
        "id": chat.request_id, "object": "chat.completion", "created": int(time.time()), "model": model_id,
        "choices": choices, "usage": result.usage.to_dict(), "safety": result.safety,
    }


def moderation_result(safety: dict, risky_types: list[str], type_names: list[str]) -> dict:
    """OpenAI's moderation result, keyed by the model's risky types: a type's score is `risk * P(type)`; a type is
    flagged when the verdict is flagged and names it."""
    if not safety.get("judged"):
        return {"flagged": False, "categories": dict.fromkeys(risky_types, False), "category_scores": dict.fromkeys(risky_types, 0.0), "safety": safety}
    probs = dict(zip(type_names, safety["type_probs"]))
    scores = {name: round(safety["risk"] * probs[name], 6) for name in risky_types}
    categories = {name: bool(safety["flagged"] and safety["category_name"] == name) for name in risky_types}
    return {"flagged": bool(safety["flagged"]), "categories": categories, "category_scores": scores, "safety": safety}


def _chunk(chat: ChatRequest, model_id: str, created: int, choices: list, **extra) -> str:
    chunk = {"id": chat.request_id, "object": "chat.completion.chunk", "created": created, "model": model_id, "choices": choices, **extra}
    return f"data: {json.dumps(chunk)}\n\n"


def _event_choices(event: StreamEvent) -> list:
    if event.kind == "delta":
        return [{"index": event.index, "delta": {"content": event.text}, "logprobs": None, "finish_reason": None}]
    return [{"index": event.index, "delta": {}, "logprobs": None, "finish_reason": event.finish_reason}]


class ChunkFormatter:
    """The SSE events of one streamed answer (`data: {chat.completion.chunk}\\n\\n`). A content delta, one per
    token or so, is filled into a template made once per stream: only its text is JSON-encoded, and the event is the
    very string `json.dumps` of the whole chunk gives (`_chunk`). Other events (verdict, finish, usage) go through
    `_chunk`."""

    def __init__(self, chat: ChatRequest, model_id: str, created: int):
        self.chat, self.model_id, self.created = chat, model_id, created
        head = _chunk(chat, model_id, created, [])
        self._head = head[: head.rindex("[]")] + "["  # 'data: {"id": ..., "choices": ['

    def delta(self, index: int, text: str) -> str:
        return (
            f'{self._head}{{"index": {index}, "delta": {{"content": {json.dumps(text)}}}, "logprobs": null, '
            '"finish_reason": null}]}\n\n'
        )

    def event(self, event: StreamEvent) -> str:
        """The SSE event of a delta, finish or usage `StreamEvent`."""
        if event.kind == "delta":
            return self.delta(event.index, event.text)
        if event.kind == "usage":
            return _chunk(self.chat, self.model_id, self.created, [], usage=event.usage.to_dict())
        return _chunk(self.chat, self.model_id, self.created, _event_choices(event))

    def verdict(self, safety: dict) -> str:
        """The first event: every choice's role delta, and the verdict as a top-level `safety`."""
        roles = [{"index": i, "delta": {"role": "assistant"}, "logprobs": None, "finish_reason": None} for i in range(self.chat.n)]
        return _chunk(self.chat, self.model_id, self.created, roles, safety=safety)


async def _stream_response(request: Request, backend: ServingBackend, chat: ChatRequest) -> _EventStream:
    """SSE: the verdict chunk (role delta, top-level `safety`), the content deltas, one finish per choice, the usage
    chunk when asked for, then `data: [DONE]`. An error before the verdict is an ordinary error response. Events the
    backend hands over together (a list) go out in one write."""
    start, metrics = time.monotonic(), request.app.state.metrics
    events = backend.stream(chat).__aiter__()
    watch = ClientWatch(request, chat.client_gone)
    try:
        first, *rest = _as_list(await watch.run(events.__anext__()))  # errors (queue full, ...) keep their status
    finally:
        watch.stop()
    if first.kind != "verdict":
        raise RuntimeError(f"{type(backend).__name__}.stream must yield the verdict first, got {first.kind!r}")
    metrics.observe_verdict("/v1/chat/completions", first.safety)
    formatter = ChunkFormatter(chat, backend.model_id, int(time.time()))
    first_delta = []

    def sse(items: list[StreamEvent]) -> bytes:
        if not first_delta and any(event.kind == "delta" for event in items):
            metrics.time_to_first_token.observe(time.monotonic() - start)
            first_delta.append(True)
        return "".join(map(formatter.event, items)).encode()

    async def body():
        yield formatter.verdict(first.safety).encode() + sse(rest)
        try:
            async for item in events:
                yield sse(_as_list(item))
        except ServingError as error:
            yield f"data: {json.dumps(error.to_dict())}\n\n".encode()
        except Exception:  # noqa: BLE001 - headers are sent: the error goes in the stream, the traceback to the log
            logger.exception("%s: stream failed", chat.request_id)
            yield f"data: {json.dumps(ServingError('Internal server error.', status=500, type='server_error').to_dict())}\n\n".encode()
        finally:
            close = getattr(events, "aclose", None)
            if close is not None:
                await close()
        yield b"data: [DONE]\n\n"

    return _EventStream(body(), chat.client_gone, headers={"Cache-Control": "no-cache"})


def _as_list(item) -> list[StreamEvent]:
    """A backend's stream item: one `StreamEvent`, or a list of those handed over together."""
    return item if isinstance(item, list) else [item]


__all__ = ["ServerConfig", "create_app", "check_api_key", "completion_json", "moderation_result"]
