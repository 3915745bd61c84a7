"""`--policy cache_aware` end to end: two `pdserve prefill` servers, one `pdserve decode` and two `pdserve router`s in
front of them (default knobs, and knobs that spill early), real processes on builtin:tiny-llama.

Where each request was prefilled is read from the prefill servers' own metrics, not from the router: each server's
pdserve_requests_total{role="prefill",status="ok"} says how many requests it answered, and (with the prefill prefix
cache, issue 14) pdserve_cached_prompt_tokens_total{role="prefill"} says that the requests after a group's first found
its prefix cached there.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from engine.ports import free_port
from harness.observe import counter, settle
from harness.stack import Proc, Stack, find_key

pytestmark = pytest.mark.timeout(300)

# Long shared prefixes (several hundred characters), each starting differently so no two groups share a prefix.
PREFIXES = [
    "Alpha report. " + "The northern warehouse logged inbound pallets, outbound crates and damaged goods. " * 6,
    "Bravo manual. " + "Open the valve slowly, watch the gauge, close it when the needle settles near two. " * 6,
    "Charlie story. " + "The fox ran along the river bank until the old mill, then doubled back at dusk. " * 6,
]
HOT = "Delta hot prefix. " + "Every request of this burst carries the same long system preamble, word for word. " * 6
GROUP = 4  # requests per prefix, sent one after another
BURST = 24  # concurrent requests with one hot prefix


def prefill_counts(urls: list[str], name: str, *labels: str) -> list[float]:
    """Each prefill server's own count of `name` (role="prefill" and `labels`)."""
    return [counter(httpx.get(f"{u}/metrics", timeout=10).text, name, 'role="prefill"', *labels) for u in urls]


@dataclass
class CacheStack:
    stack: Stack
    router: str  # default knobs
    spill_router: str  # --balance-abs-threshold 2 --balance-rel-threshold 1.1

    @property
    def prefills(self) -> list[str]:
        return self.stack.prefill_urls

    def ok_counts(self) -> list[float]:
        return prefill_counts(self.prefills, "pdserve_requests_total", 'status="ok"')


@pytest.fixture(scope="module")
def cs() -> Iterator[CacheStack]:
    s = Stack("mooncake", prefills=2, router_extra=["--policy", "cache_aware"])
    try:
        port = free_port()
        servers = [a for u, b in zip(s.prefill_urls, s.bootstrap_ports, strict=True) for a in ("--prefill", u, str(b))]
        spill = Proc("router-spill", [sys.executable, "-m", "pdserve", "--log-level", "warning", "router",
                                      "--port", str(port), *servers, "--decode", s.decode_url,
                                      "--policy", "cache_aware", "--balance-abs-threshold", "2",
                                      "--balance-rel-threshold", "1.1"], s.log_dir)  # fmt: skip
        s.procs.append(spill)
        url = f"http://127.0.0.1:{port}"
        s.wait_ready(f"{url}/readiness", 60)
        for router in (s.router_url, url):  # a router is ready with one prefill: wait for both, seen by both routers
            all_up(router)
        yield CacheStack(s, s.router_url, url)
    finally:
        s.stop()


def all_up(router: str, limit_s: float = 120.0) -> None:
    deadline = time.monotonic() + limit_s
    while (
        down := httpx.get(f"{router}/readiness", timeout=10).json()["prefill"]["down"]
    ) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert not down, f"prefill servers still down for {router}: {down}"


def complete(url: str, prompt: str) -> None:
    r = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 2, "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text


def test_requests_sharing_a_prefix_land_on_one_prefill(cs: CacheStack) -> None:
    placed = []
    for g, prefix in enumerate(PREFIXES):
        before = cs.ok_counts()
        for q in range(GROUP):
            complete(cs.router, f"{prefix}Question {g}.{q}: what comes next?")
        after = settle(cs.ok_counts, sum(before) + GROUP)
        delta = [a - b for a, b in zip(after, before, strict=True)]
        assert sorted(delta) == [0, GROUP], (g, delta)  # the whole group on one server
        placed.append(delta.index(GROUP))
    assert set(placed) == {0, 1}, placed  # and a new prefix on the server holding less
    routes = httpx.get(f"{cs.router}/metrics", timeout=10).text
    assert counter(routes, "pdserve_router_cache_aware_total", 'decision="prefix"') == len(PREFIXES) * (GROUP - 1)
    assert counter(routes, "pdserve_router_cache_aware_total", 'decision="least_load"') == len(PREFIXES)


def _prefix_cache_on(url: str) -> bool:
    try:
        return bool(find_key(httpx.get(f"{url}/server_info", timeout=10).json(), "prefix_cache"))
    except KeyError:
        return False


def test_the_prefill_that_received_a_group_served_its_prefix_from_cache(cs: CacheStack) -> None:
    if not all(_prefix_cache_on(u) for u in cs.prefills):
        pytest.skip("the prefill servers report no prefix cache (/server_info prefix_cache): issue 14's prefill prefix "
                    "cache has not landed, so pdserve_cached_prompt_tokens_total stays 0")  # fmt: skip
    prefix = "Echo notes. " + "Cached prefixes save the prefill server from computing the same tokens twice. " * 6
    ok_before = cs.ok_counts()
    cached = lambda: prefill_counts(cs.prefills, "pdserve_cached_prompt_tokens_total")  # noqa: E731
    cached_before = cached()
    for q in range(GROUP):
        complete(cs.router, f"{prefix}Item {q}?")
    ok = settle(cs.ok_counts, sum(ok_before) + GROUP)
    server = [a - b for a, b in zip(ok, ok_before, strict=True)].index(GROUP)
    deadline = time.monotonic() + 15  # the scheduler publishes its counters on its own beat
    while (gained := [a - b for a, b in zip(cached(), cached_before, strict=True)])[server] <= 0:
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert gained[server] > 0, gained  # the 2nd..4th requests found the 1st one's prefix there
    assert gained[1 - server] == 0, gained


def test_a_hot_prefix_spills_to_the_other_prefill_under_load(cs: CacheStack) -> None:
    before = cs.ok_counts()

    async def burst() -> None:
        async with httpx.AsyncClient(timeout=120) as c:
            body = {"max_tokens": 2, "temperature": 0}
            rs = await asyncio.gather(
                *(
                    c.post(f"{cs.spill_router}/v1/completions", json={**body, "prompt": f"{HOT}#{i}"})
                    for i in range(BURST)
                )
            )
        assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200]

    asyncio.run(burst())
    after = settle(cs.ok_counts, sum(before) + BURST)
    delta = [a - b for a, b in zip(after, before, strict=True)]
    assert sum(delta) == BURST and min(delta) > 0, delta  # both prefills took part of the one prefix
    routes = httpx.get(f"{cs.spill_router}/metrics", timeout=10).text
    assert counter(routes, "pdserve_router_cache_aware_total", 'decision="balance"') > 0
