"""The prefill bootstrap server over real HTTP (DESIGN §3.2)."""

from __future__ import annotations

from dataclasses import asdict

import httpx
import pytest

from transfer.bootstrap import BootstrapError, BootstrapServer, RankInfo, fetch_route, health, probe, register_rank


def rank(tp_rank: int, tp_size: int = 2) -> RankInfo:
    return RankInfo(tp_size=tp_size, tp_rank=tp_rank, rank_ip="10.0.0.1", rank_port=7000 + tp_rank, page_size=16,
                    kv_dtype="bfloat16", num_layers=32, num_kv_heads=8, head_dim=128, backend="mooncake",
                    instance=f"i{tp_rank}")  # fmt: skip


@pytest.fixture
def server():
    s = BootstrapServer("127.0.0.1", 0).start()
    yield f"127.0.0.1:{s.port}"
    s.stop()


def test_layout_is_503_until_every_rank_registered(server: str):
    assert health(server)
    with pytest.raises(BootstrapError, match="503"):
        fetch_route(server)
    register_rank(server, rank(0))
    with pytest.raises(BootstrapError, match="1 of 2 prefill ranks registered"):
        fetch_route(server)
    register_rank(server, rank(1))
    assert fetch_route(server) == {"tp_size": 2, "dp_size": 1, "page_size": 16, "kv_dtype": "bfloat16",
                                   "num_layers": 32, "num_kv_heads": 8, "head_dim": 128,
                                   "backend": "mooncake"}  # fmt: skip
    assert fetch_route(server, tp_rank=1) == {"rank_ip": "10.0.0.1", "rank_port": 7001, "instance": "i1"}


def test_unknown_rank_and_bad_input(server: str):
    register_rank(server, rank(0, tp_size=1))
    r = httpx.get(f"http://{server}/route", params={"tp_rank": 5})
    assert r.status_code == 404 and "unknown prefill rank 5" in r.json()["error"]
    r = httpx.get(f"http://{server}/route", params={"tp_rank": "x"})
    assert r.status_code == 400
    r = httpx.put(f"http://{server}/route", content=b"{not json")
    assert r.status_code == 400 and "bad registration" in r.json()["error"]
    r = httpx.put(f"http://{server}/route", json={**asdict(rank(0)), "surprise": 1})
    assert r.status_code == 400
    assert httpx.get(f"http://{server}/nope").status_code == 404


def test_unreachable_server_is_a_clear_error():
    with pytest.raises(BootstrapError, match="unreachable"):
        fetch_route("127.0.0.1:1", timeout=1)
    assert not health("127.0.0.1:1", timeout=1)


def test_health_shows_each_rank_instance_and_a_restart(server: str):
    assert probe(server).ok and probe(server).ranks == {}
    register_rank(server, rank(0))
    assert probe(server).ranks == {0: {"rank_ip": "10.0.0.1", "rank_port": 7000, "instance": "i0"}}
    # a restarted rank registers again with its new instance: the heartbeat sees the change
    register_rank(server, RankInfo(**{**asdict(rank(0)), "instance": "j0"}))
    assert probe(server).ranks[0]["instance"] == "j0"
    assert "instance" not in fetch_route_layout_fields()


def fetch_route_layout_fields() -> tuple[str, ...]:
    from transfer.bootstrap import LAYOUT_FIELDS

    return LAYOUT_FIELDS


def test_probe_tells_a_gone_prefill_from_a_frozen_one():
    import socket

    gone = probe("127.0.0.1:1", timeout=1)
    assert not gone.ok and gone.gone and not gone.frozen
    # a socket that accepts connections (the kernel does, even for a stopped process) but never answers
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        frozen = probe(f"127.0.0.1:{s.getsockname()[1]}", timeout=0.3)
    assert not frozen.ok and frozen.frozen and not frozen.gone
