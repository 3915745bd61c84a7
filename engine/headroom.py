"""How much more KV the running requests will still take: the estimate admission keeps free.

Reserving every page a request could need (prompt + max_new_tokens) is safe but ruinous when budgets are large:
a chat without `max_tokens` may run to the end of a 128K context, yet most stop after a few hundred tokens.
So admission reserves an *estimate* instead (as SGLang's `new_token_ratio` does): a request with R tokens of
budget left is expected to take `ratio * min(R, CLIP_TOKENS)` more. When the estimate is wrong and the pool runs
out mid-decode, the scheduler retracts a request (engine/scheduler.py) and the estimate rises.

The ratio is learned from what finished requests actually took (output tokens / clipped budget, the mean of the
last `WINDOW`, times a safety factor), starts at `init_ratio` before any request finished, never goes below
`min_ratio`, and is multiplied by a boost that doubles on each retraction and relaxes as requests finish
without one. The worst-case policy (`policy="worst_case"`) is ratio 1 with no clip: every page up front, no
retraction ever (kept for comparison and for users who want no preemption at all).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Literal

from engine.request import FinishReason, Request

AdmissionPolicy = Literal["need", "worst_case"]
ADMISSION_POLICIES: tuple[str, ...] = ("need", "worst_case")

# Budgets beyond this count as this much: a 128K budget says nothing about a reply's length (SGLang clips at 4096)
CLIP_TOKENS = 4096
WINDOW = 64  # finished requests the learned ratio averages over
SAFETY = 1.5  # the mean is an average; requests longer than average must fit too
BOOST_MAX = 16.0
BOOST_RELAX = 0.9  # per finished request without a retraction


class HeadroomEstimator:
    def __init__(self, policy: AdmissionPolicy = "need", init_ratio: float = 0.7, min_ratio: float = 0.1) -> None:
        if policy not in ADMISSION_POLICIES:
            raise ValueError(f"admission policy must be one of {', '.join(ADMISSION_POLICIES)}, got {policy!r}")
        for name, v in (("init_ratio", init_ratio), ("min_ratio", min_ratio)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        self.policy = policy
        self.init_ratio = init_ratio
        self.min_ratio = min_ratio
        self._samples: deque[float] = deque(maxlen=WINDOW)
        self._boost = 1.0
        self.retractions = 0

    @property
    def ratio(self) -> float:
        """The fraction of a request's (clipped) remaining budget it is expected to still generate."""
        if self.policy == "worst_case":
            return 1.0
        base = SAFETY * sum(self._samples) / len(self._samples) if self._samples else self.init_ratio
        return min(1.0, max(self.min_ratio, base * self._boost))

    def remaining_tokens(self, req: Request) -> int:
        """Tokens `req` is expected to still generate (never more than its budget allows)."""
        budget = max(0, req.params.max_new_tokens - len(req.output_ids))
        if self.policy == "worst_case":
            return budget
        return min(budget, math.ceil(self.ratio * min(budget, CLIP_TOKENS)))

    def observe_finish(self, req: Request) -> None:
        """Learn from a request that ended on its own (stop or length; aborts say nothing about lengths)."""
        if req.finish_reason not in (FinishReason.STOP, FinishReason.LENGTH) or req.params.max_new_tokens <= 0:
            return
        clipped = min(req.params.max_new_tokens, CLIP_TOKENS)
        self._samples.append(min(1.0, len(req.output_ids) / clipped))
        self._boost = max(1.0, self._boost * BOOST_RELAX)

    def observe_retraction(self) -> None:
        """The pool ran out: the estimate was too low; be more careful for a while."""
        self.retractions += 1
        self._boost = min(BOOST_MAX, self._boost * 2.0)
