"""The front's end of the ZMQ link to its scheduler process: one PUSH socket out, one PULL socket in.

- PUSH (front → scheduler) is a plain, non-asyncio socket used only with NOBLOCK from the event loop:
  sends never block, and — unlike an awaitable send — they also work from `finally` blocks that run
  while a cancelled streaming response unwinds, which is exactly where aborts must be sent.
- PULL (scheduler → front) is a zmq.asyncio socket read by one background task. It routes each
  `RequestOutput` to the in-flight HTTP request that registered its rid (registration happens before the
  `GenerateRequest` is sent, so no output can arrive for an unknown rid), keeps the latest
  `SchedulerStats` (and sets the load gauges from it) and the scheduler's `Ready` info.

Rids here are the front's own (`uuid4().hex` per prompt), never the client's: a client rid is only echoed,
so a second request reusing it cannot take over, or abort, the first. `names` maps what clients call their
prompts (a prompt's rid, a batch's group rid) to the internal rids, for /abort_request; several requests in
flight may share one name. Both tables lose a request's entries when it closes, however it ended.

A message that does not decode (garbage, another protocol version, an unknown type) is logged and
dropped: one bad message must never stop the reader, or every request in flight would hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Protocol

import zmq
import zmq.asyncio

from contracts.metrics import Metrics, Role
from serving import api
from serving.ipc import AbortRequest, IpcMessage, Ready, RequestOutput, SchedulerStats, pack, unpack

__all__ = ["Route", "SchedulerClient"]

logger = logging.getLogger("pdserve.front")

# Enough for bursts; if the scheduler stops reading this many requests, answering 503 beats queueing
# without bound.
_SEND_HWM = 10000


class Route(Protocol):
    """What owns a scheduler rid here: the in-flight HTTP request its outputs go to."""

    def deliver(self, out: RequestOutput) -> None: ...

    def abort_rid(self, rid: str) -> None: ...

    def room_of(self, rid: str) -> int | None: ...

    def close(self) -> None: ...


class SchedulerClient:
    """Sends requests and aborts to the scheduler and dispatches what it sends back."""

    def __init__(self, to_scheduler: str, from_scheduler: str, metrics: Metrics, role: Role) -> None:
        self.to_scheduler = to_scheduler
        self.from_scheduler = from_scheduler
        self.metrics = metrics
        self.role = role
        self.routes: dict[str, Route] = {}  # internal (scheduler) rid -> its HTTP request
        self.names: dict[str, set[str]] = {}  # a client's name for prompts -> the internal rids it names now
        self.ready_info: dict[str, Any] | None = None  # the scheduler's Ready info, once it sent it
        self.stats: SchedulerStats | None = None
        self._rank_stats: dict[int, SchedulerStats] = {}  # the latest of each rank (several under DP attention)
        self.stats_at = 0.0  # time.time() of the latest stats
        self._actx: zmq.asyncio.Context | None = None
        self._sctx: zmq.Context | None = None
        self._push: zmq.Socket | None = None
        self._pull: zmq.asyncio.Socket | None = None
        self._reader: asyncio.Task[None] | None = None

    # -- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind both sockets and start the reader task (needs the running event loop)."""
        self._sctx = zmq.Context()
        self._push = self._sctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.SNDHWM, _SEND_HWM)
        self._push.setsockopt(zmq.LINGER, 0)
        self._push.bind(self.to_scheduler)
        self._actx = zmq.asyncio.Context()
        self._pull = self._actx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._pull.bind(self.from_scheduler)
        self._reader = asyncio.create_task(self._read_loop(), name="pdserve-front-reader")

    async def stop(self) -> None:
        """Abort every request in flight, stop the reader and close the sockets."""
        for flight in list(self.routes.values()):
            flight.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        for sock in (self._push, self._pull):
            if sock is not None:
                sock.close(linger=0)
        for ctx in (self._sctx, self._actx):
            if ctx is not None:
                ctx.term()

    # -- who owns which rid -------------------------------------------------------------------------

    def register(self, route: Route, rid: str, names: list[str]) -> None:
        """Route `rid`'s outputs to `route`; `names` (client rid, group rid) will find it for /abort_request."""
        self.routes[rid] = route
        for name in names:
            self.names.setdefault(name, set()).add(rid)

    def unregister(self, route: Route, rid: str, names: list[str]) -> None:
        """Undo `register` (idempotent; only `route`'s own rid), dropping a name once no running prompt has it."""
        if self.routes.get(rid) is not route:
            return
        del self.routes[rid]
        for name in names:
            rids = self.names.get(name)
            if rids is not None:
                rids.discard(rid)
                if not rids:
                    del self.names[name]

    def named(self, name: str, room: int | None = None) -> list[str]:
        """The internal rids of running prompts the client calls `name` (and, if given, in bootstrap `room`)."""
        rids = sorted(self.names.get(name, ()))
        if room is None:
            return rids
        return [r for r in rids if (route := self.routes.get(r)) is not None and route.room_of(r) == room]

    # -- front → scheduler --------------------------------------------------------------------------

    def send(self, msg: IpcMessage) -> None:
        """Send without blocking; a full queue or a missing scheduler is a 503 for the caller."""
        if self._push is None:
            raise api.APIError(503, "the server is not started")
        try:
            self._push.send(pack(msg), flags=zmq.NOBLOCK)
        except zmq.Again:
            raise api.APIError(
                503, "the scheduler is not accepting requests (its queue is full or it is down)"
            ) from None

    def send_abort(self, rid: str) -> None:
        """Best effort: the request's own timeout still bounds its life if this cannot be sent."""
        try:
            self.send(AbortRequest(rid=rid))
        except api.APIError as exc:
            logger.warning("could not send abort for %s: %s", rid, exc.message)

    # -- scheduler → front --------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        assert self._pull is not None
        while True:
            try:
                data = await self._pull.recv()
            except asyncio.CancelledError:
                raise
            except zmq.ZMQError as exc:
                if exc.errno == zmq.ETERM:
                    return
                logger.error("receiving from the scheduler failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            try:
                msg = unpack(data)
            except Exception:  # CodecError today; any decoding failure must only cost this one message
                logger.warning("dropping a malformed message from the scheduler", exc_info=True)
                continue
            try:
                self._dispatch(msg)
            except Exception:
                logger.exception("error while handling %s from the scheduler", type(msg).__name__)

    def _dispatch(self, msg: IpcMessage) -> None:
        if isinstance(msg, RequestOutput):
            flight = self.routes.get(msg.rid)
            if flight is not None:
                flight.deliver(msg)
            # else: output of a request that was aborted or timed out here; nothing waits for it.
        elif isinstance(msg, SchedulerStats):
            self._rank_stats[msg.rank] = msg
            self.stats, self.stats_at = SchedulerStats.total(list(self._rank_stats.values())), time.time()
            msg = self.stats
            role = self.role.value
            self.metrics.running_requests.labels(role=role).set(msg.running)
            self.metrics.queued_requests.labels(role=role).set(msg.queued)
            usage = msg.kv_pages_used / msg.kv_pages_total if msg.kv_pages_total else 0.0
            self.metrics.kv_pool_usage_ratio.labels(role=role).set(usage)
        elif isinstance(msg, Ready):
            self.ready_info = dict(msg.info)
            logger.info("scheduler ready: %s", msg.info)
        else:
            logger.warning("unexpected %s from the scheduler", type(msg).__name__)
