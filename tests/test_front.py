"""The HTTP front under uvicorn: real HTTP to the app and real ZMQ to a stand-in scheduler.

The stand-in (`tests/front_standin.py`) only exercises the front's plumbing; end-to-end tests with the
real scheduler live in test_serving_e2e.py and friends.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import pytest

from tests.front_standin import BOOTSTRAP_PORT, CONTEXT, MODEL, Server, sse_events, wait_for


def test_health_before_and_after_ready_and_stale_stats() -> None:
    s = Server(stats_stale_after_s=0.5)
    try:
        r = s.client.get("/health")
        assert r.status_code == 503 and "starting" in r.json()["error"]["message"]
        assert s.client.get("/health_generate").status_code == 503
        r = s.client.post("/v1/completions", json={"prompt": "hi"})
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        assert s.client.get("/get_load").json() == {"load": 0}
        s.make_ready()
        assert s.client.get("/health_generate").status_code == 200
        # The scheduler goes quiet: the server drops out of rotation.
        s.sched.send_stats.clear()
        wait_for(lambda: s.client.get("/health").status_code == 503)
    finally:
        s.close()


def test_completion_non_stream(srv: Server) -> None:
    r = srv.client.post("/v1/completions", json={"model": MODEL, "prompt": "hello world", "max_tokens": 50})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == MODEL
    n = len(srv.tok.encode("hello world"))
    assert body["choices"][0]["text"] == "hello world" and body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": n, "completion_tokens": n, "total_tokens": 2 * n}
    # token ids prompt, batch of two, length limit, logprobs
    r = srv.client.post("/v1/completions", json={"prompt": [[10, 11, 12], [13, 14]], "max_tokens": 2, "logprobs": 0})
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert [c["finish_reason"] for c in body["choices"]] == ["length", "length"]
    lp = body["choices"][1]["logprobs"]
    assert lp["token_logprobs"] == [-0.25, -0.25] and len(lp["tokens"]) == 2
    assert body["usage"]["prompt_tokens"] == 5 and body["usage"]["completion_tokens"] == 4


def test_completion_stream(srv: Server) -> None:
    body = {"prompt": "hello world", "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 50}
    with srv.client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        ev = sse_events(r)
    assert ev[-1] == "[DONE]"
    usage = ev[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(srv.tok.encode("hello world"))
    chunks = ev[:-2]
    assert all(c["object"] == "text_completion" and c["usage"] is None for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == "hello world"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert len({c["id"] for c in chunks}) == 1


def test_chat_non_stream_and_stream(srv: Server) -> None:
    msgs = [{"role": "user", "content": "hi there"}]
    expected_ids = srv.tok.apply_chat_template(msgs)
    expected = "".join(srv.tok.decode([t]) for t in expected_ids)
    r = srv.client.post("/v1/chat/completions", json={"model": MODEL, "messages": msgs, "logprobs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expected}
    assert choice["finish_reason"] == "stop"  # no max_tokens: limited by the context, the echo ends first
    assert len(choice["logprobs"]["content"]) == len(expected_ids)
    assert body["usage"]["prompt_tokens"] == len(expected_ids)

    with srv.client.stream("POST", "/v1/chat/completions", json={"messages": msgs, "stream": True}) as r:
        assert r.status_code == 200
        ev = sse_events(r)
    assert ev[-1] == "[DONE]"
    chunks = ev[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}


def test_generate_single_batch_and_stream(srv: Server) -> None:
    r = srv.client.post(
        "/generate",
        json={"input_ids": [20, 21, 22], "sampling_params": {"max_new_tokens": 2}, "return_logprob": True, "rid": "g1"},
    )
    body = r.json()
    assert body["output_ids"] == [20, 21] and body["text"] == srv.tok.decode([20, 21])
    meta = body["meta_info"]
    assert meta["id"] == "g1" and meta["finish_reason"] == {"type": "length", "length": 2}
    assert meta["prompt_tokens"] == 3 and meta["completion_tokens"] == 2
    assert meta["output_token_logprobs"] == [[-0.25, 20, None], [-0.25, 21, None]]

    r = srv.client.post("/generate", json={"text": ["ab", "cd"], "rid": "gb", "sampling_params": {"temperature": 0}})
    body = r.json()
    assert isinstance(body, list) and [b["meta_info"]["id"] for b in body] == ["gb_0", "gb_1"]
    assert [b["text"] for b in body] == ["ab", "cd"]

    with srv.client.stream("POST", "/generate", json={"input_ids": [30, 31, 32], "stream": True}) as r:
        ev = sse_events(r)
    assert ev[-1] == "[DONE]"
    # cumulative chunks, SGLang style
    assert [e["output_ids"] for e in ev[:-1]] == [[30], [30, 31], [30, 31, 32]]
    assert ev[-2]["meta_info"]["finish_reason"] == {"type": "stop", "matched": None}

    with srv.client.stream("POST", "/generate", json={"input_ids": [[1, 2], [3]], "stream": True}) as r:
        ev = sse_events(r)
    finals = {e["index"]: e for e in ev[:-1] if e["meta_info"]["finish_reason"]}
    assert finals[0]["output_ids"] == [1, 2] and finals[1]["output_ids"] == [3]


def test_bootstrap_fields_reach_the_scheduler(srv: Server) -> None:
    body = {
        "prompt": ["a", "b"],
        "bootstrap_host": "10.0.0.1",
        "bootstrap_port": [None, 9000],
        "bootstrap_room": [11, 12],
    }
    r = srv.client.post("/v1/completions", json={**body, "rid": "bs"})
    assert r.status_code == 200, r.text
    reqs = [srv.sched.requests[srv.internal(f"bs_{i}")[0]] for i in range(2)]
    assert [(q.bootstrap_host, q.bootstrap_port, q.bootstrap_room) for q in reqs] == [
        ("10.0.0.1", BOOTSTRAP_PORT, 11),
        ("10.0.0.1", 9000, 12),
    ]
    assert reqs[0].arrival_time > 0 and reqs[0].sampling["max_new_tokens"] == 16
    r = srv.client.post("/v1/completions", json={**body, "bootstrap_room": [1, 2, 3]})
    assert r.status_code == 400 and "bootstrap_room" in r.json()["error"]["message"]


def test_bad_inputs_get_openai_errors(srv: Server) -> None:
    c = srv.client
    cases = [
        (c.post("/v1/completions", content=b"{nope", headers={"content-type": "application/json"}), 400, "JSON"),
        (c.post("/v1/chat/completions", json=[1]), 400, "object"),
        (c.post("/v1/completions", json={"prompt": 5}), 400, "prompt"),
        (c.post("/v1/completions", json={"prompt": "a", "n": 2}), 400, "n > 1"),
        (
            c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a"}], "temperature": -1}),
            400,
            "temperature",
        ),
        (c.post("/v1/completions", json={"prompt": "a", "model": "gpt-4"}), 404, "gpt-4"),
        (c.post("/v1/completions", json={"prompt": [1] * 4000, "max_tokens": 200}), 400, "4000"),
        (c.post("/v1/chat/completions", json={"messages": []}), 400, "messages"),
        (c.post("/generate", json={"input_ids": [1, 100000]}), 400, "vocabulary"),
        (c.post("/generate", json={"text": "a", "sampling_params": {"max_new_tokens": 5000}}), 400, "max_new_tokens"),
        (c.get("/no/such/route"), 404, "Not Found"),
        (c.get("/generate"), 405, "Method Not Allowed"),
    ]
    for resp, status, needle in cases:
        assert resp.status_code == status, (resp.status_code, resp.text)
        err = resp.json()["error"]
        assert needle in err["message"], err
        assert set(err) >= {"message", "type", "param", "code"}
    too_long = c.post("/v1/completions", json={"prompt": [1] * 4000, "max_tokens": 200}).json()["error"]
    assert "200" in too_long["message"] and str(CONTEXT) in too_long["message"]
    assert c.post("/v1/completions", json={"prompt": "a", "model": "x"}).json()["error"]["code"] == "model_not_found"


def test_failed_request_status_propagates(srv: Server) -> None:
    r = srv.client.post("/v1/completions", json={"prompt": "a", "seed": 666})
    assert r.status_code == 503 and r.json()["error"]["message"] == "transfer failed"
    # A stream that fails before its first output gets the real status too (the router can retry it).
    with srv.client.stream(
        "POST",
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "a"}], "stream": True, "seed": 666},
    ) as r:
        assert r.status_code == 503
        r.read()
    # After the first token, the failure arrives as an error event, then [DONE].
    with srv.client.stream(
        "POST", "/generate", json={"text": "abc", "stream": True, "sampling_params": {"seed": 888}}
    ) as r:
        assert r.status_code == 200
        ev = sse_events(r)
    assert ev[0]["output_ids"] and ev[-1] == "[DONE]"
    assert ev[-2]["error"]["message"] == "transfer failed" and ev[-2]["error"]["status"] == 503


def test_request_timeout_504(srv: Server) -> None:
    t0 = time.monotonic()
    r = srv.client.post("/generate", json={"text": "a", "rid": "silent", "sampling_params": {"seed": 999}})
    assert r.status_code == 504 and "no output" in r.json()["error"]["message"]
    assert time.monotonic() - t0 >= 2.0
    (rid,) = srv.internal("silent")
    wait_for(lambda: rid in srv.sched.aborts)


def test_stream_client_disconnect_aborts(srv: Server) -> None:
    body = {"prompt": "abc", "stream": True, "seed": 777, "max_tokens": 1000, "rid": "disc-stream"}
    with srv.client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        first = next(line for line in lines if line)
        assert json.loads(first[len("data: ") :])["choices"][0]["text"]
    # leaving the block closed the connection mid-stream
    wait_for(lambda: len(srv.internal("disc-stream")) == 1)  # the front may register it after the client left
    (rid,) = srv.internal("disc-stream")
    # close() sends the abort before it unregisters: wait for both
    front = srv.app.state.front
    wait_for(lambda: rid in srv.sched.aborts and rid not in front.routes and "disc-stream" not in front.scheduler.names)


def test_non_stream_client_disconnect_aborts(srv: Server) -> None:
    with pytest.raises(httpx.ReadTimeout):
        srv.client.post(
            "/v1/completions", json={"prompt": "abc", "seed": 777, "max_tokens": 1000, "rid": "disc"}, timeout=0.5
        )
    wait_for(lambda: len(srv.internal("disc")) == 1)  # the front may register it after the client left
    (rid,) = srv.internal("disc")
    # close() sends the abort before it unregisters: wait for both
    front = srv.app.state.front
    wait_for(lambda: rid in srv.sched.aborts and rid not in front.routes and "disc" not in front.scheduler.names)


def test_abort_request_endpoint(srv: Server) -> None:
    result: dict[str, httpx.Response] = {}

    def call() -> None:
        body = {"text": ["x", "y"], "rid": "ab", "sampling_params": {"seed": 777, "max_new_tokens": 1000}}
        result["r"] = httpx.post(srv.url + "/generate", json=body, timeout=30)

    t = threading.Thread(target=call)
    t.start()
    rids = srv.wait_sent("ab", 2)  # the group rid names both prompts; wait until both reached the scheduler
    assert len(rids) == 2 and srv.internal("ab_0") + srv.internal("ab_1") == rids
    assert srv.client.post("/abort_request", json={"rid": "ab"}).status_code == 200
    t.join(10)
    body = result["r"].json()
    assert result["r"].status_code == 200
    assert [b["meta_info"]["finish_reason"]["type"] for b in body] == ["abort", "abort"]
    assert [b["meta_info"]["id"] for b in body] == ["ab_0", "ab_1"]
    # the answer can beat the stand-in scheduler's receipt of the second abort: wait for both
    wait_for(lambda: set(rids) <= set(srv.sched.aborts))
    assert srv.client.post("/abort_request", json={}).status_code == 400


def test_info_endpoints_load_and_metrics(srv: Server) -> None:
    c = srv.client
    assert c.get("/get_load").json() == {"load": 5}
    models = c.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == MODEL
    for path in ("/server_info", "/get_server_info"):
        info = c.get(path).json()
        assert info["num_layers"] == 4 and info["transfer_backend"] == "mooncake"
        assert info["served_model_name"] == MODEL and info["internal_states"][0]["running"] == 2
    for path in ("/model_info", "/get_model_info"):
        mi = c.get(path).json()
        assert mi["is_generation"] is True and mi["model_type"] == "llama" and mi["model_path"]
    assert c.get("/health_generate").status_code == 200
    (hg,) = [q for rid, q in srv.sched.requests.items() if rid.startswith("health-generate-")]
    assert hg.sampling["max_new_tokens"] == 1 and hg.sampling["temperature"] == 0
    assert (hg.bootstrap_host, hg.bootstrap_port, hg.bootstrap_room) == (None, None, None)
    assert c.post("/flush_cache").status_code == 200

    c.post("/v1/completions", json={"prompt": "hello", "max_tokens": 3})
    c.post("/v1/completions", json={"prompt": "hello", "n": 3})
    r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'pdserve_requests_total{role="decode",status="ok"}' in text
    assert 'pdserve_requests_total{role="decode",status="client_error"}' in text
    assert 'pdserve_time_to_first_token_seconds_count{role="decode"}' in text
    assert 'pdserve_inter_token_latency_seconds_count{role="decode"}' in text
    assert 'pdserve_e2e_request_latency_seconds_count{role="decode"}' in text
    assert 'pdserve_running_requests{role="decode"} 2.0' in text
    assert 'pdserve_queued_requests{role="decode"} 3.0' in text
    assert 'pdserve_kv_pool_usage_ratio{role="decode"} 0.25' in text


def test_unexpected_errors_are_500_and_server_survives(srv: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    front = srv.app.state.front

    async def boom(*args: Any) -> None:
        raise RuntimeError("kaboom")

    monkeypatch.setattr(front, "_build_requests", boom)
    r = srv.client.post("/v1/completions", json={"prompt": "a"})
    assert r.status_code == 500 and r.json()["error"] == {
        "message": "internal server error",
        "type": "server_error",
        "param": None,
        "code": None,
    }
    # outside the generation path: the app-wide handler
    monkeypatch.setattr(front, "server_info", lambda: 1 / 0)
    r = srv.client.get("/server_info")
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    monkeypatch.undo()
    assert srv.client.get("/health").status_code == 200
    assert srv.client.post("/v1/completions", json={"prompt": "ok", "max_tokens": 1}).status_code == 200
