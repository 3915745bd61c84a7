"""Streaming responses: SSE chunks in the request's dialect, and cleanup however the stream ends.

The stream's status is decided before it starts (`generation.GenerationEndpoints._stream` waits for the
first output); once the 200 is out, a later failure can only be reported in-band as an error event
followed by `[DONE]`. Whatever ends the stream — completion, an error, a disconnect, or the server
cancelling the response task — the request is closed (its unfinished prompts aborted) and counted once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from serving import api
from serving.front.inflight import ClientGone, Inflight
from serving.ipc import RequestOutput

__all__ = ["SSEResponse", "StreamFormatter", "sse_body"]

logger = logging.getLogger("pdserve.front")

TokenTexts = Callable[[list[int]], list[str]]


class SSEResponse(StreamingResponse):
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


class StreamFormatter:
    """Turns a request's outputs into SSE chunks in its dialect."""

    def __init__(self, token_texts: TokenTexts, parsed: api.ParsedRequest) -> None:
        self.token_texts = token_texts
        self.p = parsed
        self.request_id = api.new_request_id(parsed.kind)
        self.created = api.now()
        self.role_sent = False
        # Per prompt: characters of text already streamed (for completion logprobs' text_offset).
        self.text_pos = [0] * len(parsed.prompts)

    def chunks(self, r: api.PromptResult, out: RequestOutput) -> list[bytes]:
        """Chunks for `out`, already folded into `r` (a failed output yields none: the caller sends the error)."""
        p = self.p
        if r.failed:
            return []
        if p.kind == "generate":
            if not out.token_ids and not out.text and not out.finished:
                return []
            texts = self.token_texts(r.output_ids) if p.return_text_in_logprobs else None
            obj = api.generate_object(r, p.return_logprob, texts, index=r.index if p.is_batch else None)
            return [api.sse(obj)]
        toks = self.token_texts(list(out.token_ids)) if p.return_logprob else []
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

    def tail(self, results: list[api.PromptResult]) -> list[bytes]:
        """The chunks after the last output: OpenAI's usage chunk when the client asked for it."""
        if self.p.kind != "generate" and self.p.include_usage:
            return [api.sse(api.usage_chunk(self.p.kind, self.request_id, self.created, self.p.model, results))]
        return []


async def sse_body(
    parsed: api.ParsedRequest,
    flight: Inflight,
    first: tuple[int, RequestOutput],
    outcome: dict[str, int],
    token_texts: TokenTexts,
    count: Callable[[int, bool], None],
) -> AsyncIterator[bytes]:
    """The SSE body of a stream whose `first` output was already recorded.

    `outcome["status"]` is the status counted for the request, through `count(status, aborted)`, by
    whichever closes it first: this generator's `finally` or the `SSEResponse`'s `on_close`.
    """
    fmt = StreamFormatter(token_texts, parsed)
    try:
        index, out = first
        r = flight.results[index]  # `first` was already recorded by the caller
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
    except ClientGone:
        outcome["status"] = 499
    except api.APIError as err:
        outcome["status"] = err.status
        yield api.sse(err.stream_event())
        yield api.SSE_DONE
    except asyncio.CancelledError:
        flight.aborted = True
        raise
    except Exception:
        logger.exception("unexpected error while streaming a %s response", parsed.kind)
        outcome["status"] = 500
        yield api.sse(api.APIError(500, "internal server error").stream_event())
        yield api.SSE_DONE
    finally:
        if not flight.closed:
            flight.close()
            count(outcome["status"], flight.aborted)
