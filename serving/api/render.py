"""Response bodies and stream chunks in each dialect's shape, from the prompts' `PromptResult`s.

Clients parse these with SGLang's and OpenAI's own SDKs, so field names, nesting and null-vs-absent
follow theirs exactly. Logprobs of -inf (not valid JSON) are sent as null, which OpenAI clients accept.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Sequence
from typing import Any

from contracts.errors import SSE_DONE
from serving.api.results import PromptResult
from serving.api.spec import Kind

__all__ = [
    "SSE_DONE",
    "chat_chunk",
    "chat_logprobs",
    "chat_response",
    "completion_chunk",
    "completion_logprobs",
    "completion_response",
    "generate_object",
    "new_request_id",
    "now",
    "sglang_finish_reason",
    "sse",
    "usage",
    "usage_chunk",
]


def new_request_id(kind: Kind) -> str:
    """A fresh OpenAI-style response id (`chatcmpl-`/`cmpl-` prefixes, as clients log them)."""
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def now() -> int:
    """OpenAI's `created`: whole seconds since the epoch."""
    return int(time.time())


def sse(obj: Any) -> bytes:
    """One server-sent event carrying `obj` as compact JSON."""
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def usage(results: Sequence[PromptResult]) -> dict[str, Any]:
    """OpenAI `usage` summed over the prompts; `prompt_tokens_details` only when the prefix cache hit."""
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
    """SGLang's `meta_info.finish_reason` object (None while the prompt is still running)."""
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


def _envelope(
    obj_type: str, request_id: str, created: int, model: str, choices: list[dict[str, Any]]
) -> dict[str, Any]:
    """The fields every OpenAI answer and chunk starts with."""
    return {"id": request_id, "object": obj_type, "created": created, "model": model, "choices": choices}


def _chunk(
    obj_type: str, request_id: str, created: int, model: str, choice: dict[str, Any], include_usage: bool
) -> dict[str, Any]:
    obj = _envelope(obj_type, request_id, created, model, [choice])
    if include_usage:
        obj["usage"] = None  # OpenAI: every chunk carries usage=null when the final usage chunk will come
    return obj


def completion_response(
    request_id: str,
    created: int,
    model: str,
    results: Sequence[PromptResult],
    logprobs: Sequence[dict[str, Any] | None] | None = None,
) -> dict[str, Any]:
    """A whole `/v1/completions` answer, one choice per prompt."""
    choices = [
        {
            "index": r.index,
            "text": r.text,
            "logprobs": logprobs[i] if logprobs else None,
            "finish_reason": r.finish_reason,
        }
        for i, r in enumerate(results)
    ]
    return {**_envelope("text_completion", request_id, created, model, choices), "usage": usage(results)}


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
    """One streamed `/v1/completions` chunk: one prompt's new text."""
    choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    return _chunk("text_completion", request_id, created, model, choice, include_usage)


# OpenAI chat -----------------------------------------------------------------------------------


def chat_logprobs(token_texts: Sequence[str], logprobs: Sequence[float]) -> dict[str, Any]:
    """Chat logprobs for the sampled tokens (no alternatives: `top_logprobs` is always empty)."""
    return {
        "content": [
            {"token": t, "logprob": _safe_logprob(lp), "bytes": list(t.encode("utf-8")), "top_logprobs": []}
            for t, lp in zip(token_texts, logprobs, strict=False)
        ]
    }


def chat_response(
    request_id: str, created: int, model: str, r: PromptResult, logprobs: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A whole `/v1/chat/completions` answer."""
    message = {"role": "assistant", "content": r.text}
    choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": r.finish_reason}
    return {**_envelope("chat.completion", request_id, created, model, [choice]), "usage": usage([r])}


def chat_chunk(
    request_id: str,
    created: int,
    model: str,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None,
    include_usage: bool = False,
) -> dict[str, Any]:
    """One streamed chat chunk carrying `delta` (the role first, then content pieces)."""
    choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    return _chunk("chat.completion.chunk", request_id, created, model, choice, include_usage)


def usage_chunk(kind: Kind, request_id: str, created: int, model: str, results: Sequence[PromptResult]) -> dict:
    """The last chunk of a stream with stream_options.include_usage: no choices, the usage totals."""
    obj_type = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {**_envelope(obj_type, request_id, created, model, []), "usage": usage(results)}
