"""How the router picks a prefill and a decode server for a request.

A policy is pure: it gets the candidate URLs (already filtered to healthy, untried servers, in configured order),
for least-load a mapping of known loads, and for cache-aware the request's routing text (`key`), and returns one URL.
Prefill and decode are chosen independently (each role keeps its own state). The only I/O lives in `LoadTracker`,
which is handed a fetch function so it can be tested without HTTP. The cache-aware policy lives in
`router.cache_aware` (with its prefix tree, `router.prefix_tree`).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from router.config import RouterConfig

Role = Literal["prefill", "decode"]


class Policy:
    """Base class: `choose(role, candidates, loads, key)` returns one of `candidates` (which is never empty). `key` is
    the request's routing text (`router.cache_aware.routing_key`), given only to a policy that `needs_key`; a policy
    that sets `inflight_prefill` gets, as the prefill `loads`, the router's own count of requests each prefill has
    not answered yet instead of the polled ones."""

    name = ""
    needs_loads = False
    needs_key = False
    inflight_prefill = False

    def choose(
        self, role: Role, candidates: Sequence[str], loads: Mapping[str, float] | None = None, key: str | None = None
    ) -> str:
        raise NotImplementedError


class RoundRobinPolicy(Policy):
    """Cycles through the candidates, one counter per role. When the candidate list shrinks (a server is down or
    failed in this request) the counter keeps advancing over what is left, which is the useful behaviour."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next: dict[str, int] = {"prefill": 0, "decode": 0}

    def choose(
        self, role: Role, candidates: Sequence[str], loads: Mapping[str, float] | None = None, key: str | None = None
    ) -> str:
        if not candidates:
            raise ValueError(f"no {role} candidates")
        i = self._next[role]
        self._next[role] = i + 1
        return candidates[i % len(candidates)]


class RandomPolicy(Policy):
    """Uniform choice; `rng` is injectable so tests are deterministic."""

    name = "random"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(
        self, role: Role, candidates: Sequence[str], loads: Mapping[str, float] | None = None, key: str | None = None
    ) -> str:
        if not candidates:
            raise ValueError(f"no {role} candidates")
        return candidates[self._rng.randrange(len(candidates))]


class LeastLoadPolicy(Policy):
    """Picks the candidate with the smallest known load. Candidates without a known load (unreachable at the last
    poll) are skipped; ties rotate round-robin so equal servers share work. With no load known at all it falls
    back to round-robin, so a request still goes somewhere (and a dead server is then caught by the retry)."""

    name = "least_load"
    needs_loads = True

    def __init__(self) -> None:
        self._rr = RoundRobinPolicy()

    def choose(
        self, role: Role, candidates: Sequence[str], loads: Mapping[str, float] | None = None, key: str | None = None
    ) -> str:
        if not candidates:
            raise ValueError(f"no {role} candidates")
        known = [(loads[c], c) for c in candidates if loads is not None and c in loads]
        if not known:
            return self._rr.choose(role, candidates)
        best = min(load for load, _ in known)
        tied = [c for load, c in known if load == best]
        return self._rr.choose(role, tied) if len(tied) > 1 else tied[0]


def make_policy(name: str, rng: random.Random | None = None, cfg: RouterConfig | None = None) -> Policy:
    """The policy called `name`; `cfg` gives the cache-aware policy its knobs (their defaults without it)."""
    if name == "round_robin":
        return RoundRobinPolicy()
    if name == "random":
        return RandomPolicy(rng)
    if name == "least_load":
        return LeastLoadPolicy()
    if name == "cache_aware":
        from router.cache_aware import CacheAwarePolicy  # it builds on this module's classes

        return CacheAwarePolicy() if cfg is None else CacheAwarePolicy.from_config(cfg)
    raise ValueError(f"unknown policy {name!r}")


def parse_load(payload: object) -> float | None:
    """The load from a `/get_load` body: `{"load": n}`, or a list of such (one per DP rank, summed)."""
    if isinstance(payload, dict):
        v = payload.get("load")
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
    if isinstance(payload, list) and payload:
        parts = [parse_load(p) for p in payload]
        return None if any(p is None for p in parts) else float(sum(p for p in parts if p is not None))
    return None


class LoadTracker:
    """Server loads for least-load, polled at most once per `ttl_s` (the poll is the expensive part, and
    `/get_load` moves slowly compared with request arrival).

    Only the first call waits for a poll; later, a stale cache is answered at once while a poll refreshes it in
    the background, so a server that is slow to answer `/get_load` never delays requests. Between polls it adds
    the requests this router dispatched to a server since that server's last poll, otherwise a burst arriving
    within one TTL would all land on the server that looked idlest.
    """

    def __init__(
        self,
        fetch: Callable[[str], Awaitable[float | None]],
        ttl_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._ttl = ttl_s
        self._clock = clock
        self._polled: dict[str, float] = {}  # last polled load of each reachable server
        self._pending: dict[str, int] = {}  # dispatches since that poll
        self._at: float | None = None
        self._seen: set[str] = set()  # the URLs of the last poll; asking about others forces a new one
        self._lock = asyncio.Lock()
        self._background: asyncio.Task[None] | None = None

    async def loads(self, urls: Iterable[str]) -> dict[str, float]:
        """Known loads of `urls` (unreachable servers absent)."""
        urls = list(urls)
        if self._at is None or not self._seen.issuperset(urls):
            async with self._lock:  # concurrent first callers share one poll instead of stampeding
                if self._at is None or not self._seen.issuperset(urls):
                    await self._refresh(urls)
        elif self._clock() - self._at >= self._ttl and (self._background is None or self._background.done()):
            self._background = asyncio.ensure_future(self._refresh(urls))
        return {u: self._polled[u] + self._pending.get(u, 0) for u in urls if u in self._polled}

    async def _refresh(self, urls: list[str]) -> None:
        results = await asyncio.gather(*(self._fetch(u) for u in urls), return_exceptions=True)
        for u, r in zip(urls, results, strict=True):
            if isinstance(r, (int, float)) and not isinstance(r, bool):
                self._polled[u] = float(r)
            else:
                self._polled.pop(u, None)
            self._pending.pop(u, None)
        self._seen = set(urls)
        self._at = self._clock()

    def note_dispatch(self, url: str) -> None:
        self._pending[url] = self._pending.get(url, 0) + 1
