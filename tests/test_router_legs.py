"""Failing legs end their requests, servers that fail are avoided until they answer again, and every abort names one
attempt's prompt (rid AND room). Real HTTP on 127.0.0.1: the router (uvicorn, in a thread) between stand-ins that
behave as the servers do where it matters here:

- the prefill is a raw asyncio HTTP server, so it can answer 5xx or reset the connection after reading a request;
  on success it marks the request's rooms "KV sent" and answers 200;
- the decode waits for its rooms' KV as a real one does (here up to KV_WAIT_S, a real one 300 s), answers 500 when
  an abort names (rid, room) of a waiting prompt (or the rid alone, the servers' contract), and records each abort.

Under the old router, a failing prefill left the client waiting KV_WAIT_S for the decode's own timeout, and an abort
by rid alone also ended another client's request of the same rid: these tests fail there.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tests.test_router import ServerThread, wait_until

pytestmark = pytest.mark.timeout(90)

KV_WAIT_S = 30.0  # the stand-in decode's wait for KV: far longer than any answer these tests expect


def _listed(v: Any) -> list[Any]:
    return v if isinstance(v, list) else [v]


class Rooms:
    """What the stand-ins share instead of a KV transfer: which rooms got their KV, which were aborted."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.rid_of: dict[int, str] = {}  # waiting decode prompts
        self.kv: set[int] = set()
        self.aborted: set[int] = set()

    def kv_sent(self, rooms: list[int]) -> None:
        with self._lock:
            self.kv.update(rooms)

    def abort(self, rid: str, room: int | None) -> None:
        """The servers' /abort_request contract: with a room only that prompt, without one every prompt of the rid."""
        with self._lock:
            self.aborted.update(r for r, x in self.rid_of.items() if x == rid and room in (None, r))

    async def wait(self, rids: list[str], rooms: list[int]) -> str:
        with self._lock:
            self.rid_of.update(zip(rooms, rids, strict=True))
        deadline = time.monotonic() + KV_WAIT_S
        while time.monotonic() < deadline:
            with self._lock:
                if any(r in self.aborted for r in rooms):
                    return "aborted"
                if all(r in self.kv for r in rooms):
                    return "kv"
            await asyncio.sleep(0.01)
        return "timeout"


class Prefill:
    """A raw HTTP/1.1 prefill. `mode` (or a prompt "p:<mode>"): ok, 503, 500, 400, reset; `hold` delays an ok."""

    def __init__(self, rooms: Rooms) -> None:
        self.rooms = rooms
        self.mode = "ok"
        self.healthy = True
        self.hold: threading.Event | None = None
        self.requests: list[dict[str, Any]] = []
        self.aborts: list[dict[str, Any]] = []
        self.loop = asyncio.new_event_loop()
        self.server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)

    @staticmethod
    def _answer(writer: asyncio.StreamWriter, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        head = f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n\r\n"
        writer.write(head.encode() + data)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
                path = head.split(" ")[1]
                length = int(head.split("content-length: ")[1].split("\r\n")[0]) if "content-length" in head else 0
                body = json.loads(await reader.readexactly(length)) if length else {}
                if path == "/health":
                    self._answer(writer, 200 if self.healthy else 503, {})
                elif path == "/abort_request":
                    self.aborts.append(body)
                    self._answer(writer, 200, {})
                elif not await self._generate(body, writer):
                    return
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _generate(self, body: dict[str, Any], writer: asyncio.StreamWriter) -> bool:
        """Answers one generate request; False when the connection was dropped."""
        self.requests.append(body)
        prompt = body.get("prompt")
        mode = prompt[2:] if isinstance(prompt, str) and prompt.startswith("p:") else self.mode
        if mode == "reset":  # a dying server: the connection goes away (RST) with no answer
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        if mode in ("503", "500", "400"):
            said = {"503": "the server is starting", "500": "prefill forward raised", "400": "prefill says no"}[mode]
            self._answer(writer, int(mode), {"error": {"message": said, "type": "x", "param": None, "code": None}})
            return True
        while self.hold is not None and not self.hold.is_set():
            await asyncio.sleep(0.01)
        self.rooms.kv_sent(_listed(body["bootstrap_room"]))
        self._answer(writer, 200, {"text": "", "meta_info": {"id": body.get("rid")}})
        return True


class Decode:
    """A FastAPI decode that waits for its rooms' KV, or an abort of them."""

    def __init__(self, rooms: Rooms) -> None:
        self.rooms = rooms
        self.requests: list[dict[str, Any]] = []
        self.aborts: list[dict[str, Any]] = []
        self.server = ServerThread(self._app())
        self.url = self.server.url

    def abort_pairs(self) -> list[tuple[str, int | None]]:
        return [(a["rid"], a.get("bootstrap_room")) for a in self.aborts]

    def _app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/completions")
        async def generate(request: Request) -> Response:
            body = await request.json()
            self.requests.append(body)
            got = await self.rooms.wait(_listed(body["rid"]), _listed(body["bootstrap_room"]))
            if got != "kv":
                err = {"message": f"KV transfer failed: {got}", "type": "server_error", "param": None, "code": None}
                return JSONResponse({"error": err}, status_code=500)
            if body.get("stream"):
                events = [b'data: {"choices":[{"index":0,"text":"Hello"}]}\n\n', b"data: [DONE]\n\n"]
                return StreamingResponse(iter(events), media_type="text/event-stream")
            return JSONResponse({"object": "text_completion", "choices": [{"index": 0, "text": "Hello"}]})

        @app.post("/abort_request")
        async def abort(request: Request) -> dict[str, Any]:
            body = await request.json()
            self.aborts.append(body)
            self.rooms.abort(body["rid"], body.get("bootstrap_room"))
            return {}

        @app.get("/health")
        async def health() -> Response:
            return Response(status_code=200)

        return app


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[Rooms, Prefill, Prefill, Decode]]:
    rooms = Rooms()
    p1, p2, d = Prefill(rooms), Prefill(rooms), Decode(rooms)
    yield rooms, p1, p2, d
    for p in (p1, p2):
        p.stop()
    d.server.stop()


@pytest.fixture
def sv(stack: tuple[Rooms, Prefill, Prefill, Decode]) -> Iterator[tuple[Prefill, Prefill, Decode]]:
    rooms, p1, p2, d = stack
    for p in (p1, p2):
        p.mode, p.healthy, p.hold, p.requests, p.aborts = "ok", True, None, [], []
    d.requests, d.aborts = [], []
    yield p1, p2, d
    for p in (p1, p2):
        if p.hold is not None:
            p.hold.set()
    rooms.aborted.update(rooms.rid_of)  # release any decode request a failed test left waiting


def _post(url: str, body: dict[str, Any]) -> tuple[httpx.Response, float]:
    t0 = time.monotonic()
    r = httpx.post(url + "/v1/completions", json=body, timeout=KV_WAIT_S * 2)
    return r, time.monotonic() - t0


# ---- a failing prefill leg ends the request ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "status", "said"),
    [("503", 503, "answered 503: the server is starting"), ("500", 502, "answered 500: prefill forward raised"),
     ("reset", 502, "failed: UpstreamError")],
)  # fmt: skip
def test_failing_prefill_answers_at_once_and_aborts_the_decode_leg(
    sv: tuple[Prefill, Prefill, Decode], make_router: Any, mode: str, status: int, said: str
) -> None:
    p1, _, d = sv
    p1.mode = mode
    url = make_router([p1.url], [d.url], max_retries=0)
    for stream in (False, True):
        r, took = _post(url, {"prompt": "x", "stream": stream})
        assert r.status_code == status and took < KV_WAIT_S / 2, (r.status_code, took)
        assert r.headers["content-type"] == "application/json"  # an error answer, not a stream
        err = r.json()["error"]
        assert f"prefill {p1.url} {said}" in err["message"], err
        assert err["type"] == ("service_unavailable" if status == 503 else "server_error")
    # the decode leg of each was told to drop exactly its prompt, by its rid and its room (sent whether or not the
    # decode had read the request yet, as the router cannot know)
    assert wait_until(lambda: len(d.aborts) == 2)
    assert sorted(d.abort_pairs()) == sorted((b["rid"], b["bootstrap_room"]) for b in p1.requests)


def test_prefill_503_or_reset_is_retried_on_a_new_pair_and_500_is_not(
    sv: tuple[Prefill, Prefill, Decode], make_router: Any
) -> None:
    p1, p2, d = sv
    url = make_router([p1.url, p2.url], [d.url], max_retries=2)
    for mode in ("503", "reset"):
        p1.mode, p1.requests, p2.requests, d.requests, d.aborts = mode, [], [], [], []
        r, took = _post(url, {"prompt": "x", "rid": "mine"})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "Hello" and took < KV_WAIT_S / 2
        # (a reset on a reused connection is indistinguishable from a keep-alive close, which the router's pool
        # retries once on a fresh connection with the same bytes: p1 may see the same attempt twice)
        assert len({b["bootstrap_room"] for b in p1.requests}) == 1 and len(p2.requests) == 1
        first, second = p1.requests[0]["bootstrap_room"], p2.requests[0]["bootstrap_room"]
        # a client-chosen rid is kept; the room is new, and only the first attempt's room was aborted
        assert p1.requests[0]["rid"] == p2.requests[0]["rid"] == "mine" and first != second
        assert wait_until(lambda room=first: ("mine", room) in d.abort_pairs())
        assert ("mine", second) not in d.abort_pairs()
    # a 500 means this request made the prefill fail: not sent on to fail another one
    p1.mode, p2.mode, p1.requests, p2.requests = "500", "500", [], []
    r, _ = _post(url, {"prompt": "x"})
    assert r.status_code == 502 and "answered 500" in r.json()["error"]["message"]
    assert len(p1.requests) + len(p2.requests) == 1


def test_every_prefill_unavailable_gives_503_naming_each(sv: tuple[Prefill, Prefill, Decode], make_router: Any) -> None:
    p1, p2, d = sv
    p1.mode, p2.mode = "503", "reset"
    url = make_router([p1.url, p2.url], [d.url], max_retries=1)
    r, took = _post(url, {"prompt": "x"})
    err = r.json()["error"]
    assert r.status_code == 502 and took < KV_WAIT_S / 2  # one of them broke: not merely unavailable
    assert "2 attempt(s)" in err["message"] and p1.url in err["message"] and p2.url in err["message"]
    p2.mode = "503"
    r, _ = _post(url, {"prompt": "x"})
    assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
    assert wait_until(lambda: len(d.aborts) == 4)  # every attempt's decode leg let go
    assert sorted(d.abort_pairs()) == sorted((b["rid"], b["bootstrap_room"]) for b in p1.requests + p2.requests)


# ---- health: failing servers are avoided until they answer again -----------------------------------------------


def test_a_reset_server_is_avoided_until_its_health_answers(
    sv: tuple[Prefill, Prefill, Decode], make_router: Any
) -> None:
    p1, p2, d = sv
    p1.mode, p1.healthy = "reset", False  # restarting: drops connections, /health says 503
    url = make_router([p1.url, p2.url], [d.url], max_retries=2)
    assert _post(url, {"prompt": "x"})[0].status_code == 200  # the reset attempt retried on p2
    assert len(p1.requests) == 1
    for _ in range(4):  # round-robin would alternate; p1 is skipped while down
        assert _post(url, {"prompt": "x"})[0].status_code == 200
    assert len(p1.requests) == 1 and len(p2.requests) == 5
    assert httpx.get(url + "/readiness").json()["prefill"]["down"] == [p1.url]
    gauge = f'pdserve_router_upstream_healthy{{url="{p1.url}"}}'
    assert f"{gauge} 0.0" in httpx.get(url + "/metrics").text
    p1.mode, p1.healthy = "ok", True  # back: the router's probe (no health loop here) returns it to the pool
    assert wait_until(lambda: _post(url, {"prompt": "x"})[0].status_code == 200 and len(p1.requests) > 1, 10)
    assert f"{gauge} 1.0" in httpx.get(url + "/metrics").text


def test_when_every_server_of_a_role_is_down_they_are_still_tried(
    sv: tuple[Prefill, Prefill, Decode], make_router: Any
) -> None:
    p1, _, d = sv
    p1.mode, p1.healthy = "reset", False
    url = make_router([p1.url], [d.url], max_retries=1)
    assert _post(url, {"prompt": "x"})[0].status_code == 502  # both attempts reset: marked down
    p1.mode = "ok"  # serving again, though its /health still says 503
    r, _ = _post(url, {"prompt": "x"})
    assert r.status_code == 200 and len(p1.requests) == 3


# ---- aborts name one attempt: a duplicate client rid never aborts another client's request ----------------------


def test_duplicate_client_rid_never_aborts_the_other_request(
    sv: tuple[Prefill, Prefill, Decode], make_router: Any
) -> None:
    p1, _, d = sv
    p1.hold = threading.Event()  # client A's request stays in flight at the decode, waiting for its KV
    url = make_router([p1.url], [d.url])
    with ThreadPoolExecutor(2) as pool:
        a = pool.submit(_post, url, {"prompt": "x", "rid": "dup"})
        assert wait_until(lambda: len(d.requests) == 1)
        # client B reuses the rid; its prefill leg refuses it, so the router aborts B's decode leg
        r, _ = _post(url, {"prompt": "p:400", "rid": "dup"})
        assert r.status_code == 400 and r.json()["error"]["message"] == "prefill says no"
        b_room = next(b["bootstrap_room"] for b in p1.requests if b["prompt"] == "p:400")
        assert wait_until(lambda: ("dup", b_room) in d.abort_pairs())
        # client C reuses it too and goes away while waiting: its legs are aborted, by its own room
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json={"prompt": "y", "rid": "dup"}, timeout=httpx.Timeout(5, read=2.0))
        assert wait_until(lambda: any(b["prompt"] == "y" for b in p1.requests))
        c_room = next(b["bootstrap_room"] for b in p1.requests if b["prompt"] == "y")
        assert wait_until(lambda: ("dup", c_room) in d.abort_pairs())
        assert wait_until(lambda: {"rid": "dup", "bootstrap_room": c_room} in p1.aborts)
        p1.hold.set()
        r, _ = a.result(timeout=KV_WAIT_S)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "Hello"  # A was never touched
    a_room = next(b["bootstrap_room"] for b in p1.requests if b["prompt"] == "x")
    sent = d.abort_pairs() + [(x["rid"], x.get("bootstrap_room")) for x in p1.aborts]
    assert sent and all(room is not None and room != a_room for _, room in sent)
