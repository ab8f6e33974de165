"""The OpenAI-compatible gateway: `build_app` wires routes, auth, errors and metrics around a backend."""

from __future__ import annotations

import hmac
import time
import uuid
from collections.abc import Callable

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from diptych.engine.messages import GenerateRequest
from diptych.engine.tokenizer import Tokenizer
from diptych.router.backend import GenerationBackend
from diptych.router.body import read_json_object
from diptych.router.errors import APIError, install_error_handlers
from diptych.router.guard import guarded
from diptych.router.lifecycle import generate_text
from diptych.router.metrics import GatewayMetrics
from diptych.router.openapi import install_openapi
from diptych.router.preprocess import build_request, chat_prompt, completion_prompt
from diptych.router.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from diptych.router.render import ChatRenderer, CompletionRenderer, Renderer
from diptych.router.settings import GatewaySettings
from diptych.router.state import Admission, Gateway
from diptych.router.streaming import sse_stream

CLIENT_CLOSED = 499  # nginx's status for a client that left before the response; nobody receives it
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


def build_app(backend: GenerationBackend, tokenizer: Tokenizer, settings: GatewaySettings) -> FastAPI:
    metrics = GatewayMetrics(backend.load)
    backend.add_timing_listener(metrics.observe_phase)
    gw = Gateway(backend, tokenizer, settings, metrics, Admission(settings.max_pending))
    app = FastAPI(title="diptych", summary="OpenAI-compatible gateway")
    app.state.gateway = gw  # the server's shutdown sets gw.closing
    install_error_handlers(app)
    install_openapi(app)
    app.include_router(_open_routes(gw))
    app.include_router(_api_routes(gw), dependencies=[Depends(_api_key_check(settings.api_keys))])
    app.add_middleware(_CountRequests, counter=metrics.requests)
    return app


def _api_key_check(keys: tuple[str, ...]) -> Callable[[Request], None]:
    expected = [k.encode() for k in keys]

    def check(request: Request) -> None:
        if not expected:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # compare_digest against every key: the time taken says nothing about which one nearly matched
        matches = [hmac.compare_digest(token.strip().encode(), k) for k in expected]
        if scheme.lower() != "bearer" or not any(matches):
            raise APIError(
                401, "missing or invalid API key (send 'Authorization: Bearer <key>')", code="invalid_api_key"
            )

    return check


def _open_routes(gw: Gateway) -> APIRouter:
    routes = APIRouter()

    @routes.get("/health")
    async def health() -> Response:
        if not await gw.backend.check_health():
            return gw.retry_later(503, "the backend is not healthy").response()
        return JSONResponse({"status": "ok"})

    @routes.get("/metrics")
    async def metrics() -> Response:
        return Response(gw.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return routes


def _api_routes(gw: Gateway) -> APIRouter:
    routes = APIRouter(prefix="/v1")
    limit = gw.settings.max_body_bytes

    @routes.get("/models")
    async def models() -> ModelList:
        return ModelList(
            data=[ModelCard(id=name, max_model_len=gw.backend.max_model_len) for name in gw.model_names]
        )

    @routes.post("/chat/completions")
    async def chat(request: Request) -> Response:
        arrived = time.monotonic()
        body = ChatCompletionRequest.model_validate(await read_json_object(request, limit))
        renderer = _renderer(ChatRenderer, "chatcmpl", gw, body.model, body.logprobs)
        prompt = chat_prompt(gw.tokenizer, body)
        job = build_request(renderer.request_id, prompt, body, gw.backend.max_model_len, gw.timeout_s)
        return await _respond(gw, request, job, arrived, renderer, body.stream, body.include_usage)

    @routes.post("/completions")
    async def completions(request: Request) -> Response:
        arrived = time.monotonic()
        body = CompletionRequest.model_validate(await read_json_object(request, limit))
        renderer = _renderer(CompletionRenderer, "cmpl", gw, body.model, body.logprobs is not None)
        prompt = completion_prompt(gw.tokenizer, body)
        job = build_request(renderer.request_id, prompt, body, gw.backend.max_model_len, gw.timeout_s)
        return await _respond(gw, request, job, arrived, renderer, body.stream, body.include_usage)

    return routes


def _renderer(kind: type[Renderer], prefix: str, gw: Gateway, model: str | None, logprobs: bool) -> Renderer:
    request_id = f"{prefix}-{uuid.uuid4().hex}"
    return kind(request_id, gw.resolve_model(model), int(time.time()), gw.tokenizer, logprobs)


async def _respond(
    gw: Gateway,
    request: Request,
    job: GenerateRequest,
    arrived: float,
    renderer: Renderer,
    stream: bool,
    include_usage: bool,
) -> Response:
    """Run the request; errors before the first token keep their HTTP status, even when streaming."""
    if not await gw.backend.check_health():
        raise gw.retry_later(503, "the backend is not healthy")
    deadline = arrived + gw.settings.request_timeout_s
    source = generate_text(gw, job, arrived)
    events = guarded(request, source, deadline, gw.settings.disconnect_poll_s, gw.closing)
    first = await anext(events, None)
    if first is None:
        return Response(status_code=CLIENT_CLOSED)
    if stream:
        body = sse_stream(first, events, renderer, include_usage)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(body, media_type="text/event-stream", headers=headers)
    deltas = [first, *[delta async for delta in events]]
    if deltas[-1].finish_reason is None:
        return Response(status_code=CLIENT_CLOSED)
    return Response(renderer.response(deltas).model_dump_json(), media_type="application/json")


class _CountRequests:
    """Counts every response by endpoint and status code (pure ASGI: streaming passes straight through)."""

    def __init__(self, app: ASGIApp, counter: Counter) -> None:
        self.app = app
        self.counter = counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"] if scope["path"] in ENDPOINTS else "other"
        status = 500  # if the app fails before starting a response, the server answers 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.counter.labels(endpoint=path, status=str(status)).inc()
