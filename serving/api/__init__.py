"""Request parsing/validation and response rendering for the HTTP front: pure functions, no I/O.

Three request dialects, as users of SGLang and vLLM expect them:
- SGLang native `POST /generate` (`text` / `input_ids`, `sampling_params`, batches as lists): `generate`;
- OpenAI `POST /v1/completions` (`prompt` as text, token ids, or a batch of either): `openai`;
- OpenAI `POST /v1/chat/completions` (`messages`): `chat`.
All three also take the PD fields the router injects (`bootstrap_host`, `bootstrap_port`,
`bootstrap_room`: a scalar, or a list with one entry per prompt) and an optional `rid` (`pd_fields`).

What the package guarantees: every bad input becomes an `APIError` with a 4xx status and an
OpenAI-style error body naming the offending field (clients of OpenAI-compatible servers parse
`{"error": {...}}`, never FastAPI's 422). Parameters we cannot honour are rejected only when they would
change the result (`n=2`, a penalty, `echo`, tools...); harmless unknown fields (`user`, ...) are ignored.

The front uses this package as `from serving import api` and the names below; the modules are its
implementation.
"""

from __future__ import annotations

from serving.api.chat import parse_chat
from serving.api.errors import APIError
from serving.api.fields import parse_json_body
from serving.api.generate import parse_generate
from serving.api.openai import parse_completion
from serving.api.render import (
    SSE_DONE,
    chat_chunk,
    chat_logprobs,
    chat_response,
    completion_chunk,
    completion_logprobs,
    completion_response,
    generate_object,
    new_request_id,
    now,
    sglang_finish_reason,
    sse,
    usage,
    usage_chunk,
)
from serving.api.request import check_token_ids, finalize_sampling, parse_request, prompt_too_large
from serving.api.results import PromptResult
from serving.api.spec import (
    COMPLETION_DEFAULT_MAX_TOKENS,
    DEFAULT_TEMPERATURE,
    GENERATE_DEFAULT_MAX_NEW_TOKENS,
    Kind,
    ParsedRequest,
    PromptSpec,
)

__all__ = [
    "COMPLETION_DEFAULT_MAX_TOKENS",
    "DEFAULT_TEMPERATURE",
    "GENERATE_DEFAULT_MAX_NEW_TOKENS",
    "SSE_DONE",
    "APIError",
    "Kind",
    "ParsedRequest",
    "PromptResult",
    "PromptSpec",
    "chat_chunk",
    "chat_logprobs",
    "chat_response",
    "check_token_ids",
    "completion_chunk",
    "completion_logprobs",
    "completion_response",
    "finalize_sampling",
    "generate_object",
    "new_request_id",
    "now",
    "parse_chat",
    "parse_completion",
    "parse_generate",
    "parse_json_body",
    "parse_request",
    "prompt_too_large",
    "sglang_finish_reason",
    "sse",
    "usage",
    "usage_chunk",
]
