"""The HTTP front: pure parsing/validation/formatting tests, then the real app under uvicorn.

The app tests talk real HTTP to uvicorn and real ZMQ to a stand-in scheduler (a thread in this
file speaking serving.ipc). The stand-in only exercises the front's plumbing; end-to-end tests
with the real scheduler live elsewhere. It decides what to do from the request's sampling seed:
  none  echo the prompt's token ids back, one per output (finish "length" or "stop")
  666   fail at once (error, status 503)
  777   one token every 0.1 s, forever (until aborted)
  888   one token, then fail (error mid-stream)
  999   never answer
"""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import zmq

from contracts.errors import SSE_DONE, error_body, error_type
from serving import api
from serving.api import APIError, PromptResult, fields
from serving.front import FrontConfig, create_app
from serving.ipc import AbortRequest, GenerateRequest, Ready, RequestOutput, SchedulerStats, pack, unpack

MODEL = "tiny"
CONTEXT = 4096
BOOTSTRAP_PORT = 8998

# --------------------------------------------------------------------------------------------------
# pure: parsing and validation


def _err(fn, *args) -> APIError:
    with pytest.raises(APIError) as ei:
        fn(*args)
    return ei.value


def comp(body: dict[str, Any]) -> api.ParsedRequest:
    return api.parse_completion(body, MODEL)


def chat(body: dict[str, Any]) -> api.ParsedRequest:
    return api.parse_chat(body, MODEL)


def test_parse_json_body_errors() -> None:
    for raw, needle in [(b"", "empty"), (b"{not json", "not valid JSON"), (b"[1, 2]", "an array"), (b'"x"', "string")]:
        e = _err(api.parse_json_body, raw)
        assert e.status == 400 and needle in e.message
        assert set(e.body()["error"]) == {"message", "type", "param", "code"}
    assert api.parse_json_body(b'{"a": 1}') == {"a": 1}


def test_generate_single_and_defaults() -> None:
    p = api.parse_generate({"text": "hello", "rid": "r1"})
    assert p.kind == "generate" and not p.is_batch and not p.stream
    (s,) = p.prompts
    assert s.text == "hello" and s.rid == "r1"
    assert s.sampling == {
        "max_new_tokens": 128,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": -1,
        "seed": None,
        "stop_token_ids": [],
        "stop": [],
        "ignore_eos": False,
    }


def test_generate_batch_ids_sampling_and_bootstrap() -> None:
    p = api.parse_generate(
        {
            "input_ids": [[1, 2], [3]],
            "sampling_params": {"max_new_tokens": 4, "temperature": 0, "stop": "x", "top_k": 0, "sampling_seed": 5},
            "bootstrap_host": ["h1", "h2"],
            "bootstrap_port": None,
            "bootstrap_room": [7, 8],
            "rid": "g",
            "stream": True,
            "return_logprob": True,
        }
    )
    assert p.is_batch and p.stream and p.return_logprob and p.group_rid == "g"
    assert [s.input_ids for s in p.prompts] == [[1, 2], [3]]
    assert [s.rid for s in p.prompts] == ["g_0", "g_1"]
    assert [(s.bootstrap_host, s.bootstrap_port, s.bootstrap_room) for s in p.prompts] == [
        ("h1", None, 7),
        ("h2", None, 8),
    ]
    sp = p.prompts[0].sampling
    assert sp["stop"] == ["x"] and sp["top_k"] == -1 and sp["temperature"] == 0 and sp["seed"] == 5
    # per-prompt sampling_params
    p = api.parse_generate({"text": ["a", "b"], "sampling_params": [{"max_new_tokens": 1}, {"max_new_tokens": 2}]})
    assert [s.sampling["max_new_tokens"] for s in p.prompts] == [1, 2]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "text"),
        ({"text": "a", "input_ids": [1]}, "text"),
        ({"text": ""}, "text"),
        ({"text": 5}, "text"),
        ({"text": ["a", 3]}, "text"),
        ({"input_ids": []}, "input_ids"),
        ({"input_ids": [1, -2]}, "input_ids"),
        ({"input_ids": "12"}, "input_ids"),
        ({"text": "a", "sampling_params": []}, "sampling_params"),
        ({"text": "a", "sampling_params": 3}, "sampling_params"),
        ({"text": "a", "sampling_params": {"max_tokens": 3}}, "sampling_params.max_tokens"),
        ({"text": "a", "sampling_params": {"max_new_tokens": 0}}, "sampling_params.max_new_tokens"),
        ({"text": "a", "sampling_params": {"max_new_tokens": "5"}}, "sampling_params.max_new_tokens"),
        ({"text": "a", "sampling_params": {"temperature": -1}}, "sampling_params.temperature"),
        ({"text": "a", "sampling_params": {"top_p": 1.5}}, "sampling_params.top_p"),
        ({"text": "a", "sampling_params": {"n": 2}}, "sampling_params.n"),
        ({"text": "a", "sampling_params": {"frequency_penalty": 0.5}}, "sampling_params.frequency_penalty"),
        ({"text": "a", "sampling_params": {"stop_token_ids": [1, "x"]}}, "sampling_params.stop_token_ids"),
        ({"text": "a", "stream": "yes"}, "stream"),
        ({"text": "a", "image_data": "http://x"}, "image_data"),
        ({"text": "a", "top_logprobs_num": 3}, "top_logprobs_num"),
        ({"text": ["a", "b"], "bootstrap_room": 5, "bootstrap_host": "h"}, "bootstrap_room"),
        ({"text": ["a", "b"], "bootstrap_room": [5], "bootstrap_host": "h"}, "bootstrap_room"),
        ({"text": ["a", "b"], "bootstrap_host": ["h"]}, "bootstrap_host"),
        ({"text": "a", "bootstrap_room": -1, "bootstrap_host": "h"}, "bootstrap_room"),
        ({"text": "a", "bootstrap_room": 2**63, "bootstrap_host": "h"}, "bootstrap_room"),
        ({"text": "a", "bootstrap_room": 1}, "bootstrap_host"),
        ({"text": "a", "bootstrap_room": 1, "bootstrap_host": "h", "bootstrap_port": 70000}, "bootstrap_port"),
        ({"text": "a", "bootstrap_room": 1, "bootstrap_host": "h", "bootstrap_port": "8998"}, "bootstrap_port"),
        ({"text": ["a", "b"], "rid": ["x"]}, "rid"),
        ({"text": ["a", "b"], "rid": ["x", "x"]}, "rid"),
        ({"text": "a", "rid": 3}, "rid"),
    ],
)
def test_generate_errors(body: dict[str, Any], param: str) -> None:
    e = _err(api.parse_generate, body)
    assert e.status == 400
    assert e.param == param
    assert param.split(".")[-1] in e.message


@pytest.mark.parametrize(
    ("getter", "bad_value", "expected"),
    [
        (lambda d, name: fields.get_bool(d, "k", False, name=name), 1, "a boolean"),
        (lambda d, name: fields.get_int(d, "k", None, name=name), 1.5, "an integer"),
        (lambda d, name: fields.get_int(d, "k", None, name=name), True, "an integer"),
        (lambda d, name: fields.get_number(d, "k", None, name=name), "1", "a number"),
        (lambda d, name: fields.get_stop(d, "k", name=name), ["a", 1], "a string or a list of strings"),
        (lambda d, name: fields.get_int_list(d, "k", name=name), [1, "2"], "a list of integers"),
        (lambda d, name: fields.get_object(d, "k", name=name), [], "an object"),
    ],
)
def test_field_getters_share_one_shape(getter: Any, bad_value: Any, expected: str) -> None:
    # missing and null both take the default
    assert getter({}, None) == getter({"k": None}, None)
    for name, param in ((None, "k"), ("outer.k", "outer.k")):
        e = _err(getter, {"k": bad_value}, name)
        assert e.status == 400 and e.param == param
        assert e.message.startswith(f"'{param}' must be {expected}, got {type(bad_value).__name__}")
        assert e.body()["error"]["type"] == "invalid_request_error"


def test_field_getters_values() -> None:
    assert fields.get_number({"k": 2}, "k", None) == 2.0 and isinstance(fields.get_number({"k": 2}, "k", None), float)
    assert fields.get_stop({"k": "s"}, "k") == ["s"] and fields.get_stop({"k": ""}, "k") == []
    assert fields.get_stop({"k": ["a", "", "b"]}, "k") == ["a", "b"]
    assert fields.get_int_list({"k": [1, 2]}, "k") == [1, 2] and fields.get_object({}, "k") == {}
    assert "got float 1.5" in _err(fields.get_int, {"k": 1.5}, "k", None).message  # scalars show the value


def test_api_error_body_is_the_shared_contract() -> None:
    e = APIError(404, "gone", param="model", code="model_not_found")
    assert e.body() == error_body(404, "gone", param="model", code="model_not_found")
    assert e.stream_event() == error_body(404, "gone", param="model", code="model_not_found", stream=True)
    assert APIError(503, "x").type == error_type(503) == "service_unavailable"
    assert api.SSE_DONE == SSE_DONE


@pytest.mark.parametrize(
    "parse",
    [lambda b: api.parse_generate({"text": ["a", "b", "c"], **b}), lambda b: comp({"prompt": ["a", "b", "c"], **b})],
    ids=["generate", "completion"],
)
def test_rid_rule_as_the_server_applies_it(parse: Any) -> None:
    # a string rid on a batch: the group's id, each prompt gets <rid>_<i>
    p = parse({"rid": "grp"})
    assert [s.rid for s in p.prompts] == ["grp_0", "grp_1", "grp_2"] and p.group_rid == "grp"
    # a list: one id per prompt, no group
    p = parse({"rid": ["x", "y", "z"]})
    assert [s.rid for s in p.prompts] == ["x", "y", "z"] and p.group_rid is None
    # none: the front picks ids
    p = parse({})
    assert [s.rid for s in p.prompts] == [None, None, None] and p.group_rid is None
    for rid, needle in [
        (["x", "y"], "2 entries"),
        (["x", "y", "z", "w"], "4 entries"),
        (["x", "x", "y"], "distinct"),
        (["x", "", "y"], "non-empty"),
        (["x", 1, "y"], "non-empty"),
        ("", "non-empty"),
        (7, "got int"),
    ]:
        e = _err(parse, {"rid": rid})
        assert e.status == 400 and e.param == "rid" and needle in e.message, (rid, e.message)


def test_rid_on_single_prompt_is_its_id() -> None:
    p = api.parse_generate({"text": "a", "rid": "solo"})
    assert p.prompts[0].rid == "solo" and p.group_rid is None
    # a one-prompt list is a batch (contracts.pd.batch_size), but its rid stays bare
    p = comp({"prompt": ["a"], "rid": "one"})
    assert p.is_batch and p.prompts[0].rid == "one" and p.group_rid is None
    p = api.parse_generate({"text": ["a"], "rid": "one"})
    assert p.is_batch and p.prompts[0].rid == "one" and p.group_rid is None
    # /generate decides from its own input fields only
    assert not api.parse_generate({"text": "a", "prompt": ["x", "y"]}).is_batch


def test_completion_parsing() -> None:
    p = comp({"model": MODEL, "prompt": "hi", "max_tokens": 5, "stop": ["a", ""], "user": "u", "logprobs": 0})
    (s,) = p.prompts
    assert s.text == "hi" and s.sampling["max_new_tokens"] == 5 and s.sampling["stop"] == ["a"]
    assert p.return_logprob and p.model == MODEL and not p.is_batch
    # no model field is fine; default max_tokens is 16
    p = comp({"prompt": [1, 2, 3]})
    assert p.prompts[0].input_ids == [1, 2, 3] and p.prompts[0].sampling["max_new_tokens"] == 16
    p = comp({"prompt": [[1], [2, 3]], "stream": True, "stream_options": {"include_usage": True}})
    assert p.is_batch and p.include_usage and [s.input_ids for s in p.prompts] == [[1], [2, 3]]
    p = comp({"prompt": ["a", "b"], "bootstrap_host": "h", "bootstrap_room": [1, 2]})
    assert [(s.text, s.bootstrap_room) for s in p.prompts] == [("a", 1), ("b", 2)]
    # include_usage only means something when streaming
    assert not comp({"prompt": "a", "stream_options": {"include_usage": True}}).include_usage


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"prompt": "a", "model": "other"}, 404, "model"),
        ({"prompt": "a", "model": 3}, 400, "model"),
        ({}, 400, "prompt"),
        ({"prompt": ""}, 400, "prompt"),
        ({"prompt": []}, 400, "prompt"),
        ({"prompt": ["a", 1]}, 400, "prompt"),
        ({"prompt": {"a": 1}}, 400, "prompt"),
        ({"prompt": "a", "n": 2}, 400, "n"),
        ({"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt": "a", "max_tokens": -3}, 400, "max_tokens"),
        ({"prompt": "a", "max_tokens": "3"}, 400, "max_tokens"),
        ({"prompt": "a", "temperature": -0.5}, 400, "temperature"),
        ({"prompt": "a", "temperature": "hot"}, 400, "temperature"),
        ({"prompt": "a", "top_p": 0}, 400, "top_p"),
        ({"prompt": "a", "top_p": 1.01}, 400, "top_p"),
        ({"prompt": "a", "top_k": -5}, 400, "top_k"),
        ({"prompt": "a", "seed": 1.5}, 400, "seed"),
        ({"prompt": "a", "stop": 3}, 400, "stop"),
        ({"prompt": "a", "echo": True}, 400, "echo"),
        ({"prompt": "a", "best_of": 3}, 400, "best_of"),
        ({"prompt": "a", "logprobs": 2}, 400, "logprobs"),
        ({"prompt": "a", "logprobs": True}, 400, "logprobs"),
        ({"prompt": "a", "presence_penalty": 1.0}, 400, "presence_penalty"),
        ({"prompt": "a", "stream_options": 1}, 400, "stream_options"),
        ({"prompt": "a", "response_format": {"type": "json_object"}}, 400, "response_format"),
    ],
)
def test_completion_errors(body: dict[str, Any], status: int, param: str) -> None:
    e = _err(comp, body)
    assert e.status == status and e.param == param and param in e.message
    if status == 404:
        assert e.body()["error"]["code"] == "model_not_found"


def test_n2_message() -> None:
    assert "n > 1 is not supported" in _err(comp, {"prompt": "a", "n": 2}).message


def test_chat_parsing() -> None:
    p = chat(
        {
            "model": MODEL,
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": None},
            ],
            "max_completion_tokens": 7,
            "max_tokens": 99,
            "logprobs": True,
            "tool_choice": "none",
        }
    )
    (s,) = p.prompts
    assert s.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": ""},
    ]
    assert s.sampling["max_new_tokens"] == 7 and p.return_logprob and p.max_tokens_field == "max_completion_tokens"
    # no limit: filled in from the context once the prompt length is known
    p = chat({"messages": [{"role": "user", "content": "x"}]})
    assert p.prompts[0].sampling["max_new_tokens"] is None
    assert api.finalize_sampling(p.prompts[0], 96, 100)["max_new_tokens"] == 4


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": ["hi"]}, "messages[0]"),
        ({"messages": [{"content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
        ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "auto"}, "tool_choice"),
        ({"messages": [{"role": "user", "content": "x"}], "logprobs": 1}, "logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, "max_completion_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": -1}, "temperature"),
    ],
)
def test_chat_errors(body: dict[str, Any], param: str) -> None:
    e = _err(chat, body)
    assert e.status == 400 and e.param == param and param in e.message


def test_finalize_sampling_context() -> None:
    spec = comp({"prompt": "a", "max_tokens": 100}).prompts[0]
    assert api.finalize_sampling(spec, 50, 150)["max_new_tokens"] == 100
    e = _err(api.finalize_sampling, spec, 51, 150)
    assert e.status == 400 and e.param == "max_tokens" and "51" in e.message and "100" in e.message
    assert "150" in e.message
    e = _err(api.finalize_sampling, spec, 150, 150)
    assert e.status == 400 and "150" in e.message


def test_formatting() -> None:
    r = PromptResult(0, "rid0")
    r.apply(RequestOutput(rid="rid0", token_ids=[5, 6], text="ab", logprobs=[-0.5, -1.0], prompt_tokens=3))
    r.apply(
        RequestOutput(
            rid="rid0",
            token_ids=[7],
            text="c",
            logprobs=[float("-inf")],
            finished=True,
            finish_reason="length",
            completion_tokens=3,
        )
    )
    g = api.generate_object(r, return_logprob=True, token_texts=["a", "b", "c"])
    assert g["text"] == "abc" and g["output_ids"] == [5, 6, 7]
    assert g["meta_info"]["finish_reason"] == {"type": "length", "length": 3}
    assert g["meta_info"]["output_token_logprobs"] == [[-0.5, 5, "a"], [-1.0, 6, "b"], [None, 7, "c"]]
    assert g["meta_info"]["prompt_tokens"] == 3 and g["meta_info"]["id"] == "rid0"
    c = api.completion_response("cmpl-1", 1, MODEL, [r], [api.completion_logprobs(["a", "b", "c"], r.logprobs)])
    assert c["object"] == "text_completion" and c["choices"][0]["text"] == "abc"
    assert c["choices"][0]["logprobs"]["text_offset"] == [0, 1, 2]
    assert c["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    ch = api.chat_response("chatcmpl-1", 1, MODEL, r)
    assert ch["choices"][0]["message"] == {"role": "assistant", "content": "abc"}
    assert ch["choices"][0]["finish_reason"] == "length"
    chunk = api.chat_chunk("chatcmpl-1", 1, MODEL, {"content": "x"}, include_usage=True)
    assert chunk["object"] == "chat.completion.chunk" and chunk["usage"] is None
    assert api.usage_chunk("chat", "chatcmpl-1", 1, MODEL, [r])["choices"] == []
    assert api.sse({"a": 1}) == b'data: {"a":1}\n\n'
    assert api.new_request_id("chat").startswith("chatcmpl-") and api.new_request_id("completion").startswith("cmpl-")
    failed = PromptResult(0, "x")
    failed.apply(RequestOutput(rid="x", finished=True, finish_reason="abort", error="boom", status=503))
    assert failed.failed and failed.api_error().status == 503
    ev = failed.api_error().stream_event()
    assert ev["error"]["message"] == "boom" and ev["error"]["status"] == 503


# --------------------------------------------------------------------------------------------------
# the real app: uvicorn + a stand-in scheduler over real ZMQ


class StandInScheduler(threading.Thread):
    def __init__(self, to_sched: str, from_sched: str, tokenizer: Any) -> None:
        super().__init__(daemon=True)
        self.tok = tokenizer
        self.ctx = zmq.Context()
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.connect(to_sched)
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.connect(from_sched)
        self.ready = threading.Event()
        self.send_stats = threading.Event()
        self.send_stats.set()
        self.halt = threading.Event()
        self.requests: dict[str, GenerateRequest] = {}
        self.aborts: list[str] = []
        self.active: dict[str, dict[str, Any]] = {}

    def out(self, msg: Any) -> None:
        self.push.send(pack(msg))

    def run(self) -> None:
        ready_sent, next_stats = False, 0.0
        while not self.halt.is_set():
            now = time.monotonic()
            if self.ready.is_set() and not ready_sent:
                self.out(Ready(info={"num_layers": 4, "page_size": 16}))
                ready_sent = True
            if ready_sent and self.send_stats.is_set() and now >= next_stats:
                self.out(SchedulerStats(running=2, queued=3, kv_pages_used=10, kv_pages_total=40))
                next_stats = now + 0.1
            if self.pull.poll(10):
                msg = unpack(self.pull.recv())
                if isinstance(msg, GenerateRequest):
                    self.requests[msg.rid] = msg
                    self.active[msg.rid] = {"req": msg, "pos": 0, "next": now}
                elif isinstance(msg, AbortRequest):
                    self.aborts.append(msg.rid)
                    if self.active.pop(msg.rid, None) is not None:
                        self.out(RequestOutput(rid=msg.rid, finished=True, finish_reason="abort"))
            for rid, st in list(self.active.items()):
                if time.monotonic() >= st["next"]:
                    self.step(rid, st)
        self.pull.close(0)
        self.push.close(0)
        self.ctx.term()

    def step(self, rid: str, st: dict[str, Any]) -> None:
        req: GenerateRequest = st["req"]
        seed, ids, pos = req.sampling.get("seed"), req.input_ids, st["pos"]
        common = {"rid": rid, "prompt_tokens": len(ids)}
        if seed == 999:
            return
        if seed == 666 or (seed == 888 and pos == 1):
            self.active.pop(rid)
            self.out(RequestOutput(**common, finished=True, finish_reason="abort", error="transfer failed", status=503))
            return
        tid = ids[pos % len(ids)]
        st["pos"] = pos = pos + 1
        if seed in (777, 888):
            st["next"] = time.monotonic() + 0.1
            self.out(
                RequestOutput(
                    **common, token_ids=[tid], text=self.tok.decode([tid]), logprobs=[-0.5], completion_tokens=pos
                )
            )
            return
        limit = req.sampling["max_new_tokens"]
        done = pos >= min(limit, len(ids))
        self.out(
            RequestOutput(
                **common,
                token_ids=[tid],
                text=self.tok.decode([tid]),
                logprobs=[-0.25],
                completion_tokens=pos,
                finished=done,
                finish_reason=("length" if pos >= limit else "stop") if done else None,
            )
        )
        if done:
            self.active.pop(rid)


class Server:
    def __init__(self, request_timeout_s: float = 2.0, **cfg_kw: Any) -> None:
        from engine.builtin import resolve_model
        from engine.tokenizer import Tokenizer

        model_dir = resolve_model("builtin:tiny-llama")
        # Short paths: ipc:// names are limited to ~100 bytes.
        self.tmp = Path(tempfile.mkdtemp(prefix="pdsv"))
        cfg = FrontConfig(
            role="decode",
            ipc_to_scheduler=f"ipc://{self.tmp}/to",
            ipc_from_scheduler=f"ipc://{self.tmp}/from",
            model_dir=str(model_dir),
            served_model_name=MODEL,
            context_length=CONTEXT,
            default_bootstrap_port=BOOTSTRAP_PORT,
            request_timeout_s=request_timeout_s,
            server_args={"transfer_backend": "mooncake"},
            health_generate_timeout_s=2.0,
            **cfg_kw,
        )
        self.app = create_app(cfg)
        self.tok = self.app.state.front.tokenizer
        assert isinstance(self.tok, Tokenizer)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        self.sched = StandInScheduler(cfg.ipc_to_scheduler, cfg.ipc_from_scheduler, self.tok)
        self.sched.start()
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def make_ready(self) -> None:
        self.sched.ready.set()
        wait_for(lambda: self.client.get("/health").status_code == 200)

    def close(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(10)
        self.sched.halt.set()
        self.sched.join(5)
        shutil.rmtree(self.tmp, ignore_errors=True)


def wait_for(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def srv() -> Iterator[Server]:
    s = Server()
    s.make_ready()
    yield s
    s.close()


def sse_events(resp: httpx.Response) -> list[Any]:
    events = []
    for line in resp.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


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
    reqs = [srv.sched.requests["bs_0"], srv.sched.requests["bs_1"]]
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
    wait_for(lambda: "silent" in srv.sched.aborts)


def test_stream_client_disconnect_aborts(srv: Server) -> None:
    body = {"prompt": "abc", "stream": True, "seed": 777, "max_tokens": 1000, "rid": "disc-stream"}
    with srv.client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        first = next(line for line in lines if line)
        assert json.loads(first[len("data: ") :])["choices"][0]["text"]
    # leaving the block closed the connection mid-stream
    wait_for(lambda: "disc-stream" in srv.sched.aborts)
    assert "disc-stream" not in srv.app.state.front.routes


def test_non_stream_client_disconnect_aborts(srv: Server) -> None:
    with pytest.raises(httpx.ReadTimeout):
        srv.client.post(
            "/v1/completions", json={"prompt": "abc", "seed": 777, "max_tokens": 1000, "rid": "disc"}, timeout=0.5
        )
    wait_for(lambda: "disc" in srv.sched.aborts)
    assert "disc" not in srv.app.state.front.routes


def test_abort_request_endpoint(srv: Server) -> None:
    result: dict[str, httpx.Response] = {}

    def call() -> None:
        body = {"text": ["x", "y"], "rid": "ab", "sampling_params": {"seed": 777, "max_new_tokens": 1000}}
        result["r"] = httpx.post(srv.url + "/generate", json=body, timeout=30)

    t = threading.Thread(target=call)
    t.start()
    wait_for(lambda: "ab_1" in srv.sched.requests)
    assert srv.client.post("/abort_request", json={"rid": "ab"}).status_code == 200
    t.join(10)
    body = result["r"].json()
    assert result["r"].status_code == 200
    assert [b["meta_info"]["finish_reason"]["type"] for b in body] == ["abort", "abort"]
    # the answer can beat the stand-in scheduler's receipt of the second abort: wait for both
    wait_for(lambda: {"ab_0", "ab_1"} <= set(srv.sched.aborts))
    assert srv.client.post("/abort_request", json={}).status_code == 400


def test_duplicate_live_rid_rejected(srv: Server) -> None:
    body = {"prompt": "abc", "stream": True, "seed": 777, "max_tokens": 1000, "rid": "dup"}
    with srv.client.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()  # keep a reference: a collected line iterator closes the stream
        assert next(lines).startswith("data: ")
        again = srv.client.post("/v1/completions", json=body)
        assert again.status_code == 400 and "dup" in again.json()["error"]["message"], again.text[:500]
    wait_for(lambda: "dup" in srv.sched.aborts)


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
