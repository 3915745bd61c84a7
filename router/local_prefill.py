"""Conditional disaggregation: where a request's prompts are prefilled, decided once per request by their length.

A short prompt costs less to prefill in the decode server's running batch than on a prefill server followed by a KV
transfer and a second hop, so a request whose every prompt has at most `local_prefill_max_tokens` tokens goes to one
decode server only, without bootstrap fields (the decode server then prefills it itself: DESIGN §2). Everything else,
and everything the router cannot count, goes both ways as before ("remote"): a body the servers will refuse is theirs
to answer, and a count that differs from the servers' would put long prompts into the decode batch.

Tokens are counted by the servers' one rule (`tokenization.tokenizer.Tokenizer`, as `serving/front/generation.py`
tokenizes): text with `encode_prompt` (the tokenizer's special tokens added), chat with the template's text encoded
without specials, token-id prompts by their length. A text is not tokenized at all when its size alone shows it is
longer than the limit (no token covers more than `Tokenizer.max_token_bytes` bytes, the bound the servers' context
check uses), so the router's CPU per request stays bounded by the limit, not by the prompt.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from contracts.metrics import PrefillPath
from contracts.pd import Dialect

if TYPE_CHECKING:
    from router.config import RouterConfig
    from tokenization.tokenizer import Tokenizer

log = logging.getLogger("pdserve.router")

__all__ = ["PD_HEADER", "PrefillDecider", "prompts_of"]

# On every generation answer the router gives after deciding: "local" (prefilled on the decode server) or "remote".
PD_HEADER = "x-pd-prefill"

# One prompt as the servers read it: ("text", str), ("ids", list[int]) or ("chat", [{"role", "content"}, ...]).
Prompt = tuple[str, Any]


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _ids(v: object) -> Prompt | None:
    if isinstance(v, list) and v and all(_is_int(x) for x in v):
        return ("ids", v)
    return None


def _texts(v: list[Any]) -> list[Prompt] | None:
    return [("text", t) for t in v] if v and all(isinstance(t, str) and t for t in v) else None


def _generate(body: dict[str, Any]) -> list[Prompt | None] | None:
    """`/generate`: `text` (a string or a list of them) or `input_ids` (a list of ids or of id lists), not both."""
    text, ids = body.get("text"), body.get("input_ids")
    if text is not None:
        if ids is not None:
            return None
        if isinstance(text, str):
            return [("text", text)] if text else None
        return _texts(text) if isinstance(text, list) else None
    if isinstance(ids, list) and ids and all(isinstance(x, list) for x in ids):
        return [_ids(x) for x in ids]
    return [_ids(ids)]


def _completion(body: dict[str, Any]) -> list[Prompt | None] | None:
    """`/v1/completions`: `prompt` as text, a list of texts, a list of ids or a list of id lists."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [("text", prompt)] if prompt else None
    if not isinstance(prompt, list) or not prompt:
        return None
    if all(isinstance(p, str) for p in prompt):
        return _texts(prompt)
    if all(isinstance(p, list) for p in prompt):
        return [_ids(p) for p in prompt]
    return [_ids(prompt)]


def _content(m: dict[str, Any]) -> str | None:
    """A message's text as the servers' chat parser makes it (serving/api/chat.py): a string, text parts joined by
    newlines, or "" for an assistant turn without content; None for anything that parser refuses."""
    content = m.get("content")
    if isinstance(content, str):
        return content
    if content is None:
        return "" if m.get("role") == "assistant" else None
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(parts) != len(content) or not all(isinstance(t, str) for t in parts):
            return None
        return "\n".join(parts)
    return None


def _chat(body: dict[str, Any]) -> list[Prompt | None] | None:
    """`/v1/chat/completions`: one prompt, the messages reduced to role and content as the servers reduce them."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return None
    messages = []
    for m in msgs:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
            return None
        content = _content(m)
        if content is None:
            return None
        messages.append({"role": m["role"], "content": content})
    return [("chat", messages)]


_READERS: dict[str, Callable[[dict[str, Any]], list[Prompt | None] | None]] = {
    "generate": _generate,
    "completion": _completion,
    "chat": _chat,
}


def prompts_of(body: dict[str, Any], dialect: Dialect) -> list[Prompt] | None:
    """The request's prompts as the servers will read them, or None when the body is not one they accept as is."""
    prompts = _READERS[dialect](body)
    if prompts is None or any(p is None for p in prompts):
        return None
    return [p for p in prompts if p is not None]


class PrefillDecider:
    """`decide(body, dialect)`: LOCAL when every prompt has at most `max_tokens` tokens, else REMOTE. Without a
    tokenizer, or with `max_tokens` 0, every request is REMOTE."""

    def __init__(self, max_tokens: int, tokenizer: Tokenizer | None, tokenizer_path: str | None = None) -> None:
        self.max_tokens, self.tokenizer, self.tokenizer_path = max_tokens, tokenizer, tokenizer_path
        self.active = max_tokens > 0 and tokenizer is not None
        mtb = tokenizer.max_token_bytes if tokenizer is not None else None
        # A text longer than this many bytes has more than max_tokens tokens (None: the tokenizer gives no bound).
        self._max_bytes = max_tokens * mtb if mtb is not None else None

    @classmethod
    def from_config(cls, cfg: RouterConfig) -> PrefillDecider:
        """Loads the tokenizer when one is configured and it would be used; says once when the feature is off for
        want of one. Raises RouterConfigError (naming --tokenizer) when the directory holds no loadable tokenizer."""
        from router.config import RouterConfigError

        n = cfg.local_prefill_max_tokens
        if n == 0:
            return cls(0, None, cfg.tokenizer)
        if cfg.tokenizer is None:
            log.warning(
                "conditional disaggregation is off: pass --tokenizer DIR (the model's Hugging Face directory, as the "
                "servers' --model) so the router can count prompt tokens; until then every request, short or long, "
                "goes to a prefill server (--local-prefill-max-tokens 0 silences this)"
            )
            return cls(n, None, None)
        from tokenization.tokenizer import Tokenizer  # transformers: paid only by a router that counts tokens

        try:
            tok = Tokenizer.from_pretrained(cfg.tokenizer)
        except ValueError as e:
            raise RouterConfigError(f"--tokenizer: {e}") from None
        log.info("conditional disaggregation: prompts of <= %d tokens are prefilled on the decode server", n)
        return cls(n, tok, cfg.tokenizer)

    def info(self) -> dict[str, Any]:
        """The state for the router's /readiness: whether short requests may go local, and by what rule."""
        off = None
        if self.max_tokens == 0:
            off = "--local-prefill-max-tokens is 0"
        elif self.tokenizer is None:
            off = "no --tokenizer: the router cannot count prompt tokens"
        return {
            "active": self.active,
            "local_prefill_max_tokens": self.max_tokens,
            "tokenizer": self.tokenizer_path,
            **({"off_because": off} if off else {}),
        }

    def decide(self, body: dict[str, Any], dialect: Dialect) -> PrefillPath:
        if not self.active:
            return PrefillPath.REMOTE
        try:
            fits = self.fits(body, dialect)
        except Exception:  # a template or tokenizer failure: the servers will say what is wrong with the body
            log.debug("could not count the prompt tokens; prefilling remotely", exc_info=True)
            fits = False
        return PrefillPath.LOCAL if fits else PrefillPath.REMOTE

    def fits(self, body: dict[str, Any], dialect: Dialect) -> bool:
        """Whether every prompt has at most max_tokens tokens; False for a body that cannot be counted. May raise
        (the chat template, the tokenizer), which `decide` takes as "remote"."""
        prompts = prompts_of(body, dialect)
        if prompts is None:
            return False
        # every prompt by the cheap test first: one long prompt of a batch makes tokenizing the others pointless
        if any(kind == "ids" and len(v) > self.max_tokens for kind, v in prompts):
            return False
        return all(self._fits(kind, v) for kind, v in prompts)

    def _fits(self, kind: str, value: Any) -> bool:
        tok = self.tokenizer
        assert tok is not None
        if kind == "ids":
            return len(value) <= self.max_tokens
        text = tok.render_chat(value) if kind == "chat" else value
        if self._max_bytes is not None and (
            len(text) > self._max_bytes or len(text.encode("utf-8")) > self._max_bytes  # chars <= bytes: cheap first
        ):
            return False
        # the servers' rule: a text prompt gets the tokenizer's special tokens, a rendered chat has its own
        ids = tok.encode(text) if kind == "chat" else tok.encode_prompt(text)
        return len(ids) <= self.max_tokens
