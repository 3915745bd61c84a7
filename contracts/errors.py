"""The OpenAI-style error body every pdserve HTTP answer uses (servers and router alike).

Clients of OpenAI-compatible servers parse `{"error": {"message", "type", "param", "code"}}` and switch on
`type`, so its spelling follows OpenAI's. A streamed error is the same body plus `status` (what the
answer would have been had nothing been sent yet), sent as an SSE event before `[DONE]`.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["SSE_DONE", "error_body", "error_type", "sse_error"]

SSE_DONE = b"data: [DONE]\n\n"


def error_type(status: int) -> str:
    """OpenAI's `error.type` for an HTTP status."""
    if status == 503:
        return "service_unavailable"
    if status == 504:
        return "timeout"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_body(
    status: int,
    message: str,
    *,
    type: str | None = None,
    param: str | None = None,
    code: str | int | None = None,
    stream: bool = False,
) -> dict[str, Any]:
    """The error body; with `stream`, the SSE event's body (it also carries the status)."""
    err: dict[str, Any] = {
        "message": message,
        "type": type if type is not None else error_type(status),
        "param": param,
        "code": code,
    }
    if stream:
        err["status"] = status
    return {"error": err}


def sse_error(status: int, message: str) -> bytes:
    """An SSE error event followed by the end of the stream."""
    body = json.dumps(error_body(status, message, stream=True), ensure_ascii=False, separators=(",", ":"))
    return b"data: " + body.encode() + b"\n\n" + SSE_DONE
