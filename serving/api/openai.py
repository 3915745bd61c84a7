"""OpenAI's fields shared by `/v1/completions` and `/v1/chat/completions`, and the completions parser.

OpenAI clients send many optional parameters with neutral defaults filled in; those are accepted, and
only values that would change the result are rejected. vLLM's extensions that clients commonly send
(`top_k`, `stop_token_ids`, `ignore_eos`, `guided_*`) are understood the way vLLM reads them.
"""

from __future__ import annotations

from typing import Any

from contracts.pd import batch_size
from serving.api.errors import APIError, bad, tname
from serving.api.fields import (
    UNSUPPORTED_SAMPLING_COMMON,
    Unsupported,
    get_bool,
    get_field,
    get_int,
    get_int_list,
    get_number,
    get_object,
    get_stop,
    is_empty,
    is_int,
    is_one,
    is_zero,
    reject,
    reject_all,
    token_ids,
)
from serving.api.pd_fields import attach
from serving.api.spec import (
    COMPLETION_DEFAULT_MAX_TOKENS,
    DEFAULT_TEMPERATURE,
    ParsedRequest,
    PromptSpec,
    copy_sampling,
    validated_sampling,
)

__all__ = ["check_model", "openai_common", "parse_completion"]

_UNSUPPORTED: Unsupported = {
    **UNSUPPORTED_SAMPLING_COMMON,
    "min_tokens": (is_zero, "no minimum length"),
    "guided_json": (is_empty, "no constrained decoding"),
    "guided_regex": (is_empty, "no constrained decoding"),
    "guided_choice": (is_empty, "no constrained decoding"),
    "guided_grammar": (is_empty, "no constrained decoding"),
    "include_stop_str_in_output": (lambda v: v is False, "stop strings are always trimmed"),
    "prompt_logprobs": (is_zero, "no prompt logprobs"),
    "response_format": (lambda v: isinstance(v, dict) and v.get("type") in (None, "text"), "text output only"),
}


def check_model(body: dict[str, Any], served_model_name: str) -> str:
    """The model to echo back; 404 `model_not_found` (OpenAI's answer) for any other name."""
    model = get_field(body, "model", served_model_name, lambda v: isinstance(v, str), "a string")
    if model != served_model_name:
        raise APIError(
            404,
            f"The model '{model}' does not exist; this server serves '{served_model_name}'",
            type="invalid_request_error",
            param="model",
            code="model_not_found",
        )
    return model


def openai_common(
    body: dict[str, Any], max_tokens: int | None, max_tokens_field: str = "max_tokens"
) -> tuple[dict[str, Any], bool, bool]:
    """Sampling kwargs, stream and include_usage, shared by completions and chat."""
    reject_all(body, _UNSUPPORTED)
    n = get_int(body, "n", 1)
    if n != 1:
        raise bad("n", f"n > 1 is not supported (got n={n}); send several requests instead")
    if max_tokens is not None and max_tokens <= 0:
        raise bad(max_tokens_field, f"'{max_tokens_field}' must be at least 1, got {max_tokens}")
    temperature = get_number(body, "temperature", DEFAULT_TEMPERATURE)
    top_p = get_number(body, "top_p", 1.0)
    top_k = get_int(body, "top_k", -1)
    kw = {
        "max_new_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": -1 if top_k == 0 else top_k,
        "seed": get_int(body, "seed", None),
        "stop_token_ids": get_int_list(body, "stop_token_ids"),
        "stop": get_stop(body),
        "ignore_eos": get_bool(body, "ignore_eos", False),
    }
    validated_sampling(kw, {"max_new_tokens": max_tokens_field})
    stream = get_bool(body, "stream", False)
    opts = get_object(body, "stream_options")
    include_usage = get_bool(opts, "include_usage", False, name="stream_options.include_usage")
    return kw, stream, include_usage and stream


def _completion_logprobs(body: dict[str, Any]) -> bool:
    """Whether logprobs were asked for: only `logprobs=0` (the sampled tokens, no alternatives) is served."""
    logprobs = body.get("logprobs")
    if logprobs is None:
        return False
    if not is_int(logprobs) or logprobs < 0:
        raise bad("logprobs", f"'logprobs' must be a non-negative integer or null, got {logprobs!r}")
    if logprobs > 0:
        raise bad(
            "logprobs",
            f"'logprobs' > 0 (top alternatives) is not supported, got {logprobs}; "
            "use logprobs=0 for the sampled tokens' logprobs",
        )
    return True


def _completion_prompts(body: dict[str, Any]) -> list[PromptSpec]:
    """`prompt` as text, token ids, or a batch of either."""
    if "prompt" not in body or body["prompt"] is None:
        raise bad("prompt", "'prompt' is required")
    prompt = body["prompt"]
    if isinstance(prompt, str):
        if not prompt:
            raise bad("prompt", "'prompt' must not be empty")
        return [PromptSpec(0, text=prompt)]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            if not all(prompt):
                raise bad("prompt", "'prompt' entries must not be empty")
            return [PromptSpec(i, text=p) for i, p in enumerate(prompt)]
        if all(isinstance(p, list) for p in prompt):
            return [PromptSpec(i, input_ids=token_ids(p, "prompt")) for i, p in enumerate(prompt)]
        if all(is_int(p) for p in prompt):
            return [PromptSpec(0, input_ids=token_ids(prompt, "prompt"))]
        raise bad(
            "prompt",
            "'prompt' must be a string, a list of strings, a list of token ids or a list of token-id lists",
        )
    if isinstance(prompt, list):
        raise bad("prompt", "'prompt' must not be empty")
    raise bad("prompt", f"'prompt' must be a string or a list, got {tname(prompt)}")


def parse_completion(body: dict[str, Any], served_model_name: str) -> ParsedRequest:
    """OpenAI `POST /v1/completions` (legacy completions)."""
    model = check_model(body, served_model_name)
    reject(body, "echo", lambda v: v is False, "the prompt is not echoed back")
    reject(body, "suffix", is_empty, "no insertion")
    reject(body, "best_of", is_one, "only best_of=1")
    return_logprob = _completion_logprobs(body)
    prompts = _completion_prompts(body)
    max_tokens = get_int(body, "max_tokens", COMPLETION_DEFAULT_MAX_TOKENS)
    kw, stream, include_usage = openai_common(body, max_tokens)
    for p in prompts:
        p.sampling = copy_sampling(kw)
    group_rid = attach(prompts, body)
    return ParsedRequest(
        kind="completion",
        prompts=prompts,
        stream=stream,
        return_logprob=return_logprob,
        is_batch=batch_size(body, "completion") is not None,
        model=model,
        include_usage=include_usage,
        group_rid=group_rid,
    )
