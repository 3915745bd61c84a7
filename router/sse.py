"""Relaying D's SSE stream to the client: the copy loop, its race against the client's disconnect and the deadline,
the TTFT mark, and how a stream that breaks is ended.

The router only relays events; it reads them only to find the first one carrying generated output (that moment is
the router's TTFT). Once headers went out, a failure can no longer change the status, so it is reported as an SSE
error event (`contracts.errors.sse_error`) after closing any half-sent event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from contracts.errors import sse_error
from router import telemetry
from router.dispatch import Exchange, Outcome
from router.errors import CLIENT_CLOSED, openai_error
from router.local_prefill import PD_HEADER
from router.wire import ReadTimeout, UpstreamError

log = logging.getLogger("pdserve.router")

__all__ = ["ContentScanner", "RelayResponse", "client_gone", "event_has_content"]

# The keys whose non-empty value makes an event content-carrying (OpenAI choices and SGLang-native events).
_CONTENT_KEYS = (b'"text"', b'"content"', b'"reasoning_content"', b'"tool_calls"', b'"output_ids"')


def event_has_content(line: bytes) -> bool:
    """Whether one SSE line is a data event carrying generated output (not a role-only delta or an error)."""
    line = line.strip()
    if not line.startswith(b"data:"):
        return False
    payload = line[5:].strip()
    if not payload or payload == b"[DONE]":
        return False
    if not any(key in payload for key in _CONTENT_KEYS):
        return False  # cannot carry output: skip the parse (the servers write keys unescaped)
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


class ContentScanner:
    """Finds the first content-carrying event in an SSE byte stream whose chunks may split lines."""

    _LIMIT = 1 << 20  # a line longer than this is not a token event; drop it rather than grow without bound

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> bool:
        self._buf += chunk
        while b"\n" in self._buf:
            line, _, self._buf = self._buf.partition(b"\n")
            if event_has_content(line):
                return True
        if len(self._buf) > self._LIMIT:
            self._buf = b""
        return False


async def client_gone(receive: Receive) -> None:
    """Returns when the client disconnects (or the response completed, which the caller tells apart).

    Once the request body has been read, the only message that can still arrive on `receive` is
    `http.disconnect`, so a task waiting here notices a client that goes away at any point."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class RelayResponse(Response):
    """Streams D's SSE answer to the client as it arrives, racing the copy against the client's disconnect
    (`watcher`) and the request's deadline; `abort` stops both legs of the current attempt."""

    def __init__(
        self, ex: Exchange, out: Outcome, watcher: asyncio.Task[None], abort: Callable[[], None], timeout_s: float
    ) -> None:
        # Not calling Response.__init__: it would render an empty body and add content-length: 0.
        self.status_code = out.status
        self.background = None
        self.init_headers(out.headers)
        self._ex, self._out, self._watcher, self._abort, self._timeout_s = ex, out, watcher, abort, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ex, out, watcher = self._ex, self._out, self._watcher
        pump = asyncio.create_task(self._pump(send))
        status, aborted = 500, False
        try:
            done, _ = await asyncio.wait({pump, watcher}, timeout=ex.remaining(), return_when=asyncio.FIRST_COMPLETED)
            if pump in done:
                status = pump.result()
            else:
                pump.cancel()
                with contextlib.suppress(BaseException):
                    await pump
                self._abort()
                if watcher in done:
                    log.info("client went away mid-stream; aborted %s", ex.attempt and ex.attempt.rids)
                    status, aborted = CLIENT_CLOSED, True
                else:
                    status = 504
                    await self._fail(send, status, f"request timed out after {self._timeout_s:g} s")
        except BaseException as e:  # shutdown (cancelled) or a bug: either way the upstream work must stop
            pump.cancel()
            self._abort()
            aborted = isinstance(e, asyncio.CancelledError)
            raise
        finally:
            watcher.cancel()
            if out.stream is not None:
                out.stream.close()
            ex.finish(status, aborted)

    async def _start(self, send: Send) -> None:
        if not self._ex.started:
            self._ex.started = True
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})

    async def _pump(self, send: Send) -> int:
        """Returns the status the request ended with: D's on a clean end, 502/504 when D's stream broke."""
        ex, out = self._ex, self._out
        scanner: ContentScanner | None = ContentScanner()

        async def emit(chunk: bytes) -> None:
            nonlocal scanner
            await self._start(send)
            if scanner is not None and scanner.feed(chunk):
                telemetry.observe_ttft(time.perf_counter() - ex.t0)
                scanner = None  # found: stop parsing
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            ex.tail = (ex.tail + chunk)[-2:]

        stream = out.stream
        assert stream is not None
        try:
            if out.first is not None:
                await emit(out.first)
            while (chunk := await stream.chunk()) is not None:
                await emit(chunk)
        except UpstreamError as e:
            status = 504 if isinstance(e, ReadTimeout) else 502
            log.warning("decode %s stream broke: %s: %s", stream.url, type(e).__name__, e)
            self._abort()
            await self._fail(send, status, f"decode stream failed: {type(e).__name__}: {e}")
            return status
        await self._start(send)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return out.status

    async def _fail(self, send: Send, status: int, message: str) -> None:
        """Ends a stream with an error: a plain error response if nothing was sent, else an SSE error event."""
        ex = self._ex
        if not ex.started:
            ex.started = True
            # the decision stays visible on an error that replaces the stream before it started
            pd = self._out.headers.get(PD_HEADER)
            err = openai_error(status, message, headers={PD_HEADER: pd} if pd else None)
            await send({"type": "http.response.start", "status": status, "headers": err.raw_headers})
            await send({"type": "http.response.body", "body": err.body, "more_body": False})
            return
        lead = b"" if ex.tail.endswith(b"\n\n") else b"\n\n"  # finish a half-sent event first
        await send({"type": "http.response.body", "body": lead + sse_error(status, message), "more_body": False})
