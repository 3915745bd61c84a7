"""A client's request body, read within the limits every pdserve process shares (`contracts.http`), and what is left
of it when the router refuses the request before reading it all.

The size is checked on `Content-Length` before a byte is read, then on the bytes as they arrive (a chunked body
declares none), so no more than the limit is ever buffered. A refused body is drained, not buffered, when that is
cheap (up to DRAIN_FACTOR times the limit, within DRAIN_TIMEOUT_S): the client's next request on the same keep-alive
connection then parses cleanly. Beyond that the answer carries `Connection: close` and the server closes the
connection after it, rather than read a huge body only to throw it away.
"""

from __future__ import annotations

import asyncio

from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from starlette.types import Receive

from contracts.http import check_size, declared_length

__all__ = ["DRAIN_FACTOR", "DRAIN_TIMEOUT_S", "RequestBody"]

DRAIN_FACTOR = 4
DRAIN_TIMEOUT_S = 30.0


class RequestBody:
    """The body of one request on the ASGI `receive` channel. `read` returns it whole or raises BodyError (413,
    400) or ClientDisconnect; `discard` drops whatever was not read and says whether the connection can be kept."""

    def __init__(self, headers: Headers, receive: Receive, limit: int) -> None:
        self._receive, self.limit = receive, limit
        self.size = 0  # bytes received so far
        self.done = False  # the whole body was received
        # None: chunked (or unparsable, which the HTTP server refuses)
        self.declared = declared_length(headers.get("content-length"))
        # A client that sent `Expect: 100-continue` sends the body only once the server reads it: never reading
        # it leaves those bytes unsent, so the connection cannot carry another request.
        self._expects_continue = headers.get("expect", "").strip().lower() == "100-continue"

    async def _next(self) -> bytes:
        message = await self._receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk: bytes = message.get("body", b"")
        self.size += len(chunk)
        if not message.get("more_body", False):
            self.done = True
        return chunk

    async def read(self) -> bytes:
        if self.declared is not None:
            check_size(self.declared, self.limit)  # refused before reading a byte
        parts: list[bytes] = []
        while not self.done:
            chunk = await self._next()
            check_size(self.size, self.limit)
            parts.append(chunk)
        return b"".join(parts)

    async def discard(self) -> bool:
        """Receives and drops the rest of the body if that is cheap; True when all of it arrived (the connection
        can carry the client's next request), False when the answer should close the connection."""
        if self.done:
            return True
        cap = DRAIN_FACTOR * self.limit
        if (self.size == 0 and self._expects_continue) or (self.declared is not None and self.declared > cap):
            return False
        try:
            await asyncio.wait_for(self._drain(cap), DRAIN_TIMEOUT_S)  # a client that stalls is not waited for
        except (asyncio.TimeoutError, ClientDisconnect):
            return False
        return self.done

    async def _drain(self, cap: int) -> None:
        while not self.done and self.size <= cap:
            await self._next()
