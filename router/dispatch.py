"""Getting one client request answered: attempts, each sending the same body to a prefill and a decode server at
once, and what is done with the legs when an attempt fails or the client goes away.

P's answer is only looked at while nothing has reached the client yet (a 4xx from P is returned; a refused
connection to either leg retries with a new pair, a new room and, unless the client chose them, new rids, since the
abandoned attempt's may still be live). D's answer is the client's: a body, or an SSE stream whose first chunk has
been read (until then a failure of P can still be answered with a clean status).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from router import telemetry
from router.config import PrefillServer, RouterConfig
from router.errors import UpstreamFailure
from router.pd_body import assign_rids, draw_rooms, pd_body
from router.upstream import Upstreams
from router.wire import ConnectFailed, ReadTimeout, UpstreamError, WireResponse

log = logging.getLogger("pdserve.router")

__all__ = ["Attempt", "Dispatcher", "Exchange", "Outcome"]

# Hop-by-hop and framing headers are the router's own business. The body is relayed as received (the router asks
# for no compression, and passes content-encoding on should a server use it anyway).
_DROPPED_HEADERS = frozenset(
    {b"content-length", b"transfer-encoding", b"connection", b"keep-alive", b"date", b"server"}
)
BOTH_LEGS = ("prefill", "decode")


def _pass_headers(resp: WireResponse) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in resp.headers if k not in _DROPPED_HEADERS}


class _LegUnreachable(Exception):
    """A connection to P or D could not be made: nothing reached that server, so the pair can be retried."""

    def __init__(self, role: str, url: str, exc: Exception) -> None:
        super().__init__(f"{role} {url}: {type(exc).__name__}: {exc}")
        self.role, self.url, self.exc = role, url, exc


@dataclass
class _Leg:
    role: str
    url: str
    task: asyncio.Task[Any] | None = None  # sends the request and reads what the router needs of the answer
    resp: WireResponse | None = None
    body: bytes = b""  # P's 4xx answer, read in full: it may be the client's
    reaper: asyncio.Task[None] | None = None  # drains an answer the router ignores


@dataclass
class Attempt:
    prefill: PrefillServer
    decode: str
    rids: list[str]
    rooms: list[int]
    body: bytes
    p: _Leg
    d: _Leg


@dataclass
class Outcome:
    """What goes back to the client: a complete body, or D's SSE stream (its first chunk already read)."""

    status: int
    headers: dict[str, str]
    source: str  # "prefill" or "decode"
    body: bytes = b""
    stream: WireResponse | None = None  # D's answer, still being read
    first: bytes | None = None


@dataclass
class Exchange:
    """One client request across its attempts (and, for a stream, while it is relayed)."""

    path: str
    body: dict[str, Any]
    n: int | None  # batch size; None for a single prompt
    client_rid: Any
    headers: list[tuple[str, str]]  # forwarded to both servers
    t0: float
    deadline: float
    attempt: Attempt | None = None
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


class Dispatcher:
    """Runs attempts for exchanges and cleans up after them (closing our side, aborting theirs)."""

    def __init__(self, cfg: RouterConfig, up: Upstreams) -> None:
        self.cfg, self.up = cfg, up

    # ---- aborts and leg cleanup ------------------------------------------------------------------------

    async def _close_leg(self, leg: _Leg) -> None:
        for t in (leg.reaper, leg.task):
            if t is None:
                continue
            if not t.done():
                t.cancel()
            with contextlib.suppress(BaseException):
                await t  # also retrieves a failure nobody looked at, which asyncio would log as unhandled
        if leg.resp is not None:
            leg.resp.close()

    def abort_legs(self, att: Attempt | None, legs: tuple[str, ...] = BOTH_LEGS) -> None:
        """Fire-and-forget: stop our side of the named legs and tell those servers to drop every rid."""
        if att is None:
            return
        for leg in (att.p, att.d):
            if leg.role in legs:
                self.up.spawn(self._close_leg(leg))
                for rid in att.rids:
                    self.up.spawn(self.up.post_abort(leg.url, rid))

    # ---- one attempt -----------------------------------------------------------------------------------

    def _attempt(self, ex: Exchange, prefill: PrefillServer, decode: str) -> Attempt:
        rooms = draw_rooms(ex.n or 1)
        # a fresh rid per attempt unless the client chose them: the aborted attempt's rid may still be live
        rids = assign_rids(ex.client_rid, ex.n)
        body = pd_body(ex.body, ex.n, prefill, rids, rooms)
        return Attempt(prefill, decode, rids, rooms, body, _Leg("prefill", prefill.url), _Leg("decode", decode))

    async def _open(self, leg: _Leg, ex: Exchange, att: Attempt) -> WireResponse:
        leg.resp = await self.up.pool(leg.url).post(ex.path, att.body, ex.headers)
        return leg.resp

    async def _open_prefill(self, leg: _Leg, ex: Exchange, att: Attempt) -> WireResponse:
        resp = await self._open(leg, ex, att)
        if 400 <= resp.status < 500:
            leg.body = await resp.aread()  # may be returned to the client
        return resp

    async def _open_decode(self, leg: _Leg, ex: Exchange, att: Attempt) -> Outcome:
        resp = await self._open(leg, ex, att)
        if 200 <= resp.status < 300 and resp.header(b"content-type").startswith(b"text/event-stream"):
            # read up to the first chunk: until then a failure of P can still be answered with a clean status
            first = await resp.chunk()
            return Outcome(resp.status, _pass_headers(resp), "decode", stream=resp, first=first)
        body = await resp.aread()
        resp.close()
        return Outcome(resp.status, _pass_headers(resp), "decode", body=body)

    async def _drain(self, leg: _Leg) -> None:
        """Waits for an answer the router ignores (P's, normally) and reads it to the end, so the server sees a
        well-behaved client and the connection goes back to the pool."""
        try:
            assert leg.task is not None
            resp = await leg.task
            if resp.status >= 400:
                log.warning("%s %s answered %d (decode's answer is used)", leg.role, leg.url, resp.status)
            while await resp.chunk() is not None:
                pass
        except UpstreamError as e:
            log.warning("%s %s failed: %s: %s (decode's answer is used)", leg.role, leg.url, type(e).__name__, e)
        finally:
            if leg.resp is not None:
                leg.resp.close()

    async def _run_attempt(self, ex: Exchange, att: Attempt) -> Outcome:
        """Sends to P and D concurrently; returns what the client gets. Raises _LegUnreachable on a connect failure
        of either leg and UpstreamFailure when D failed otherwise."""
        att.p.task = asyncio.create_task(self._open_prefill(att.p, ex, att))
        att.d.task = asyncio.create_task(self._open_decode(att.d, ex, att))
        p_seen = False
        while True:
            waiting = {att.d.task} if p_seen else {att.p.task, att.d.task}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if not p_seen and att.p.task.done():
                p_seen = True
                exc = att.p.task.exception()
                if isinstance(exc, ConnectFailed):
                    raise _LegUnreachable("prefill", att.p.url, exc)
                if exc is None and 400 <= att.p.task.result().status < 500:
                    resp = att.p.task.result()
                    resp.close()
                    return Outcome(resp.status, _pass_headers(resp), "prefill", body=att.p.body)
                if exc is not None:
                    log.warning("prefill %s failed: %s: %s; waiting for decode", att.p.url, type(exc).__name__, exc)
                else:
                    att.p.reaper = self.up.spawn(self._drain(att.p))
            if att.d.task.done():
                try:
                    out = att.d.task.result()
                except ConnectFailed as e:
                    raise _LegUnreachable("decode", att.d.url, e) from e
                except ReadTimeout as e:
                    raise UpstreamFailure(504, f"decode {att.d.url} timed out ({type(e).__name__})") from e
                except UpstreamError as e:
                    raise UpstreamFailure(502, f"decode {att.d.url} failed: {type(e).__name__}: {e}") from e
                if not p_seen:  # from here on P's answer only needs draining
                    att.p.reaper = self.up.spawn(self._drain(att.p))
                return out

    # ---- attempts --------------------------------------------------------------------------------------

    async def dispatch(self, ex: Exchange) -> Outcome:
        """Runs attempts until one gets an answer; retries (new pair, new room) only on connect failures."""
        failed: set[str] = set()
        attempts = self.cfg.max_retries + 1
        for i in range(attempts):
            prefill, decode = await self.up.pick(failed)
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
        raise UpstreamFailure(
            503, f"no prefill/decode pair reachable after {attempts} attempt(s): " + "; ".join(ex.failures)
        )
