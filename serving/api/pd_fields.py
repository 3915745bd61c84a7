"""The PD fields every dialect takes: the router's bootstrap address/room and the client's `rid`.

The router injects `bootstrap_host`, `bootstrap_port` and `bootstrap_room` into the request it sends to
both servers; each is a scalar or, for a batch, a list with one entry per prompt. The rules shared with
the router (room range, the rid rule) live in `contracts.pd` so the three processes cannot disagree.
"""

from __future__ import annotations

from typing import Any

from contracts.pd import ROOM_MAX, RidError, prompt_rids
from serving.api.errors import APIError, bad
from serving.api.fields import is_int
from serving.api.spec import PromptSpec

__all__ = ["attach", "bootstrap", "rids"]

Bootstrap = tuple[str | None, int | None, int | None]


def _per_prompt(body: dict[str, Any], key: str, n: int) -> list[Any]:
    v = body.get(key)
    if isinstance(v, list):
        if len(v) != n:
            raise bad(key, f"'{key}' has {len(v)} entries but the request has {n} prompt(s); they must match")
        return list(v)
    return [v] * n


def bootstrap(body: dict[str, Any], n: int) -> list[Bootstrap]:
    """Each prompt's (host, port, room); all None when the request is not a PD one."""
    hosts = _per_prompt(body, "bootstrap_host", n)
    ports = _per_prompt(body, "bootstrap_port", n)
    room_v = body.get("bootstrap_room")
    if n > 1 and room_v is not None and not isinstance(room_v, list):
        # One room shared by several prompts would be a duplicate live room on the transfer side.
        raise bad("bootstrap_room", f"'bootstrap_room' must be a list with one room per prompt ({n} prompts)")
    rooms = _per_prompt(body, "bootstrap_room", n)
    out = []
    for host, port, room in zip(hosts, ports, rooms, strict=True):
        if host is not None and (not isinstance(host, str) or not host):
            raise bad("bootstrap_host", f"'bootstrap_host' must be a non-empty string or null, got {host!r}")
        if port is not None and (not is_int(port) or not 0 < port < 65536):
            raise bad("bootstrap_port", f"'bootstrap_port' must be an integer in [1, 65535] or null, got {port!r}")
        if room is not None:
            if not is_int(room) or not 0 <= room <= ROOM_MAX:
                raise bad("bootstrap_room", f"'bootstrap_room' must be an integer in [0, 2^63-1], got {room!r}")
            if host is None:
                raise bad("bootstrap_host", "'bootstrap_host' is required when 'bootstrap_room' is given")
        out.append((host, port, room))
    return out


def rids(body: dict[str, Any], n: int) -> list[str | None]:
    """Each prompt's client rid (None: it gave none), by `contracts.pd.prompt_rids`. A client rid is only a name,
    echoed in the answer and matched by /abort_request; the front sends every prompt under its own unique id."""
    try:
        ids = prompt_rids(body.get("rid"), n)
    except RidError as exc:
        raise APIError(400, str(exc), param="rid") from None
    return [None] * n if ids is None else list(ids)


def attach(prompts: list[PromptSpec], body: dict[str, Any]) -> str | None:
    """Set each prompt's bootstrap fields and rid; return the batch's shared client rid, if any.

    A string rid on a batch is the group's id (its prompts get `<rid>_<i>`): the front keeps the group
    name so that /abort_request with the bare id reaches all of them.
    """
    n = len(prompts)
    for p, (host, port, room), rid in zip(prompts, bootstrap(body, n), rids(body, n), strict=True):
        p.bootstrap_host, p.bootstrap_port, p.bootstrap_room, p.rid = host, port, room, rid
    rid = body.get("rid")
    return rid if isinstance(rid, str) and n > 1 else None
