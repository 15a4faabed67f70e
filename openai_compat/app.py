"""The Starlette app: routes, middleware (CORS, API keys, errors) and the engine's lifespan.

The engine loads in the background after the server starts listening, so `/health` can
answer 503 while the model loads; every generation route checks readiness first.
Middleware, outermost first: CORS → API keys → body size limit → routes; errors of any kind
leave as OpenAI's envelope.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine import AsyncEngine, __version__
from openai_compat.config import Settings
from openai_compat.errors import OpenAIError, body_too_large, from_exception, invalid_api_key, model_not_found
from openai_compat.metrics import CONTENT_TYPE
from openai_compat.openapi import openapi_document
from openai_compat.prompt_size import PromptBound
from openai_compat.protocol import ModelCard, ModelList
from openai_compat.server_state import ServerState
from openai_compat.serving_chat import ChatServing
from openai_compat.serving_completions import CompletionServing
from openai_compat.serving_tokenize import detokenize, tokenize
from openai_compat.sse import RAW_SEND

logger = logging.getLogger("lightgate")

ProgressFn = Callable[[float, str], None]
OPEN_PATHS = frozenset({"/health", "/metrics", "/version", "/openapi.json"})


class APIKeyMiddleware:
    """401 `invalid_api_key` unless `Authorization: Bearer <key>` names a configured key."""

    def __init__(self, app: ASGIApp, api_keys: list[str]) -> None:
        self.app = app
        self.api_keys = [key.encode() for key in api_keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        given = token.strip().encode()
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(given, key) for key in self.api_keys):
            await invalid_api_key().response()(scope, receive, send)
            return
        await self.app(scope, receive, send)


class BodySizeLimitMiddleware:
    """413 for a request body over `max_bytes`, before it is in memory: at once when its
    Content-Length says so (the body is never read), else as soon as the bytes read pass the
    limit (a chunked body, or one longer than it said)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            declared = int(Headers(scope=scope).get("content-length", "0"))
        except ValueError:  # the HTTP parser vouches for the header; the bytes are counted anyway
            declared = 0
        if declared > self.max_bytes:
            await body_too_large(self.max_bytes).response()(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Raised where the handler reads its body; the app answers it like any error.
                    raise body_too_large(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)


def _server(request: Request) -> ServerState:
    state: ServerState = request.app.state.server
    return state


async def health(request: Request) -> Response:
    state = _server(request)
    if state.healthy and not state.draining:
        return JSONResponse({"status": "ok"})
    status = "loading" if not state.loaded and state.load_error is None else "unavailable"
    return JSONResponse({"status": status}, status_code=503)


async def metrics(request: Request) -> Response:
    return Response(_server(request).metrics.render(), media_type=CONTENT_TYPE)


async def version(request: Request) -> Response:
    return JSONResponse({"version": __version__})


async def openapi(request: Request) -> Response:
    return JSONResponse(openapi_document(__version__))


def _model_cards(state: ServerState) -> list[ModelCard]:
    state.check_ready()
    root = state.settings.engine.model or state.engine.model_name
    return [
        ModelCard(id=name, created=state.created, root=root, max_model_len=state.engine.max_model_len)
        for name in state.model_names
    ]


async def list_models(request: Request) -> Response:
    return JSONResponse(ModelList(data=_model_cards(_server(request))).model_dump())


async def get_model(request: Request) -> Response:
    name = request.path_params["model"]
    for card in _model_cards(_server(request)):
        if card.id == name:
            return JSONResponse(card.model_dump())
    raise model_not_found(name)


async def _openai_error(request: Request, exc: Exception) -> Response:
    return from_exception(exc, _server(request).settings.retry_after_s).response()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return OpenAIError(str(exc.detail), exc.status_code, param=None, code=code,
                       headers=dict(exc.headers) if exc.headers else None).response()


async def _load(state: ServerState, progress: ProgressFn | None, on_loaded: Callable[[ServerState], None] | None,
                on_failed: Callable[[BaseException], None] | None, owns_process: bool) -> None:
    try:
        await state.engine.start(progress=progress, freeze_startup_objects=owns_process)
    except Exception as e:
        state.load_error = e
        logger.error("the model failed to load: %s", e, exc_info=e)
        if on_failed is not None:
            on_failed(e)
        return
    tokenizer = state.engine.tokenizer
    if tokenizer is not None:
        try:
            state.prompt_bound = await state.run_tokenizer(PromptBound.of, tokenizer)
        except Exception as e:  # only a shortcut: without it every prompt is tokenized before its check
            logger.warning("no bound on prompt tokens from characters for this tokenizer: %s", e)
    state.mark_loaded()
    if on_loaded is not None:
        on_loaded(state)
    # From here on, watch the worker: once it is dead the server answers 503 for a short while
    # (so clients and probes see why), then stops with a non-zero status for a supervisor to act on.
    while not state.engine.errored:
        await asyncio.sleep(0.25)
    delay = state.settings.dead_worker_exit_delay
    logger.error("the engine's worker died: answering 503, exiting with status 1 in %.0f s", delay)
    await asyncio.sleep(delay)
    if on_failed is not None:
        on_failed(state.engine.dead_error or RuntimeError("the engine's worker died"))


def build_app(
    settings: Settings,
    engine: AsyncEngine | None = None,
    *,
    progress: ProgressFn | None = None,
    on_loaded: Callable[[ServerState], None] | None = None,
    on_load_failed: Callable[[BaseException], None] | None = None,
    owns_process: bool = False,
) -> Starlette:
    """The app. `owns_process`: it runs in a process of its own (`lightgate serve`), whose start-up
    objects the engine may hide from the garbage collector once loaded."""
    state = ServerState(settings, engine if engine is not None else AsyncEngine(settings.engine))
    chat, completions = ChatServing(state), CompletionServing(state)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        loader = asyncio.create_task(
            _load(state, progress, on_loaded, on_load_failed, owns_process), name="lightgate-load"
        )
        try:
            yield
        finally:
            state.draining = True
            if not loader.done():
                loader.cancel()
            await asyncio.gather(loader, return_exceptions=True)
            await state.engine.shutdown()
            state.close()

    routes = [
        Route("/v1/chat/completions", chat.create, methods=["POST"]),
        Route("/v1/completions", completions.create, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/version", version, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]
    middleware = []
    if settings.cors_allow_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=settings.cors_allow_origins,
                allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=settings.cors_allow_headers,
                expose_headers=["Retry-After"],
            )
        )
    if settings.api_keys:
        middleware.append(Middleware(APIKeyMiddleware, api_keys=list(settings.api_keys)))
    if settings.max_request_body_bytes:
        middleware.append(Middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_body_bytes))
    handlers: dict[Any, Any] = {OpenAIError: _openai_error, HTTPException: _http_error, Exception: _openai_error}
    app = _App(routes=routes, middleware=middleware, exception_handlers=handlers, lifespan=lifespan)
    app.state.server = state
    return app


class _App(Starlette):
    """Puts the server's own `send` in each scope (`RAW_SEND`): a pushed stream's body messages
    go through it, past the middleware's wrappers (which look at a response's start only), at
    one event per token per stream."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[RAW_SEND] = send
        await super().__call__(scope, receive, send)
