"""Malformed and oversized request bodies at the router: each gets a clean OpenAI 4xx, and the same keep-alive TCP
connection then carries a normal request (raw sockets, so "the same connection" is certain). Real HTTP on 127.0.0.1:
the router (uvicorn, in a thread) in front of the stand-in servers of test_router.py."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from contracts.http import DEFAULT_MAX_BODY_BYTES, MAX_JSON_DEPTH
from router.app import create_app
from router.config import RouterConfig
from router.intake import DRAIN_FACTOR
from tests.test_router import ServerThread, StandIn

pytestmark = pytest.mark.timeout(120)

NORMAL = b'{"prompt": "x", "max_tokens": 2}'


class Conn:
    """One raw HTTP/1.1 connection to the router."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=60)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def send_head(self, path: str, headers: dict[str, str]) -> None:
        lines = "".join(f"{k}: {v}\r\n" for k, v in {"host": "router", **headers}.items())
        self.sock.sendall(f"POST {path} HTTP/1.1\r\n{lines}\r\n".encode())

    def post(self, body: bytes, path: str = "/v1/completions", **headers: str) -> tuple[int, dict[str, str], Any]:
        self.send_head(path, {"content-type": "application/json", "content-length": str(len(body)), **headers})
        self.sock.sendall(body)
        return self.response()

    def post_chunked(self, body: bytes, chunk: int = 1 << 16) -> tuple[int, dict[str, str], Any]:
        self.send_head("/v1/completions", {"content-type": "application/json", "transfer-encoding": "chunked"})
        for i in range(0, len(body), chunk):
            part = body[i : i + chunk]
            self.sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
        self.sock.sendall(b"0\r\n\r\n")
        return self.response()

    def _recv(self) -> None:
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionError("the router closed the connection")
        self.buf += data

    def response(self) -> tuple[int, dict[str, str], Any]:
        while b"\r\n\r\n" not in self.buf:
            self._recv()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        length = int(headers["content-length"])
        while len(self.buf) < length:
            self._recv()
        body, self.buf = self.buf[:length], self.buf[length:]
        return int(status_line.split()[1]), headers, json.loads(body)

    def at_eof(self) -> bool:
        """Whether the router closed the connection cleanly (FIN, nothing more to read)."""
        return self.buf == b"" and self.sock.recv(1 << 16) == b""


@pytest.fixture(scope="module")
def routers() -> Iterator[Callable[..., str]]:
    p, d = StandIn("prefill"), StandIn("decode")
    started: dict[tuple[Any, ...], ServerThread] = {}

    def router(**kw: Any) -> str:
        key = tuple(sorted(kw.items()))
        if key not in started:
            cfg = RouterConfig(prefill=[p.url], decode=[d.url], health_check_interval_s=0, **kw)
            started[key] = ServerThread(create_app(cfg))
        return started[key].url

    yield router
    for srv in (*started.values(), p.server, d.server):
        srv.stop()


def assert_refused(got: tuple[int, dict[str, str], Any], status: int, says: str) -> None:
    code, headers, body = got
    assert code == status, (code, body)
    err = body["error"]
    assert err["type"] == "invalid_request_error" and says in err["message"], err
    assert headers.get("connection", "").lower() != "close"


def assert_still_serves(conn: Conn) -> None:
    code, _, body = conn.post(NORMAL)
    assert code == 200 and body["choices"][0]["text"] == "Hello", body


def _nested(depth: int) -> bytes:
    return b'{"prompt": "x", "tools": ' + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.parametrize(
    ("label", "body", "status", "says"),
    [
        ("nested 5,000 deep", _nested(5_000), 400, f"nested deeper than {MAX_JSON_DEPTH} levels"),
        ("nested 100,000 deep", _nested(100_000), 400, f"nested deeper than {MAX_JSON_DEPTH} levels"),
        ("10 MB of brackets", b"[" * (10 << 20), 400, "nested deeper"),
        ("lone surrogate", b'{"prompt": "a\\ud800b"}', 400, "'prompt' is not valid Unicode: lone surrogate"),
        ("surrogate in a message", b'{"messages": [{"role": "user", "content": "\\udfff"}]}', 400, "lone surrogate"),
        ("10 MB of garbage", os.urandom(10 << 20), 400, "not valid JSON"),
        ("not an object", b"[1, 2]", 400, "must be a JSON object"),
        ("empty", b"", 400, "empty"),
    ],
)
def test_malformed_body_gets_400_and_the_connection_serves_on(
    routers: Callable[..., str], label: str, body: bytes, status: int, says: str
) -> None:
    conn = Conn(routers())
    try:
        assert_still_serves(conn)  # the connection is warm: what follows is on the same keep-alive connection
        assert_refused(conn.post(body), status, says)
        assert_still_serves(conn)
        assert_refused(conn.post_chunked(body), status, says)  # the same without a declared length
        assert_still_serves(conn)
    finally:
        conn.close()


def test_40_mb_body_gets_413_at_the_default_limit_and_the_connection_serves_on(routers: Callable[..., str]) -> None:
    body = b'{"prompt": "' + b"a" * (40 << 20) + b'"}'
    conn = Conn(routers())
    try:
        assert_refused(conn.post(body), 413, f"larger than the server's limit of {DEFAULT_MAX_BODY_BYTES} bytes")
        assert_still_serves(conn)
    finally:
        conn.close()


def test_413_by_content_length_and_by_chunks_with_a_configured_limit(routers: Callable[..., str]) -> None:
    limit = 1 << 20
    url = routers(max_body_bytes=limit)
    conn = Conn(url)
    try:
        fits = b'{"prompt": "' + b"a" * (limit - 100) + b'"}'
        assert conn.post(fits)[0] == 200
        over = b'{"prompt": "' + b"a" * (2 * limit) + b'"}'
        says = f"limit of {limit} bytes (send less, or raise the limit with --max-body-bytes)"
        assert_refused(conn.post(over), 413, says)  # refused on Content-Length, the body drained
        assert_still_serves(conn)
        assert_refused(conn.post_chunked(over), 413, says)  # refused once the chunks pass the limit, drained
        assert_still_serves(conn)
    finally:
        conn.close()

    # far larger than the limit: refused on the declared length without reading it, and the connection closed
    # cleanly after the answer (the client sent only the head: nothing is left unread to turn the close into a reset)
    for headers in ({}, {"expect": "100-continue"}):
        conn = Conn(url)
        try:
            declared = DRAIN_FACTOR * limit + 1
            conn.send_head("/v1/completions", {"content-length": str(declared), **headers})
            code, got, body = conn.response()
            assert code == 413 and got["connection"].lower() == "close" and "limit of" in body["error"]["message"]
            assert conn.at_eof()
        finally:
            conn.close()
    # a client that asked to be told before sending (Expect: 100-continue) is told 413 without the body being asked
    # for, even within DRAIN_FACTOR; the connection then cannot carry a next request (its body was never sent)
    conn = Conn(url)
    try:
        conn.send_head("/v1/completions", {"content-length": str(2 * limit), "expect": "100-continue"})
        code, got, _ = conn.response()
        assert code == 413 and got["connection"].lower() == "close" and conn.at_eof()
    finally:
        conn.close()


def test_refused_key_with_a_body_keeps_the_connection(routers: Callable[..., str]) -> None:
    conn = Conn(routers(api_key="sekrit"))
    try:
        code, _, body = conn.post(NORMAL + b" " * 200_000)  # refused before the body was read: drained
        assert code == 401 and "API key" in body["error"]["message"]
        code, _, body = conn.post(NORMAL, authorization="Bearer sekrit")
        assert code == 200 and body["choices"][0]["text"] == "Hello"
    finally:
        conn.close()
