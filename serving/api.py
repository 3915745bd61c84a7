"""Request parsing/validation and response formatting for the HTTP front: pure functions, no I/O.

Three request dialects, as users of SGLang and vLLM expect them:
- SGLang native `POST /generate` (`text` / `input_ids`, `sampling_params`, batches as lists);
- OpenAI `POST /v1/completions` (`prompt` as text, token ids, or a batch of either);
- OpenAI `POST /v1/chat/completions` (`messages`).
All three also take the PD fields the router injects (`bootstrap_host`, `bootstrap_port`,
`bootstrap_room`: a scalar, or a list with one entry per prompt) and an optional `rid`.

Every bad input becomes an `APIError` with a 4xx status and an OpenAI-style error body naming the
offending field: clients of OpenAI-compatible servers parse `{"error": {...}}`, never FastAPI's 422.
Parameters we cannot honour are rejected only when they would change the result (`n=2`, a penalty,
`echo`, tools...); harmless unknown fields (`user`, `metadata`, ...) are ignored.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from engine.sampling import SamplingParams
from serving.ipc import RequestOutput

Kind = Literal["generate", "completion", "chat"]

# SGLang's and OpenAI's defaults (SGLang: max_new_tokens 128; OpenAI legacy completions: max_tokens 16;
# both: temperature 1.0). The engine's own SamplingParams defaults to greedy, so we always pass these.
GENERATE_DEFAULT_MAX_NEW_TOKENS = 128
COMPLETION_DEFAULT_MAX_TOKENS = 16
DEFAULT_TEMPERATURE = 1.0

_MAX_ROOM = 2**63 - 1  # the router draws rooms in [0, 2^63-1] (DESIGN §2)

SSE_DONE = b"data: [DONE]\n\n"


# --------------------------------------------------------------------------------------------------
# errors


def error_type_for_status(status: int) -> str:
    """OpenAI's `error.type` for an HTTP status (clients switch on it, so keep their spelling)."""
    if status == 503:
        return "service_unavailable"
    if status == 504:
        return "timeout"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


class APIError(Exception):
    """An error answered to the client as `status` + OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str | None = None,
        param: str | None = None,
        code: str | int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type if type is not None else error_type_for_status(status)
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def stream_event(self) -> dict[str, Any]:
        """The body of an SSE error event: the same error plus the status the router passes on."""
        body = self.body()
        body["error"]["status"] = self.status
        return body


def _bad(param: str, message: str) -> APIError:
    return APIError(400, message, param=param)


def _tname(value: object) -> str:
    return "null" if value is None else type(value).__name__


# --------------------------------------------------------------------------------------------------
# parsed request types


@dataclass
class PromptSpec:
    """One prompt of a request, normalised. Exactly one of text / input_ids / messages is set."""

    index: int
    text: str | None = None
    input_ids: list[int] | None = None
    messages: list[dict[str, str]] | None = None
    # engine.sampling.SamplingParams kwargs, already validated; max_new_tokens None means "whatever
    # context is left after the prompt" and is filled in by `finalize_sampling` once it is tokenized.
    sampling: dict[str, Any] = field(default_factory=dict)
    bootstrap_host: str | None = None
    bootstrap_port: int | None = None
    bootstrap_room: int | None = None
    rid: str | None = None  # the client's id for this prompt, if it gave one


@dataclass
class ParsedRequest:
    kind: Kind
    prompts: list[PromptSpec]
    stream: bool = False
    return_logprob: bool = False
    is_batch: bool = False  # /generate with list input (response is a list) or a multi-prompt completion
    model: str = ""  # echoed in OpenAI responses
    include_usage: bool = False  # stream_options.include_usage
    return_text_in_logprobs: bool = False  # SGLang: put token text in output_token_logprobs
    max_tokens_field: str = "max_tokens"  # how the client spells the length limit (for error messages)
    group_rid: str | None = None  # a client rid shared by a batch's prompts (suffixed per prompt)


# --------------------------------------------------------------------------------------------------
# typed field access


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or 400."""
    if not raw:
        raise APIError(400, "request body is empty; expected a JSON object")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise APIError(400, f"request body must be a JSON object, got {_json_kind(body)}")
    return body


def _json_kind(value: object) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _get_bool(d: dict[str, Any], key: str, default: bool, name: str | None = None) -> bool:
    v = d.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(name or key, f"'{name or key}' must be a boolean, got {_tname(v)}")
    return v


def _get_int(d: dict[str, Any], key: str, default: int | None, name: str | None = None) -> int | None:
    v = d.get(key)
    if v is None:
        return default
    if not _is_int(v):
        raise _bad(name or key, f"'{name or key}' must be an integer, got {_tname(v)} {v!r}")
    return v


def _get_number(d: dict[str, Any], key: str, default: float | None, name: str | None = None) -> float | None:
    v = d.get(key)
    if v is None:
        return default
    if not _is_number(v):
        raise _bad(name or key, f"'{name or key}' must be a number, got {_tname(v)} {v!r}")
    return float(v)


def _get_stop(d: dict[str, Any], key: str = "stop", name: str | None = None) -> list[str]:
    name = name or key
    v = d.get(key)
    if v is None:
        return []
    if isinstance(v, str):
        return [v] if v else []
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise _bad(name, f"'{name}' must be a string or a list of strings, got {_tname(v)}")
    return [s for s in v if s]  # an empty stop string would match everywhere; OpenAI ignores it too


def _get_int_list(d: dict[str, Any], key: str, name: str | None = None) -> list[int]:
    name = name or key
    v = d.get(key)
    if v is None:
        return []
    if not isinstance(v, list) or not all(_is_int(t) for t in v):
        raise _bad(name, f"'{name}' must be a list of integers, got {_tname(v)}")
    return list(v)


def _reject(d: dict[str, Any], key: str, harmless: Callable[[Any], bool], why: str, name: str | None = None) -> None:
    """400 when `key` is present with a value that would change the result and is not supported."""
    if key in d and d[key] is not None and not harmless(d[key]):
        raise _bad(name or key, f"'{name or key}' is not supported by this server ({why}), got {d[key]!r}")


def _is_zero(v: Any) -> bool:
    return _is_number(v) and v == 0


def _is_one(v: Any) -> bool:
    return _is_number(v) and v == 1


def _is_empty(v: Any) -> bool:
    return v in ({}, [], "")


def _check_model(body: dict[str, Any], served_model_name: str) -> str:
    model = body.get("model")
    if model is None:
        return served_model_name
    if not isinstance(model, str):
        raise _bad("model", f"'model' must be a string, got {_tname(model)}")
    if model != served_model_name:
        raise APIError(
            404,
            f"The model '{model}' does not exist; this server serves '{served_model_name}'",
            type="invalid_request_error",
            param="model",
            code="model_not_found",
        )
    return model


def _validated_sampling(kw: dict[str, Any], aliases: dict[str, str]) -> dict[str, Any]:
    """Run the engine's own validation; its messages name engine fields, so map them to the client's."""
    probe = dict(kw)
    if probe.get("max_new_tokens") is None:
        probe["max_new_tokens"] = 1  # filled in after tokenization; validate everything else now
    try:
        SamplingParams(**probe).validate()
    except ValueError as exc:
        msg = str(exc)
        engine_field = msg.split(" ", 1)[0].split("[", 1)[0]
        client_field = aliases.get(engine_field, engine_field)
        if client_field != engine_field:
            msg = client_field + msg[len(engine_field) :]
        raise _bad(client_field, msg) from None
    return kw


# --------------------------------------------------------------------------------------------------
# PD bootstrap fields and request ids


def _per_prompt(body: dict[str, Any], key: str, n: int) -> list[Any]:
    v = body.get(key)
    if isinstance(v, list):
        if len(v) != n:
            raise _bad(key, f"'{key}' has {len(v)} entries but the request has {n} prompt(s); they must match")
        return list(v)
    return [v] * n


def _bootstrap(body: dict[str, Any], n: int) -> list[tuple[str | None, int | None, int | None]]:
    hosts = _per_prompt(body, "bootstrap_host", n)
    ports = _per_prompt(body, "bootstrap_port", n)
    room_v = body.get("bootstrap_room")
    if n > 1 and room_v is not None and not isinstance(room_v, list):
        # One room shared by several prompts would be a duplicate live room on the transfer side.
        raise _bad("bootstrap_room", f"'bootstrap_room' must be a list with one room per prompt ({n} prompts)")
    rooms = _per_prompt(body, "bootstrap_room", n)
    out = []
    for host, port, room in zip(hosts, ports, rooms, strict=True):
        if host is not None and (not isinstance(host, str) or not host):
            raise _bad("bootstrap_host", f"'bootstrap_host' must be a non-empty string or null, got {host!r}")
        if port is not None and (not _is_int(port) or not 0 < port < 65536):
            raise _bad("bootstrap_port", f"'bootstrap_port' must be an integer in [1, 65535] or null, got {port!r}")
        if room is not None:
            if not _is_int(room) or not 0 <= room <= _MAX_ROOM:
                raise _bad("bootstrap_room", f"'bootstrap_room' must be an integer in [0, 2^63-1], got {room!r}")
            if host is None:
                raise _bad("bootstrap_host", "'bootstrap_host' is required when 'bootstrap_room' is given")
        out.append((host, port, room))
    return out


def _rids(body: dict[str, Any], n: int) -> list[str | None]:
    rid = body.get("rid")
    if rid is None:
        return [None] * n
    if isinstance(rid, str):
        if not rid:
            raise _bad("rid", "'rid' must be a non-empty string")
        # A batch under one client id: suffix the index so every prompt has its own scheduler id,
        # while /abort_request with the bare id still finds all of them (the app keeps the group).
        return [rid] if n == 1 else [f"{rid}_{i}" for i in range(n)]
    if isinstance(rid, list):
        if len(rid) != n:
            raise _bad("rid", f"'rid' has {len(rid)} entries but the request has {n} prompt(s); they must match")
        if not all(isinstance(r, str) and r for r in rid):
            raise _bad("rid", "'rid' entries must be non-empty strings")
        if len(set(rid)) != n:
            raise _bad("rid", "'rid' entries must be distinct")
        return list(rid)
    raise _bad("rid", f"'rid' must be a string or a list of strings, got {_tname(rid)}")


def _attach(prompts: list[PromptSpec], body: dict[str, Any]) -> str | None:
    """Set each prompt's bootstrap fields and rid; return the batch's shared client rid, if any."""
    n = len(prompts)
    for p, (host, port, room), rid in zip(prompts, _bootstrap(body, n), _rids(body, n), strict=True):
        p.bootstrap_host, p.bootstrap_port, p.bootstrap_room, p.rid = host, port, room, rid
    rid = body.get("rid")
    return rid if isinstance(rid, str) and n > 1 else None


def _ids_list(v: Any, name: str) -> list[int]:
    if not v:
        raise _bad(name, f"'{name}' must not be empty")
    for t in v:
        if not _is_int(t) or t < 0:
            raise _bad(name, f"'{name}' must contain non-negative integer token ids, got {t!r}")
    return list(v)


# --------------------------------------------------------------------------------------------------
# POST /generate (SGLang native)

# sampling_params keys SGLang defines that we cannot honour: accepted only at their neutral value.
_GEN_UNSUPPORTED_SAMPLING: dict[str, tuple[Callable[[Any], bool], str]] = {
    "n": (_is_one, "only n=1"),
    "min_new_tokens": (_is_zero, "no minimum length"),
    "min_p": (_is_zero, "no min_p sampling"),
    "frequency_penalty": (_is_zero, "no penalties"),
    "presence_penalty": (_is_zero, "no penalties"),
    "repetition_penalty": (_is_one, "no penalties"),
    "logit_bias": (_is_empty, "no logit bias"),
    "json_schema": (_is_empty, "no constrained decoding"),
    "regex": (_is_empty, "no constrained decoding"),
    "ebnf": (_is_empty, "no constrained decoding"),
    "structural_tag": (_is_empty, "no constrained decoding"),
    "no_stop_trim": (lambda v: v is False, "stop strings are always trimmed"),
    "skip_special_tokens": (lambda v: v is True, "special tokens are always skipped"),
}
# Keys that only affect presentation or batching and can be ignored without changing the output.
_GEN_IGNORED_SAMPLING = frozenset({"spaces_between_special_tokens", "stream_interval", "custom_params"})
_GEN_SAMPLING_KEYS = frozenset(
    {"max_new_tokens", "temperature", "top_p", "top_k", "stop", "stop_token_ids", "ignore_eos", "seed", "sampling_seed"}
)

# Top-level /generate fields that would change the result.
_GEN_UNSUPPORTED_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "input_embeds": (_is_empty, "token or text input only"),
    "image_data": (_is_empty, "text-only model"),
    "video_data": (_is_empty, "text-only model"),
    "audio_data": (_is_empty, "text-only model"),
    "lora_path": (_is_empty, "no LoRA adapters"),
    "return_hidden_states": (lambda v: v is False, "hidden states are not returned"),
    "top_logprobs_num": (_is_zero, "only the sampled token's logprob is returned"),
    "custom_logit_processor": (_is_empty, "no custom logit processors"),
}


def _generate_sampling(sp: Any, name: str) -> dict[str, Any]:
    if sp is None:
        sp = {}
    if not isinstance(sp, dict):
        raise _bad(name, f"'{name}' must be an object, got {_tname(sp)}")
    for key in sp:
        if key not in _GEN_SAMPLING_KEYS and key not in _GEN_UNSUPPORTED_SAMPLING and key not in _GEN_IGNORED_SAMPLING:
            # Unknown keys are rejected (as SGLang does): a typo such as "max_tokens" here would
            # otherwise silently fall back to the default length.
            raise _bad(f"{name}.{key}", f"unknown sampling parameter '{name}.{key}'")
    for key, (harmless, why) in _GEN_UNSUPPORTED_SAMPLING.items():
        _reject(sp, key, harmless, why, name=f"{name}.{key}")
    seed = _get_int(sp, "seed", None, name=f"{name}.seed")
    if seed is None:
        seed = _get_int(sp, "sampling_seed", None, name=f"{name}.sampling_seed")
    kw = {
        "max_new_tokens": _get_int(
            sp, "max_new_tokens", GENERATE_DEFAULT_MAX_NEW_TOKENS, name=f"{name}.max_new_tokens"
        ),
        "temperature": _get_number(sp, "temperature", DEFAULT_TEMPERATURE, name=f"{name}.temperature"),
        "top_p": _get_number(sp, "top_p", 1.0, name=f"{name}.top_p"),
        "top_k": _get_int(sp, "top_k", -1, name=f"{name}.top_k"),
        "seed": seed,
        "stop_token_ids": _get_int_list(sp, "stop_token_ids", name=f"{name}.stop_token_ids"),
        "stop": _get_stop(sp, "stop", name=f"{name}.stop"),
        "ignore_eos": _get_bool(sp, "ignore_eos", False, name=f"{name}.ignore_eos"),
    }
    # SGLang uses top_k=-1 and 0 interchangeably for "disabled"; the engine wants -1.
    if kw["top_k"] == 0:
        kw["top_k"] = -1
    aliases = {k: f"{name}.{k}" for k in kw}
    return _validated_sampling(kw, aliases)


def parse_generate(body: dict[str, Any]) -> ParsedRequest:
    """SGLang `POST /generate`. A list input is a batch; its response is a list."""
    for key, (harmless, why) in _GEN_UNSUPPORTED_FIELDS.items():
        _reject(body, key, harmless, why)
    text, ids = body.get("text"), body.get("input_ids")
    if text is not None and ids is not None:
        raise _bad("text", "give either 'text' or 'input_ids', not both")
    prompts: list[PromptSpec]
    if text is not None:
        if isinstance(text, str):
            if not text:
                raise _bad("text", "'text' must not be empty")
            prompts, is_batch = [PromptSpec(0, text=text)], False
        elif isinstance(text, list):
            if not text:
                raise _bad("text", "'text' must not be an empty list")
            for t in text:
                if not isinstance(t, str) or not t:
                    raise _bad("text", f"'text' must be a list of non-empty strings, got an entry {t!r}")
            prompts, is_batch = [PromptSpec(i, text=t) for i, t in enumerate(text)], True
        else:
            raise _bad("text", f"'text' must be a string or a list of strings, got {_tname(text)}")
    elif ids is not None:
        if not isinstance(ids, list):
            raise _bad("input_ids", f"'input_ids' must be a list of token ids or a list of lists, got {_tname(ids)}")
        if ids and all(isinstance(x, list) for x in ids):
            prompts = [PromptSpec(i, input_ids=_ids_list(x, "input_ids")) for i, x in enumerate(ids)]
            is_batch = True
        else:
            prompts, is_batch = [PromptSpec(0, input_ids=_ids_list(ids, "input_ids"))], False
    else:
        raise _bad("text", "one of 'text' or 'input_ids' is required")

    n = len(prompts)
    sp = body.get("sampling_params")
    if isinstance(sp, list):
        if len(sp) != n:
            raise _bad("sampling_params", f"'sampling_params' has {len(sp)} entries but the request has {n} prompt(s)")
        for p, s in zip(prompts, sp, strict=True):
            p.sampling = _generate_sampling(s, "sampling_params")
    else:
        kw = _generate_sampling(sp, "sampling_params")
        for p in prompts:
            p.sampling = dict(kw, stop=list(kw["stop"]), stop_token_ids=list(kw["stop_token_ids"]))
    group_rid = _attach(prompts, body)
    return ParsedRequest(
        kind="generate",
        prompts=prompts,
        stream=_get_bool(body, "stream", False),
        return_logprob=_get_bool(body, "return_logprob", False),
        is_batch=is_batch,
        return_text_in_logprobs=_get_bool(body, "return_text_in_logprobs", False),
        max_tokens_field="sampling_params.max_new_tokens",
        group_rid=group_rid,
    )


# --------------------------------------------------------------------------------------------------
# OpenAI shared fields

_OPENAI_UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "presence_penalty": (_is_zero, "no penalties"),
    "frequency_penalty": (_is_zero, "no penalties"),
    "repetition_penalty": (_is_one, "no penalties"),
    "min_p": (_is_zero, "no min_p sampling"),
    "min_tokens": (_is_zero, "no minimum length"),
    "logit_bias": (_is_empty, "no logit bias"),
    "guided_json": (_is_empty, "no constrained decoding"),
    "guided_regex": (_is_empty, "no constrained decoding"),
    "guided_choice": (_is_empty, "no constrained decoding"),
    "guided_grammar": (_is_empty, "no constrained decoding"),
    "include_stop_str_in_output": (lambda v: v is False, "stop strings are always trimmed"),
    "skip_special_tokens": (lambda v: v is True, "special tokens are always skipped"),
    "prompt_logprobs": (_is_zero, "no prompt logprobs"),
    "response_format": (lambda v: isinstance(v, dict) and v.get("type") in (None, "text"), "text output only"),
}


def _openai_common(
    body: dict[str, Any], max_tokens: int | None, max_tokens_field: str = "max_tokens"
) -> tuple[dict[str, Any], bool, bool]:
    """Sampling kwargs, stream and include_usage, shared by completions and chat."""
    for key, (harmless, why) in _OPENAI_UNSUPPORTED.items():
        _reject(body, key, harmless, why)
    n = _get_int(body, "n", 1)
    if n != 1:
        raise _bad("n", f"n > 1 is not supported (got n={n}); send several requests instead")
    if max_tokens is not None and max_tokens <= 0:
        raise _bad(max_tokens_field, f"'{max_tokens_field}' must be at least 1, got {max_tokens}")
    temperature = _get_number(body, "temperature", DEFAULT_TEMPERATURE)
    top_p = _get_number(body, "top_p", 1.0)
    top_k = _get_int(body, "top_k", -1)
    kw = {
        "max_new_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": -1 if top_k == 0 else top_k,
        "seed": _get_int(body, "seed", None),
        "stop_token_ids": _get_int_list(body, "stop_token_ids"),
        "stop": _get_stop(body),
        "ignore_eos": _get_bool(body, "ignore_eos", False),
    }
    _validated_sampling(kw, {"max_new_tokens": max_tokens_field})
    stream = _get_bool(body, "stream", False)
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise _bad("stream_options", f"'stream_options' must be an object, got {_tname(opts)}")
    include_usage = _get_bool(opts or {}, "include_usage", False, name="stream_options.include_usage")
    return kw, stream, include_usage and stream


# --------------------------------------------------------------------------------------------------
# POST /v1/completions


def parse_completion(body: dict[str, Any], served_model_name: str) -> ParsedRequest:
    model = _check_model(body, served_model_name)
    _reject(body, "echo", lambda v: v is False, "the prompt is not echoed back")
    _reject(body, "suffix", _is_empty, "no insertion")
    _reject(body, "best_of", _is_one, "only best_of=1")
    logprobs = body.get("logprobs")
    if logprobs is not None:
        if not _is_int(logprobs) or logprobs < 0:
            raise _bad("logprobs", f"'logprobs' must be a non-negative integer or null, got {logprobs!r}")
        if logprobs > 0:
            raise _bad(
                "logprobs",
                f"'logprobs' > 0 (top alternatives) is not supported, got {logprobs}; "
                "use logprobs=0 for the sampled tokens' logprobs",
            )
    if "prompt" not in body or body["prompt"] is None:
        raise _bad("prompt", "'prompt' is required")
    prompt = body["prompt"]
    prompts: list[PromptSpec]
    if isinstance(prompt, str):
        if not prompt:
            raise _bad("prompt", "'prompt' must not be empty")
        prompts = [PromptSpec(0, text=prompt)]
    elif isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            if not all(prompt):
                raise _bad("prompt", "'prompt' entries must not be empty")
            prompts = [PromptSpec(i, text=p) for i, p in enumerate(prompt)]
        elif all(isinstance(p, list) for p in prompt):
            prompts = [PromptSpec(i, input_ids=_ids_list(p, "prompt")) for i, p in enumerate(prompt)]
        elif all(_is_int(p) for p in prompt):
            prompts = [PromptSpec(0, input_ids=_ids_list(prompt, "prompt"))]
        else:
            raise _bad(
                "prompt",
                "'prompt' must be a string, a list of strings, a list of token ids or a list of token-id lists",
            )
    elif isinstance(prompt, list):
        raise _bad("prompt", "'prompt' must not be empty")
    else:
        raise _bad("prompt", f"'prompt' must be a string or a list, got {_tname(prompt)}")

    max_tokens = _get_int(body, "max_tokens", COMPLETION_DEFAULT_MAX_TOKENS)
    kw, stream, include_usage = _openai_common(body, max_tokens)
    for p in prompts:
        p.sampling = dict(kw, stop=list(kw["stop"]), stop_token_ids=list(kw["stop_token_ids"]))
    group_rid = _attach(prompts, body)
    return ParsedRequest(
        kind="completion",
        prompts=prompts,
        stream=stream,
        return_logprob=logprobs is not None,
        is_batch=len(prompts) > 1,
        model=model,
        include_usage=include_usage,
        group_rid=group_rid,
    )


# --------------------------------------------------------------------------------------------------
# POST /v1/chat/completions


def _message_content(i: int, m: dict[str, Any]) -> str:
    content = m.get("content")
    if isinstance(content, str):
        return content
    if content is None:
        if m.get("role") == "assistant":  # an assistant turn that only called tools has no content
            return ""
        raise _bad(f"messages[{i}].content", f"'messages[{i}].content' is required")
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            if not isinstance(part, dict):
                raise _bad(where, f"'{where}' must be an object, got {_tname(part)}")
            if part.get("type") != "text":
                raise _bad(where, f"'{where}': only text content parts are supported, got type {part.get('type')!r}")
            if not isinstance(part.get("text"), str):
                raise _bad(f"{where}.text", f"'{where}.text' must be a string")
            parts.append(part["text"])
        return "\n".join(parts)
    raise _bad(f"messages[{i}].content", f"'messages[{i}].content' must be a string or a list, got {_tname(content)}")


def parse_chat(body: dict[str, Any], served_model_name: str) -> ParsedRequest:
    model = _check_model(body, served_model_name)
    tools = body.get("tools")
    if tools:
        raise _bad("tools", "'tools' (function calling) is not supported by this server")
    _reject(body, "tool_choice", lambda v: v == "none", "no function calling")
    _reject(body, "functions", _is_empty, "no function calling")
    _reject(body, "function_call", lambda v: v == "none", "no function calling")
    _reject(body, "audio", _is_empty, "text output only")
    logprobs = _get_bool(body, "logprobs", False)
    top_logprobs = _get_int(body, "top_logprobs", 0)
    if top_logprobs:
        raise _bad("top_logprobs", f"'top_logprobs' > 0 is not supported, got {top_logprobs}")

    msgs = body.get("messages")
    if msgs is None:
        raise _bad("messages", "'messages' is required")
    if not isinstance(msgs, list):
        raise _bad("messages", f"'messages' must be a list, got {_tname(msgs)}")
    if not msgs:
        raise _bad("messages", "'messages' must not be empty")
    messages = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]", f"'messages[{i}]' must be an object, got {_tname(m)}")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise _bad(f"messages[{i}].role", f"'messages[{i}].role' must be a non-empty string, got {role!r}")
        messages.append({"role": role, "content": _message_content(i, m)})

    # max_completion_tokens is the current OpenAI name; max_tokens the deprecated one. No limit given
    # means "until the context is full" (filled in after tokenization), as with OpenAI and vLLM.
    max_tokens = _get_int(body, "max_completion_tokens", None)
    field_name = "max_completion_tokens"
    if max_tokens is None:
        max_tokens = _get_int(body, "max_tokens", None)
        field_name = "max_tokens"
    kw, stream, include_usage = _openai_common(body, max_tokens, field_name)
    prompts = [PromptSpec(0, messages=messages, sampling=kw)]
    _attach(prompts, body)
    return ParsedRequest(
        kind="chat",
        prompts=prompts,
        stream=stream,
        return_logprob=logprobs,
        model=model,
        include_usage=include_usage,
        max_tokens_field=field_name,
    )


def parse_request(kind: Kind, body: dict[str, Any], served_model_name: str) -> ParsedRequest:
    if kind == "generate":
        return parse_generate(body)
    if kind == "completion":
        return parse_completion(body, served_model_name)
    return parse_chat(body, served_model_name)


def finalize_sampling(
    spec: PromptSpec, prompt_tokens: int, context_length: int, max_tokens_field: str = "max_tokens"
) -> dict[str, Any]:
    """The prompt's final sampling kwargs once its length is known; 400 if it cannot fit the context."""
    kw = dict(spec.sampling)
    if prompt_tokens >= context_length:
        raise _bad(
            "messages" if spec.messages is not None else "prompt",
            f"the prompt has {prompt_tokens} tokens, but this model's context length is {context_length} tokens "
            "and at least one token must be generated; shorten the prompt",
        )
    if kw.get("max_new_tokens") is None:
        kw["max_new_tokens"] = context_length - prompt_tokens
    elif prompt_tokens + kw["max_new_tokens"] > context_length:
        raise _bad(
            max_tokens_field,
            f"the prompt has {prompt_tokens} tokens and {max_tokens_field} is {kw['max_new_tokens']}, "
            f"{prompt_tokens + kw['max_new_tokens']} in total, but this model's context length is {context_length} "
            "tokens; shorten the prompt or lower the limit",
        )
    return kw


def check_token_ids(ids: Sequence[int], vocab_size: int, param: str) -> None:
    """400 for ids the model has no embedding for (they would fail inside the forward pass)."""
    for t in ids:
        if t >= vocab_size:
            raise _bad(param, f"'{param}' contains token id {t}, outside the model's vocabulary (size {vocab_size})")


# --------------------------------------------------------------------------------------------------
# per-prompt results


@dataclass
class PromptResult:
    """Everything received so far for one prompt; `apply` folds in the scheduler's delta outputs."""

    index: int
    rid: str
    prompt_tokens: int = 0
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    status: int = 200
    completion_tokens: int = 0
    cached_tokens: int = 0

    def apply(self, out: RequestOutput) -> None:
        self.output_ids.extend(out.token_ids)
        self.text += out.text
        self.logprobs.extend(out.logprobs)
        if out.prompt_tokens:
            self.prompt_tokens = out.prompt_tokens
        self.completion_tokens = max(out.completion_tokens, len(self.output_ids))
        self.cached_tokens = max(self.cached_tokens, out.cached_tokens)
        if out.finished:
            self.finished = True
            self.finish_reason = out.finish_reason
            self.error = out.error
            self.status = out.status if out.error else 200

    @property
    def failed(self) -> bool:
        return self.finished and self.error is not None

    def api_error(self) -> APIError:
        status = self.status if self.status >= 400 else 500
        return APIError(status, self.error or "request failed")


# --------------------------------------------------------------------------------------------------
# response formatting


def new_request_id(kind: Kind) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def now() -> int:
    return int(time.time())


def sse(obj: Any) -> bytes:
    """One server-sent event carrying `obj` as compact JSON."""
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def usage(results: Sequence[PromptResult]) -> dict[str, Any]:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    out: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    cached = sum(r.cached_tokens for r in results)
    if cached:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    return out


def _safe_logprob(lp: float) -> float | None:
    return lp if math.isfinite(lp) else None  # -inf is not JSON; OpenAI clients accept null


# SGLang /generate ------------------------------------------------------------------------------


def sglang_finish_reason(r: PromptResult) -> dict[str, Any] | None:
    if not r.finished:
        return None
    if r.finish_reason == "length":
        return {"type": "length", "length": r.completion_tokens}
    if r.finish_reason == "stop":
        return {"type": "stop", "matched": None}
    return {"type": r.finish_reason or "abort", "message": r.error or "aborted"}


def generate_object(
    r: PromptResult,
    return_logprob: bool = False,
    token_texts: Sequence[str] | None = None,
    index: int | None = None,
) -> dict[str, Any]:
    """One prompt's SGLang `/generate` result: the whole body, or one (cumulative) stream chunk."""
    meta: dict[str, Any] = {
        "id": r.rid,
        "finish_reason": sglang_finish_reason(r),
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "cached_tokens": r.cached_tokens,
    }
    if return_logprob:
        texts: Sequence[str | None] = token_texts if token_texts is not None else [None] * len(r.output_ids)
        meta["output_token_logprobs"] = [
            [_safe_logprob(lp), tid, txt] for lp, tid, txt in zip(r.logprobs, r.output_ids, texts, strict=False)
        ]
        # The PD router concatenates prefill's and decode's input_token_logprobs; we compute none, but
        # the key must exist for it to do so.
        meta["input_token_logprobs"] = []
    obj: dict[str, Any] = {"text": r.text, "output_ids": list(r.output_ids), "meta_info": meta}
    if index is not None:
        obj["index"] = index
    return obj


# OpenAI completions ----------------------------------------------------------------------------


def completion_logprobs(token_texts: Sequence[str], logprobs: Sequence[float], text_offset: int = 0) -> dict[str, Any]:
    """Legacy completions logprobs for the sampled tokens (logprobs=0: top_logprobs holds only them)."""
    offsets = []
    pos = text_offset
    for t in token_texts:
        offsets.append(pos)
        pos += len(t)
    lps = [_safe_logprob(lp) for lp in logprobs]
    return {
        "tokens": list(token_texts),
        "token_logprobs": lps,
        "top_logprobs": [{t: lp} for t, lp in zip(token_texts, lps, strict=False)],
        "text_offset": offsets,
    }


def completion_response(
    request_id: str,
    created: int,
    model: str,
    results: Sequence[PromptResult],
    logprobs: Sequence[dict[str, Any] | None] | None = None,
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": r.index,
                "text": r.text,
                "logprobs": logprobs[i] if logprobs else None,
                "finish_reason": r.finish_reason,
            }
            for i, r in enumerate(results)
        ],
        "usage": usage(results),
    }


def completion_chunk(
    request_id: str,
    created: int,
    model: str,
    index: int,
    text: str,
    finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None,
    include_usage: bool = False,
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
    }
    if include_usage:
        obj["usage"] = None  # OpenAI: every chunk carries usage=null when the final usage chunk will come
    return obj


# OpenAI chat -----------------------------------------------------------------------------------


def chat_logprobs(token_texts: Sequence[str], logprobs: Sequence[float]) -> dict[str, Any]:
    return {
        "content": [
            {"token": t, "logprob": _safe_logprob(lp), "bytes": list(t.encode("utf-8")), "top_logprobs": []}
            for t, lp in zip(token_texts, logprobs, strict=False)
        ]
    }


def chat_response(
    request_id: str, created: int, model: str, r: PromptResult, logprobs: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": r.text},
                "logprobs": logprobs,
                "finish_reason": r.finish_reason,
            }
        ],
        "usage": usage([r]),
    }


def chat_chunk(
    request_id: str,
    created: int,
    model: str,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None,
    include_usage: bool = False,
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
    }
    if include_usage:
        obj["usage"] = None
    return obj


def usage_chunk(kind: Kind, request_id: str, created: int, model: str, results: Sequence[PromptResult]) -> dict:
    """The last chunk of a stream with stream_options.include_usage: no choices, the usage totals."""
    return {
        "id": request_id,
        "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage(results),
    }
