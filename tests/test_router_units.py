"""Router pure units: policies, load tracking, config and CLI, the PD body rules, TTFT content detection, and
the lean upstream client (`router/wire.py`) against raw sockets. Routing mechanics are in test_router.py."""

from __future__ import annotations

import argparse
import asyncio
import random
from typing import Any

import pytest

from contracts.http import DEFAULT_MAX_BODY_BYTES
from contracts.pd import ROOM_MAX, RidError, batch_size
from router.config import PrefillServer, RouterConfig, RouterConfigError, add_router_args, router_config
from router.pd_body import assign_rids, draw_rooms
from router.policies import LeastLoadPolicy, LoadTracker, RandomPolicy, RoundRobinPolicy, make_policy, parse_load
from router.sse import ContentScanner, event_has_content
from router.wire import ConnectFailed, Pool, ReadTimeout, UpstreamError
from tests.test_router import dead_url

pytestmark = pytest.mark.timeout(60)


def test_round_robin_cycles_each_role_independently() -> None:
    p = RoundRobinPolicy()
    assert [p.choose("prefill", ["a", "b", "c"]) for _ in range(4)] == ["a", "b", "c", "a"]
    assert [p.choose("decode", ["x", "y"]) for _ in range(3)] == ["x", "y", "x"]
    assert p.choose("prefill", ["a", "b", "c"]) == "b"  # decode picks did not move the prefill counter


def test_random_policy_is_uniform_enough_and_seedable() -> None:
    picks = [RandomPolicy(random.Random(7)).choose("decode", ["a", "b", "c"]) for _ in range(1)]
    assert picks == [RandomPolicy(random.Random(7)).choose("decode", ["a", "b", "c"])]
    pol = RandomPolicy(random.Random(0))
    counts = {u: 0 for u in "abc"}
    for _ in range(300):
        counts[pol.choose("prefill", list("abc"))] += 1
    assert all(c > 60 for c in counts.values()), counts


def test_least_load_policy() -> None:
    p = LeastLoadPolicy()
    assert p.choose("decode", ["a", "b", "c"], {"a": 3, "b": 1, "c": 2}) == "b"
    # unreachable (unknown load) servers are skipped even if listed first
    assert p.choose("decode", ["a", "b"], {"b": 9}) == "b"
    # ties rotate so equally idle servers share the work
    assert {p.choose("prefill", ["a", "b"], {"a": 0, "b": 0}) for _ in range(4)} == {"a", "b"}
    # nothing known: round-robin over the candidates rather than refusing
    assert {p.choose("prefill", ["a", "b"], {}) for _ in range(2)} == {"a", "b"}
    with pytest.raises(ValueError):
        p.choose("decode", [], {})
    assert isinstance(make_policy("least_load"), LeastLoadPolicy) and make_policy("least_load").needs_loads
    with pytest.raises(ValueError):
        make_policy("no_such_policy")


def test_parse_load() -> None:
    assert parse_load({"load": 3}) == 3.0
    assert parse_load([{"load": 1}, {"load": 2}]) == 3.0
    assert parse_load({"load": "x"}) is None and parse_load({}) is None and parse_load(None) is None


def test_load_tracker_caches_skips_unreachable_and_counts_dispatches() -> None:
    now = [0.0]
    calls: list[str] = []
    loads = {"a": 4.0, "b": 1.0}

    async def fetch(url: str) -> float | None:
        calls.append(url)
        if url == "dead":
            raise OSError("refused")
        return loads.get(url)

    async def main() -> None:
        t = LoadTracker(fetch, ttl_s=1.0, clock=lambda: now[0])
        assert await t.loads(["a", "b", "dead"]) == {"a": 4.0, "b": 1.0}
        t.note_dispatch("b")
        t.note_dispatch("b")
        now[0] = 0.5  # within the TTL: cached, plus what was dispatched since
        assert await t.loads(["a", "b", "dead"]) == {"a": 4.0, "b": 3.0}
        assert len(calls) == 3
        now[0] = 1.5  # stale: answered from the cache at once while a background poll refreshes it
        loads["a"] = 0.0
        assert await t.loads(["a", "b", "dead"]) == {"a": 4.0, "b": 3.0}
        for _ in range(20):  # let the background poll finish
            await asyncio.sleep(0)
        assert len(calls) == 6
        assert await t.loads(["a", "b", "dead"]) == {"a": 0.0, "b": 1.0}  # fresh; dispatch counts reset
        assert len(calls) == 6
        assert await t.loads(["a", "b", "c"]) == {"a": 0.0, "b": 1.0}  # a new server forces a waited poll
        assert len(calls) == 9

    asyncio.run(main())


def test_config_normalizes_and_validates() -> None:
    cfg = RouterConfig(prefill=[("http://p0:30000/", 8998), "http://p1:30000"], decode=["http://d0:30001"])
    assert cfg.prefill == [PrefillServer("http://p0:30000", 8998), PrefillServer("http://p1:30000", None)]
    assert cfg.prefill[0] == ("http://p0:30000", 8998)  # still the plain (url, port) pair
    assert cfg.prefill[0].host == "p0" and PrefillServer("http://[fe80::1]:80").host == "fe80::1"
    assert (cfg.policy, cfg.request_timeout_s, cfg.max_retries, cfg.health_check_interval_s) == (
        "round_robin",
        600.0,
        3,
        5.0,
    )
    bad: list[tuple[dict[str, Any], str]] = [
        ({"prefill": []}, "at least one prefill"),
        ({"decode": []}, "at least one decode"),
        ({"decode": ["d0:1"]}, "http://"),
        ({"decode": ["http://"]}, "no host"),
        ({"prefill": [("http://p:1", 70000)]}, "outside 1..65535"),
        ({"prefill": [("http://p:1", "x")]}, "integer or none"),
        ({"prefill": ["http://p:1", "http://p:1/"]}, "more than once"),
        ({"decode": ["http://p:1"]}, "both prefill and decode"),
        ({"policy": "no_such_policy"}, "policy must be one of"),
        ({"api_key": ""}, "api_key"),
        ({"request_timeout_s": 0}, "request_timeout_s"),
        ({"max_retries": -1}, "max_retries"),
        ({"max_body_bytes": 0}, "max_body_bytes"),
        ({"max_body_bytes": 1.5}, "max_body_bytes"),
        ({"health_check_interval_s": -1}, "health_check_interval_s"),
        ({"port": 70000}, "port"),
    ]
    for override, msg in bad:
        kw: dict[str, Any] = {"prefill": [("http://p:1", None)], "decode": ["http://d:2"], **override}
        with pytest.raises(RouterConfigError, match=msg):
            RouterConfig(**kw)


def test_cli_args() -> None:
    parser = argparse.ArgumentParser()
    add_router_args(parser)
    argv = ["--pd-disaggregation", "--prefill", "http://p0:1", "8998", "--prefill", "http://p1:1", "none"]
    argv += ["--prefill", "http://p2:1", "--decode", "http://d0:2", "--decode", "http://d1:2"]
    argv += ["--policy", "least_load", "--host", "0.0.0.0", "--port", "9000", "--api-key", "k"]
    argv += ["--request-timeout-secs", "30", "--max-retries", "1", "--health-check-interval", "0"]
    args = parser.parse_args(argv)
    cfg = router_config(args)
    assert [tuple(p) for p in cfg.prefill] == [("http://p0:1", 8998), ("http://p1:1", None), ("http://p2:1", None)]
    assert cfg.decode == ["http://d0:2", "http://d1:2"]
    assert (cfg.policy, cfg.host, cfg.port, cfg.api_key) == ("least_load", "0.0.0.0", 9000, "k")
    assert (cfg.request_timeout_s, cfg.max_retries, cfg.health_check_interval_s) == (30.0, 1, 0.0)
    assert cfg.max_body_bytes == DEFAULT_MAX_BODY_BYTES  # the limit every pdserve process shares, unless set
    args = parser.parse_args(["--prefill", "http://p:1", "--decode", "http://d:1", "--max-body-bytes", "1024"])
    assert router_config(args).max_body_bytes == 1024
    with pytest.raises(RouterConfigError, match="URL \\[BOOTSTRAP_PORT\\]"):
        router_config(parser.parse_args(["--prefill", "http://p:1", "1", "2", "--decode", "http://d:1"]))


def test_batch_detection_rids_and_rooms() -> None:
    assert batch_size({"prompt": "hi"}, "completion") is None
    assert batch_size({"prompt": [1, 2, 3]}, "completion") is None  # one tokenized prompt
    assert batch_size({"prompt": ["a", "b"]}, "completion") == 2
    assert batch_size({"prompt": [[1], [2, 3], [4]]}, "completion") == 3
    assert batch_size({"text": ["a", "b", "c"]}, "generate") == 3
    assert batch_size({"input_ids": [[1, 2], [3]]}, "generate") == 2
    assert batch_size({"input_ids": [1, 2]}, "generate") is None
    assert batch_size({"messages": [{"role": "user", "content": "x"}]}, "chat") is None
    # only the dialect's own prompt field counts: the router and the servers then agree on a stray field
    assert batch_size({"text": "a", "prompt": ["x", "y"]}, "generate") is None
    assert batch_size({"prompt": "a", "text": ["x", "y"]}, "completion") is None
    assert batch_size({"messages": [], "prompt": ["x", "y"]}, "chat") is None
    assert len(assign_rids(None, None)) == 1 and len(assign_rids(None, 3)) == 3
    assert assign_rids("r1", None) == ["r1"] and assign_rids(["a", "b"], 2) == ["a", "b"]
    # The shared rid rule (contracts.pd): a string rid on a batch of n names prompt i `<rid>_<i>`. This replaces
    # the old router-only rule that refused it (the one sanctioned assertion change of the router split).
    assert assign_rids("r", 2) == ["r_0", "r_1"]
    for rid, n in ((["a"], 2), (["a", "a"], 2), (3, None), ("", None), (["a", ""], 2)):
        with pytest.raises(RidError, match="rid"):
            assign_rids(rid, n)
    rooms = draw_rooms(50)
    assert len(set(rooms)) == 50 and all(0 <= r <= ROOM_MAX for r in rooms)


def test_content_detection_for_ttft() -> None:
    assert not event_has_content(b'data: {"choices":[{"index":0,"delta":{"role":"assistant"}}]}')
    assert event_has_content(b'data: {"choices":[{"index":0,"delta":{"content":"H"}}]}')
    assert event_has_content(b'data: {"choices":[{"index":0,"text":"H"}]}')
    assert event_has_content(b'data: {"text":"H","meta_info":{}}')
    assert not event_has_content(b"data: [DONE]") and not event_has_content(b'data: {"error":{}}')
    s = ContentScanner()
    assert not s.feed(b'data: {"choices":[{"te')  # split mid-line
    assert s.feed(b'xt":"Hi"}]}\n\n')


def test_wire_pool_reuses_retries_a_stale_connection_and_reports_breaks() -> None:
    """router.wire against a raw asyncio server: keep-alive reuse, chunked answers relayed as chunks, a reused
    connection the server drops unread retried on a fresh one, an answer cut short reported as an error, and a
    server that never answers timed out."""
    seen: list[int] = []  # per request: the number of the connection it came on
    rest = asyncio.Event()  # lets the server send the rest of an answer (set once; later answers go straight on)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn_no = len({*seen}) + 1
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            body = await reader.readexactly(length)
            seen.append(conn_no)
            if body == b"drop-if-reused" and seen.count(conn_no) > 1:
                writer.close()  # as a server closing an idle connection at the moment it is reused
                return
            if body == b"silent":
                await asyncio.sleep(5)
                return
            if body == b"cut":
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")
                await writer.drain()
                writer.close()
                return
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            writer.write(b"5\r\nhello\r\n")
            await writer.drain()
            await rest.wait()
            writer.write(b"1\r\n!\r\n0\r\n\r\n")
            await writer.drain()

    async def main() -> None:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = Pool(f"http://127.0.0.1:{port}", 1.0, 5.0, 4.0, 8)
        try:
            resp = await pool.post("/x", b"a", [("x-request-id", "1")])
            assert resp.status == 200 and resp.header(b"content-type") == b"text/event-stream"
            assert await resp.chunk() == b"hello"  # the first chunk, before the rest was even sent
            rest.set()
            assert await resp.aread() == b"!" and await resp.chunk() is None
            resp.close()
            resp = await pool.post("/x", b"drop-if-reused", [])  # reused, dropped unread: retried on a new one
            assert await resp.aread() == b"hello!"
            resp.close()
            assert seen == [1, 1, 2]
            resp = await pool.post("/x", b"cut", [])
            assert await resp.chunk() == b"abc"
            with pytest.raises(UpstreamError, match="mid-answer"):
                await resp.chunk()
            resp.close()
            quick = Pool(f"http://127.0.0.1:{port}", 1.0, 0.2, 4.0, 8)
            with pytest.raises(ReadTimeout):
                await quick.post("/x", b"silent", [])
        finally:
            pool.close()
            server.close()
        with pytest.raises(ConnectFailed):
            await Pool(dead_url(), 1.0, 5.0, 4.0, 8).post("/x", b"", [])

    asyncio.run(main())
