"""Which prompt tokens the next prefill forward computes: whole prompts, and chunks of long ones.

Jobs ready for a forward wait in `waiting` (arrival order); a job whose prompt did not fit in one forward is in
`prefilling` between its chunks. Each step's rows are formed by `next_rows`:

- Chunking off (`chunk_size` 0): whole prompts in arrival order while their uncached tokens stay within
  `max_prefill_tokens` (the first one always goes, however long).
- Chunking on: one forward computes at most `chunk_size` tokens.
  1. Waiting prompts that fit whole in what is left go first, in arrival order, skipping longer ones, so a short
     request arriving during a long prompt waits for one chunk, not for the whole prompt. While a prompt is under
     way they get at most half the budget: the other half (at least a page) is kept for it, so it always ends.
  2. Prompts under way get their next chunk (page-aligned, so no two chunks write one page).
  3. What is left starts the oldest waiting prompt's first chunk.
A prompt's pages are taken when its first row is formed (prefill_server/page_book.py), the cached prefix
included; when the pool cannot give them, no further prompt starts this step.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from engine.request import Request
from prefill_server.page_book import PageBook
from serving.ipc import GenerateRequest
from transfer.prefill import KVSender


@dataclass(eq=False)
class PrefillJob:
    req: Request
    msg: GenerateRequest
    sender: KVSender | None  # None: a local request (health_generate), nothing to send
    since: float = field(default_factory=time.monotonic)
    token: int = -1
    logprob: float = 0.0
    cached: int = -1  # prompt tokens the prefix cache gave it (-1: its prefill has not started)

    @property
    def remaining(self) -> int:
        """Prompt tokens still to compute (all of them before its pages are taken)."""
        return len(self.req.prompt_ids) - max(self.req.num_cached, 0)


# (job, first token, tokens) of one forward
Row = tuple[PrefillJob, int, int]


class PrefillBatcher:
    def __init__(
        self, book: PageBook, page_size: int, max_batch_size: int, max_prefill_tokens: int, chunk_size: int
    ) -> None:
        self.book = book
        self.page_size = page_size
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.chunk_size = chunk_size
        self.waiting: deque[PrefillJob] = deque()
        self.prefilling: list[PrefillJob] = []

    def __len__(self) -> int:
        return len(self.waiting) + len(self.prefilling)

    def remove(self, job: PrefillJob) -> None:
        if job in self.waiting:  # O(len), on aborts and failures only
            self.waiting.remove(job)
        if job in self.prefilling:
            self.prefilling.remove(job)

    def jobs(self) -> list[PrefillJob]:
        return [*self.waiting, *self.prefilling]

    def _start(self, job: PrefillJob) -> bool:
        if not self.book.take(job.req):
            return False
        job.cached = job.req.num_cached
        return True

    def next_rows(self) -> list[Row]:
        return self._chunked_rows() if self.chunk_size > 0 else self._whole_rows()

    def complete(self, rows: list[Row]) -> None:
        """The rows' forward ran: their tokens' KV is in the pages; prompts that reached their end leave."""
        for job, start, n in rows:
            job.req.num_cached = start + n
            if job.remaining == 0 and job in self.prefilling:
                self.prefilling.remove(job)

    # -- the two policies ---------------------------------------------------------------------------------

    def _whole_rows(self) -> list[Row]:
        rows: list[Row] = []
        tokens = 0
        while self.waiting and len(rows) < self.max_batch_size:
            job = self.waiting[0]
            n = len(job.req.prompt_ids) - self.book.cached_tokens(job.req)
            if rows and tokens + n > self.max_prefill_tokens:
                break
            if not self._start(job):
                break
            self.waiting.popleft()
            rows.append((job, job.req.num_cached, job.remaining))
            tokens += job.remaining
        return rows

    def _chunked_rows(self) -> list[Row]:
        ps, budget = self.page_size, self.chunk_size
        rows: list[Row] = []
        under_way = sum(j.remaining for j in self.prefilling)
        reserve = min(under_way, max(ps, budget // 2 // ps * ps))
        pool_full = False
        # 1. whole short prompts first
        for job in list(self.waiting):
            if len(rows) >= self.max_batch_size:
                break
            n = len(job.req.prompt_ids) - self.book.cached_tokens(job.req)
            if n > budget - reserve:
                continue
            if not self._start(job):
                pool_full = True
                break
            self.waiting.remove(job)
            rows.append((job, job.req.num_cached, job.remaining))
            budget -= job.remaining
        # 2. the next chunk of each prompt under way
        for job in self.prefilling:
            if len(rows) >= self.max_batch_size:
                break
            n = self._chunk(job.remaining, budget)
            if n == 0:
                break
            rows.append((job, job.req.num_cached, n))
            budget -= n
        # 3. the first chunk of the oldest waiting prompts, on what is left
        while self.waiting and not pool_full and len(rows) < self.max_batch_size and budget >= ps:
            job = self.waiting[0]
            if self._chunk(len(job.req.prompt_ids) - self.book.cached_tokens(job.req), budget) == 0:
                break
            if not self._start(job):
                break
            self.waiting.popleft()
            n = self._chunk(job.remaining, budget)
            rows.append((job, job.req.num_cached, n))
            budget -= n
            if n < job.remaining:
                self.prefilling.append(job)
        return rows

    def _chunk(self, remaining: int, budget: int) -> int:
        """The tokens a prompt with `remaining` tokens to compute gets out of `budget`: all of them if they fit,
        else whole pages (0 when not even one page is left)."""
        return remaining if remaining <= budget else budget // self.page_size * self.page_size
