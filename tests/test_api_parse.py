"""The HTTP front's pure layer (`serving.api`): parsing, validation and response formatting, no I/O."""

from __future__ import annotations

from typing import Any

import pytest

from contracts.errors import SSE_DONE, error_body, error_type
from serving import api
from serving.api import APIError, PromptResult, fields
from serving.ipc import RequestOutput

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
