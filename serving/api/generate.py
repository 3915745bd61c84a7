"""SGLang's native `POST /generate`: `text` or `input_ids` (a list of either is a batch) + `sampling_params`.

SGLang users send SGLang's field names, so unknown `sampling_params` keys are rejected (a typo would
otherwise fall back silently to a default) while the keys SGLang defines but we cannot honour are
accepted at their neutral value only.
"""

from __future__ import annotations

from typing import Any

from contracts.pd import batch_size
from serving.api.errors import bad, tname
from serving.api.fields import (
    UNSUPPORTED_SAMPLING_COMMON,
    Unsupported,
    get_bool,
    get_int,
    get_int_list,
    get_number,
    get_stop,
    is_empty,
    is_one,
    is_zero,
    reject_all,
    token_ids,
)
from serving.api.pd_fields import attach
from serving.api.spec import (
    DEFAULT_TEMPERATURE,
    GENERATE_DEFAULT_MAX_NEW_TOKENS,
    ParsedRequest,
    PromptSpec,
    copy_sampling,
    validated_sampling,
)

__all__ = ["parse_generate"]

# sampling_params keys SGLang defines that we cannot honour: accepted only at their neutral value.
_UNSUPPORTED_SAMPLING: Unsupported = {
    **UNSUPPORTED_SAMPLING_COMMON,
    "n": (is_one, "only n=1"),
    "min_new_tokens": (is_zero, "no minimum length"),
    "json_schema": (is_empty, "no constrained decoding"),
    "regex": (is_empty, "no constrained decoding"),
    "ebnf": (is_empty, "no constrained decoding"),
    "structural_tag": (is_empty, "no constrained decoding"),
    "no_stop_trim": (lambda v: v is False, "stop strings are always trimmed"),
}
# Keys that only affect presentation or batching and can be ignored without changing the output.
_IGNORED_SAMPLING = frozenset({"spaces_between_special_tokens", "stream_interval", "custom_params"})
_SAMPLING_KEYS = frozenset(
    {"max_new_tokens", "temperature", "top_p", "top_k", "stop", "stop_token_ids", "ignore_eos", "seed", "sampling_seed"}
)

# Top-level /generate fields that would change the result.
_UNSUPPORTED_FIELDS: Unsupported = {
    "input_embeds": (is_empty, "token or text input only"),
    "image_data": (is_empty, "text-only model"),
    "video_data": (is_empty, "text-only model"),
    "audio_data": (is_empty, "text-only model"),
    "lora_path": (is_empty, "no LoRA adapters"),
    "return_hidden_states": (lambda v: v is False, "hidden states are not returned"),
    "top_logprobs_num": (is_zero, "only the sampled token's logprob is returned"),
    "custom_logit_processor": (is_empty, "no custom logit processors"),
}


def _sampling(sp: Any, name: str) -> dict[str, Any]:
    """One `sampling_params` object as validated engine kwargs; `name` prefixes the fields in errors."""
    if sp is None:
        sp = {}
    if not isinstance(sp, dict):
        raise bad(name, f"'{name}' must be an object, got {tname(sp)}")
    for key in sp:
        if key not in _SAMPLING_KEYS and key not in _UNSUPPORTED_SAMPLING and key not in _IGNORED_SAMPLING:
            # Unknown keys are rejected (as SGLang does): a typo such as "max_tokens" here would
            # otherwise silently fall back to the default length.
            raise bad(f"{name}.{key}", f"unknown sampling parameter '{name}.{key}'")
    reject_all(sp, _UNSUPPORTED_SAMPLING, prefix=name)
    seed = get_int(sp, "seed", None, name=f"{name}.seed")
    if seed is None:
        seed = get_int(sp, "sampling_seed", None, name=f"{name}.sampling_seed")
    kw = {
        "max_new_tokens": get_int(sp, "max_new_tokens", GENERATE_DEFAULT_MAX_NEW_TOKENS, name=f"{name}.max_new_tokens"),
        "temperature": get_number(sp, "temperature", DEFAULT_TEMPERATURE, name=f"{name}.temperature"),
        "top_p": get_number(sp, "top_p", 1.0, name=f"{name}.top_p"),
        "top_k": get_int(sp, "top_k", -1, name=f"{name}.top_k"),
        "seed": seed,
        "stop_token_ids": get_int_list(sp, "stop_token_ids", name=f"{name}.stop_token_ids"),
        "stop": get_stop(sp, "stop", name=f"{name}.stop"),
        "ignore_eos": get_bool(sp, "ignore_eos", False, name=f"{name}.ignore_eos"),
    }
    # SGLang uses top_k=-1 and 0 interchangeably for "disabled"; the engine wants -1.
    if kw["top_k"] == 0:
        kw["top_k"] = -1
    aliases = {k: f"{name}.{k}" for k in kw}
    return validated_sampling(kw, aliases)


def _prompts(text: Any, ids: Any) -> list[PromptSpec]:
    if text is not None and ids is not None:
        raise bad("text", "give either 'text' or 'input_ids', not both")
    if text is not None:
        if isinstance(text, str):
            if not text:
                raise bad("text", "'text' must not be empty")
            return [PromptSpec(0, text=text)]
        if isinstance(text, list):
            if not text:
                raise bad("text", "'text' must not be an empty list")
            for t in text:
                if not isinstance(t, str) or not t:
                    raise bad("text", f"'text' must be a list of non-empty strings, got an entry {t!r}")
            return [PromptSpec(i, text=t) for i, t in enumerate(text)]
        raise bad("text", f"'text' must be a string or a list of strings, got {tname(text)}")
    if ids is not None:
        if not isinstance(ids, list):
            raise bad("input_ids", f"'input_ids' must be a list of token ids or a list of lists, got {tname(ids)}")
        if ids and all(isinstance(x, list) for x in ids):
            return [PromptSpec(i, input_ids=token_ids(x, "input_ids")) for i, x in enumerate(ids)]
        return [PromptSpec(0, input_ids=token_ids(ids, "input_ids"))]
    raise bad("text", "one of 'text' or 'input_ids' is required")


def parse_generate(body: dict[str, Any]) -> ParsedRequest:
    """SGLang `POST /generate`. A list input is a batch; its response is a list."""
    reject_all(body, _UNSUPPORTED_FIELDS)
    text, ids = body.get("text"), body.get("input_ids")
    prompts = _prompts(text, ids)
    n = len(prompts)
    sp = body.get("sampling_params")
    if isinstance(sp, list):
        if len(sp) != n:
            raise bad("sampling_params", f"'sampling_params' has {len(sp)} entries but the request has {n} prompt(s)")
        for p, s in zip(prompts, sp, strict=True):
            p.sampling = _sampling(s, "sampling_params")
    else:
        kw = _sampling(sp, "sampling_params")
        for p in prompts:
            p.sampling = copy_sampling(kw)
    group_rid = attach(prompts, body)
    return ParsedRequest(
        kind="generate",
        prompts=prompts,
        stream=get_bool(body, "stream", False),
        return_logprob=get_bool(body, "return_logprob", False),
        # Only the fields /generate reads decide (a stray `prompt` list must not make it a batch).
        is_batch=batch_size(body, "generate") is not None,
        return_text_in_logprobs=get_bool(body, "return_text_in_logprobs", False),
        max_tokens_field="sampling_params.max_new_tokens",
        group_rid=group_rid,
    )
