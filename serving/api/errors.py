"""The exception every bad input becomes, so the HTTP layer answers one OpenAI-style body for all of them.

The body itself is `contracts.errors.error_body`: the router and both servers must spell it identically,
so this module only carries the fields around until the front renders them.
"""

from __future__ import annotations

from typing import Any

from contracts.errors import error_body, error_type

__all__ = ["APIError", "bad", "tname"]


class APIError(Exception):
    """An error answered to the client as `status` + OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str | None = None,
        param: str | None = None,
        code: str | int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type if type is not None else error_type(status)
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """The JSON body of a plain (non-streamed) error answer."""
        return error_body(self.status, self.message, type=self.type, param=self.param, code=self.code)

    def stream_event(self) -> dict[str, Any]:
        """The body of an SSE error event: the same error plus the status the router passes on."""
        return error_body(self.status, self.message, type=self.type, param=self.param, code=self.code, stream=True)


def bad(param: str, message: str) -> APIError:
    """A 400 naming the offending field, the shape of nearly every validation failure."""
    return APIError(400, message, param=param)


def tname(value: object) -> str:
    """A value's type as error messages name it (JSON null reads better than NoneType)."""
    return "null" if value is None else type(value).__name__
