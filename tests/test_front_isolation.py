"""Request isolation at a front: a client's rid is a name it chose, never the key of anyone's request.

A real front (uvicorn, real ZMQ) over the stand-in scheduler of front_standin. Two requests may share a rid:
both run and complete, neither aborts the other; /abort_request by rid reaches every running prompt of that
name, and by rid + bootstrap_room (what the router sends for one leg) only that one. Every per-request table
of the front is empty again however its requests ended.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from serving.front.scheduler_client import SchedulerClient
from tests.front_standin import Server, sse_events, wait_for

IDS = list(range(40, 50))  # ten tokens: with seed 555 the echo takes ~1 s


@pytest.fixture(scope="module")
def srv() -> Iterator[Server]:
    s = Server(request_timeout_s=2.0)
    s.make_ready()
    yield s
    s.close()


def _post(srv: Server, path: str, body: dict[str, Any], timeout: float = 30) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, timeout=timeout)


def test_a_duplicate_rid_runs_beside_the_first_and_both_complete(srv: Server) -> None:
    body = {"input_ids": IDS, "rid": "dup", "sampling_params": {"seed": 555, "max_new_tokens": 10}}
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(_post, srv, "/generate", body)
        (rid1,) = srv.wait_sent("dup")
        assert not first.done()  # the first is still running when the second arrives
        second = pool.submit(_post, srv, "/generate", body)
        rid2 = srv.wait_sent("dup", 2)[1]
        r1, r2 = first.result(30), second.result(30)
    assert rid1 != rid2 and "dup" not in (rid1, rid2)  # the scheduler never sees the client's id
    for r in (r1, r2):
        assert r.status_code == 200, r.text[:300]
        out = r.json()
        assert out["output_ids"] == IDS and out["meta_info"]["id"] == "dup"  # echoed as the client sent it
        assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 10}
    assert rid1 not in srv.sched.aborts and rid2 not in srv.sched.aborts
    wait_for(lambda: srv.front_tables() == {"routes": 0, "names": 0})


def test_abort_by_rid_and_room_aborts_only_that_prompt(srv: Server) -> None:
    def body(room: int) -> dict[str, Any]:
        return {"prompt": "abc", "stream": True, "seed": 777, "max_tokens": 1000, "rid": "twin",
                "bootstrap_host": "127.0.0.1", "bootstrap_room": room}  # fmt: skip

    with srv.client.stream("POST", "/v1/completions", json=body(101)) as a:
        lines_a = a.iter_lines()  # keep a reference: a collected line iterator closes the stream
        assert next(lines_a).startswith("data: ")
        with httpx.stream("POST", srv.url + "/v1/completions", json=body(102), timeout=30) as b:
            assert b.status_code == 200
            rid_a, rid_b = srv.wait_sent("twin", 2)
            # a room nobody of that name holds, and a name nobody holds: nothing happens
            assert srv.client.post("/abort_request", json={"rid": "twin", "bootstrap_room": 7}).json() == {}
            assert srv.client.post("/abort_request", json={"rid": "nobody"}).status_code == 200
            r = srv.client.post("/abort_request", json={"rid": "twin", "bootstrap_room": 102})
            assert r.status_code == 200 and r.json() == {}
            events_b = sse_events(b)
        assert events_b[-1] == "[DONE]" and events_b[-2]["choices"][0]["finish_reason"] == "abort"
        wait_for(lambda: rid_b in srv.sched.aborts)
        assert rid_a not in srv.sched.aborts and rid_a in srv.sched.active  # the twin of the same rid runs on
        assert next(line for line in lines_a if line).startswith("data: ")
        # the bare rid reaches every prompt still running under it: now only the first
        assert srv.client.post("/abort_request", json={"rid": "twin"}).status_code == 200
        rest = [line for line in lines_a if line]
    assert rest[-1] == "data: [DONE]" and '"finish_reason":"abort"' in rest[-2]
    wait_for(lambda: rid_a in srv.sched.aborts)
    bad = srv.client.post("/abort_request", json={"rid": "twin", "bootstrap_room": "x"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "bootstrap_room"


def test_a_duplicate_rid_on_a_batch_and_a_single_prompt(srv: Server) -> None:
    """A group rid `g` names the batch's prompts (`g_0`, `g_1`); a single prompt may be called `g_1` too."""
    batch = {"text": ["x", "y"], "rid": "g", "sampling_params": {"seed": 777, "max_new_tokens": 1000}}
    single = {"text": "z", "rid": "g_1", "sampling_params": {"seed": 777, "max_new_tokens": 1000}}
    with ThreadPoolExecutor(2) as pool:
        fb = pool.submit(_post, srv, "/generate", batch)
        fs = pool.submit(_post, srv, "/generate", single)
        srv.wait_sent("g", 2)
        srv.wait_sent("g_1", 2)
        assert srv.client.post("/abort_request", json={"rid": "g"}).status_code == 200  # the batch only
        rb = fb.result(30)
        assert [o["meta_info"]["finish_reason"]["type"] for o in rb.json()] == ["abort", "abort"]
        assert not fs.done()
        assert srv.client.post("/abort_request", json={"rid": "g_1"}).status_code == 200
        rs = fs.result(30)
    assert rs.json()["meta_info"] == {**rs.json()["meta_info"], "id": "g_1"}
    assert rs.json()["meta_info"]["finish_reason"]["type"] == "abort"
    wait_for(lambda: srv.front_tables() == {"routes": 0, "names": 0})


def test_every_table_is_empty_however_requests_ended(srv: Server) -> None:
    c = srv.client
    endings: list[int] = []
    endings.append(c.post("/v1/completions", json={"prompt": "ok", "rid": "e-ok"}).status_code)  # success
    endings.append(c.post("/v1/completions", json={"prompt": "a", "seed": 666, "rid": "e-err"}).status_code)
    endings.append(c.post("/generate", json={"text": "a", "rid": "e-silent", "sampling_params": {"seed": 999}})
                   .status_code)  # fmt: skip  # timeout
    endings.append(c.post("/generate", json={"text": ["a", "b"], "rid": "e-batch"}).status_code)
    endings.append(c.post("/v1/completions", json={"prompt": 5, "rid": "e-400"}).status_code)  # refused early
    with c.stream("POST", "/generate", json={"text": "abc", "stream": True, "rid": "e-888",
                                             "sampling_params": {"seed": 888}}) as r:  # fmt: skip
        assert sse_events(r)[-1] == "[DONE]"  # fails mid-stream
    with c.stream("POST", "/v1/completions", json={"prompt": "a", "stream": True, "seed": 777, "rid": "e-gone"}) as r:
        next(line for line in r.iter_lines() if line)  # then the client leaves mid-stream
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that leaves
        c.post("/v1/completions", json={"prompt": "a", "seed": 777, "rid": "e-left"}, timeout=0.5)
    done = threading.Event()

    def aborted() -> None:
        _post(srv, "/generate", {"text": "a", "rid": "e-abort", "sampling_params": {"seed": 777}})
        done.set()

    t = threading.Thread(target=aborted)
    t.start()
    srv.wait_sent("e-abort")
    c.post("/abort_request", json={"rid": "e-abort"})
    t.join(30)
    assert done.is_set()
    assert endings == [200, 503, 504, 200, 400]
    wait_for(lambda: srv.front_tables() == {"routes": 0, "names": 0})


def test_scheduler_client_tables_unit() -> None:
    """register / unregister / named on their own: shared names, rooms, and nothing left behind."""

    class FakeRoute:  # a pure unit test of the tables: only room_of is consulted
        def __init__(self, rooms: dict[str, int | None]) -> None:
            self.rooms = rooms

        def room_of(self, rid: str) -> int | None:
            return self.rooms.get(rid)

    client = SchedulerClient("ipc://unused-to", "ipc://unused-from", metrics=None, role=None)  # type: ignore[arg-type]
    a, b = FakeRoute({"i1": 5}), FakeRoute({"i2": 6, "i3": None})
    client.register(a, "i1", ["r"])  # type: ignore[arg-type]
    client.register(b, "i2", ["r", "grp"])  # type: ignore[arg-type]
    client.register(b, "i3", ["grp"])  # type: ignore[arg-type]
    assert client.named("r") == ["i1", "i2"] and client.named("r", 6) == ["i2"] and client.named("r", 9) == []
    assert client.named("grp") == ["i2", "i3"] and client.named("nobody") == []
    client.unregister(b, "i1", ["r"])  # type: ignore[arg-type]  # not b's: its route stays
    assert client.routes["i1"] is a
    client.unregister(a, "i1", ["r"])  # type: ignore[arg-type]
    client.unregister(b, "i2", ["r", "grp"])  # type: ignore[arg-type]
    client.unregister(b, "i3", ["grp"])  # type: ignore[arg-type]
    client.unregister(b, "i3", ["grp"])  # type: ignore[arg-type]  # idempotent
    assert client.routes == {} and client.names == {}
