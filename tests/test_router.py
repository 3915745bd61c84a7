"""Router routing mechanics against stand-in prefill/decode servers (real uvicorn servers on 127.0.0.1 in
threads that record what they receive). Pure units are in test_router_units.py; end-to-end runs with real
pdserve servers live elsewhere."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from contracts.pd import ROOM_MAX

# the stand-ins raise on purpose (a decode dying mid-stream); keep uvicorn from printing those tracebacks
UVICORN_LOG = "critical"
pytestmark = pytest.mark.timeout(60)

# ---- stand-in servers ----------------------------------------------------------------------------------


async def _wait_event(ev: threading.Event, limit_s: float = 10.0) -> None:
    deadline = time.monotonic() + limit_s
    while not ev.is_set() and time.monotonic() < deadline:
        await asyncio.sleep(0.005)


class StandIn:
    """A fake prefill or decode server: records every body and abort, answers like the real ones would."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.reset()
        self.server = ServerThread(self._app())
        self.url = self.server.url

    def reset(self) -> None:
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.aborts: list[str] = []  # the rid of each abort
        self.abort_rooms: list[tuple[str, Any]] = []  # (rid, bootstrap_room) of each abort
        self.load = 0
        self.healthy = True
        self.reject: int | None = None  # answer every generate request with this 4xx
        self.header_hold: threading.Event | None = None  # decode: hold the answer until set
        self.hold: threading.Event | None = None  # decode stream: hold after the first chunk until set
        self.break_stream = False  # decode stream: die after the first chunk
        self.finished = threading.Event()  # decode stream fully produced

    def _app(self) -> FastAPI:
        app = FastAPI()

        async def generate(request: Request) -> Response:
            body = await request.json()
            self.requests.append((request.url.path, body))
            if self.reject:
                err = {"message": f"{self.role} says no", "type": "invalid_request_error", "param": None}
                return JSONResponse({"error": {**err, "code": self.reject}}, status_code=self.reject)
            if self.role == "prefill":
                await asyncio.sleep(0.02)  # "the KV transfer"
                return JSONResponse({"text": "", "meta_info": {"id": body.get("rid")}})
            if self.header_hold is not None:
                await _wait_event(self.header_hold)
            if body.get("stream"):
                return StreamingResponse(self._events(), media_type="text/event-stream")
            return JSONResponse({"object": "text_completion", "choices": [{"index": 0, "text": "Hello"}]})

        for path in ("/generate", "/v1/completions", "/v1/chat/completions"):
            app.add_api_route(path, generate, methods=["POST"])

        @app.post("/abort_request")
        async def abort(request: Request) -> dict[str, Any]:
            body = await request.json()
            self.aborts.append(body["rid"])
            self.abort_rooms.append((body["rid"], body.get("bootstrap_room")))
            return {}

        @app.get("/health")
        async def health() -> Response:
            return Response(status_code=200 if self.healthy else 503)

        @app.get("/get_load")
        async def get_load() -> dict[str, Any]:
            return {"load": self.load}

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            return {"object": "list", "data": [{"id": f"standin-{self.role}", "object": "model"}]}

        return app

    async def _events(self) -> Any:
        yield b'data: {"choices":[{"index":0,"text":"Hel"}]}\n\n'
        if self.hold is not None:
            await _wait_event(self.hold)
        if self.break_stream:
            raise RuntimeError("stand-in decode dies mid-stream")
        yield b'data: {"choices":[{"index":0,"text":"lo"}]}\n\n'
        yield b"data: [DONE]\n\n"
        self.finished.set()

    def generate_bodies(self, at_least: int = 0) -> list[dict[str, Any]]:
        """The bodies received so far, after waiting for `at_least` of them: the router relays D's answer
        without waiting for P's, so a stand-in prefill may record its copy a moment after the client is done."""
        wait_until(lambda: len(self.requests) >= at_least)
        return [b for _, b in self.requests]


class ServerThread:
    """A uvicorn server on 127.0.0.1 at a free port, in a daemon thread."""

    def __init__(self, app: Any) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        cfg = uvicorn.Config(app, log_level=UVICORN_LOG, timeout_graceful_shutdown=1, timeout_keep_alive=30)
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.005)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)


def dead_url() -> str:
    """A URL with nothing listening: connections to it are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def wait_until(cond: Callable[[], bool], limit_s: float = 5.0) -> bool:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


@pytest.fixture(scope="module")
def standins() -> Iterator[dict[str, StandIn]]:
    servers = {"p1": StandIn("prefill"), "p2": StandIn("prefill"), "d1": StandIn("decode"), "d2": StandIn("decode")}
    yield servers
    for s in servers.values():
        s.server.stop()


@pytest.fixture
def sv(standins: dict[str, StandIn]) -> Iterator[dict[str, StandIn]]:
    for s in standins.values():
        s.reset()
    yield standins
    for s in standins.values():  # release anything a failed test left held
        for ev in (s.hold, s.header_hold):
            if ev is not None:
                ev.set()


# ---- routing mechanics ----------------------------------------------------------------------------------


def test_both_legs_get_the_same_body_with_bootstrap_fields(sv: dict[str, StandIn], make_router: Any) -> None:
    url = make_router([(sv["p1"].url, 8998)], [sv["d1"].url])
    req = {"model": "m", "prompt": "hi", "max_tokens": 2, "temperature": 0}
    r = httpx.post(url + "/v1/completions", json=req)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "Hello"
    sv["p1"].generate_bodies(1)
    [(p_path, p_body)] = sv["p1"].requests
    [(d_path, d_body)] = sv["d1"].requests
    assert p_path == d_path == "/v1/completions"
    assert p_body == d_body
    assert {k: p_body[k] for k in req} == req
    assert p_body["bootstrap_host"] == "127.0.0.1" and p_body["bootstrap_port"] == 8998
    assert isinstance(p_body["bootstrap_room"], int) and 0 <= p_body["bootstrap_room"] <= ROOM_MAX
    assert isinstance(p_body["rid"], str) and len(p_body["rid"]) == 32

    # a prefill without a bootstrap port: null, the server uses its default; a client rid is kept
    url = make_router([sv["p2"].url], [sv["d2"].url])
    r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "rid": "my"})
    assert r.status_code == 200
    (p_body,), (d_body,) = sv["p2"].generate_bodies(1), sv["d2"].generate_bodies()
    assert p_body == d_body and p_body["bootstrap_port"] is None and p_body["rid"] == "my"
    assert sv["p1"].requests[1:] == [] and sv["d1"].requests[1:] == []


def test_batches_get_lists(sv: dict[str, StandIn], make_router: Any) -> None:
    url = make_router([(sv["p1"].url, 7000)], [sv["d1"].url])
    assert httpx.post(url + "/v1/completions", json={"prompt": ["a", "b", "c"]}).status_code == 200
    assert httpx.post(url + "/generate", json={"input_ids": [[1, 2], [3]], "rid": ["x", "y"]}).status_code == 200
    assert httpx.post(url + "/generate", json={"input_ids": [1, 2, 3]}).status_code == 200
    p, d = sv["p1"].generate_bodies(3), sv["d1"].generate_bodies()
    assert p == d
    assert p[0]["bootstrap_host"] == ["127.0.0.1"] * 3 and p[0]["bootstrap_port"] == [7000] * 3
    assert len(set(p[0]["bootstrap_room"])) == 3 and len(set(p[0]["rid"])) == 3
    assert p[1]["rid"] == ["x", "y"] and len(p[1]["bootstrap_room"]) == 2
    assert isinstance(p[2]["bootstrap_room"], int) and isinstance(p[2]["rid"], str)
    # Sanctioned assertion change (one rid rule for router and servers, contracts.pd): a string rid on a batch used
    # to get a 400 from the router; now prompt i gets `<rid>_<i>`, sent as that list to both servers.
    r = httpx.post(url + "/generate", json={"text": ["a", "b"], "rid": "one"})
    assert r.status_code == 200
    p, d = sv["p1"].generate_bodies(4), sv["d1"].generate_bodies()
    assert p[3] == d[3] and p[3]["rid"] == ["one_0", "one_1"] and len(set(p[3]["bootstrap_room"])) == 2
    # a rid that does not fit the prompts: refused before dispatch, as the servers refuse it (param "rid")
    r = httpx.post(url + "/generate", json={"text": ["a", "b"], "rid": ["x"]})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "rid" and err["type"] == "invalid_request_error"
    assert err["message"] == "'rid' has 1 entries but the request has 2 prompt(s); they must match"
    assert len(sv["p1"].requests) == 4 and len(sv["d1"].requests) == 4


def test_stream_is_passed_through_incrementally(sv: dict[str, StandIn], make_router: Any) -> None:
    url = make_router([sv["p1"].url], [sv["d1"].url])
    sv["d1"].hold = threading.Event()
    body = {"prompt": "x", "stream": True}
    with httpx.Client(timeout=10) as c, c.stream("POST", url + "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        chunks = r.iter_raw()
        first = next(chunks)
        # the first chunk reached the client while the decode stand-in is still holding the rest
        assert b'"Hel"' in first and not sv["d1"].finished.is_set()
        sv["d1"].hold.set()
        rest = b"".join(chunks)
    assert rest.endswith(b"data: [DONE]\n\n") and b'"lo"' in rest
    assert sv["p1"].generate_bodies(1) == sv["d1"].generate_bodies()


def test_non_stream_and_4xx_passthrough(sv: dict[str, StandIn], make_router: Any) -> None:
    url = make_router([sv["p1"].url], [sv["d1"].url])
    sv["d1"].reject = 400
    r = httpx.post(url + "/v1/completions", json={"prompt": "x", "stream": True})
    assert r.status_code == 400 and r.json()["error"]["message"] == "decode says no"
    rid = sv["d1"].requests[0][1]["rid"]
    assert wait_until(lambda: rid in sv["p1"].aborts)  # P was left waiting for a partner: told to drop it

    sv["d1"].reset()
    sv["p1"].reject = 422
    sv["d1"].header_hold = threading.Event()  # D still waiting for the transfer when P refuses
    r = httpx.post(url + "/v1/chat/completions", json={"messages": []})
    assert r.status_code == 422 and r.json()["error"]["message"] == "prefill says no"
    rid = sv["p1"].requests[-1][1]["rid"]
    assert wait_until(lambda: rid in sv["d1"].aborts)
    sv["d1"].header_hold.set()


def test_invalid_json_and_api_key(sv: dict[str, StandIn], make_router: Any) -> None:
    url = make_router([sv["p1"].url], [sv["d1"].url], api_key="sekrit")
    ok = {"authorization": "Bearer sekrit"}
    for body in (b"{not json", b"[1, 2]", b""):
        r = httpx.post(url + "/v1/completions", content=body, headers=ok)
        assert r.status_code == 400
        assert r.json()["error"]["type"] == "invalid_request_error" and r.json()["error"]["message"]
    for headers in ({}, {"authorization": "Bearer nope"}, {"authorization": "sekrit"}):
        r = httpx.post(url + "/v1/completions", json={"prompt": "x"}, headers=headers)
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    assert httpx.get(url + "/v1/models").status_code == 401
    assert sv["p1"].requests == [] and sv["d1"].requests == []
    assert httpx.post(url + "/v1/completions", json={"prompt": "x"}, headers=ok).status_code == 200
    assert httpx.get(url + "/v1/models", headers=ok).json()["data"][0]["id"] == "standin-decode"
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.get(url + "/metrics").status_code == 200


def test_retry_on_dead_prefill_then_decode(sv: dict[str, StandIn], make_router: Any) -> None:
    dead = dead_url()
    url = make_router([dead, sv["p1"].url], [sv["d1"].url], max_retries=3)
    r = httpx.post(url + "/v1/completions", json={"prompt": "x"})
    assert r.status_code == 200
    [p_body] = sv["p1"].generate_bodies(1)
    d_bodies = sv["d1"].generate_bodies()
    assert d_bodies[-1] == p_body  # the successful pair shares a room
    if len(d_bodies) == 2:  # the first attempt reached D before the refused connection cancelled it
        assert d_bodies[0]["bootstrap_room"] != p_body["bootstrap_room"]
    # the first attempt's D leg was told to drop its rid, which is not the retry's rid
    assert wait_until(lambda: len(sv["d1"].aborts) == 1)
    assert sv["d1"].aborts[0] != p_body["rid"]

    sv["d1"].reset()
    url = make_router([sv["p2"].url], [dead, sv["d2"].url], max_retries=1)
    r = httpx.post(url + "/v1/completions", json={"prompt": "y", "stream": True})
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    [d_body] = sv["d2"].generate_bodies()
    # P may or may not have read attempt 1's body before the refused decode connection cancelled it
    assert wait_until(lambda: sv["p2"].generate_bodies()[-1:] == [d_body])
    p_bodies = sv["p2"].generate_bodies()
    assert wait_until(lambda: len(sv["p2"].aborts) == 1) and sv["p2"].aborts[0] != p_bodies[-1]["rid"]


def test_503_after_max_retries(sv: dict[str, StandIn], make_router: Any) -> None:
    dead = dead_url()
    url = make_router([dead], [sv["d1"].url], max_retries=2)
    t0 = time.monotonic()
    r = httpx.post(url + "/v1/completions", json={"prompt": "x"})
    assert r.status_code == 503 and time.monotonic() - t0 < 5
    err = r.json()["error"]
    assert dead in err["message"] and "3 attempt" in err["message"] and err["type"] == "service_unavailable"
    assert wait_until(lambda: len(sv["d1"].aborts) == 3)  # one per attempt


def test_client_disconnect_aborts_both_legs(sv: dict[str, StandIn], make_router: Any) -> None:
    url = make_router([sv["p1"].url], [sv["d1"].url])
    # mid-stream
    sv["d1"].hold = threading.Event()
    with httpx.Client(timeout=10) as c, c.stream("POST", url + "/generate", json={"text": "x", "stream": True}) as r:
        assert b'"Hel"' in next(r.iter_raw())
    rid, room = sv["d1"].requests[0][1]["rid"], sv["d1"].requests[0][1]["bootstrap_room"]
    assert wait_until(lambda: (rid, room) in sv["d1"].abort_rooms and (rid, room) in sv["p1"].abort_rooms)

    # while still waiting for D's answer
    sv["d1"].header_hold = threading.Event()
    # the read timeout is long enough for the router to send the request under load; D holds the answer anyway
    with pytest.raises(httpx.ReadTimeout), httpx.Client(timeout=httpx.Timeout(10, read=2.0)) as c:
        c.post(url + "/v1/completions", json={"prompt": ["a", "b"]})
    assert wait_until(lambda: len(sv["d1"].requests) == 2)
    pairs = list(zip(sv["d1"].requests[1][1]["rid"], sv["d1"].requests[1][1]["bootstrap_room"], strict=True))
    # each prompt of the batch aborted by its own rid and room, on both servers
    assert wait_until(lambda: all(x in sv["d1"].abort_rooms and x in sv["p1"].abort_rooms for x in pairs))


def test_upstream_failures_before_and_after_first_byte(sv: dict[str, StandIn], make_router: Any) -> None:
    url = make_router([sv["p1"].url], [sv["d1"].url], request_timeout_s=2.0)
    sv["d1"].header_hold = threading.Event()
    r = httpx.post(url + "/v1/completions", json={"prompt": "x"}, timeout=30)
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
    rid = sv["d1"].requests[0][1]["rid"]
    assert wait_until(lambda: rid in sv["d1"].aborts and rid in sv["p1"].aborts)
    sv["d1"].header_hold.set()

    sv["d1"].reset()
    sv["d1"].break_stream = True
    url = make_router([sv["p1"].url], [sv["d1"].url])
    r = httpx.post(url + "/v1/completions", json={"prompt": "x", "stream": True})
    assert r.status_code == 200
    events = [e for e in r.text.split("\n\n") if e]
    assert events[0] == 'data: {"choices":[{"index":0,"text":"Hel"}]}'
    err = json.loads(events[1].removeprefix("data: "))["error"]
    assert err["status"] == 502 and err["type"] == "server_error" and "decode stream failed" in err["message"]
    assert events[2] == "data: [DONE]"


def test_readiness(sv: dict[str, StandIn], make_router: Any) -> None:
    dead = dead_url()
    url = make_router([sv["p1"].url], [dead])
    r = httpx.get(url + "/readiness")
    assert r.status_code == 503 and r.json()["decode"]["down"] == [dead] and r.json()["prefill"]["down"] == []
    url = make_router([sv["p1"].url, sv["p2"].url], [sv["d1"].url])
    assert httpx.get(url + "/readiness").status_code == 200
    sv["p1"].healthy = sv["p2"].healthy = False
    r = httpx.get(url + "/readiness")
    assert r.status_code == 503 and sorted(r.json()["prefill"]["down"]) == sorted([sv["p1"].url, sv["p2"].url])
    assert httpx.get(url + "/health").status_code == 200


def test_least_load_picks_the_least_loaded(sv: dict[str, StandIn], make_router: Any) -> None:
    sv["p1"].load, sv["p2"].load = 5, 0
    sv["d1"].load, sv["d2"].load = 0, 7
    url = make_router([sv["p1"].url, sv["p2"].url], [sv["d1"].url, sv["d2"].url], policy="least_load")
    assert httpx.post(url + "/v1/completions", json={"prompt": "x"}).status_code == 200
    assert len(sv["p2"].generate_bodies(1)) == 1 and len(sv["d1"].requests) == 1
    assert sv["p1"].requests == [] and sv["d2"].requests == []
    loads = httpx.get(url + "/get_load").json()
    assert [row["load"] for row in loads["prefill"]] == [5, 0] and [row["load"] for row in loads["decode"]] == [0, 7]


def test_health_loop_steers_away_from_down_servers(sv: dict[str, StandIn], make_router: Any) -> None:
    sv["d1"].healthy = False
    url = make_router([sv["p1"].url], [sv["d1"].url, sv["d2"].url], health_check_interval_s=0.05)
    # /readiness probes every server now and records the answer: no sleep standing in for "the health loop ran"
    assert httpx.get(url + "/readiness").json()["decode"]["down"] == [sv["d1"].url]
    for _ in range(3):
        assert httpx.post(url + "/v1/completions", json={"prompt": "x"}).status_code == 200
    assert sv["d1"].requests == [] and len(sv["d2"].requests) == 3


def test_router_metrics(sv: dict[str, StandIn], make_router: Any) -> None:
    dead = dead_url()
    url = make_router([dead, sv["p1"].url], [sv["d1"].url])
    assert httpx.post(url + "/v1/completions", json={"prompt": "x", "stream": True}).status_code == 200
    text = httpx.get(url + "/metrics").text
    assert "pdserve_router_retries_total" in text
    assert 'pdserve_time_to_first_token_seconds_count{role="router"}' in text
    assert 'pdserve_e2e_request_latency_seconds_count{role="router"}' in text
    assert 'pdserve_requests_total{role="router",status="ok"}' in text
    assert 'pdserve_running_requests{role="router"}' in text
