"""What a parsed request is, whichever dialect it came in: the types the front works with after parsing.

The three parsers normalise into one `ParsedRequest` of `PromptSpec`s, so tokenizing, scheduling and
the PD plumbing never look at dialect-specific fields again; only rendering still switches on `kind`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from contracts.pd import Dialect
from engine.sampling import SamplingParams
from serving.api.errors import bad

__all__ = [
    "COMPLETION_DEFAULT_MAX_TOKENS",
    "DEFAULT_TEMPERATURE",
    "GENERATE_DEFAULT_MAX_NEW_TOKENS",
    "Kind",
    "ParsedRequest",
    "PromptSpec",
    "copy_sampling",
    "validated_sampling",
]

Kind = Dialect  # the three request dialects, named once in contracts.pd

# SGLang's and OpenAI's defaults (SGLang: max_new_tokens 128; OpenAI legacy completions: max_tokens 16;
# both: temperature 1.0). The engine's own SamplingParams defaults to greedy, so we always pass these.
GENERATE_DEFAULT_MAX_NEW_TOKENS = 128
COMPLETION_DEFAULT_MAX_TOKENS = 16
DEFAULT_TEMPERATURE = 1.0


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
    """A whole request: its prompts plus the flags that decide how the answer is rendered."""

    kind: Kind
    prompts: list[PromptSpec]
    stream: bool = False
    return_logprob: bool = False
    # The prompts came as a list (contracts.pd.batch_size): /generate then answers a list.
    is_batch: bool = False
    model: str = ""  # echoed in OpenAI responses
    include_usage: bool = False  # stream_options.include_usage
    return_text_in_logprobs: bool = False  # SGLang: put token text in output_token_logprobs
    max_tokens_field: str = "max_tokens"  # how the client spells the length limit (for error messages)
    group_rid: str | None = None  # a client rid shared by a batch's prompts (suffixed per prompt)


def validated_sampling(kw: dict[str, Any], aliases: dict[str, str]) -> dict[str, Any]:
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
        raise bad(client_field, msg) from None
    return kw


def copy_sampling(kw: dict[str, Any]) -> dict[str, Any]:
    """A copy of shared sampling kwargs for one prompt of a batch (the lists must not be shared)."""
    return dict(kw, stop=list(kw["stop"]), stop_token_ids=list(kw["stop_token_ids"]))
