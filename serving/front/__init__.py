"""The HTTP front of a pdserve server (prefill or decode): FastAPI app + uvicorn runner.

The front never runs model work. It parses and validates requests (`serving.api`), tokenizes, sends
one `GenerateRequest` per prompt to the scheduler process over ZMQ, and turns the `RequestOutput`
deltas that come back into SGLang-native or OpenAI responses (JSON or SSE). It never answers FastAPI's
422 or a bare 500: every error is an OpenAI-style body.

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

Modules: `config` (FrontConfig), `body` (reading a body within --max-body-bytes), `scheduler_client` (the
ZMQ link, its reader task and the rid tables), `inflight` (one HTTP request's prompts), `state` (what all
endpoints share), `generation` (the generation endpoints), `sse` (streamed responses), `info` (health,
info, load, abort), `app` (routes, error handling, runner).

Requests are isolated: each prompt is sent under an id the front makes; the client's rid is only echoed
and names prompts for /abort_request (see `scheduler_client`).
"""

from __future__ import annotations

from serving.front.app import create_app, run_front
from serving.front.config import FrontConfig

__all__ = ["FrontConfig", "create_app", "run_front"]
