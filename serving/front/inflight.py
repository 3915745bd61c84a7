"""One HTTP request in flight: the prompts it sent to the scheduler and everything that comes back.

An `Inflight` registers its rids with the `SchedulerClient` before sending (so the reader can route
every output to it), folds outputs into per-prompt `PromptResult`s, observes TTFT / inter-token / e2e
latency, and on `close()` aborts whatever is unfinished and unregisters. `close()` is synchronous and
idempotent, so it is safe from the `finally` of a cancelled response.

Its rids are the front's own, unique per prompt; the client's rids (`client_rids`, with a batch's
`group_rid`) are only names: echoed in the answer, and what /abort_request finds prompts by.

Client disconnects are detected by a watcher task per HTTP request that awaits the ASGI
`http.disconnect` message; it wakes the request's queue, whose owner then aborts every unfinished
prompt (`next()` raises `ClientGone`).
"""

from __future__ import annotations

import asyncio
import logging
import time

from fastapi import Request

from contracts.metrics import Metrics, Role
from serving import api
from serving.front.scheduler_client import SchedulerClient
from serving.ipc import GenerateRequest, RequestOutput

__all__ = ["ClientGone", "Inflight"]

logger = logging.getLogger("pdserve.front")


class ClientGone(Exception):
    """The HTTP client disconnected before its response was complete."""


class Inflight:
    """The prompts of one HTTP request: their queue, results, metrics and abort-on-exit."""

    def __init__(
        self,
        client: SchedulerClient,
        rids: list[str],
        arrival: float,
        *,
        timeout_s: float,
        metrics: Metrics,
        role: Role,
        record_metrics: bool = True,
        client_rids: list[str | None] | None = None,
        rooms: list[int | None] | None = None,
        group_rid: str | None = None,
    ) -> None:
        self.client = client
        self.rids = rids  # internal, unique: what the scheduler knows the prompts by
        self.client_rids = client_rids if client_rids is not None else [None] * len(rids)
        self.rooms = rooms if rooms is not None else [None] * len(rids)
        self.group_rid = group_rid  # a client rid shared by a batch (its prompts are <rid>_<i>)
        self._index = {rid: i for i, rid in enumerate(rids)}
        self.arrival = arrival
        self.timeout_s = timeout_s  # abort + 504 when no output comes for this long
        self.metrics = metrics
        self.role = role
        self.record_metrics = record_metrics
        # (prompt index, output), or None when the client went away.
        self.queue: asyncio.Queue[tuple[int, RequestOutput] | None] = asyncio.Queue()
        # Answers echo the client's rid; a prompt it gave none shows the internal one.
        self.results = [
            api.PromptResult(i, c or rid) for i, (rid, c) in enumerate(zip(rids, self.client_rids, strict=True))
        ]
        self._first_token_at: list[float | None] = [None] * len(rids)
        self._last_token_at: list[float] = [arrival] * len(rids)
        self._watcher: asyncio.Task[None] | None = None
        self._registered = False
        self.aborted = False  # the client disconnected or /abort_request named it
        self.closed = False

    # -- lifecycle --------------------------------------------------------------------------------

    def names(self, index: int) -> list[str]:
        """What the client calls prompt `index`: its rid and its batch's group rid, where it gave them."""
        return [n for n in (self.client_rids[index], self.group_rid) if n is not None]

    def room_of(self, rid: str) -> int | None:
        index = self._index.get(rid)
        return None if index is None else self.rooms[index]

    def submit(self, reqs: list[GenerateRequest], request: Request | None) -> None:
        """Register our rids, send `reqs` and, for a real HTTP request, start watching for a disconnect."""
        client = self.client
        for i, rid in enumerate(self.rids):
            client.register(self, rid, self.names(i))
        self._registered = True
        try:
            for req in reqs:
                client.send(req)
        except api.APIError:
            self.close()
            raise
        if request is not None:
            self._watcher = asyncio.create_task(self._watch_disconnect(request))

    async def _watch_disconnect(self, request: Request) -> None:
        # The body has been read, so the next ASGI message is http.disconnect: uvicorn delivers it when
        # the client closes the connection (or once the response is complete, by which time this task
        # has been cancelled).
        try:
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    break
        except asyncio.CancelledError:
            raise
        except Exception:  # a server without disconnect support: nothing to watch
            logger.debug("disconnect watcher stopped", exc_info=True)
            return
        self.aborted = True
        self.queue.put_nowait(None)

    def close(self) -> None:
        """Abort whatever is unfinished and unregister. Idempotent and synchronous (safe while cancelled)."""
        if self.closed:
            return
        self.closed = True
        if self._watcher is not None:
            self._watcher.cancel()
        client = self.client
        if self._registered:
            for i, (rid, r) in enumerate(zip(self.rids, self.results, strict=True)):
                if not r.finished:
                    client.send_abort(rid)
                client.unregister(self, rid, self.names(i))

    # -- outputs ----------------------------------------------------------------------------------

    def deliver(self, out: RequestOutput) -> None:
        """Called by the reader task for each output of one of our rids."""
        index = self._index.get(out.rid)
        if index is not None:
            self.queue.put_nowait((index, out))

    def abort_rid(self, rid: str) -> None:
        """/abort_request: finish `rid` now as aborted (the scheduler's own final output, if any, is dropped)."""
        self.aborted = True
        self.deliver(RequestOutput(rid=rid, finished=True, finish_reason="abort"))

    async def next(self) -> tuple[int, RequestOutput]:
        """The next (prompt index, output); raises ClientGone on disconnect, a 504 APIError on timeout."""
        try:
            item = await asyncio.wait_for(self.queue.get(), timeout=self.timeout_s)
        except asyncio.TimeoutError:
            raise api.APIError(504, f"no output from the scheduler for {self.timeout_s:g} s; request aborted") from None
        if item is None:
            raise ClientGone()
        return item

    def record(self, index: int, out: RequestOutput) -> api.PromptResult:
        """Fold `out` into its prompt's result and observe TTFT / inter-token / e2e latency."""
        r = self.results[index]
        if r.finished:  # e.g. the scheduler's abort output after /abort_request already finished it
            return r
        r.apply(out)
        if self.record_metrics:
            m, role, now = self.metrics, self.role.value, time.time()
            n = len(out.token_ids)
            if n:
                if self._first_token_at[index] is None:
                    self._first_token_at[index] = now
                    m.time_to_first_token.labels(role=role).observe(now - self.arrival)
                else:
                    # Outputs may carry several tokens; spread the gap evenly so the histogram stays
                    # per token, as clients experience it.
                    gap = (now - self._last_token_at[index]) / n
                    itl = m.inter_token_latency.labels(role=role)
                    for _ in range(n):
                        itl.observe(gap)
                self._last_token_at[index] = now
            if r.finished and not r.failed and r.finish_reason != "abort":
                m.e2e_request_latency.labels(role=role).observe(now - self.arrival)
        return r

    @property
    def all_finished(self) -> bool:
        return all(r.finished for r in self.results)
