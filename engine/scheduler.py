"""Continuous-batching scheduler of the colocated engine; the decode server runs its requests through it too.

Admission reserves every page a request can ever need (prompt + max_new_tokens) up front, so a running
request never runs out of KV and nothing has to be preempted: the pool is never over-committed.
Prefill batches go first (they unblock new requests); otherwise all running requests decode together.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from engine.kvcache import PageAllocator, pages_for
from engine.request import FinishReason, Request, RequestStatus


@dataclass
class ScheduledBatch:
    """The requests of the next forward (a prefill batch or the running requests' decode step)."""

    requests: list[Request]


class Scheduler:
    def __init__(self, allocator: PageAllocator, page_size: int, max_batch_size: int, max_prefill_tokens: int) -> None:
        self.allocator = allocator
        self.page_size = page_size
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def pages_needed_for(self, num_tokens: int) -> int:
        return pages_for(num_tokens, self.page_size)

    def pages_needed(self, req: Request) -> int:
        return self.pages_needed_for(req.max_seq_len)

    def add(self, req: Request) -> None:
        if self.pages_needed(req) > self.allocator.num_pages:
            raise ValueError(
                f"request needs {req.max_seq_len} tokens of KV but the pool holds "
                f"{self.allocator.num_pages * self.page_size}; lower max_new_tokens or the prompt length"
            )
        self.waiting.append(req)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        prefill = self._admit()
        if prefill:
            return ScheduledBatch(prefill)
        if self.running:
            return ScheduledBatch(self.running[: self.max_batch_size])
        return None

    def _admit(self) -> list[Request]:
        batch: list[Request] = []
        tokens = 0
        while self.waiting and len(self.running) + len(batch) < self.max_batch_size:
            req = self.waiting[0]
            new_tokens = req.seq_len - req.num_cached
            if batch and tokens + new_tokens > self.max_prefill_tokens:
                break
            pages = self.allocator.allocate(self.pages_needed(req))
            if pages is None:
                break  # FIFO: later requests wait behind the head rather than starving it
            self.waiting.popleft()
            req.pages = pages
            req.status = RequestStatus.RUNNING
            batch.append(req)
            tokens += new_tokens
        self.running.extend(batch)
        return batch

    def finish(self, req: Request, reason: FinishReason) -> None:
        """End a request in any state and give its pages back."""
        if req.finished:
            return
        if req in self.waiting:
            self.waiting.remove(req)
        if req in self.running:
            self.running.remove(req)
        self.allocator.free(req.pages)
        req.pages = []
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
