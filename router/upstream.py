"""The configured prefill and decode servers as the router sees them: their connections (a `router.wire.Pool` for
generate legs, an httpx client for control calls), their health, their loads, and the choice of a (prefill, decode)
pair for an attempt.

Health comes from a background loop of `/health` probes (a server not probed yet counts as healthy) and from the
requests themselves: a server whose connection is refused or broken is marked down at once (`mark_down`), so new
requests avoid it, and probed every RECOVERY_PROBE_S until `/health` answers 200 again (as a restarted server does
once it is ready), which returns it to the pool without waiting for the next round of the loop. When every server
of a role is down they are all still tried, since one may be back before its probe says so.

Loads are only fetched when the policy needs them (`LoadTracker` answers from a cache so a slow `/get_load` never
holds a request). Fire-and-forget work (aborts, draining ignored answers) is kept here too, so `stop` can let it land.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import Any

import httpx

from router import telemetry
from router.config import PrefillServer, RouterConfig
from router.policies import LoadTracker, make_policy, parse_load
from router.wire import Pool

log = logging.getLogger("pdserve.router")

__all__ = ["CONTROL_TIMEOUT_S", "MODELS_TIMEOUT_S", "Upstreams"]

# Aborts, health probes and load polls: short, so a dead server costs little and never holds a request.
CONTROL_TIMEOUT_S = 2.0
MODELS_TIMEOUT_S = 5.0
# Per upstream server. Each request holds one generate-leg connection (router.wire, opened as needed; at most
# MAX_KEEPALIVE kept idle) plus short-lived control calls (httpx, capped at MAX_CONNECTIONS so they never queue).
MAX_CONNECTIONS = 1024
MAX_KEEPALIVE = 256
# Below uvicorn's default keep-alive timeout (5 s, which SGLang servers keep): reusing a connection the server is
# closing at that moment fails the request, so the router drops idle connections first.
KEEPALIVE_S = 4.0
# How often a server marked down by a failed request is probed until it answers again: a restarted server is back in
# the pool within this much of becoming ready.
RECOVERY_PROBE_S = 0.5


class Upstreams:
    """Router state shared by all requests: the servers' clients, health and loads, and the pair policy."""

    def __init__(self, cfg: RouterConfig) -> None:
        self.cfg = cfg
        self.policy = make_policy(cfg.policy, cfg=cfg)
        self.prefill_urls = [p.url for p in cfg.prefill]
        self.all_urls = self.prefill_urls + cfg.decode
        self._prefill_by_url = {p.url: p for p in cfg.prefill}
        self._healthy: dict[str, bool] = {}  # absent: not probed yet, treated as healthy
        self._bg: set[asyncio.Task[Any]] = set()
        self._health_task: asyncio.Task[None] | None = None
        self._recovering: dict[str, asyncio.Task[None]] = {}  # servers marked down, probed until they answer
        self._clients: dict[str, httpx.AsyncClient] = {}  # control calls
        self._pools: dict[str, Pool] = {}  # the generate legs (router.wire)
        self.loads = LoadTracker(self.fetch_load, ttl_s=1.0)
        # requests sent to each prefill and not answered yet (router.dispatch keeps it): the cache-aware policy's load
        self._prefill_inflight: dict[str, int] = {}

    # ---- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        # One read timeout covers the whole wait for a token; the total is capped separately by the deadline.
        timeout = httpx.Timeout(self.cfg.request_timeout_s, connect=self.cfg.connect_timeout_s)
        limits = httpx.Limits(
            max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_KEEPALIVE, keepalive_expiry=KEEPALIVE_S
        )
        # One client per upstream server rather than one for all: httpcore's pool scans every connection it holds
        # on each request and response, so one shared pool costs O(total connections) per request (measured:
        # ~2x the router's CPU per request at 200 concurrent with 2+2 servers). Per-server pools bound the scan
        # to that server's connections. trust_env=False: proxy settings meant for the outside world must not
        # catch cluster-internal calls.
        for url in self.all_urls:
            self._clients[url] = httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False)
            self._pools[url] = Pool(
                url, self.cfg.connect_timeout_s, self.cfg.request_timeout_s, KEEPALIVE_S, MAX_KEEPALIVE
            )
        if self.cfg.health_check_interval_s > 0:
            self._health_task = asyncio.create_task(self._health_loop())

    async def stop(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        recovering = list(self._recovering.values())
        for task in recovering:
            task.cancel()
        await asyncio.gather(*recovering, return_exceptions=True)
        if self._bg:
            # let in-flight aborts land; whatever is still draining after that is cancelled
            _, pending = await asyncio.wait(set(self._bg), timeout=CONTROL_TIMEOUT_S)
            for t in pending:
                t.cancel()
        await asyncio.gather(*(c.aclose() for c in self._clients.values()))
        self._clients.clear()
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    def client(self, url: str) -> httpx.AsyncClient:
        """The upstream client for server `url` (one of the configured servers)."""
        try:
            return self._clients[url]
        except KeyError:
            raise RuntimeError(f"no client for {url}: router not started, or not a configured server") from None

    def pool(self, url: str) -> Pool:
        """The connections for generate legs to server `url`."""
        try:
            return self._pools[url]
        except KeyError:
            raise RuntimeError(f"no pool for {url}: router not started, or not a configured server") from None

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        """Runs `coro` in the background, kept alive until done (the loop holds tasks only weakly)."""
        task = asyncio.ensure_future(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)
        return task

    # ---- health and load -------------------------------------------------------------------------------

    def is_healthy(self, url: str) -> bool:
        return self._healthy.get(url, True)

    async def probe(self, url: str) -> bool:
        try:
            r = await self.client(url).get(url + "/health", timeout=CONTROL_TIMEOUT_S)
            ok = r.status_code == 200
        except httpx.HTTPError:
            ok = False
        prev = self._healthy.get(url)
        self._healthy[url] = ok
        telemetry.upstream_health(url, ok)
        if prev is not ok:
            # losing a server is news; gaining one (as every server does at start-up) is routine
            log.log(logging.INFO if ok else logging.WARNING, "server %s is %s", url, "healthy" if ok else "unhealthy")
        return ok

    def mark_down(self, url: str, why: str) -> None:
        """A request could not reach `url` or lost its connection: keep new requests away from it until it answers
        `/health` again (probed from now on every RECOVERY_PROBE_S, health loop or not)."""
        if self._healthy.get(url, True):
            log.warning("server %s is unhealthy (%s); new requests avoid it until /health answers", url, why)
        self._healthy[url] = False
        telemetry.upstream_health(url, False)
        if url not in self._recovering and url in self._clients:
            self._recovering[url] = asyncio.ensure_future(self._recover(url))

    async def _recover(self, url: str) -> None:
        try:
            while not self._healthy.get(url, True) and not await self.probe(url):
                await asyncio.sleep(RECOVERY_PROBE_S)
        finally:
            self._recovering.pop(url, None)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.gather(*(self.probe(u) for u in self.all_urls))
            await asyncio.sleep(self.cfg.health_check_interval_s)

    async def fetch_load(self, url: str) -> float | None:
        try:
            r = await self.client(url).get(url + "/get_load", timeout=CONTROL_TIMEOUT_S)
            return parse_load(r.json()) if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    def _candidates(self, urls: list[str], failed: set[str]) -> list[str]:
        """Healthy servers not yet failed in this request; falling back (in that order) when none are left, since
        a server may have come back and trying it beats refusing the request."""
        healthy = [u for u in urls if self._healthy.get(u, True)] or urls
        return [u for u in healthy if u not in failed] or healthy

    def prefill_started(self, url: str) -> None:
        """A request was sent to prefill `url`; `prefill_ended` once, when its answer is in or abandoned."""
        self._prefill_inflight[url] = self._prefill_inflight.get(url, 0) + 1

    def prefill_ended(self, url: str) -> None:
        self._prefill_inflight[url] = max(0, self._prefill_inflight.get(url, 0) - 1)

    def prefill_inflight(self, url: str) -> int:
        return self._prefill_inflight.get(url, 0)

    async def pick(self, failed: set[str], key: str | None = None) -> tuple[PrefillServer, str]:
        """A (prefill, decode) pair by the policy, avoiding unhealthy servers and those in `failed`. `key`: the
        request's routing text, for a policy that routes by it."""
        loads = await self.loads.loads(self.all_urls) if self.policy.needs_loads else None
        p_candidates = self._candidates(self.prefill_urls, failed)
        p_loads = loads
        if self.policy.inflight_prefill:
            p_loads = {u: float(self.prefill_inflight(u)) for u in p_candidates}
        p_url = self.policy.choose("prefill", p_candidates, p_loads, key)
        d_url = self.policy.choose("decode", self._candidates(self.cfg.decode, failed), loads)
        if self.policy.needs_loads:
            self.loads.note_dispatch(p_url)
            self.loads.note_dispatch(d_url)
        return self._prefill_by_url[p_url], d_url

    async def pick_decode(self, failed: set[str]) -> str:
        """A decode server alone, for a request it prefills itself (no prefill server is involved or counted)."""
        loads = await self.loads.loads(self.all_urls) if self.policy.needs_loads else None
        d_url = self.policy.choose("decode", self._candidates(self.cfg.decode, failed), loads)
        if self.policy.needs_loads:
            self.loads.note_dispatch(d_url)
        return d_url

    # ---- control calls ---------------------------------------------------------------------------------

    async def post_abort(self, url: str, rid: str, room: int | None) -> None:
        """Asks `url` to drop the prompt of this attempt: rid AND room, since a rid alone may be another client's
        (clients choose rids, and two may choose the same one) or a later attempt's (a client-chosen rid is reused
        on a retry, with a new room). A prompt prefilled on the decode server has no room: rid alone (room None)."""
        body: dict[str, Any] = {"rid": rid} if room is None else {"rid": rid, "bootstrap_room": room}
        try:
            await self.client(url).post(url + "/abort_request", json=body, timeout=CONTROL_TIMEOUT_S)
        except httpx.HTTPError as e:
            log.info("abort of %s (room %s) at %s failed: %s", rid, room, url, e)
