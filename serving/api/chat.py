"""OpenAI `POST /v1/chat/completions`: `messages` become one prompt, rendered by the chat template later.

Only text is served: content may be a string or a list of text parts (joined by newlines, as vLLM
does); images, audio and function calling are rejected, since silently dropping them would answer a
different question than the one asked.
"""

from __future__ import annotations

from typing import Any

from serving.api.errors import bad, tname
from serving.api.fields import get_bool, get_int, is_empty, reject
from serving.api.openai import check_model, openai_common
from serving.api.pd_fields import attach
from serving.api.spec import ParsedRequest, PromptSpec

__all__ = ["parse_chat"]


def _message_content(i: int, m: dict[str, Any]) -> str:
    content = m.get("content")
    if isinstance(content, str):
        return content
    if content is None:
        if m.get("role") == "assistant":  # an assistant turn that only called tools has no content
            return ""
        raise bad(f"messages[{i}].content", f"'messages[{i}].content' is required")
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            if not isinstance(part, dict):
                raise bad(where, f"'{where}' must be an object, got {tname(part)}")
            if part.get("type") != "text":
                raise bad(where, f"'{where}': only text content parts are supported, got type {part.get('type')!r}")
            if not isinstance(part.get("text"), str):
                raise bad(f"{where}.text", f"'{where}.text' must be a string")
            parts.append(part["text"])
        return "\n".join(parts)
    raise bad(f"messages[{i}].content", f"'messages[{i}].content' must be a string or a list, got {tname(content)}")


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    msgs = body.get("messages")
    if msgs is None:
        raise bad("messages", "'messages' is required")
    if not isinstance(msgs, list):
        raise bad("messages", f"'messages' must be a list, got {tname(msgs)}")
    if not msgs:
        raise bad("messages", "'messages' must not be empty")
    messages = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}]", f"'messages[{i}]' must be an object, got {tname(m)}")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise bad(f"messages[{i}].role", f"'messages[{i}].role' must be a non-empty string, got {role!r}")
        messages.append({"role": role, "content": _message_content(i, m)})
    return messages


def parse_chat(body: dict[str, Any], served_model_name: str) -> ParsedRequest:
    """OpenAI `POST /v1/chat/completions` (always a single prompt)."""
    model = check_model(body, served_model_name)
    tools = body.get("tools")
    if tools:
        raise bad("tools", "'tools' (function calling) is not supported by this server")
    reject(body, "tool_choice", lambda v: v == "none", "no function calling")
    reject(body, "functions", is_empty, "no function calling")
    reject(body, "function_call", lambda v: v == "none", "no function calling")
    reject(body, "audio", is_empty, "text output only")
    logprobs = get_bool(body, "logprobs", False)
    top_logprobs = get_int(body, "top_logprobs", 0)
    if top_logprobs:
        raise bad("top_logprobs", f"'top_logprobs' > 0 is not supported, got {top_logprobs}")
    messages = _messages(body)

    # max_completion_tokens is the current OpenAI name; max_tokens the deprecated one. No limit given
    # means "until the context is full" (filled in after tokenization), as with OpenAI and vLLM.
    max_tokens = get_int(body, "max_completion_tokens", None)
    field_name = "max_completion_tokens"
    if max_tokens is None:
        max_tokens = get_int(body, "max_tokens", None)
        field_name = "max_tokens"
    kw, stream, include_usage = openai_common(body, max_tokens, field_name)
    prompts = [PromptSpec(0, messages=messages, sampling=kw)]
    attach(prompts, body)
    return ParsedRequest(
        kind="chat",
        prompts=prompts,
        stream=stream,
        return_logprob=logprobs,
        model=model,
        include_usage=include_usage,
        max_tokens_field=field_name,
    )
