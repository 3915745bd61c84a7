"""Rules of a PD request that the router and both servers must apply identically (DESIGN §2, §3.1).

- Bootstrap rooms are integers in [0, ROOM_MAX]; a prefill's bootstrap server listens on
  DEFAULT_BOOTSTRAP_PORT unless told otherwise.
- A request is a *batch* when its dialect's prompt field carries its prompts as a list: on `/generate`
  `text` as a list of strings or `input_ids` as a list of token-id lists; on `/v1/completions` `prompt`
  as either (a flat token-id list is one prompt); a chat request is never a batch. Other dialects'
  prompt fields do not count. A batch's per-prompt fields (`bootstrap_*`, `rid`) may then be lists with
  one entry per prompt.
- The rid rule (SGLang's): no `rid` → the server picks ids; a string on a single prompt is its id; a
  string on a batch of n is the group's id, and prompt i gets `<rid>_<i>` (an abort naming the bare id
  reaches all of them); a list must have one distinct non-empty string per prompt.
- DP attention: a server of N data-parallel ranks gives request R to rank `dp_owner(room, rid, N)`: its bootstrap
  room mod N when it has one (so prefill's scheduler and the transfer layer of both sides agree on the rank that
  writes the room), else a hash of its rid.
"""

from __future__ import annotations

import zlib
from typing import Any, Literal

__all__ = [
    "DEFAULT_BOOTSTRAP_PORT",
    "DIALECT_OF_PATH",
    "ROOM_MAX",
    "Dialect",
    "RidError",
    "batch_size",
    "dp_owner",
    "prompt_rids",
]

Dialect = Literal["generate", "completion", "chat"]
DIALECT_OF_PATH: dict[str, Dialect] = {
    "/generate": "generate",
    "/v1/completions": "completion",
    "/v1/chat/completions": "chat",
}
# Per dialect: each field that can carry a batch, and the entry types that make it one.
_BATCH_FIELDS: dict[str, tuple[tuple[str, tuple[type, ...]], ...]] = {
    "generate": (("text", (str,)), ("input_ids", (list,))),
    "completion": (("prompt", (str, list)),),
    "chat": (),
}

ROOM_MAX = 2**63 - 1
DEFAULT_BOOTSTRAP_PORT = 8998


def dp_owner(room: int | None, rid: str, dp_size: int) -> int:
    """The data-parallel rank of `dp_size` that owns a request (module docstring)."""
    if room is not None:
        return room % dp_size
    return zlib.crc32(rid.encode()) % dp_size


class RidError(ValueError):
    """A `rid` that does not fit the request's prompts; the message is client-facing (param `rid`)."""


def batch_size(body: dict[str, Any], dialect: Dialect) -> int | None:
    """How many prompts a batch of this dialect carries, or None for a single prompt (see the module docstring)."""
    for key, kinds in _BATCH_FIELDS[dialect]:
        v = body.get(key)
        if isinstance(v, list) and v:
            for kind in kinds:
                if all(isinstance(x, kind) for x in v):
                    return len(v)
    return None


def prompt_rids(rid: Any, n: int) -> list[str] | None:
    """The per-prompt rids the client's `rid` names for n prompts, or None when it gave none."""
    if rid is None:
        return None
    if isinstance(rid, str):
        if not rid:
            raise RidError("'rid' must be a non-empty string")
        return [rid] if n == 1 else [f"{rid}_{i}" for i in range(n)]
    if isinstance(rid, list):
        if len(rid) != n:
            raise RidError(f"'rid' has {len(rid)} entries but the request has {n} prompt(s); they must match")
        if not all(isinstance(r, str) and r for r in rid):
            raise RidError("'rid' entries must be non-empty strings")
        if len(set(rid)) != n:
            raise RidError("'rid' entries must be distinct")
        return list(rid)
    kind = "null" if rid is None else type(rid).__name__
    raise RidError(f"'rid' must be a string or a list of strings, got {kind}")
