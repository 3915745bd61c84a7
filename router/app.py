"""The router: an OpenAI-compatible front door that sends each request to one prefill and one decode server.

Per request (DESIGN.md §2 step 1): check the key and the body (size, JSON, nesting, strings: `router.intake` and
`contracts.http`, the limits the servers apply too), then hand it to the dispatcher (`router.dispatch`:
pick P and D, draw rooms, POST to both, retry a refused connection) and answer with D's result, relaying a stream
through `router.sse`. It talks HTTP only: no `engine`, no `transfer`, no `serving`.

Before dispatch it decides where the prompts are prefilled (`router.local_prefill`: short ones on the decode server
itself), counts that in pdserve_pd_decision_total{path} and says it in every answer's `X-PD-Prefill` header.

Client disconnects are noticed by a task that waits on the ASGI `receive` channel (`sse.client_gone`). That task
races the upstream work both while waiting for D and while relaying D's stream, so a client that goes away at any
point gets its rids aborted on both servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from contracts.http import BodyError, parse_json_object
from contracts.pd import DIALECT_OF_PATH, RidError, batch_size
from router import telemetry
from router.config import RouterConfig
from router.dispatch import Dispatcher, Exchange, Outcome
from router.errors import CLIENT_CLOSED, UpstreamFailure, openai_error
from router.intake import RequestBody
from router.local_prefill import PD_HEADER, PrefillDecider
from router.pd_body import assign_rids
from router.sse import RelayResponse, client_gone
from router.upstream import MODELS_TIMEOUT_S, Upstreams

log = logging.getLogger("pdserve.router")

__all__ = ["GENERATE_PATHS", "PD_HEADER", "Router", "RouterApp", "create_app", "run_router"]

GENERATE_PATHS = tuple(DIALECT_OF_PATH)
FORWARDED_HEADERS = ("authorization", "x-request-id", "x-correlation-id")
# Bodies larger than this are counted (conditional disaggregation) in a worker thread, so other requests' streams do
# not stall meanwhile; the servers' fronts tokenize long prompts off their loop for the same reason.
DECIDE_INLINE_MAX_BYTES = 16384


class Router:
    """The request-facing side: auth, body checks, the race of the upstream work against client and deadline."""

    def __init__(self, cfg: RouterConfig, decider: PrefillDecider | None = None) -> None:
        self.cfg = cfg
        self.up = Upstreams(cfg)
        self.dispatcher = Dispatcher(cfg, self.up)
        self.decider = decider if decider is not None else PrefillDecider.from_config(cfg)

    async def start(self) -> None:
        await self.up.start()

    async def stop(self) -> None:
        await self.up.stop()

    def check_auth(self, request: Request) -> Response | None:
        if self.cfg.api_key is None:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.cfg.api_key.encode()):
            return None
        return openai_error(
            401, "invalid or missing API key", code="invalid_api_key", headers={"www-authenticate": "Bearer"}
        )

    def _timeout_message(self) -> str:
        return f"request timed out after {self.cfg.request_timeout_s:g} s"

    async def _read(self, request: Request, path: str) -> tuple[dict[str, Any], int | None, int] | Response:
        """The checked body, its batch size and its size in bytes, or the answer that refuses the request before
        dispatch."""
        body_in = RequestBody(request.headers, request.receive, self.cfg.max_body_bytes)
        denied = self.check_auth(request)
        if denied is not None:
            telemetry.request_rejected(401)
            return await self._refuse(denied, body_in)
        try:
            body = parse_json_object(await body_in.read())  # size, JSON, nesting and strings, as the servers check
        except ClientDisconnect:
            telemetry.request_rejected(CLIENT_CLOSED, aborted=True)
            return Response(status_code=CLIENT_CLOSED)
        except BodyError as e:
            telemetry.request_rejected(e.status)
            return await self._refuse(openai_error(e.status, e.message), body_in)
        n = batch_size(body, DIALECT_OF_PATH[path])
        try:
            assign_rids(body.get("rid"), n)  # the servers' rid rule: refuse here what they would refuse
        except RidError as e:
            telemetry.request_rejected(400)
            return openai_error(400, str(e), param="rid")
        return body, n, body_in.size

    @staticmethod
    async def _refuse(response: Response, body_in: RequestBody) -> Response:
        """A refusal sent before the body was read whole: drop the rest, so the connection carries the client's next
        request; where that would mean reading far too much, close the connection after the answer instead."""
        if not await body_in.discard():
            response.headers["connection"] = "close"
        return response

    async def handle(self, request: Request, path: str) -> Response:
        t0 = time.perf_counter()
        parsed = await self._read(request, path)
        if isinstance(parsed, Response):
            return parsed
        body, n, size = parsed
        # counting tokens is CPU work: a large body's (rare: a short prompt is a small body) is done off the event loop
        decide = self.decider.decide
        dialect = DIALECT_OF_PATH[path]
        if self.decider.active and size > DECIDE_INLINE_MAX_BYTES:
            pd_path = await asyncio.to_thread(decide, body, dialect)
        else:
            pd_path = decide(body, dialect)
        ex = Exchange(
            path=path,
            body=body,
            n=n,
            client_rid=body.get("rid"),
            headers=[(k, v) for k in FORWARDED_HEADERS if (v := request.headers.get(k)) is not None],
            t0=t0,
            deadline=t0 + self.cfg.request_timeout_s,
            pd_path=pd_path,
        )
        telemetry.count_decision(ex.pd_path)
        telemetry.request_started()
        watcher = asyncio.create_task(client_gone(request.receive))
        work = asyncio.create_task(self.dispatcher.dispatch(ex))
        try:
            done, _ = await asyncio.wait({work, watcher}, timeout=ex.remaining(), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the server is shutting down under us
            work.cancel()
            watcher.cancel()
            self.dispatcher.abort_legs(ex.attempt)
            ex.finish(CLIENT_CLOSED, aborted=True)
            raise
        if work not in done:
            return await self._gave_up(ex, work, watcher, client_left=watcher in done)
        return self._answer(ex, work, watcher)

    async def _gave_up(
        self, ex: Exchange, work: asyncio.Task[Outcome], watcher: asyncio.Task[None], client_left: bool
    ) -> Response:
        """The client left, or the deadline passed, before D answered: stop the work, abort both legs."""
        work.cancel()
        with contextlib.suppress(BaseException):
            await work
        self.dispatcher.abort_legs(ex.attempt)
        if client_left:
            log.info("client went away while waiting; aborted %s", ex.attempt and ex.attempt.rids)
            ex.finish(CLIENT_CLOSED, aborted=True)
            return Response(status_code=CLIENT_CLOSED)
        watcher.cancel()
        ex.finish(504)
        return openai_error(504, self._timeout_message(), headers={PD_HEADER: ex.pd_path.value})

    def _answer(self, ex: Exchange, work: asyncio.Task[Outcome], watcher: asyncio.Task[None]) -> Response:
        """The client's response from the finished dispatch: D's body, D's relayed stream, or an error."""
        abort = self.dispatcher.abort_legs
        decided = {PD_HEADER: ex.pd_path.value}
        try:
            out = work.result()
        except UpstreamFailure as e:  # every attempt already cleaned up after itself (legs closed and aborted)
            watcher.cancel()
            ex.finish(e.status)
            return openai_error(e.status, e.message, headers=decided)
        except Exception as e:  # a router bug: still stop the upstream work and answer in the API's format
            log.exception("request failed")
            watcher.cancel()
            abort(ex.attempt)
            ex.finish(500)
            return openai_error(500, f"router error: {type(e).__name__}: {e}", headers=decided)
        out.headers.update(decided)
        if out.stream is not None:
            return RelayResponse(ex, out, watcher, lambda: abort(ex.attempt), self.cfg.request_timeout_s)
        watcher.cancel()
        ex.finish(out.status)
        return Response(content=out.body, status_code=out.status, headers=out.headers)

    # ---- everything else -------------------------------------------------------------------------------

    async def models(self) -> Response:
        order = sorted(self.cfg.decode, key=lambda u: not self.up.is_healthy(u))
        for url in order:
            try:
                r = await self.up.client(url).get(url + "/v1/models", timeout=MODELS_TIMEOUT_S)
            except httpx.HTTPError:
                continue
            if r.status_code == 200:
                return Response(r.content, media_type=r.headers.get("content-type", "application/json"))
        return openai_error(503, "no decode server answered /v1/models: " + ", ".join(order))

    async def readiness(self) -> Response:
        p_urls, d_urls = self.up.prefill_urls, self.cfg.decode
        oks = await asyncio.gather(*(self.up.probe(u) for u in p_urls + d_urls))
        state = {}
        for role, urls, part in (("prefill", p_urls, oks[: len(p_urls)]), ("decode", d_urls, oks[len(p_urls) :])):
            state[role] = {
                "healthy": [u for u, ok in zip(urls, part, strict=True) if ok],
                "down": [u for u, ok in zip(urls, part, strict=True) if not ok],
            }
        ready = bool(state["prefill"]["healthy"]) and bool(state["decode"]["healthy"])
        body = {"ready": ready, **state, "local_prefill": self.decider.info()}
        return JSONResponse(body, status_code=200 if ready else 503)

    async def get_load(self) -> Response:
        urls = self.up.all_urls
        loads = await asyncio.gather(*(self.up.fetch_load(u) for u in urls))
        rows = [{"url": u, "load": v} for u, v in zip(urls, loads, strict=True)]
        n_p = len(self.up.prefill_urls)
        return JSONResponse({"prefill": rows[:n_p], "decode": rows[n_p:]})


class RouterApp:
    """The ASGI entry. Generate POSTs go straight to `Router.handle`: FastAPI's middleware stack would otherwise wrap
    every relayed chunk's `send` in several layers (profiled at ~12% of the router's CPU under streaming load), and
    the router answers its own errors anyway. Everything else, lifespan included, goes to the FastAPI app."""

    def __init__(self, router: Router, api: FastAPI) -> None:
        self.router, self.api, self.state = router, api, api.state
        self._paths = frozenset(GENERATE_PATHS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self._paths:
            try:
                response = await self.router.handle(Request(scope, receive), scope["path"])
            except Exception as e:  # a router bug: an answer in the API's format, not uvicorn's bare 500 and a close
                log.exception("request failed")
                response = openai_error(500, f"router error: {type(e).__name__}: {e}")
            await response(scope, receive, send)
        else:
            await self.api(scope, receive, send)


def create_app(cfg: RouterConfig) -> RouterApp:
    """The router as an ASGI app; its lifespan opens the upstream clients and starts health checks. Raises
    RouterConfigError when --tokenizer names a directory without a loadable tokenizer."""
    router = Router(cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await router.start()
        try:
            yield
        finally:
            await router.stop()

    app = FastAPI(title="pdserve router", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.router = router

    def generate_endpoint(path: str) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            return await router.handle(request, path)

        return endpoint

    for path in GENERATE_PATHS:  # reached only through FastAPI directly; RouterApp takes these first
        app.add_api_route(path, generate_endpoint(path), methods=["POST"], response_model=None)

    @app.get("/health", response_model=None)
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/readiness", response_model=None)
    async def readiness() -> Response:
        return await router.readiness()

    @app.get("/metrics", response_model=None)
    async def metrics() -> Response:
        data, content_type = telemetry.render()
        return Response(data, headers={"content-type": content_type})

    @app.get("/v1/models", response_model=None)
    async def models(request: Request) -> Response:
        return router.check_auth(request) or await router.models()

    @app.get("/get_load", response_model=None)
    async def get_load(request: Request) -> Response:
        return router.check_auth(request) or await router.get_load()

    return RouterApp(router, app)


def run_router(cfg: RouterConfig, log_level: str = "warning") -> None:
    """Serves the router on cfg.host:cfg.port until interrupted."""
    import uvicorn

    app = create_app(cfg)  # before serving: a bad --tokenizer fails the start, not the first request
    # long keep-alive, as the servers use: benchmark clients hold connections across bursts
    uvicorn.run(
        app, host=cfg.host, port=cfg.port, log_level=log_level, timeout_keep_alive=60,
        timeout_graceful_shutdown=5,
    )  # fmt: skip
