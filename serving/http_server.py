"""The HTTP front of a pdserve server (prefill or decode): FastAPI app + uvicorn runner.

The front never runs model work. It parses and validates requests (`serving.api`), tokenizes, sends
one `GenerateRequest` per prompt to the scheduler process over ZMQ, and turns the `RequestOutput`
deltas that come back into SGLang-native or OpenAI responses (JSON or SSE).

Plumbing:
- PUSH (front → scheduler) is a plain, non-asyncio socket used only with NOBLOCK from the event loop:
  sends never block, and — unlike an awaitable send — they also work from `finally` blocks that run
  while a cancelled streaming response unwinds, which is exactly where aborts must be sent.
- PULL (scheduler → front) is a zmq.asyncio socket read by one background task, which dispatches
  each `RequestOutput` to the queue of the HTTP request that owns its rid (registered before the
  `GenerateRequest` is sent, so no output can arrive for an unknown rid).
- Client disconnects are detected by a watcher task per HTTP request that awaits the ASGI
  `http.disconnect` message; it wakes the request's queue, whose owner then aborts every unfinished
  prompt. Streaming responses are also covered when the server cancels the response task.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import uvicorn
import zmq
import zmq.asyncio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from contracts.metrics import get_metrics, render, setup_multiprocess, status_label
from engine.sampling import SamplingParams
from engine.tokenizer import Tokenizer
from serving import api
from serving.api import APIError, ParsedRequest, PromptResult
from serving.ipc import AbortRequest, GenerateRequest, IpcMessage, Ready, RequestOutput, SchedulerStats, pack, unpack

logger = logging.getLogger("pdserve.front")

# Prompts longer than this (characters) are tokenized in a worker thread: a long prompt can take
# milliseconds to encode, and every other request's stream would stall meanwhile.
_TOKENIZE_INLINE_MAX_CHARS = 2048
# Enough for bursts; if the scheduler stops reading this many requests, answering 503 beats queueing
# without bound.
_SEND_HWM = 10000


@dataclass
class FrontConfig:
    role: Literal["prefill", "decode"]
    ipc_to_scheduler: str  # ipc://... the front binds a PUSH socket here
    ipc_from_scheduler: str  # ipc://... the front binds a PULL socket here
    model_dir: str  # tokenizer (and config.json) are read from here
    served_model_name: str
    context_length: int
    default_bootstrap_port: int | None = None  # used when a request's bootstrap_port is null
    request_timeout_s: float = 600.0  # abort + 504 when a request gets no output for this long
    server_args: dict[str, Any] = field(default_factory=dict)  # reported by /server_info
    health_generate_timeout_s: float = 30.0
    # /health answers 503 when the scheduler sent no stats for this long (None: never), so a crashed or
    # wedged scheduler takes the server out of the router's rotation. Off by default because a very long
    # forward on a slow machine can legitimately delay stats.
    stats_stale_after_s: float | None = None
    # When set, the front puts itself in Prometheus multiprocess mode with this directory (the same one
    # the scheduler uses), so /metrics merges both processes.
    prometheus_multiproc_dir: str | None = None


class _ClientGone(Exception):
    """The HTTP client disconnected before its response was complete."""


# --------------------------------------------------------------------------------------------------
# one HTTP request in flight


class _Inflight:
    """The prompts of one HTTP request: their queue, results, metrics and abort-on-exit."""

    def __init__(self, front: _Front, rids: list[str], arrival: float, record_metrics: bool = True) -> None:
        self.front = front
        self.rids = rids
        self.arrival = arrival
        self.record_metrics = record_metrics
        # (prompt index, output), or None when the client went away.
        self.queue: asyncio.Queue[tuple[int, RequestOutput] | None] = asyncio.Queue()
        self.results = [PromptResult(i, rid) for i, rid in enumerate(rids)]
        self._first_token_at: list[float | None] = [None] * len(rids)
        self._last_token_at: list[float] = [arrival] * len(rids)
        self._watcher: asyncio.Task[None] | None = None
        self._registered = False
        self.aborted = False  # the client disconnected or /abort_request named it
        self.closed = False
        self.group_rid: str | None = None

    # -- lifecycle --------------------------------------------------------------------------------

    def submit(self, reqs: list[GenerateRequest], request: Request | None, group_rid: str | None = None) -> None:
        front = self.front
        for rid in self.rids:
            if rid in front.routes:
                raise APIError(400, f"rid '{rid}' is already in use by a running request", param="rid")
        for rid in self.rids:
            front.routes[rid] = self
        self._registered = True
        if group_rid is not None:
            self.group_rid = group_rid
            front.groups[group_rid] = list(self.rids)
        try:
            for req in reqs:
                front.send(req)
        except APIError:
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
        front = self.front
        if self._registered:
            for r in self.results:
                if not r.finished:
                    front.send_abort(r.rid)
                if front.routes.get(r.rid) is self:
                    del front.routes[r.rid]
            if self.group_rid is not None and front.groups.get(self.group_rid) == self.rids:
                del front.groups[self.group_rid]

    # -- outputs ----------------------------------------------------------------------------------

    def deliver(self, out: RequestOutput) -> None:
        """Called by the reader task for each output of one of our rids."""
        try:
            index = self.rids.index(out.rid)
        except ValueError:
            return
        self.queue.put_nowait((index, out))

    def abort_rid(self, rid: str) -> None:
        """/abort_request: finish `rid` now as aborted (the scheduler's own final output, if any, is dropped)."""
        self.aborted = True
        self.deliver(RequestOutput(rid=rid, finished=True, finish_reason="abort"))

    async def next(self) -> tuple[int, RequestOutput]:
        try:
            item = await asyncio.wait_for(self.queue.get(), timeout=self.front.cfg.request_timeout_s)
        except asyncio.TimeoutError:
            raise APIError(
                504, f"no output from the scheduler for {self.front.cfg.request_timeout_s:g} s; request aborted"
            ) from None
        if item is None:
            raise _ClientGone()
        return item

    def record(self, index: int, out: RequestOutput) -> PromptResult:
        """Fold `out` into its prompt's result and observe TTFT / inter-token / e2e latency."""
        r = self.results[index]
        if r.finished:  # e.g. the scheduler's abort output after /abort_request already finished it
            return r
        r.apply(out)
        if self.record_metrics:
            m, role, now = self.front.metrics, self.front.cfg.role, time.time()
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


# --------------------------------------------------------------------------------------------------
# the front


class _SSEResponse(StreamingResponse):
    """A streaming response that always runs `on_close`, even if the body iterator never started.

    Starlette cancels the response task when the client disconnects; if that happens before the
    generator's first step, the generator's own `finally` never runs, so cleanup lives here too.
    """

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


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
                await _error_response(APIError(500, "internal server error"))(scope, receive, send)


def _read_model_config(model_dir: str) -> dict[str, Any]:
    try:
        return json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


class _Front:
    def __init__(self, cfg: FrontConfig) -> None:
        self.cfg = cfg
        self.tokenizer = Tokenizer.from_pretrained(cfg.model_dir)
        self.model_config = _read_model_config(cfg.model_dir)
        # Ids the model can embed: the tokenizer's and the config's vocab can differ (padded embeddings).
        self.vocab_size = max(self.tokenizer.vocab_size, int(self.model_config.get("vocab_size") or 0))
        self.metrics = get_metrics()
        self.started_at = time.time()
        self.ready_info: dict[str, Any] | None = None
        self.stats: SchedulerStats | None = None
        self.stats_at = 0.0
        self.routes: dict[str, _Inflight] = {}  # scheduler rid -> its HTTP request
        self.groups: dict[str, list[str]] = {}  # client rid of a batch -> its per-prompt rids
        self._actx: zmq.asyncio.Context | None = None
        self._sctx: zmq.Context | None = None
        self._push: zmq.Socket | None = None
        self._pull: zmq.asyncio.Socket | None = None
        self._reader: asyncio.Task[None] | None = None

    # -- sockets ----------------------------------------------------------------------------------

    async def start(self) -> None:
        self._sctx = zmq.Context()
        self._push = self._sctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.SNDHWM, _SEND_HWM)
        self._push.setsockopt(zmq.LINGER, 0)
        self._push.bind(self.cfg.ipc_to_scheduler)
        self._actx = zmq.asyncio.Context()
        self._pull = self._actx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._pull.bind(self.cfg.ipc_from_scheduler)
        self._reader = asyncio.create_task(self._read_loop(), name="pdserve-front-reader")

    async def stop(self) -> None:
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

    def send(self, msg: IpcMessage) -> None:
        if self._push is None:
            raise APIError(503, "the server is not started")
        try:
            self._push.send(pack(msg), flags=zmq.NOBLOCK)
        except zmq.Again:
            raise APIError(503, "the scheduler is not accepting requests (its queue is full or it is down)") from None

    def send_abort(self, rid: str) -> None:
        try:
            self.send(AbortRequest(rid=rid))
        except APIError as exc:  # best effort: the request's own timeout still bounds its life
            logger.warning("could not send abort for %s: %s", rid, exc.message)

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
            except Exception:
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
            self.stats, self.stats_at = msg, time.time()
            role = self.cfg.role
            self.metrics.running_requests.labels(role=role).set(msg.running)
            self.metrics.queued_requests.labels(role=role).set(msg.queued)
            usage = msg.kv_pages_used / msg.kv_pages_total if msg.kv_pages_total else 0.0
            self.metrics.kv_pool_usage_ratio.labels(role=role).set(usage)
        elif isinstance(msg, Ready):
            self.ready_info = dict(msg.info)
            logger.info("scheduler ready: %s", msg.info)
        else:
            logger.warning("unexpected %s from the scheduler", type(msg).__name__)

    # -- state ------------------------------------------------------------------------------------

    def not_ready_reason(self) -> str | None:
        if self.ready_info is None:
            return "the server is starting: the model is not loaded yet"
        stale = self.cfg.stats_stale_after_s
        if stale is not None and time.time() - max(self.stats_at, self.started_at) > stale:
            return f"the scheduler sent no stats for more than {stale:g} s"
        return None

    def count(self, status: int, aborted: bool = False) -> None:
        self.metrics.requests.labels(role=self.cfg.role, status=status_label(status, aborted)).inc()

    def token_texts(self, ids: list[int]) -> list[str]:
        return [self.tokenizer.decode([t], skip_special_tokens=False) for t in ids]

    # -- generation endpoints -----------------------------------------------------------------------

    async def handle(self, kind: api.Kind, request: Request) -> Response:
        arrival = time.time()
        try:
            reason = self.not_ready_reason()
            if reason is not None:
                raise APIError(503, reason)
            body = api.parse_json_body(await request.body())
            parsed = api.parse_request(kind, body, self.cfg.served_model_name)
            reqs = await self._build_requests(parsed, arrival)
            flight = _Inflight(self, [r.rid for r in reqs], arrival)
            flight.submit(reqs, request, parsed.group_rid)
        except APIError as err:
            self.count(err.status)
            return _error_response(err)
        except ClientDisconnect:  # gone while still sending its body
            self.count(499, aborted=True)
            return Response(status_code=499)
        except Exception:
            logger.exception("unexpected error while admitting a %s request", kind)
            self.count(500)
            return _error_response(APIError(500, "internal server error"))
        if parsed.stream:
            return await self._stream(parsed, flight)
        return await self._collect(parsed, flight)

    async def _build_requests(self, parsed: ParsedRequest, arrival: float) -> list[GenerateRequest]:
        reqs = []
        for spec in parsed.prompts:
            if spec.input_ids is not None:
                param = "input_ids" if parsed.kind == "generate" else "prompt"
                api.check_token_ids(spec.input_ids, self.vocab_size, param)
                ids = spec.input_ids
            elif spec.messages is not None:
                ids = await self._tokenize_chat(spec.messages)
            else:
                assert spec.text is not None
                ids = await self._tokenize_text(spec.text)
            if not ids:
                raise APIError(400, "the prompt is empty after tokenization", param="prompt")
            sampling = api.finalize_sampling(spec, len(ids), self.cfg.context_length, parsed.max_tokens_field)
            host, port = spec.bootstrap_host, spec.bootstrap_port
            if port is None and (host is not None or spec.bootstrap_room is not None):
                port = self.cfg.default_bootstrap_port
            reqs.append(
                GenerateRequest(
                    rid=spec.rid or uuid.uuid4().hex,
                    input_ids=list(ids),
                    sampling=sampling,
                    bootstrap_host=host,
                    bootstrap_port=port,
                    bootstrap_room=spec.bootstrap_room,
                    return_logprob=parsed.return_logprob,
                    stream=parsed.stream,
                    arrival_time=arrival,
                )
            )
        return reqs

    async def _tokenize_text(self, text: str) -> list[int]:
        # add_special_tokens=True: a plain-text prompt gets the tokenizer's usual BOS (Llama), as in
        # vLLM and SGLang; chat templates write their own specials instead.
        def enc() -> list[int]:
            return list(self.tokenizer.hf.encode(text, add_special_tokens=True))

        if len(text) <= _TOKENIZE_INLINE_MAX_CHARS:
            return enc()
        return await asyncio.to_thread(enc)

    async def _tokenize_chat(self, messages: list[dict[str, str]]) -> list[int]:
        def enc() -> list[int]:
            try:
                return self.tokenizer.apply_chat_template(messages)
            except ValueError as exc:
                raise APIError(400, f"cannot apply the chat template: {exc}", param="messages") from None

        if sum(len(m["content"]) for m in messages) <= _TOKENIZE_INLINE_MAX_CHARS:
            return enc()
        return await asyncio.to_thread(enc)

    # -- non-streaming ------------------------------------------------------------------------------

    async def _collect(self, parsed: ParsedRequest, flight: _Inflight) -> Response:
        status = 200
        try:
            while not flight.all_finished:
                index, out = await flight.next()
                r = flight.record(index, out)
                if r.failed:
                    raise r.api_error()
            return JSONResponse(self._full_body(parsed, flight))
        except _ClientGone:
            status = 499  # nginx's "client closed request"; nobody reads it
            return Response(status_code=status)
        except APIError as err:
            status = err.status
            return _error_response(err)
        except Exception:
            logger.exception("unexpected error while answering a %s request", parsed.kind)
            status = 500
            return _error_response(APIError(500, "internal server error"))
        finally:
            flight.close()
            self.count(status, flight.aborted)

    def _full_body(self, parsed: ParsedRequest, flight: _Inflight) -> Any:
        results = flight.results
        if parsed.kind == "generate":
            objs = [
                api.generate_object(
                    r,
                    parsed.return_logprob,
                    self.token_texts(r.output_ids) if parsed.return_text_in_logprobs else None,
                )
                for r in results
            ]
            return objs if parsed.is_batch else objs[0]
        request_id, created = api.new_request_id(parsed.kind), api.now()
        if parsed.kind == "completion":
            lps = (
                [api.completion_logprobs(self.token_texts(r.output_ids), r.logprobs) for r in results]
                if parsed.return_logprob
                else None
            )
            return api.completion_response(request_id, created, parsed.model, results, lps)
        r = results[0]
        lp = api.chat_logprobs(self.token_texts(r.output_ids), r.logprobs) if parsed.return_logprob else None
        return api.chat_response(request_id, created, parsed.model, r, lp)

    # -- streaming --------------------------------------------------------------------------------

    async def _stream(self, parsed: ParsedRequest, flight: _Inflight) -> Response:
        # Wait for the first output before committing to a 200 stream: a request that fails early
        # (transfer failure, overload) then gets its real status, which lets the router retry it.
        try:
            first = await flight.next()
            r = flight.record(*first)
            if r.failed:
                raise r.api_error()
        except _ClientGone:
            flight.close()
            self.count(499, aborted=True)
            return Response(status_code=499)
        except APIError as err:
            flight.close()
            self.count(err.status, flight.aborted)
            return _error_response(err)
        except BaseException as exc:  # incl. cancellation: never leave the scheduler generating for nobody
            flight.close()
            if not isinstance(exc, Exception):
                raise
            logger.exception("unexpected error while starting a %s stream", parsed.kind)
            self.count(500)
            return _error_response(APIError(500, "internal server error"))

        outcome = {"status": 200}

        def on_close() -> None:
            if not flight.closed:  # the generator never ran to its end: the client went away
                flight.aborted = True
                flight.close()
                self.count(outcome["status"], True)

        return _SSEResponse(self._sse(parsed, flight, first, outcome), on_close)

    async def _sse(
        self, parsed: ParsedRequest, flight: _Inflight, first: tuple[int, RequestOutput], outcome: dict[str, int]
    ) -> AsyncIterator[bytes]:
        fmt = _StreamFormatter(self, parsed)
        try:
            index, out = first
            r = flight.results[index]  # `first` was already recorded by _stream
            while True:
                for chunk in fmt.chunks(r, out):
                    yield chunk
                if r.failed:
                    raise r.api_error()
                if flight.all_finished:
                    break
                index, out = await flight.next()
                r = flight.record(index, out)
            for chunk in fmt.tail(flight.results):
                yield chunk
            yield api.SSE_DONE
        except _ClientGone:
            outcome["status"] = 499
        except APIError as err:
            outcome["status"] = err.status
            yield api.sse(err.stream_event())
            yield api.SSE_DONE
        except asyncio.CancelledError:
            flight.aborted = True
            raise
        except Exception:
            logger.exception("unexpected error while streaming a %s response", parsed.kind)
            outcome["status"] = 500
            yield api.sse(APIError(500, "internal server error").stream_event())
            yield api.SSE_DONE
        finally:
            if not flight.closed:
                flight.close()
                self.count(outcome["status"], flight.aborted)

    # -- other endpoints ------------------------------------------------------------------------------

    async def health_generate(self) -> Response:
        reason = self.not_ready_reason()
        if reason is not None:
            return _error_response(APIError(503, reason))
        ids = self.tokenizer.encode("hi")[:4] or [self.tokenizer.bos_token_id or 0]
        rid = f"health-generate-{uuid.uuid4().hex}"
        req = GenerateRequest(
            rid=rid,
            input_ids=ids,
            sampling=dataclasses.asdict(SamplingParams(max_new_tokens=1, temperature=0.0)),
            arrival_time=time.time(),
        )
        flight = _Inflight(self, [rid], req.arrival_time, record_metrics=False)
        try:
            flight.submit([req], None)
            deadline = time.monotonic() + self.cfg.health_generate_timeout_s
            while not flight.all_finished:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise asyncio.TimeoutError
                index, out = await asyncio.wait_for(flight.next(), timeout=left)
                r = flight.record(index, out)
                if r.failed:
                    raise r.api_error()
            return JSONResponse({"status": "ok"})
        except asyncio.TimeoutError:
            msg = f"health generation did not finish within {self.cfg.health_generate_timeout_s:g} s"
            return _error_response(APIError(503, msg))
        except APIError as err:
            return _error_response(APIError(503, f"health generation failed: {err.message}"))
        finally:
            flight.close()

    async def abort_request(self, request: Request) -> Response:
        body = api.parse_json_body(await request.body())
        rid, abort_all = body.get("rid"), body.get("abort_all", False)
        if abort_all is True:
            targets = list(self.routes)
        elif isinstance(rid, str) and rid:
            targets = self.groups.get(rid, [rid])
        else:
            raise APIError(400, "'rid' (a non-empty string) or 'abort_all': true is required", param="rid")
        for t in targets:
            # Forwarded even when unknown here: harmless for the scheduler, and it may hold the rid.
            self.send_abort(t)
            flight = self.routes.get(t)
            if flight is not None:
                flight.abort_rid(t)
        return JSONResponse({})

    def stats_dict(self) -> dict[str, Any]:
        s = self.stats
        if s is None:
            return {}
        return {
            "running": s.running,
            "queued": s.queued,
            "kv_pages_used": s.kv_pages_used,
            "kv_pages_total": s.kv_pages_total,
            "in_flight_transfers": s.in_flight_transfers,
            "age_s": round(time.time() - self.stats_at, 3),
        }

    def server_info(self) -> dict[str, Any]:
        cfg = self.cfg
        info: dict[str, Any] = {
            "model_path": cfg.model_dir,
            "tokenizer_path": cfg.model_dir,
            "served_model_name": cfg.served_model_name,
            "context_length": cfg.context_length,
            "disaggregation_mode": cfg.role,
            "disaggregation_bootstrap_port": cfg.default_bootstrap_port,
            "dp_size": 1,
            "tp_size": 1,
        }
        info.update(cfg.server_args)
        info.update(self.ready_info or {})
        info["ready"] = self.ready_info is not None
        stats = self.stats_dict()
        info["stats"] = stats
        # SGLang's mini_lb reads decode's internal_states.
        info["internal_states"] = [stats]
        return info

    def model_info(self) -> dict[str, Any]:
        return {
            "model_path": self.cfg.model_dir,
            "tokenizer_path": self.cfg.model_dir,
            "served_model_name": self.cfg.served_model_name,
            "is_generation": True,
            "model_type": self.model_config.get("model_type"),
            "architectures": self.model_config.get("architectures"),
            "context_length": self.cfg.context_length,
        }


class _StreamFormatter:
    """Turns a request's outputs into SSE chunks in its dialect."""

    def __init__(self, front: _Front, parsed: ParsedRequest) -> None:
        self.front = front
        self.p = parsed
        self.request_id = api.new_request_id(parsed.kind)
        self.created = api.now()
        self.role_sent = False
        # Per prompt: characters of text already streamed (for completion logprobs' text_offset).
        self.text_pos = [0] * len(parsed.prompts)

    def chunks(self, r: PromptResult, out: RequestOutput) -> list[bytes]:
        """Chunks for `out`, already folded into `r` (a failed output yields none: the caller sends the error)."""
        p = self.p
        if r.failed:
            return []
        if p.kind == "generate":
            if not out.token_ids and not out.text and not out.finished:
                return []
            texts = self.front.token_texts(r.output_ids) if p.return_text_in_logprobs else None
            obj = api.generate_object(r, p.return_logprob, texts, index=r.index if p.is_batch else None)
            return [api.sse(obj)]
        toks = self.front.token_texts(list(out.token_ids)) if p.return_logprob else []
        finish = r.finish_reason if r.finished else None
        if p.kind == "completion":
            if not out.text and not out.token_ids and not out.finished:
                return []
            lp = api.completion_logprobs(toks, out.logprobs, self.text_pos[r.index]) if p.return_logprob else None
            self.text_pos[r.index] += len(out.text)
            chunk = api.completion_chunk(
                self.request_id, self.created, p.model, r.index, out.text, finish, lp, p.include_usage
            )
            return [api.sse(chunk)]
        res = []
        mk = self._chat_chunk
        if not self.role_sent:
            self.role_sent = True
            res.append(mk({"role": "assistant", "content": ""}))
        if out.text or out.token_ids:
            lp = api.chat_logprobs(toks, out.logprobs) if p.return_logprob else None
            res.append(mk({"content": out.text}, None, lp))
        if finish is not None:
            res.append(mk({}, finish))
        return res

    def _chat_chunk(self, delta: dict[str, Any], finish: str | None = None, lp: dict | None = None) -> bytes:
        p = self.p
        return api.sse(api.chat_chunk(self.request_id, self.created, p.model, delta, finish, lp, p.include_usage))

    def tail(self, results: list[PromptResult]) -> list[bytes]:
        if self.p.kind != "generate" and self.p.include_usage:
            return [api.sse(api.usage_chunk(self.p.kind, self.request_id, self.created, self.p.model, results))]
        return []


# --------------------------------------------------------------------------------------------------
# app


def create_app(cfg: FrontConfig) -> FastAPI:
    """The front's FastAPI app. Loads the tokenizer now; binds the ZMQ sockets when the app starts."""
    if cfg.role not in ("prefill", "decode"):
        raise ValueError(f"FrontConfig.role must be 'prefill' or 'decode', got {cfg.role!r}")
    if cfg.prometheus_multiproc_dir is not None:
        setup_multiprocess(cfg.prometheus_multiproc_dir)
    front = _Front(cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await front.start()
        try:
            yield
        finally:
            await front.stop()

    # Routes take the raw Request and parse bodies themselves (serving.api), so FastAPI never
    # produces a 422; the OpenAPI schema would document nothing useful.
    app = FastAPI(title="pdserve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.front = front

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(APIError(400, f"invalid request: {exc.errors()}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code, headers=exc.headers
        )

    app.add_middleware(_CatchAllMiddleware)

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        return await front.handle("generate", request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await front.handle("completion", request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await front.handle("chat", request)

    @app.post("/abort_request")
    async def abort_request(request: Request) -> Response:
        return await front.abort_request(request)

    @app.post("/flush_cache")
    async def flush_cache() -> Response:
        # The router fans this out to every server; there is no prefix cache to flush here.
        return JSONResponse({})

    @app.get("/health")
    async def health() -> Response:
        reason = front.not_ready_reason()
        if reason is not None:
            return _error_response(APIError(503, reason))
        return JSONResponse({"status": "ok"})

    @app.get("/health_generate")
    async def health_generate() -> Response:
        return await front.health_generate()

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": cfg.served_model_name,
                        "object": "model",
                        "created": int(front.started_at),
                        "owned_by": "pdserve",
                        "root": cfg.model_dir,
                        "max_model_len": cfg.context_length,
                    }
                ],
            }
        )

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
        s = front.stats
        return JSONResponse({"load": (s.running + s.queued) if s is not None else 0})

    @app.get("/metrics")
    async def metrics() -> Response:
        # In multiprocess mode this reads every process's files: keep it off the event loop.
        body, content_type = await asyncio.to_thread(render)
        return Response(body, media_type=content_type)

    return app


def run_front(cfg: FrontConfig, host: str, port: int) -> None:
    """Serve the front with uvicorn until interrupted."""
    # A keep-alive longer than typical client pool idle times, so the router never reuses a
    # connection the server is just closing.
    # a bounded graceful shutdown: SIGTERM must end the server (and so its scheduler) promptly
    uvicorn.run(
        create_app(cfg), host=host, port=port, log_level="warning", timeout_keep_alive=60, timeout_graceful_shutdown=5
    )
