"""The front's reader task survives bad input from the scheduler.

The front reads every scheduler message in one asyncio task; if a malformed message killed it, every
request in flight would hang until its timeout. Here a real front (uvicorn + the stand-in scheduler of
front_standin) receives garbage bytes, a message of another protocol version and one of an unknown type, all
aimed at a live request, and must drop them and still deliver the good `RequestOutput` that follows.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import msgpack
import pytest
import zmq

from serving.ipc import CODEC, RequestOutput, pack
from tests.front_standin import Server


def test_reader_drops_bad_messages_and_delivers_the_next_good_one(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pdserve.front")
    s = Server(request_timeout_s=10.0)
    ctx = zmq.Context()
    inject = ctx.socket(zmq.PUSH)  # a second sender: the stand-in's own socket belongs to its thread
    try:
        s.make_ready()
        inject.connect(s.app.state.front.cfg.ipc_from_scheduler)
        rid = "reader-1"
        with ThreadPoolExecutor(1) as pool:
            # seed 999: the stand-in never answers, so only what we inject can finish this request
            fut = pool.submit(
                s.client.post, "/v1/completions", json={"prompt": "ab", "seed": 999, "max_tokens": 4, "rid": rid}
            )
            (rid,) = s.wait_sent(rid)  # outputs address the front's own id for the prompt
            bad_output = {"rid": rid, "text": "BAD", "finished": True, "finish_reason": "stop"}
            inject.send(b"\xc1 not msgpack at all")
            inject.send(msgpack.packb({"v": CODEC.version + 1, "type": "output", **bad_output}))
            inject.send(msgpack.packb({"v": CODEC.version, "type": "no-such-type", **bad_output}))
            good = RequestOutput(
                rid=rid,
                token_ids=[104, 105],
                text="hi",
                finished=True,
                finish_reason="stop",
                prompt_tokens=2,
                completion_tokens=2,
            )
            inject.send(pack(good))
            r = fut.result(timeout=10)
        assert r.status_code == 200, r.text[:500]
        choice = r.json()["choices"][0]
        assert choice["text"] == "hi" and choice["finish_reason"] == "stop"
        dropped = [rec for rec in caplog.records if "dropping a malformed message" in rec.getMessage()]
        assert len(dropped) == 3
        # the reader is still running: stats and new requests keep flowing
        assert s.client.get("/health").status_code == 200
        assert s.client.post("/v1/completions", json={"prompt": "ok", "max_tokens": 1}).status_code == 200
    finally:
        inject.close(0)
        ctx.term()
        s.close()
