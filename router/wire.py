"""A lean HTTP/1.1 client for the generate legs: one POST per leg, the answer relayed as the bytes arrive.

Why not httpx here: profiled at 32 concurrent streams, httpx/httpcore/anyio/h11 took over half of the router's CPU
(pool scans that poll every idle socket per request, anyio cancel scopes and h11 events per chunk), and on a host
shared with the servers that CPU is taken from them. This client is an `asyncio.Protocol` with httptools' C parser:
a connection marks itself dead when the server closes it (no polling), and a chunk costs one callback. The router's
control calls (health, loads, aborts, /v1/models) still use httpx, where convenience matters more than cost.

Errors: `ConnectFailed` (nothing reached the server: the pair may be retried), `ReadTimeout`, and `UpstreamError`
(the base: the connection broke or the answer was not HTTP).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from urllib.parse import urlsplit

import httptools

__all__ = ["ConnectFailed", "Pool", "ReadTimeout", "UpstreamError", "WireResponse"]

_HIGH_WATER = 1 << 18  # buffered answer bytes at which reading pauses until the relay catches up


class UpstreamError(Exception):
    """The exchange with an upstream server failed after the connection was made."""


class ConnectFailed(UpstreamError):
    """No connection could be made (refused, unreachable, timed out): the request never reached the server."""


class ReadTimeout(UpstreamError):
    """The server sent nothing for the read timeout."""


class WireResponse:
    """One answer: status and headers once the head arrived, then the body as chunks (`chunk`) or whole (`aread`)."""

    def __init__(self, conn: _Conn) -> None:
        self._conn = conn
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []  # names lower-cased
        self.head: asyncio.Future[None] = conn.loop.create_future()
        self._buf: list[bytes] = []
        self._size = 0
        self._waiter: asyncio.Future[None] | None = None
        self.complete = False
        self._exc: BaseException | None = None
        self._closed = False
        # One read-timeout timer per answer, re-armed only when it fires (a timer per wait costs more than the chunk)
        self._watchdog: asyncio.TimerHandle | None = None
        self._wait_since = 0.0

    @property
    def url(self) -> str:
        return self._conn.pool.url

    def header(self, name: bytes, default: bytes = b"") -> bytes:
        for k, v in self.headers:
            if k == name:
                return v
        return default

    # ---- fed by the connection -------------------------------------------------------------------------

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _feed(self, data: bytes) -> None:
        self._buf.append(data)
        self._size += len(data)
        if self._size > _HIGH_WATER:
            self._conn.pause()
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if self.complete or self._exc is not None:
            return
        self._exc = exc
        if not self.head.done():
            self.head.set_exception(exc)
            self.head.exception()  # retrieved: whoever waits on the body sees it there
        self._wake()

    # ---- read by the router ----------------------------------------------------------------------------

    async def _wait(self, fut: asyncio.Future[None]) -> None:
        loop = self._conn.loop
        self._wait_since = loop.time()
        if self._watchdog is None:
            self._watchdog = loop.call_at(self._wait_since + self._conn.pool.read_timeout_s, self._check_timeout)
        await fut

    def _check_timeout(self) -> None:
        """Fails the answer if the router has been waiting for it, with nothing arriving, for the read timeout."""
        self._watchdog = None
        if self.complete or self._exc is not None or self._closed:
            return
        waiting = not self.head.done() or (self._waiter is not None and not self._waiter.done())
        if not waiting:
            return  # the next wait re-arms it
        timeout = self._conn.pool.read_timeout_s
        due = max(self._wait_since, self._conn.last_rx) + timeout
        if self._conn.loop.time() >= due:
            self._fail(ReadTimeout(f"no answer from {self._conn.pool.url} in {timeout:g} s"))
            self._conn.abort()
        else:
            self._watchdog = self._conn.loop.call_at(due, self._check_timeout)

    async def read_head(self) -> None:
        await self._wait(self.head)

    async def chunk(self) -> bytes | None:
        """What arrived since the last call (waiting for something), or None at the end of the body."""
        while True:
            if self._buf:
                data = self._buf[0] if len(self._buf) == 1 else b"".join(self._buf)
                self._buf.clear()
                self._size = 0
                self._conn.resume()
                return data
            if self._exc is not None:
                raise self._exc
            if self.complete:
                return None
            self._waiter = self._conn.loop.create_future()
            await self._wait(self._waiter)

    async def aread(self) -> bytes:
        parts = []
        while (data := await self.chunk()) is not None:
            parts.append(data)
        return b"".join(parts)

    def close(self) -> None:
        """Done with the answer: a fully read one gives its connection back to the pool, any other closes it."""
        if not self._closed:
            self._closed = True
            if self._watchdog is not None:
                self._watchdog.cancel()
            self._conn.release(reusable=self.complete and not self._buf)


class _Conn(asyncio.Protocol):
    """One keep-alive connection to an upstream server, carrying one exchange at a time."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.resp: WireResponse | None = None
        self.lost = False
        self.idle_since = 0.0
        self._paused = False
        self._framed = False  # the answer has content-length or chunked framing (else it ends when the socket does)
        self.received = False  # any byte of the current answer arrived
        self.keep_alive = False  # the finished answer allows reusing the connection
        self.last_rx = 0.0  # loop time of the last bytes received

    def start(self, request: bytes) -> WireResponse:
        """Sends one request; its answer arrives on the returned response."""
        resp = self.resp = WireResponse(self)
        self.parser = httptools.HttpResponseParser(self)
        self._framed = self.received = self.keep_alive = False
        assert self.transport is not None
        self.transport.write(request)
        return resp

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.resp is None:  # bytes on an idle connection: not an answer to anything; drop the connection
            self.abort()
            return
        self.received = True
        self.last_rx = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            if self.resp is not None:
                self.resp._fail(UpstreamError(f"invalid HTTP answer from {self.pool.url}: {e}"))
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        resp = self.resp
        if resp is not None and not resp.complete:
            if resp.head.done() and not self._framed and exc is None:
                resp.complete = True  # an answer delimited by the end of the connection
                resp._wake()
            else:
                why = f": {exc}" if exc else ""
                resp._fail(UpstreamError(f"{self.pool.url} closed the connection mid-answer{why}"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.resp is not None
        name = name.lower()
        if name in (b"content-length", b"transfer-encoding"):
            self._framed = True
        self.resp.headers.append((name, value))

    def on_headers_complete(self) -> None:
        resp = self.resp
        assert resp is not None
        resp.status = self.parser.get_status_code()
        if not resp.head.done():
            resp.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        assert self.resp is not None
        self.resp._feed(body)

    def on_message_complete(self) -> None:
        resp = self.resp
        assert resp is not None
        self.keep_alive = self.parser.should_keep_alive()  # only valid here: it reads False once the parser reset
        resp.complete = True
        resp._wake()

    # flow control and lifecycle
    def pause(self) -> None:
        if not self._paused and self.transport is not None and not self.lost:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None and not self.lost:
            self._paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.abort()

    def release(self, reusable: bool) -> None:
        self.resp = None
        if reusable and not self.lost and self.keep_alive:
            self.pool.put_back(self)
        else:
            self.abort()


class Pool:
    """Keep-alive connections to one server (`url`: scheme://host:port), most recently used first."""

    def __init__(self, url: str, connect_timeout_s: float, read_timeout_s: float, keepalive_s: float, max_idle: int):
        parts = urlsplit(url)
        self.url = url
        self.host = parts.hostname or ""
        self.ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self.port = parts.port or (443 if self.ssl else 80)
        self.authority = parts.netloc
        self.connect_timeout_s, self.read_timeout_s = connect_timeout_s, read_timeout_s
        self.keepalive_s, self.max_idle = keepalive_s, max_idle
        self._idle: collections.deque[_Conn] = collections.deque()

    async def _connection(self, reuse: bool) -> tuple[_Conn, bool]:
        """A connection and whether it is a reused one."""
        now = time.monotonic()
        while reuse and self._idle:
            conn = self._idle.pop()
            if not conn.lost and now - conn.idle_since < self.keepalive_s:
                return conn, True
            conn.abort()
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Conn(self), self.host, self.port, ssl=self.ssl),
                self.connect_timeout_s,
            )
        except asyncio.TimeoutError as e:
            raise ConnectFailed(f"connecting to {self.url} timed out after {self.connect_timeout_s:g} s") from e
        except OSError as e:
            raise ConnectFailed(f"cannot connect to {self.url}: {e}") from e
        return conn, False

    def put_back(self, conn: _Conn) -> None:
        conn.idle_since = time.monotonic()
        self._idle.append(conn)
        if len(self._idle) > self.max_idle:
            self._idle.popleft().abort()

    async def post(self, path: str, body: bytes, headers: list[tuple[str, str]]) -> WireResponse:
        """Sends a POST of a JSON body and returns once the answer's head has arrived."""
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers)
        head = (
            f"POST {path} HTTP/1.1\r\nhost: {self.authority}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nuser-agent: pdserve-router\r\n{extra}\r\n"
        )
        request = head.encode("latin-1") + body
        reuse = True
        while True:
            conn, reused = await self._connection(reuse)
            resp = conn.start(request)
            try:
                await resp.read_head()
                return resp
            except UpstreamError as e:
                resp.close()
                if reused and not conn.received and not isinstance(e, ReadTimeout):
                    # the server closed this idle connection as it was reused: it never read the request
                    reuse = False
                    continue
                raise
            except BaseException:
                resp.close()
                raise

    def close(self) -> None:
        while self._idle:
            self._idle.pop().abort()
