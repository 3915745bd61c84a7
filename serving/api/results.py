"""What the front has received for one prompt: the scheduler streams deltas, rendering needs the totals."""

from __future__ import annotations

from dataclasses import dataclass, field

from serving.api.errors import APIError
from serving.ipc import RequestOutput

__all__ = ["PromptResult"]


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
        """Fold in one delta output (token ids, text and logprobs are appended; counts only grow)."""
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
        """The failure as the client sees it (a non-error status from the scheduler becomes a 500)."""
        status = self.status if self.status >= 400 else 500
        return APIError(status, self.error or "request failed")
