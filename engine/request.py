"""A generation request as the engine tracks it (one per sequence)."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import torch

from engine.sampling import SamplingParams

_ids = itertools.count()
# Creation order: the scheduler serves older requests first and retracts the newest. A counter, not a clock, so that
# every tensor-parallel rank (which creates the same requests in the same order) orders them identically.
_arrivals = itertools.count()


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # stop token or stop string
    LENGTH = "length"  # max_new_tokens or context limit
    ABORT = "abort"


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    rid: str = field(default_factory=lambda: f"req-{next(_ids)}")
    status: RequestStatus = RequestStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose KV is already in `pages`
    finish_reason: FinishReason | None = None
    # Set when the engine ended the request on a failure (finish_reason ABORT): the message for the client.
    error: str | None = None
    output_text: str = ""
    generator: torch.Generator | None = field(default=None, repr=False)
    arrival: int = field(default_factory=lambda: next(_arrivals))
    retractions: int = 0  # times the pool ran out and this request gave its pages back to recompute later

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def seq_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def max_seq_len(self) -> int:
        return len(self.prompt_ids) + self.params.max_new_tokens

    @property
    def finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def next_chunk(self, n: int) -> list[int]:
        """The next `n` uncached tokens (a chunk of a prefill or of a retracted request's recomputation)."""
        return self.all_ids[self.num_cached : self.num_cached + n]
