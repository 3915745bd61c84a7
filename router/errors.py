"""How the router's own failures reach the client: OpenAI-style error bodies, spelled as the servers spell them.

The body comes from `contracts.errors` so a client cannot tell a router error from a server error by its shape.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from contracts.errors import error_body

__all__ = ["CLIENT_CLOSED", "UpstreamFailure", "openai_error"]

# Status for a request whose client is gone: nobody reads it, it only shows in logs (nginx's convention).
CLIENT_CLOSED = 499


def openai_error(
    status: int,
    message: str,
    code: str | None = None,
    headers: dict[str, str] | None = None,
    param: str | None = None,
) -> JSONResponse:
    """An OpenAI-style error response."""
    return JSONResponse(error_body(status, message, param=param, code=code), status_code=status, headers=headers)


class UpstreamFailure(Exception):
    """The request failed before anything reached the client; answered with `status` (502/503/504)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message
