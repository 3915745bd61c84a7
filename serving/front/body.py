"""Reading a request body within the server's size limit (`contracts.http`: the limit the router shares).

A body larger than the limit gets 413 before it is buffered: at once when its Content-Length says so, else
(chunked) as soon as the bytes read pass the limit. The response can go out with the rest of the body unread:
uvicorn (httptools and h11 alike) then discards what still arrives for the finished request, without buffering
it, and reads the next request on the same keep-alive connection.
"""

from __future__ import annotations

from fastapi import Request

from contracts.http import BodyError, check_size, declared_length
from serving import api

__all__ = ["read_body"]


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, or APIError 413 once it is known to pass `limit` bytes (never holding more than that)."""
    try:
        declared = declared_length(request.headers.get("content-length"))
        if declared is not None:
            check_size(declared, limit)
        buf = bytearray()
        async for chunk in request.stream():
            check_size(len(buf) + len(chunk), limit)
            buf += chunk
        return bytes(buf)
    except BodyError as exc:
        raise api.APIError(exc.status, exc.message) from None
