"""The FastAPI app of a front: routes, error handling, lifespan, and the uvicorn runner.

Every error a client can see is an OpenAI-style error body: `APIError`s from the endpoints, FastAPI's
validation errors and Starlette's HTTP errors (404, 405) go through exception handlers, and anything a
route did not handle becomes a logged 500 in `_CatchAllMiddleware`. The routes are thin: each calls one
method of `Front`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from contracts.metrics import render, setup_multiprocess
from serving import api
from serving.front.config import FrontConfig
from serving.front.generation import GenerationEndpoints
from serving.front.info import InfoEndpoints
from serving.front.state import error_response

__all__ = ["Front", "create_app", "run_front"]

logger = logging.getLogger("pdserve.front")


class Front(GenerationEndpoints, InfoEndpoints):
    """Everything the routes call: the shared `FrontState` plus both endpoint groups (`app.state.front`)."""


class _CatchAllMiddleware:
    """Any exception a route did not handle becomes a logged 500 with an OpenAI error body.

    A plain `exception_handler(Exception)` would answer the same, but Starlette re-raises the error
    after it, so the server logs every traceback twice; this one swallows it once logged.
    """

    def __init__(self, app: Callable[[Scope, Receive, Send], Any]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except Exception:
            logger.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if not started:  # otherwise the status is already out; the client sees a cut-off body
                await error_response(api.APIError(500, "internal server error"))(scope, receive, send)


def create_app(cfg: FrontConfig) -> FastAPI:
    """The front's FastAPI app. Loads the tokenizer now; binds the ZMQ sockets when the app starts."""
    if cfg.role not in ("prefill", "decode"):
        raise ValueError(f"FrontConfig.role must be 'prefill' or 'decode', got {cfg.role!r}")
    if cfg.prometheus_multiproc_dir is not None:
        setup_multiprocess(cfg.prometheus_multiproc_dir)
    front = Front(cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await front.scheduler.start()
        try:
            yield
        finally:
            await front.scheduler.stop()

    # Routes take the raw Request and parse bodies themselves (serving.api), so FastAPI never
    # produces a 422; the OpenAPI schema would document nothing useful.
    app = FastAPI(title="pdserve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.front = front

    _add_error_handlers(app)
    app.add_middleware(_CatchAllMiddleware)
    _add_generation_routes(app, front)
    _add_info_routes(app, front)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error FastAPI or Starlette would answer itself gets the OpenAI error body instead."""

    @app.exception_handler(api.APIError)
    async def _api_error(request: Request, exc: api.APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(api.APIError(400, f"invalid request: {exc.errors()}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            api.APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code, headers=exc.headers
        )


def _add_generation_routes(app: FastAPI, front: Front) -> None:
    """The three generation dialects; each route only names its dialect."""

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        return await front.handle("generate", request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await front.handle("completion", request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await front.handle("chat", request)


def _add_info_routes(app: FastAPI, front: Front) -> None:
    """Control, health, info and metrics endpoints (SGLang's names, with their `get_` aliases)."""

    @app.post("/abort_request")
    async def abort_request(request: Request) -> Response:
        return await front.abort_request(request)

    @app.post("/flush_cache")
    async def flush_cache() -> Response:
        # The router fans this out to every server; there is no prefix cache to flush here.
        return JSONResponse({})

    @app.get("/health")
    async def health() -> Response:
        return front.health()

    @app.get("/health_generate")
    async def health_generate() -> Response:
        return await front.health_generate()

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse(front.models())

    @app.get("/server_info")
    @app.get("/get_server_info")
    async def server_info() -> Response:
        return JSONResponse(front.server_info())

    @app.get("/model_info")
    @app.get("/get_model_info")
    async def model_info() -> Response:
        return JSONResponse(front.model_info())

    @app.get("/get_load")
    async def get_load() -> Response:
        return JSONResponse(front.load())

    @app.get("/metrics")
    async def metrics() -> Response:
        # In multiprocess mode this reads every process's files: keep it off the event loop.
        body, content_type = await asyncio.to_thread(render)
        return Response(body, media_type=content_type)


def run_front(cfg: FrontConfig, host: str, port: int) -> None:
    """Serve the front with uvicorn until interrupted."""
    # A keep-alive longer than typical client pool idle times, so the router never reuses a
    # connection the server is just closing.
    # a bounded graceful shutdown: SIGTERM must end the server (and so its scheduler) promptly
    uvicorn.run(
        create_app(cfg), host=host, port=port, log_level="warning", timeout_keep_alive=60, timeout_graceful_shutdown=5
    )
