"""What an HTTP request body may be, for the router and both servers alike: its size, its JSON nesting, its
strings. One home, so a body one process accepts is accepted by the others (and refused with the same words).

`read_limited` is not here (each process reads its body its own way); they all call `check_size` as bytes
arrive and `parse_json_object` once the body is complete. Both raise `BodyError` carrying the HTTP status.
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "MAX_JSON_DEPTH",
    "BodyError",
    "check_size",
    "declared_length",
    "parse_json_object",
]

# 32 MiB: a 128K-token prompt as text is well under 1 MiB, as input_ids a few MiB; anything far larger is a bug
# or an attack, and would otherwise be buffered whole in every process it passes.
DEFAULT_MAX_BODY_BYTES = 32 * 2**20
# Real bodies nest a few levels (messages → content parts → …; tool schemas a few more). Python's parser would
# recurse until RecursionError on deep input; this refuses it early and by name.
MAX_JSON_DEPTH = 64

# A lone UTF-16 surrogate can enter a str through a JSON escape ("\ud800") or through CESU-style bytes
# (json.loads decodes bytes with "surrogatepass"). Neither can be tokenized or encoded back to UTF-8.
_SURROGATE_HINT = re.compile(rb"\\u[dD][89abAB]|\\u[dD][c-fC-F]|\xed[\xa0-\xbf]")


class BodyError(ValueError):
    """A body refused before it means anything: `status` is 400 or 413, the message says what to fix."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def check_size(size: int, limit: int) -> None:
    """Raise 413 once a body (declared or read so far) passes `limit` bytes."""
    if size > limit:
        raise BodyError(
            413,
            f"request body is larger than the server's limit of {limit} bytes "
            "(send less, or raise the limit with --max-body-bytes)",
        )


def declared_length(content_length: str | None) -> int | None:
    """The body size a Content-Length header announces; None when absent (chunked) or not a plain number (the
    HTTP server refuses such a request itself)."""
    if content_length is None:
        return None
    value = content_length.strip()
    return int(value) if value.isdigit() else None


def parse_json_object(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> dict[str, Any]:
    """The body as a JSON object, or BodyError(400) naming what is wrong: empty, not JSON, not an object,
    nested deeper than `max_depth`, or holding a string that is not valid Unicode (a lone surrogate)."""
    if not raw.strip():
        raise BodyError(400, "request body is empty; expected a JSON object")
    # Cheap bound first: a body with few brackets cannot nest deeply, so the walk below is rarely needed.
    deep = raw.count(b"[") + raw.count(b"{") > max_depth
    try:
        body = json.loads(raw)
    except RecursionError:
        raise BodyError(400, f"request body is nested deeper than {max_depth} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BodyError(400, f"request body is not valid JSON: {_short(exc)}") from None
    if not isinstance(body, dict):
        raise BodyError(400, f"request body must be a JSON object, got {_json_kind(body)}")
    check_strings = _SURROGATE_HINT.search(raw) is not None
    if deep or check_strings:
        _walk(body, max_depth, check_strings)
    return body


def _walk(root: Any, max_depth: int, check_strings: bool) -> None:
    stack: list[tuple[Any, int, str]] = [(root, 1, "")]
    while stack:
        node, depth, where = stack.pop()
        if depth > max_depth:
            raise BodyError(400, f"request body is nested deeper than {max_depth} levels")
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            if check_strings and isinstance(key, str):
                _check_str(key, where or "body")
            if isinstance(value, (dict, list)):
                stack.append((value, depth + 1, f"{where}.{key}" if where else str(key)))
            elif check_strings and isinstance(value, str):
                _check_str(value, f"{where}.{key}" if where else str(key))


def _check_str(s: str, where: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BodyError(
            400, f"'{where}' is not valid Unicode: lone surrogate {s[exc.start]!r} at character {exc.start}"
        ) from None


def _short(exc: Exception, limit: int = 200) -> str:
    text = str(exc)
    return text if len(text) <= limit else text[:limit] + "..."


def _json_kind(value: object) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"
