"""What the router sends to P and D: the client's body plus, per prompt, a rid and a bootstrap room; or, for a request
prefilled on the decode server (`router.local_prefill`), to D alone: the body plus rids, no bootstrap fields.

Both servers must get byte-for-byte the same body (DESIGN.md §2 step 1): the decode server finds the prefill's KV by
(bootstrap_host, bootstrap_port, bootstrap_room), and aborts name the rid. The rules for rids and batches are the
ones the servers apply (`contracts.pd`), so a request means the same thing through the router as sent directly.
"""

from __future__ import annotations

import json
import secrets
import uuid
from typing import Any

from contracts.pd import ROOM_MAX, prompt_rids
from router.config import PrefillServer

__all__ = ["BOOTSTRAP_FIELDS", "assign_rids", "draw_rooms", "local_body", "pd_body"]

# What makes a decode server wait for a prefill's KV instead of prefilling the prompt itself.
BOOTSTRAP_FIELDS = ("bootstrap_host", "bootstrap_port", "bootstrap_room")


def assign_rids(client_rid: Any, n: int | None) -> list[str]:
    """One rid per prompt (n is None for a single prompt): the client's by the shared rid rule (a string on a batch
    of n becomes `<rid>_<i>`), else fresh uuid hex. Raises `contracts.pd.RidError` (client-facing message, param
    `rid`) when the given rid does not fit the prompts, exactly as the servers would."""
    count = n or 1
    rids = prompt_rids(client_rid, count)
    return rids if rids is not None else [uuid.uuid4().hex for _ in range(count)]


def draw_rooms(n: int) -> list[int]:
    """n distinct bootstrap rooms in [0, ROOM_MAX]; from `secrets` so separate router replicas never share a seed."""
    rooms: list[int] = []
    while len(rooms) < n:
        r = secrets.randbelow(ROOM_MAX + 1)
        if r not in rooms:
            rooms.append(r)
    return rooms


def pd_body(body: dict[str, Any], n: int | None, prefill: PrefillServer, rids: list[str], rooms: list[int]) -> bytes:
    """The JSON body for both legs: scalars for a single prompt, one-entry-per-prompt lists for a batch of n."""
    out = dict(body)
    if n is None:
        out.update(
            bootstrap_host=prefill.host, bootstrap_port=prefill.bootstrap_port, bootstrap_room=rooms[0], rid=rids[0]
        )
    else:
        out.update(
            bootstrap_host=[prefill.host] * n,
            bootstrap_port=[prefill.bootstrap_port] * n,
            bootstrap_room=rooms,
            rid=rids,
        )
    return json.dumps(out).encode()


def local_body(body: dict[str, Any], n: int | None, rids: list[str]) -> bytes:
    """The JSON body for a request prefilled on the decode server (conditional disaggregation): the client's body with
    the rids and without any bootstrap field (a client's own would make the decode server wait for KV nobody sends)."""
    out = {k: v for k, v in body.items() if k not in BOOTSTRAP_FIELDS}
    out["rid"] = rids[0] if n is None else rids
    return json.dumps(out).encode()
