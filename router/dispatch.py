"""Getting one client request answered: attempts, each sending the same body to a prefill and a decode server at
once, and what is done with the legs when an attempt fails or the client goes away.

P's answer is only looked at while nothing has reached the client yet. A 4xx from P is returned. A leg that fails
ends the attempt at once (the other leg is aborted, rid AND room, so it never waits for a partner that is gone):
a refused connection, a connection that broke, or a 503 is retried with a new pair, a new room and, unless the
client chose them, new rids (the abandoned attempt's may still be live); any other 5xx from P, or a timeout, is
answered as it is (502/504) without a retry, since a request that made one server fail would likely fail the next.
When the retries run out the client gets 503 if every failure said "unavailable" (refused, 503), else 502, naming
each server and what it said. D's answer is the client's: a body, or an SSE stream whose first chunk has been read
(until then a failure of P can still be answered with a clean status; after that P's answer is only drained).

A server whose connection was refused or broke is also marked down for every request (`Upstreams.mark_down`).

Each prefill leg is counted in flight at its server from the attempt's start until P's answer is read or the leg is
closed (`Upstreams.prefill_started`/`prefill_ended`): the cache-aware policy's measure of a prefill's load. Its
routing text (`router.cache_aware.routing_key`) is worked out once per request, only for a policy that uses it.

A request the router decided to prefill locally (`Exchange.pd_path`, `router.local_prefill`) has attempts with a
decode leg only: its body carries rids and no bootstrap fields, its retries pick another decode server, its aborts name
the rid alone (there is no room) and go to that decode server only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from contracts.metrics import PrefillPath
from contracts.pd import DIALECT_OF_PATH
from router import telemetry
from router.cache_aware import routing_key
from router.config import PrefillServer, RouterConfig
from router.errors import UpstreamFailure
from router.pd_body import assign_rids, draw_rooms, local_body, pd_body
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


class _LegFailed(Exception):
    """A leg failed before anything reached the client, which ends the attempt. `status` is what the client gets
    if this is the last word; `retry` whether a new pair may do better; `reached` whether the request may have
    reached that server (then it is told to drop it too)."""

    def __init__(self, role: str, url: str, what: str, status: int, retry: bool, reached: bool = True) -> None:
        super().__init__(f"{role} {url} {what}")
        self.role, self.url, self.what, self.status, self.retry, self.reached = role, url, what, status, retry, reached


def _error_message(body: bytes, limit: int = 300) -> str:
    """What a server's error answer says: the OpenAI error's message, else the start of the body."""
    try:
        msg = json.loads(body)["error"]["message"]
        if isinstance(msg, str):
            return msg[:limit]
    except (ValueError, KeyError, TypeError):
        pass
    text = body.decode("utf-8", "replace").strip()
    return (text[:limit] + "...") if len(text) > limit else (text or "(no body)")


@dataclass
class _Leg:
    role: str
    url: str
    task: asyncio.Task[Any] | None = None  # sends the request and reads what the router needs of the answer
    resp: WireResponse | None = None
    body: bytes = b""  # P's 4xx/5xx answer, read in full: it may be the client's, or name why P failed
    reaper: asyncio.Task[None] | None = None  # drains an answer the router ignores
    counted: bool = False  # counted in flight at its server (prefill legs), until `Dispatcher._settled`


@dataclass
class Attempt:
    prefill: PrefillServer | None  # None: prefilled on the decode server
    decode: str
    rids: list[str]
    rooms: list[int | None]  # None per prompt when prefilled on the decode server (no transfer, no room)
    body: bytes
    p: _Leg | None
    d: _Leg

    @property
    def legs(self) -> list[_Leg]:
        return [self.d] if self.p is None else [self.p, self.d]


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
    pd_path: PrefillPath = PrefillPath.REMOTE  # where the prompts are prefilled, decided once before dispatch
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

    def _settled(self, leg: _Leg) -> None:
        """The leg's server is done with it (answered, failed or abandoned): no longer in flight there. Idempotent."""
        if leg.counted:
            leg.counted = False
            self.up.prefill_ended(leg.url)

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
        self._settled(leg)

    def abort_legs(self, att: Attempt | None, legs: tuple[str, ...] = BOTH_LEGS) -> None:
        """Fire-and-forget: stop our side of the named legs and tell those servers to drop this attempt's prompts.
        Each abort names the rid and the room: the rid alone may be another client's request. A prompt prefilled on
        the decode server has no room, so its abort names the rid alone (a fresh uuid unless the client chose it)."""
        if att is None:
            return
        for leg in att.legs:
            if leg.role in legs:
                self.up.spawn(self._close_leg(leg))
                for rid, room in zip(att.rids, att.rooms, strict=True):
                    self.up.spawn(self.up.post_abort(leg.url, rid, room))

    # ---- one attempt -----------------------------------------------------------------------------------

    def _attempt(self, ex: Exchange, prefill: PrefillServer | None, decode: str) -> Attempt:
        # a fresh rid per attempt unless the client chose them: the aborted attempt's rid may still be live
        rids = assign_rids(ex.client_rid, ex.n)
        if prefill is None:
            no_rooms: list[int | None] = [None] * len(rids)
            return Attempt(None, decode, rids, no_rooms, local_body(ex.body, ex.n, rids), None, _Leg("decode", decode))
        rooms = draw_rooms(ex.n or 1)
        body = pd_body(ex.body, ex.n, prefill, rids, rooms)
        rooms_of: list[int | None] = list(rooms)
        p_leg = _Leg("prefill", prefill.url, counted=True)
        self.up.prefill_started(prefill.url)
        return Attempt(prefill, decode, rids, rooms_of, body, p_leg, _Leg("decode", decode))

    async def _open(self, leg: _Leg, ex: Exchange, att: Attempt) -> WireResponse:
        leg.resp = await self.up.pool(leg.url).post(ex.path, att.body, ex.headers)
        return leg.resp

    async def _open_prefill(self, leg: _Leg, ex: Exchange, att: Attempt) -> WireResponse:
        resp = await self._open(leg, ex, att)
        if resp.status >= 400:
            leg.body = await resp.aread()  # a 4xx may be the client's answer; a 5xx says why P failed
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
            self._settled(leg)

    def _failed(self, leg: _Leg, exc: BaseException) -> _LegFailed:
        """The attempt-ending failure for an exception of a leg's task; anything but UpstreamError is re-raised."""
        what = f"failed: {type(exc).__name__}: {exc}"
        if isinstance(exc, ConnectFailed):
            self.up.mark_down(leg.url, f"{leg.role} leg: {type(exc).__name__}")
            return _LegFailed(leg.role, leg.url, f"unreachable ({type(exc).__name__}: {exc})", 503, True, False)
        if isinstance(exc, ReadTimeout):
            return _LegFailed(leg.role, leg.url, f"timed out ({exc})", 504, False)
        if isinstance(exc, UpstreamError):  # connected, then the connection broke: a dying or restarting server
            self.up.mark_down(leg.url, f"{leg.role} leg: {exc}")
            return _LegFailed(leg.role, leg.url, what, 502, True)
        raise exc

    def _prefill_answer(self, att: Attempt) -> Outcome | None:
        """P's answer while nothing reached the client: its 4xx as the client's answer, None when P succeeded (its
        answer is then drained), or _LegFailed when P failed (5xx, broken connection, timeout)."""
        assert att.p is not None and att.p.task is not None
        exc = att.p.task.exception()
        if exc is not None:
            raise self._failed(att.p, exc)
        resp = att.p.task.result()
        if resp.status < 400:
            att.p.reaper = self.up.spawn(self._drain(att.p))
            return None
        resp.close()
        self._settled(att.p)  # P answered (4xx or 5xx): nothing more runs there
        if resp.status < 500:
            return Outcome(resp.status, _pass_headers(resp), "prefill", body=att.p.body)
        said = f"answered {resp.status}: {_error_message(att.p.body)}"
        if resp.status == 503:  # unavailable (starting, draining, full): another prefill may take it
            raise _LegFailed("prefill", att.p.url, said, 503, True)
        raise _LegFailed("prefill", att.p.url, said, 502, False)

    def _decode_answer(self, att: Attempt) -> Outcome:
        assert att.d.task is not None
        try:
            out: Outcome = att.d.task.result()
        except UpstreamError as e:
            raise self._failed(att.d, e) from e
        if out.status == 503:  # unavailable: as for P, another pair may take it
            raise _LegFailed("decode", att.d.url, f"answered 503: {_error_message(out.body)}", 503, True)
        return out

    async def _run_attempt(self, ex: Exchange, att: Attempt) -> Outcome:
        """Sends to P and D concurrently (to D alone when it prefills locally); returns what the client gets, or raises
        _LegFailed."""
        if att.p is None:
            att.d.task = asyncio.create_task(self._open_decode(att.d, ex, att))
            await asyncio.wait({att.d.task})
            return self._decode_answer(att)
        att.p.task = asyncio.create_task(self._open_prefill(att.p, ex, att))
        att.d.task = asyncio.create_task(self._open_decode(att.d, ex, att))
        p_seen = False
        while True:
            waiting = {att.d.task} if p_seen else {att.p.task, att.d.task}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            # D's good answer wins over P's news arriving in the same moment: the client has all it needs
            d = att.d.task
            d_ok = d.done() and not d.cancelled() and d.exception() is None and d.result().status < 400
            if not p_seen and att.p.task.done() and not d_ok:
                p_seen = True
                early = self._prefill_answer(att)
                if early is not None:
                    return early
            if att.d.task.done():
                out = self._decode_answer(att)
                if not p_seen:  # from here on P's answer only needs draining
                    att.p.reaper = self.up.spawn(self._drain(att.p))
                return out

    # ---- attempts --------------------------------------------------------------------------------------

    async def _end_attempt(self, att: Attempt, e: _LegFailed) -> None:
        """After a failed leg: close our side of it now, and make both servers let go of the attempt (the failed one
        only if the request may have reached it)."""
        await self._close_leg(att.p if e.role == "prefill" and att.p is not None else att.d)
        other = "decode" if e.role == "prefill" else "prefill"
        self.abort_legs(att, BOTH_LEGS if e.reached else (other,))

    async def dispatch(self, ex: Exchange) -> Outcome:
        """Runs attempts until one gets an answer; retries (new pair, new room) while the failures are retryable.
        Raises UpstreamFailure (the attempts already cleaned up after themselves)."""
        failed: set[str] = set()
        errors: list[_LegFailed] = []
        attempts = self.cfg.max_retries + 1
        local = ex.pd_path is PrefillPath.LOCAL
        key = routing_key(ex.body, DIALECT_OF_PATH[ex.path]) if self.up.policy.needs_key and not local else None
        for i in range(attempts):
            prefill: PrefillServer | None
            if local:
                prefill, decode = None, await self.up.pick_decode(failed)
            else:
                prefill, decode = await self.up.pick(failed, key)
            if i:
                telemetry.count_retry()
                if (prefill is not None and prefill.url in failed) or decode in failed:
                    # nothing untried is left: give a restarting server a moment
                    await asyncio.sleep(min(0.05 * 2**i, 1.0))
            att = ex.attempt = self._attempt(ex, prefill, decode)
            try:
                out = await self._run_attempt(ex, att)
            except _LegFailed as e:
                log.warning("attempt %d/%d: %s", i + 1, attempts, e)
                failed.add(e.url)
                errors.append(e)
                ex.failures.append(str(e))
                await self._end_attempt(att, e)
                if not e.retry:
                    raise UpstreamFailure(e.status, str(e)) from None
                continue
            except BaseException:
                # cancelled (client gone, deadline) or failed: the caller aborts; stop our side right now
                await asyncio.shield(asyncio.gather(*(self._close_leg(leg) for leg in att.legs)))
                raise
            if out.status >= 400:
                # one side refused the request: the other is waiting for a partner that will never come
                self.abort_legs(att, ("decode",) if out.source == "prefill" else ("prefill",))
            return out
        status = 503 if all(e.status == 503 for e in errors) else 502
        tried = "; ".join(ex.failures)
        who = "no decode server (prefilling locally)" if local else "no prefill/decode pair"
        raise UpstreamFailure(status, f"{who} could serve the request in {attempts} attempt(s): {tried}")
