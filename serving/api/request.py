"""The front's entry points into parsing: pick the dialect, then the checks that need the tokenized prompt.

Parsing happens in two steps because some limits depend on the prompt's length in tokens, known only
after tokenization: `parse_request` validates everything the body alone decides, `check_token_ids` and
`finalize_sampling` the rest, still before anything reaches the scheduler.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from serving.api.chat import parse_chat
from serving.api.errors import APIError, bad
from serving.api.generate import parse_generate
from serving.api.openai import parse_completion
from serving.api.spec import Kind, ParsedRequest, PromptSpec

__all__ = ["check_token_ids", "finalize_sampling", "parse_request", "prompt_too_large"]


def parse_request(kind: Kind, body: dict[str, Any], served_model_name: str) -> ParsedRequest:
    """Parse `body` in the dialect of the route it arrived on."""
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
        raise bad(
            "messages" if spec.messages is not None else "prompt",
            f"the prompt has {prompt_tokens} tokens, but this model's context length is {context_length} tokens "
            "and at least one token must be generated; shorten the prompt",
        )
    if kw.get("max_new_tokens") is None:
        kw["max_new_tokens"] = context_length - prompt_tokens
    elif prompt_tokens + kw["max_new_tokens"] > context_length:
        raise bad(
            max_tokens_field,
            f"the prompt has {prompt_tokens} tokens and {max_tokens_field} is {kw['max_new_tokens']}, "
            f"{prompt_tokens + kw['max_new_tokens']} in total, but this model's context length is {context_length} "
            "tokens; shorten the prompt or lower the limit",
        )
    return kw


def prompt_too_large(param: str, size_bytes: int, max_token_bytes: int, context_length: int) -> APIError:
    """The context check's 400 for a text prompt refused by its size before tokenization: no token stands for
    more than `max_token_bytes` bytes, so more than (context - 1) times that cannot fit."""
    limit = (context_length - 1) * max_token_bytes
    return bad(
        param,
        f"the prompt has {size_bytes} bytes of text, but this model's context length is {context_length} tokens "
        f"and at least one token must be generated (no token covers more than {max_token_bytes} bytes, so at most "
        f"{limit} bytes can fit); shorten the prompt",
    )


def check_token_ids(ids: Sequence[int], vocab_size: int, param: str) -> None:
    """400 for ids the model has no embedding for (they would fail inside the forward pass)."""
    for t in ids:
        if t >= vocab_size:
            raise bad(param, f"'{param}' contains token id {t}, outside the model's vocabulary (size {vocab_size})")
