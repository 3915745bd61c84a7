"""The router: an OpenAI-compatible front door that sends each request to one prefill and one decode server.

Per request (DESIGN.md §2 step 1): pick P and D, draw a bootstrap room per prompt, POST the same body plus
`bootstrap_host`/`bootstrap_port`/`bootstrap_room`/`rid` to both at once, and relay D's answer. P's answer is
only looked at while nothing has reached the client yet (a 4xx from P is returned; a refused connection to
either leg retries with a new pair). It talks HTTP only: no `engine`, no `transfer`.

Client disconnects are noticed by a task that waits on the ASGI `receive` channel: once the request body has
been read, the only message that can still arrive there is `http.disconnect`. That task races the upstream
work both while waiting for D and while relaying D's stream, so a client that goes away at any point gets its
rids aborted on both servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from router import telemetry
from router.config import PrefillServer, RouterConfig
from router.policies import LoadTracker, make_policy, parse_load

log = logging.getLogger("pdserve.router")

GENERATE_PATHS = ("/generate", "/v1/completions", "/v1/chat/completions")
ROOM_MAX = 2**63 - 1
# Aborts, health probes and load polls: short, so a dead server costs little and never holds a request.
CONTROL_TIMEOUT_S = 2.0
MODELS_TIMEOUT_S = 5.0
# Per upstream server: each request holds one connection to its P and one to its D (plus short-lived aborts);
# sized far past the concurrency a server batches, so the pool never queues a request.
MAX_CONNECTIONS = 1024
MAX_KEEPALIVE = 256
# Below uvicorn's default keep-alive timeout (5 s, which SGLang servers keep): reusing a connection the server is
# closing at that moment fails the request, so the router drops idle connections first.
KEEPALIVE_S = 4.0
FORWARDED_HEADERS = ("authorization", "x-request-id", "x-correlation-id")
# Hop-by-hop and framing headers are the router's own business; content-encoding goes because httpx decodes.
_DROPPED_HEADERS = frozenset(
    {"content-length", "transfer-encoding", "connection", "keep-alive", "content-encoding", "date", "server"}
)
_RETRYABLE = (httpx.ConnectError, httpx.ConnectTimeout)
# Status for a request whose client is gone: nobody reads it, it only shows in logs (nginx's convention).
CLIENT_CLOSED = 499


def error_type(status: int) -> str:
    """OpenAI's `error.type` for a status, spelled as the pdserve servers spell it (clients switch on it)."""
    if status == 503:
        return "service_unavailable"
    if status == 504:
        return "timeout"
    return "server_error" if status >= 500 else "invalid_request_error"


def error_body(status: int, message: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type(status), "param": None, "code": code}}


def openai_error(
    status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    """An OpenAI-style error response."""
    return JSONResponse(error_body(status, message, code), status_code=status, headers=headers)


def _sse_error(status: int, message: str) -> bytes:
    """An SSE error event (carrying the status, as the servers' do) followed by the end of the stream."""
    err = error_body(status, message)
    err["error"]["status"] = status
    return b"data: " + json.dumps(err).encode() + b"\n\ndata: [DONE]\n\n"


def batch_size(body: dict[str, Any]) -> int | None:
    """How many prompts the request carries: None for a single prompt, n for a batch. A batch is `text` or
    `prompt` as a list of strings, or `prompt` or `input_ids` as a list of token-id lists; a flat token-id list
    is one prompt."""
    for key, kinds in (("text", (str,)), ("prompt", (str, list)), ("input_ids", (list,))):
        v = body.get(key)
        if isinstance(v, list) and v:
            for kind in kinds:
                if all(isinstance(x, kind) for x in v):
                    return len(v)
    return None


def assign_rids(client_rid: Any, n: int | None) -> list[str]:
    """One rid per prompt: the client's when it gave them (a string, or a list of n for a batch), else fresh
    uuid hex. Raises ValueError with a client-facing message when the given rid does not fit the prompt count."""
    if client_rid is None:
        return [uuid.uuid4().hex for _ in range(n or 1)]
    if n is None:
        if isinstance(client_rid, str) and client_rid:
            return [client_rid]
        raise ValueError("rid must be a non-empty string for a single prompt")
    if (
        isinstance(client_rid, list)
        and len(client_rid) == n
        and all(isinstance(r, str) and r for r in client_rid)
        and len(set(client_rid)) == n
    ):
        return list(client_rid)
    raise ValueError(f"rid must be a list of {n} distinct non-empty strings for a batch of {n} prompts")


def draw_rooms(n: int) -> list[int]:
    """n distinct bootstrap rooms in [0, 2**63-1]; from `secrets` so separate router replicas never share a seed."""
    rooms: list[int] = []
    while len(rooms) < n:
        r = secrets.randbelow(ROOM_MAX + 1)
        if r not in rooms:
            rooms.append(r)
    return rooms


def _event_has_content(line: bytes) -> bool:
    """Whether one SSE line is a data event carrying generated output (not a role-only delta or an error)."""
    line = line.strip()
    if not line.startswith(b"data:"):
        return False
    payload = line[5:].strip()
    if not payload or payload == b"[DONE]":
        return False
    try:
        obj = json.loads(payload)
    except ValueError:
        return False
    if not isinstance(obj, dict) or "error" in obj:
        return False
    for choice in obj.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
        if choice.get("text") or delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls"):
            return True
    # SGLang-native /generate events
    return bool(obj.get("text") or obj.get("output_ids"))


class _ContentScanner:
    """Finds the first content-carrying event in an SSE byte stream whose chunks may split lines."""

    _LIMIT = 1 << 20  # a line longer than this is not a token event; drop it rather than grow without bound

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> bool:
        self._buf += chunk
        while b"\n" in self._buf:
            line, _, self._buf = self._buf.partition(b"\n")
            if _event_has_content(line):
                return True
        if len(self._buf) > self._LIMIT:
            self._buf = b""
        return False


def _pass_headers(resp: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in resp.headers.items() if k.lower() not in _DROPPED_HEADERS}


class _LegUnreachable(Exception):
    """A connection to P or D could not be made: nothing reached that server, so the pair can be retried."""

    def __init__(self, role: str, url: str, exc: Exception) -> None:
        super().__init__(f"{role} {url}: {type(exc).__name__}: {exc}")
        self.role, self.url, self.exc = role, url, exc


class _UpstreamFailure(Exception):
    """The request failed before anything reached the client; answered with `status` (502/503/504)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class _Leg:
    role: str
    url: str
    task: asyncio.Task[Any] | None = None  # sends the request and reads what the router needs of the answer
    resp: httpx.Response | None = None
    reaper: asyncio.Task[None] | None = None  # drains an answer the router ignores


@dataclass
class _Attempt:
    prefill: PrefillServer
    decode: str
    rids: list[str]
    rooms: list[int]
    body: bytes
    p: _Leg
    d: _Leg


@dataclass
class _Outcome:
    """What goes back to the client: a complete body, or D's SSE stream (its first chunk already read)."""

    status: int
    headers: dict[str, str]
    source: str  # "prefill" or "decode"
    body: bytes = b""
    stream: AsyncIterator[bytes] | None = None
    first: bytes | None = None
    resp: httpx.Response | None = None


@dataclass
class _Exchange:
    """One client request across its attempts."""

    path: str
    body: dict[str, Any]
    n: int | None
    client_rid: Any
    headers: dict[str, str]
    t0: float
    deadline: float
    attempt: _Attempt | None = None
    failures: list[str] = field(default_factory=list)
    started: bool = False  # response headers went to the client
    tail: bytes = b"\n\n"  # the last bytes sent, to close a half-sent SSE event before an error event
    done: bool = False

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.perf_counter())

    def finish(self, http_status: int, aborted: bool = False) -> None:
        """Records the request's outcome, once (the exchange was counted in flight when created)."""
        if self.done:
            return
        self.done = True
        full = not aborted and 200 <= http_status < 300
        telemetry.request_finished(http_status, aborted, time.perf_counter() - self.t0 if full else None)


async def _client_gone(receive: Receive) -> None:
    """Returns when the client disconnects (or the response completed, which the caller tells apart)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class _RelayResponse(Response):
    """Streams D's SSE answer to the client as it arrives; the router does the work, this only hooks into ASGI."""

    def __init__(self, router: Router, ex: _Exchange, out: _Outcome, watcher: asyncio.Task[None]) -> None:
        # Not calling Response.__init__: it would render an empty body and add content-length: 0.
        self.status_code = out.status
        self.background = None
        self.init_headers(out.headers)
        self._router, self._ex, self._out, self._watcher = router, ex, out, watcher

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._router.relay(self._ex, self._out, self._watcher, send, self.raw_headers)


class Router:
    """Router state shared by all requests: config, the one upstream client, the policy, health and loads."""

    def __init__(self, cfg: RouterConfig) -> None:
        self.cfg = cfg
        self.policy = make_policy(cfg.policy)
        self._prefill_by_url = {p.url: p for p in cfg.prefill}
        self._healthy: dict[str, bool] = {}  # absent: not probed yet, treated as healthy
        self._bg: set[asyncio.Task[Any]] = set()
        self._health_task: asyncio.Task[None] | None = None
        self._clients: dict[str, httpx.AsyncClient] = {}
        self.loads = LoadTracker(self._fetch_load, ttl_s=1.0)

    # ---- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        # One read timeout covers the whole wait for a token; the total is capped separately by the deadline.
        timeout = httpx.Timeout(self.cfg.request_timeout_s, connect=self.cfg.connect_timeout_s)
        limits = httpx.Limits(
            max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_KEEPALIVE, keepalive_expiry=KEEPALIVE_S
        )
        # One client per upstream server rather than one for all: httpcore's pool scans every connection it holds
        # on each request and response, so one shared pool costs O(total connections) per request (measured:
        # ~2x the router's CPU per request at 200 concurrent with 2+2 servers). Per-server pools bound the scan
        # to that server's connections. trust_env=False: proxy settings meant for the outside world must not
        # catch cluster-internal calls.
        for url in [p.url for p in self.cfg.prefill] + self.cfg.decode:
            self._clients[url] = httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False)
        if self.cfg.health_check_interval_s > 0:
            self._health_task = asyncio.create_task(self._health_loop())

    async def stop(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        if self._bg:
            # let in-flight aborts land; whatever is still draining after that is cancelled
            _, pending = await asyncio.wait(set(self._bg), timeout=CONTROL_TIMEOUT_S)
            for t in pending:
                t.cancel()
        await asyncio.gather(*(c.aclose() for c in self._clients.values()))
        self._clients.clear()

    def client(self, url: str) -> httpx.AsyncClient:
        """The upstream client for server `url` (one of the configured servers)."""
        try:
            return self._clients[url]
        except KeyError:
            raise RuntimeError(f"no client for {url}: router not started, or not a configured server") from None

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._bg.add(task)  # keep a reference: the loop holds tasks only weakly
        task.add_done_callback(self._bg.discard)
        return task

    # ---- health and load -------------------------------------------------------------------------------

    async def probe(self, url: str) -> bool:
        try:
            r = await self.client(url).get(url + "/health", timeout=CONTROL_TIMEOUT_S)
            ok = r.status_code == 200
        except httpx.HTTPError:
            ok = False
        prev = self._healthy.get(url)
        self._healthy[url] = ok
        if prev is not ok:
            # losing a server is news; gaining one (as every server does at start-up) is routine
            log.log(logging.INFO if ok else logging.WARNING, "server %s is %s", url, "healthy" if ok else "unhealthy")
        return ok

    async def _health_loop(self) -> None:
        urls = [p.url for p in self.cfg.prefill] + self.cfg.decode
        while True:
            await asyncio.gather(*(self.probe(u) for u in urls))
            await asyncio.sleep(self.cfg.health_check_interval_s)

    async def _fetch_load(self, url: str) -> float | None:
        try:
            r = await self.client(url).get(url + "/get_load", timeout=CONTROL_TIMEOUT_S)
            return parse_load(r.json()) if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    def _candidates(self, urls: list[str], failed: set[str]) -> list[str]:
        """Healthy servers not yet failed in this request; falling back (in that order) when none are left, since
        a server may have come back and trying it beats refusing the request."""
        healthy = [u for u in urls if self._healthy.get(u, True)] or urls
        return [u for u in healthy if u not in failed] or healthy

    async def _pick(self, failed: set[str]) -> tuple[PrefillServer, str]:
        p_urls = [p.url for p in self.cfg.prefill]
        loads = await self.loads.loads(p_urls + self.cfg.decode) if self.policy.needs_loads else None
        p_url = self.policy.choose("prefill", self._candidates(p_urls, failed), loads)
        d_url = self.policy.choose("decode", self._candidates(self.cfg.decode, failed), loads)
        if self.policy.needs_loads:
            self.loads.note_dispatch(p_url)
            self.loads.note_dispatch(d_url)
        return self._prefill_by_url[p_url], d_url

    # ---- aborts and leg cleanup ------------------------------------------------------------------------

    async def _post_abort(self, url: str, rid: str) -> None:
        try:
            await self.client(url).post(url + "/abort_request", json={"rid": rid}, timeout=CONTROL_TIMEOUT_S)
        except httpx.HTTPError as e:
            log.info("abort of %s at %s failed: %s", rid, url, e)

    async def _close_leg(self, leg: _Leg) -> None:
        for t in (leg.reaper, leg.task):
            if t is None:
                continue
            if not t.done():
                t.cancel()
            with contextlib.suppress(BaseException):
                await t  # also retrieves a failure nobody looked at, which asyncio would log as unhandled
        if leg.resp is not None:
            with contextlib.suppress(Exception):
                await leg.resp.aclose()

    def abort_legs(self, att: _Attempt | None, legs: tuple[str, ...] = ("prefill", "decode")) -> None:
        """Fire-and-forget: stop our side of the named legs and tell those servers to drop every rid."""
        if att is None:
            return
        for leg in (att.p, att.d):
            if leg.role in legs:
                self._spawn(self._close_leg(leg))
                for rid in att.rids:
                    self._spawn(self._post_abort(leg.url, rid))

    # ---- one attempt -----------------------------------------------------------------------------------

    def _attempt(self, ex: _Exchange, prefill: PrefillServer, decode: str) -> _Attempt:
        n = ex.n
        rooms = draw_rooms(n or 1)
        # a fresh rid per attempt unless the client chose them: the aborted attempt's rid may still be live
        rids = assign_rids(ex.client_rid, n)
        body = dict(ex.body)
        if n is None:
            body.update(
                bootstrap_host=prefill.host, bootstrap_port=prefill.bootstrap_port, bootstrap_room=rooms[0], rid=rids[0]
            )
        else:
            body.update(
                bootstrap_host=[prefill.host] * n,
                bootstrap_port=[prefill.bootstrap_port] * n,
                bootstrap_room=rooms,
                rid=rids,
            )
        return _Attempt(
            prefill=prefill,
            decode=decode,
            rids=rids,
            rooms=rooms,
            body=json.dumps(body).encode(),
            p=_Leg("prefill", prefill.url),
            d=_Leg("decode", decode),
        )

    async def _open(self, leg: _Leg, ex: _Exchange, att: _Attempt) -> httpx.Response:
        headers = {**ex.headers, "content-type": "application/json"}
        client = self.client(leg.url)
        req = client.build_request("POST", leg.url + ex.path, content=att.body, headers=headers)
        leg.resp = await client.send(req, stream=True)
        return leg.resp

    async def _open_prefill(self, leg: _Leg, ex: _Exchange, att: _Attempt) -> httpx.Response:
        resp = await self._open(leg, ex, att)
        if 400 <= resp.status_code < 500:
            await resp.aread()  # may be returned to the client
        return resp

    async def _open_decode(self, leg: _Leg, ex: _Exchange, att: _Attempt) -> _Outcome:
        resp = await self._open(leg, ex, att)
        ctype = resp.headers.get("content-type", "")
        if resp.is_success and ctype.startswith("text/event-stream"):
            # read up to the first chunk: until then a failure of P can still be answered with a clean status
            chunks = resp.aiter_bytes()
            first = None
            with contextlib.suppress(StopAsyncIteration):
                first = await chunks.__anext__()
            return _Outcome(resp.status_code, _pass_headers(resp), "decode", stream=chunks, first=first, resp=resp)
        body = await resp.aread()
        await resp.aclose()
        return _Outcome(resp.status_code, _pass_headers(resp), "decode", body=body)

    async def _drain(self, leg: _Leg) -> None:
        """Waits for an answer the router ignores (P's, normally) and reads it to the end, so the server sees a
        well-behaved client and the connection goes back to the pool."""
        try:
            assert leg.task is not None
            resp = await leg.task
            if resp.status_code >= 400:
                log.warning("%s %s answered %d (decode's answer is used)", leg.role, leg.url, resp.status_code)
            async for _ in resp.aiter_raw():
                pass
        except httpx.HTTPError as e:
            log.warning("%s %s failed: %s: %s (decode's answer is used)", leg.role, leg.url, type(e).__name__, e)
        finally:
            if leg.resp is not None:
                await leg.resp.aclose()

    async def _run_attempt(self, ex: _Exchange, att: _Attempt) -> _Outcome:
        """Sends to P and D concurrently; returns what the client gets. Raises _LegUnreachable on a connect failure
        of either leg and _UpstreamFailure when D failed otherwise."""
        att.p.task = asyncio.create_task(self._open_prefill(att.p, ex, att))
        att.d.task = asyncio.create_task(self._open_decode(att.d, ex, att))
        p_seen = False
        while True:
            waiting = {att.d.task} if p_seen else {att.p.task, att.d.task}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if not p_seen and att.p.task.done():
                p_seen = True
                exc = att.p.task.exception()
                if isinstance(exc, _RETRYABLE):
                    raise _LegUnreachable("prefill", att.p.url, exc)
                if exc is None and 400 <= att.p.task.result().status_code < 500:
                    resp = att.p.task.result()
                    await resp.aclose()
                    return _Outcome(resp.status_code, _pass_headers(resp), "prefill", body=resp.content)
                if exc is not None:
                    log.warning("prefill %s failed: %s: %s; waiting for decode", att.p.url, type(exc).__name__, exc)
                else:
                    att.p.reaper = self._spawn(self._drain(att.p))
            if att.d.task.done():
                try:
                    out = att.d.task.result()
                except _RETRYABLE as e:
                    raise _LegUnreachable("decode", att.d.url, e) from e
                except httpx.TimeoutException as e:
                    raise _UpstreamFailure(504, f"decode {att.d.url} timed out ({type(e).__name__})") from e
                except httpx.HTTPError as e:
                    raise _UpstreamFailure(502, f"decode {att.d.url} failed: {type(e).__name__}: {e}") from e
                if not p_seen:  # from here on P's answer only needs draining
                    att.p.reaper = self._spawn(self._drain(att.p))
                return out

    async def dispatch(self, ex: _Exchange) -> _Outcome:
        """Runs attempts until one gets an answer; retries (new pair, new room) only on connect failures."""
        failed: set[str] = set()
        attempts = self.cfg.max_retries + 1
        for i in range(attempts):
            prefill, decode = await self._pick(failed)
            if i:
                telemetry.count_retry()
                if prefill.url in failed or decode in failed:
                    # nothing untried is left: give a restarting server a moment
                    await asyncio.sleep(min(0.05 * 2**i, 1.0))
            att = ex.attempt = self._attempt(ex, prefill, decode)
            try:
                out = await self._run_attempt(ex, att)
            except _LegUnreachable as e:
                log.warning("attempt %d/%d: %s", i + 1, attempts, e)
                failed.add(e.url)
                ex.failures.append(f"{e.role} {e.url} ({type(e.exc).__name__})")
                await self._close_leg(att.p if e.role == "prefill" else att.d)
                # the other leg may already hold the request: make it let go
                self.abort_legs(att, ("decode",) if e.role == "prefill" else ("prefill",))
                continue
            except BaseException:
                # cancelled (client gone, deadline) or failed: the caller aborts; stop our side right now
                await asyncio.shield(asyncio.gather(self._close_leg(att.p), self._close_leg(att.d)))
                raise
            if out.status >= 400:
                # one side refused the request: the other is waiting for a partner that will never come
                self.abort_legs(att, ("decode",) if out.source == "prefill" else ("prefill",))
            return out
        raise _UpstreamFailure(
            503, f"no prefill/decode pair reachable after {attempts} attempt(s): " + "; ".join(ex.failures)
        )

    # ---- the generate endpoints ------------------------------------------------------------------------

    def check_auth(self, request: Request) -> Response | None:
        if self.cfg.api_key is None:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.cfg.api_key.encode()):
            return None
        return openai_error(
            401, "invalid or missing API key", code="invalid_api_key", headers={"www-authenticate": "Bearer"}
        )

    async def handle(self, request: Request, path: str) -> Response:
        t0 = time.perf_counter()
        denied = self.check_auth(request)
        if denied is not None:
            telemetry.request_rejected(401)
            return denied
        try:
            raw = await request.body()
        except ClientDisconnect:
            telemetry.request_rejected(CLIENT_CLOSED, aborted=True)
            return Response(status_code=CLIENT_CLOSED)
        try:
            body = json.loads(raw)
        except ValueError as e:
            telemetry.request_rejected(400)
            return openai_error(400, f"request body is not valid JSON: {e}")
        if not isinstance(body, dict):
            telemetry.request_rejected(400)
            return openai_error(400, "request body must be a JSON object")
        n = batch_size(body)
        try:
            assign_rids(body.get("rid"), n)
        except ValueError as e:
            telemetry.request_rejected(400)
            return openai_error(400, str(e))
        ex = _Exchange(
            path=path,
            body=body,
            n=n,
            client_rid=body.get("rid"),
            headers={k: v for k in FORWARDED_HEADERS if (v := request.headers.get(k)) is not None},
            t0=t0,
            deadline=t0 + self.cfg.request_timeout_s,
        )
        telemetry.request_started()
        watcher = asyncio.create_task(_client_gone(request.receive))
        work = asyncio.create_task(self.dispatch(ex))
        try:
            done, _ = await asyncio.wait({work, watcher}, timeout=ex.remaining(), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the server is shutting down under us
            work.cancel()
            watcher.cancel()
            self.abort_legs(ex.attempt)
            ex.finish(CLIENT_CLOSED, aborted=True)
            raise
        if work not in done:
            work.cancel()
            with contextlib.suppress(BaseException):
                await work
            self.abort_legs(ex.attempt)
            if watcher in done:
                log.info("client went away while waiting; aborted %s", ex.attempt and ex.attempt.rids)
                ex.finish(CLIENT_CLOSED, aborted=True)
                return Response(status_code=CLIENT_CLOSED)
            watcher.cancel()
            ex.finish(504)
            return openai_error(504, f"request timed out after {self.cfg.request_timeout_s:g} s")
        try:
            out = work.result()
        except _UpstreamFailure as e:
            watcher.cancel()
            if e.status != 503:  # 503: every attempt already cleaned up after itself
                self.abort_legs(ex.attempt)
            ex.finish(e.status)
            return openai_error(e.status, e.message)
        except Exception as e:  # a router bug: still stop the upstream work and answer in the API's format
            log.exception("request failed")
            watcher.cancel()
            self.abort_legs(ex.attempt)
            ex.finish(500)
            return openai_error(500, f"router error: {type(e).__name__}: {e}")
        if out.stream is not None:
            return _RelayResponse(self, ex, out, watcher)
        watcher.cancel()
        ex.finish(out.status)
        return Response(content=out.body, status_code=out.status, headers=out.headers)

    # ---- streaming relay -------------------------------------------------------------------------------

    async def relay(
        self,
        ex: _Exchange,
        out: _Outcome,
        watcher: asyncio.Task[None],
        send: Send,
        raw_headers: list[tuple[bytes, bytes]],
    ) -> None:
        """Copies D's stream to the client, racing the copy against the client's disconnect and the deadline."""
        pump = asyncio.create_task(self._pump(ex, out, send, raw_headers))
        status, aborted = 500, False
        try:
            done, _ = await asyncio.wait({pump, watcher}, timeout=ex.remaining(), return_when=asyncio.FIRST_COMPLETED)
            if pump in done:
                status = pump.result()
            else:
                pump.cancel()
                with contextlib.suppress(BaseException):
                    await pump
                self.abort_legs(ex.attempt)
                if watcher in done:
                    log.info("client went away mid-stream; aborted %s", ex.attempt and ex.attempt.rids)
                    status, aborted = CLIENT_CLOSED, True
                else:
                    status = 504
                    msg = f"request timed out after {self.cfg.request_timeout_s:g} s"
                    await self._fail_stream(ex, send, raw_headers, status, msg)
        except BaseException as e:  # shutdown (cancelled) or a bug: either way the upstream work must stop
            pump.cancel()
            self.abort_legs(ex.attempt)
            aborted = isinstance(e, asyncio.CancelledError)
            raise
        finally:
            watcher.cancel()
            if out.resp is not None:
                await out.resp.aclose()
            ex.finish(status, aborted)

    async def _start(self, ex: _Exchange, send: Send, status: int, raw_headers: list[tuple[bytes, bytes]]) -> None:
        if not ex.started:
            ex.started = True
            await send({"type": "http.response.start", "status": status, "headers": raw_headers})

    async def _pump(self, ex: _Exchange, out: _Outcome, send: Send, raw_headers: list[tuple[bytes, bytes]]) -> int:
        """Returns the status the request ended with: D's on a clean end, 502/504 when D's stream broke."""
        scanner: _ContentScanner | None = _ContentScanner()

        async def emit(chunk: bytes) -> None:
            nonlocal scanner
            await self._start(ex, send, out.status, raw_headers)
            if scanner is not None and scanner.feed(chunk):
                telemetry.observe_ttft(time.perf_counter() - ex.t0)
                scanner = None  # found: stop parsing
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            ex.tail = (ex.tail + chunk)[-2:]

        assert out.stream is not None
        try:
            if out.first is not None:
                await emit(out.first)
            async for chunk in out.stream:
                await emit(chunk)
        except httpx.HTTPError as e:
            status = 504 if isinstance(e, httpx.TimeoutException) else 502
            log.warning("decode %s stream broke: %s: %s", out.resp and out.resp.url, type(e).__name__, e)
            self.abort_legs(ex.attempt)
            await self._fail_stream(ex, send, raw_headers, status, f"decode stream failed: {type(e).__name__}: {e}")
            return status
        await self._start(ex, send, out.status, raw_headers)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return out.status

    async def _fail_stream(
        self, ex: _Exchange, send: Send, raw_headers: list[tuple[bytes, bytes]], status: int, message: str
    ) -> None:
        """Ends a stream with an error: a plain error response if nothing was sent, else an SSE error event."""
        if not ex.started:
            ex.started = True
            err = openai_error(status, message)
            await send({"type": "http.response.start", "status": status, "headers": err.raw_headers})
            await send({"type": "http.response.body", "body": err.body, "more_body": False})
            return
        lead = b"" if ex.tail.endswith(b"\n\n") else b"\n\n"  # finish a half-sent event first
        await send({"type": "http.response.body", "body": lead + _sse_error(status, message), "more_body": False})

    # ---- everything else -------------------------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        order = sorted(self.cfg.decode, key=lambda u: not self._healthy.get(u, True))
        for url in order:
            try:
                r = await self.client(url).get(url + "/v1/models", timeout=MODELS_TIMEOUT_S)
            except httpx.HTTPError:
                continue
            if r.status_code == 200:
                return Response(r.content, media_type=r.headers.get("content-type", "application/json"))
        return openai_error(503, "no decode server answered /v1/models: " + ", ".join(order))

    async def readiness(self) -> Response:
        p_urls = [p.url for p in self.cfg.prefill]
        oks = await asyncio.gather(*(self.probe(u) for u in p_urls + self.cfg.decode))
        state = {}
        for role, urls, part in (
            ("prefill", p_urls, oks[: len(p_urls)]),
            ("decode", self.cfg.decode, oks[len(p_urls) :]),
        ):
            state[role] = {
                "healthy": [u for u, ok in zip(urls, part, strict=True) if ok],
                "down": [u for u, ok in zip(urls, part, strict=True) if not ok],
            }
        ready = bool(state["prefill"]["healthy"]) and bool(state["decode"]["healthy"])
        return JSONResponse({"ready": ready, **state}, status_code=200 if ready else 503)

    async def get_load(self) -> Response:
        p_urls = [p.url for p in self.cfg.prefill]
        loads = await asyncio.gather(*(self._fetch_load(u) for u in p_urls + self.cfg.decode))
        rows = [{"url": u, "load": v} for u, v in zip(p_urls + self.cfg.decode, loads, strict=True)]
        return JSONResponse({"prefill": rows[: len(p_urls)], "decode": rows[len(p_urls) :]})


def create_app(cfg: RouterConfig) -> FastAPI:
    """The router as an ASGI app; its lifespan opens the upstream client and starts health checks."""
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

    for path in GENERATE_PATHS:
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
        return router.check_auth(request) or await router.models(request)

    @app.get("/get_load", response_model=None)
    async def get_load(request: Request) -> Response:
        return router.check_auth(request) or await router.get_load()

    return app


def run_router(cfg: RouterConfig, log_level: str = "warning") -> None:
    """Serves the router on cfg.host:cfg.port until interrupted."""
    import uvicorn

    # long keep-alive, as the servers use: benchmark clients hold connections across bursts
    uvicorn.run(
        create_app(cfg), host=cfg.host, port=cfg.port, log_level=log_level, timeout_keep_alive=60,
        timeout_graceful_shutdown=5,
    )  # fmt: skip
