"""Input limits at a server's front: every malformed body gets a clear 4xx, and the same keep-alive connection
then serves a normal request (a raw socket, so a reset cannot hide behind a client library's reconnect).

Most cases run against a real front (uvicorn, real ZMQ) over the stand-in scheduler of front_standin; the last
test runs a real `pdserve decode` process, for the flag's way from the command line (its environment twin) to
the front, and for a huge prompt refused by its size before tokenization.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.requests import Request

from contracts.http import DEFAULT_MAX_BODY_BYTES
from harness.raw_http import RawConnection, RawResponse
from harness.stack import free_port
from serving import api
from serving.front.body import read_body
from tests.front_standin import CONTEXT, Server

NORMAL = json.dumps({"prompt": "hi", "max_tokens": 1}).encode()


@pytest.fixture
def conn(srv: Server) -> Iterator[RawConnection]:
    with RawConnection("127.0.0.1", int(srv.url.rsplit(":", 1)[1])) as c:
        yield c


def _then_normal(c: RawConnection, path: str = "/v1/completions", body: bytes = NORMAL) -> None:
    r = c.request("POST", path, body)
    assert r.status == 200, r.body[:300]
    assert json.loads(r.body)["choices"][0]["text"]


def _error(r: RawResponse, status: int) -> dict:
    assert r.status == status, (r.status, r.body[:300])
    assert r.keep_alive  # the server did not announce a close
    err = json.loads(r.body)["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    return err


def _deep(depth: int) -> bytes:
    return b'{"prompt": ' + b"[" * depth + b"1" + b"]" * depth + b"}"


CASES = {
    "nested-5000": ("/v1/completions", _deep(5_000), False, "nested deeper"),
    "nested-100000": ("/generate", _deep(100_000), False, "nested deeper"),
    "surrogate-prompt": ("/v1/completions", b'{"prompt": "ab\\ud800cd", "max_tokens": 2}', False, "'prompt'"),
    "surrogate-chat": ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi \\udc00"}]}', False,
                       "'messages.0.content'"),
    "garbage-10mb": ("/v1/completions", os.urandom(10 * 2**20), False, "not valid JSON"),
    "garbage-10mb-chunked": ("/generate", os.urandom(10 * 2**20), True, "not valid JSON"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_malformed_body_is_a_400_and_the_connection_stays_usable(conn: RawConnection, name: str) -> None:
    path, body, chunked, needle = CASES[name]
    err = _error(conn.request("POST", path, body, chunked=chunked), 400)
    assert needle in err["message"], err
    _then_normal(conn)


def test_a_body_over_the_limit_is_a_413_by_content_length_and_by_chunks(srv: Server, conn: RawConnection) -> None:
    big = b'{"prompt": "' + b"a" * (40 * 2**20) + b'"}'  # 40 MB, over the default 32 MiB
    for chunked in (False, True):
        err = _error(conn.request("POST", "/v1/completions", big, chunked=chunked), 413)
        assert str(DEFAULT_MAX_BODY_BYTES) in err["message"] and "--max-body-bytes" in err["message"]
        _then_normal(conn)  # the rest of the refused body was read past, not taken for the next request
    # Refused on the declared length alone, before any byte of the body (none is sent here).
    with RawConnection("127.0.0.1", int(srv.url.rsplit(":", 1)[1])) as c2:
        _error(c2.request("POST", "/generate", declared_length=40 * 2**20), 413)
    # /abort_request reads its body under the same limit
    _error(conn.request("POST", "/abort_request", big), 413)
    _then_normal(conn)


def test_read_body_never_holds_more_than_the_limit() -> None:
    """Unit: a chunked body is refused as soon as it passes the limit; the rest is never received."""
    sent = {"chunks": 0}

    async def receive() -> dict:
        sent["chunks"] += 1
        return {"type": "http.request", "body": b"x" * 1000, "more_body": True}  # an endless body

    async def run(limit: int, headers: list[tuple[bytes, bytes]]) -> api.APIError:
        scope = {"type": "http", "method": "POST", "path": "/", "headers": headers, "query_string": b""}
        with pytest.raises(api.APIError) as info:
            await read_body(Request(scope, receive), limit)
        return info.value

    err = asyncio.run(run(10_500, []))
    assert err.status == 413 and sent["chunks"] == 11  # 10 chunks fit; the 11th passes the limit
    sent["chunks"] = 0
    err = asyncio.run(run(10_500, [(b"content-length", b"20000")]))
    assert err.status == 413 and sent["chunks"] == 0  # refused on the header, nothing read


def test_text_prompt_that_cannot_fit_is_refused_by_size_before_tokenizing(
    srv: Server, conn: RawConnection, monkeypatch: pytest.MonkeyPatch
) -> None:
    tok = srv.app.state.front.tokenizer
    cap = (CONTEXT - 1) * tok.max_token_bytes
    calls = []
    encode = tok.hf.encode
    monkeypatch.setattr(tok.hf, "encode", lambda *a, **kw: calls.append(len(a[0])) or encode(*a, **kw))
    over = "a" * (cap + 1)
    for path, body in (
        ("/v1/completions", {"prompt": over}),
        ("/generate", {"text": ["ok", over]}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": over}]}),
    ):
        err = _error(conn.request("POST", path, json.dumps(body).encode()), 400)
        assert f"context length is {CONTEXT} tokens" in err["message"] and "bytes" in err["message"], err
        assert str(cap) in err["message"] and err["param"] in ("prompt", "messages")
    assert all(n < cap for n in calls), calls  # nothing over the cap ever reached the tokenizer
    # A token-id list past the context: the same check, before any id is looked at.
    err = _error(conn.request("POST", "/generate", json.dumps({"input_ids": [10**9] * (3 * CONTEXT)}).encode()), 400)
    assert f"{3 * CONTEXT} tokens" in err["message"]
    # Under the cap the prompt is tokenized and checked in tokens as before.
    err = _error(conn.request("POST", "/v1/completions", json.dumps({"prompt": "ab " * 3000}).encode()), 400)
    assert "tokens, but this model's context length" in err["message"]
    _then_normal(conn)


@pytest.fixture(scope="module")
def decode_proc() -> Iterator[int]:
    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="pdserve-limits-")) / "decode.log"
    env = {**os.environ, "PDSERVE_MAX_BODY_BYTES": "1000000"}  # the flag's environment twin
    cmd = [sys.executable, "-m", "pdserve", "decode", "--model", "builtin:tiny-llama", "--kv-cache-gb", "0.05",
           "--port", str(port)]  # fmt: skip
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "decode not ready:\n" + log.read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        yield port
    finally:
        proc.terminate()
        proc.wait(30)


def test_real_decode_server_limits_on_one_connection(decode_proc: int) -> None:
    local = json.dumps({"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 1}}).encode()
    with RawConnection("127.0.0.1", decode_proc) as c:

        def normal() -> None:
            r = c.request("POST", "/generate", local)
            assert r.status == 200 and len(json.loads(r.body)["output_ids"]) == 1, r.body[:300]

        err = _error(c.request("POST", "/generate", b'{"text": "' + b"a" * 1_500_000 + b'"}'), 413)
        assert "1000000 bytes" in err["message"]
        normal()
        err = _error(c.request("POST", "/v1/completions", _deep(100_000)), 400)
        assert "nested deeper" in err["message"]
        normal()
        # 900 KB of text (under the body limit): refused by its size, at once, instead of ~700K tokens first
        t0 = time.monotonic()
        err = _error(c.request("POST", "/v1/completions", json.dumps({"prompt": "word " * 180_000}).encode()), 400)
        assert "bytes of text" in err["message"] and time.monotonic() - t0 < 30
        normal()
        info = httpx.get(f"http://127.0.0.1:{decode_proc}/server_info", timeout=5).json()
        assert info["max_body_bytes"] == 1_000_000
