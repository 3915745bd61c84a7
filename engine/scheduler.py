"""Continuous-batching scheduler of the engine: admission by need, retraction, and MIXED batches.

A request moves `waiting` → `prefilling` (pages for its tokens so far taken; its prompt, or a retracted request's
prompt + generated tokens, computed in one or more chunks) → `running` (one token per step) → finished. The decode
server adds `incoming`: requests whose pages are reserved while their prompt's KV arrives from a prefill server.

**Admission by need.** A request is admitted when the pages for its tokens so far, plus the pages its expected
remaining output will take (engine/headroom.py), fit in what is free after the running requests' own expected
growth. Pages are taken for what exists now and grown one page at a time as tokens are generated.

**Retraction.** When a running request needs a page and none is free, the newest request (latest arrival; pages
held by `incoming` cannot be taken: a transfer writes into them) is retracted: its pages are freed and it waits,
ahead of every newer request, to recompute its prompt + generated tokens as an extend, then go on. The oldest
requests always make progress, so every request ends. Its sampler state (its generator) is kept, so greedy and
seeded outputs are the same as without the retraction.

**Batches.** With prefilling requests and running requests both present and `mixed_chunk_size` > 0, one MIXED
forward carries every running request's decode plus up to `mixed_chunk_size` prefill tokens (no more than
`chunked_prefill_size` either, when set; the last request
taken may get a partial chunk; a chunk that does not reach the end of its request samples nothing). Otherwise
prefills go first, and decodes run alone: an EXTEND batch of at most `chunked_prefill_size` tokens (chunked the same
way), or, with chunking off, of whole requests within `max_prefill_tokens`.
"""

from __future__ import annotations

import bisect
import logging
from collections import deque
from dataclasses import dataclass

from engine.batch import ForwardMode
from engine.headroom import HeadroomEstimator
from engine.kvcache import PageAllocator, pages_for
from engine.request import FinishReason, Request, RequestStatus

log = logging.getLogger(__name__)


@dataclass
class ScheduledBatch:
    """The rows of the next forward: each request, how many of its uncached tokens it computes, and whether it
    samples a token (False only for a prefill chunk that does not reach the end of its request)."""

    requests: list[Request]
    chunk_lens: list[int]
    samples: list[bool]
    mode: ForwardMode

    def new_tokens(self) -> list[list[int]]:
        return [r.next_chunk(n) for r, n in zip(self.requests, self.chunk_lens, strict=True)]

    def row(self, i: int) -> ScheduledBatch:
        """Row i alone (a failed batch is rerun one request at a time)."""
        mode = ForwardMode.DECODE if self.chunk_lens[i] == 1 else ForwardMode.EXTEND
        return ScheduledBatch([self.requests[i]], [self.chunk_lens[i]], [self.samples[i]], mode)


class Scheduler:
    def __init__(
        self,
        allocator: PageAllocator,
        page_size: int,
        max_batch_size: int,
        max_prefill_tokens: int,
        mixed_chunk_size: int = 0,
        headroom: HeadroomEstimator | None = None,
        chunked_prefill_size: int = 0,
    ) -> None:
        self.allocator = allocator
        self.page_size = page_size
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.mixed_chunk_size = mixed_chunk_size
        self.chunked_prefill_size = chunked_prefill_size
        self.headroom = headroom or HeadroomEstimator()
        self.waiting: deque[Request] = deque()  # by arrival: retracted requests rejoin at their place
        self.prefilling: list[Request] = []
        self.running: list[Request] = []
        self.incoming: list[Request] = []

    # -- pages ------------------------------------------------------------------------------------------

    def pages_needed_for(self, num_tokens: int) -> int:
        return pages_for(num_tokens, self.page_size)

    def _expected_pages(self, req: Request, now_tokens: int) -> int:
        """Pages `req` is expected to hold at its end, from `now_tokens` of KV and its expected further output."""
        return self.pages_needed_for(min(req.max_seq_len, now_tokens + self.headroom.remaining_tokens(req)))

    def headroom_pages(self) -> int:
        """Pages the admitted requests are expected to still take beyond what they hold: kept free at admission."""
        live = (*self.running, *self.prefilling, *self.incoming)
        return sum(max(0, self._expected_pages(r, r.seq_len) - len(r.pages)) for r in live)

    def _fits(self, req: Request, now_tokens: int) -> tuple[int, bool]:
        """The pages `req` needs now, and whether they fit with its expected growth beside everyone else's."""
        now = self.pages_needed_for(now_tokens)
        later = max(now, self._expected_pages(req, now_tokens))
        return now, later <= self.allocator.num_free - self.headroom_pages()

    # -- requests in ------------------------------------------------------------------------------------

    def add(self, req: Request) -> None:
        if self.pages_needed_for(req.max_seq_len) > self.allocator.num_pages:
            raise ValueError(
                f"request needs {req.max_seq_len} tokens of KV but the pool holds "
                f"{self.allocator.num_pages * self.page_size}; lower max_new_tokens or the prompt length"
            )
        self._enqueue(req)

    def _enqueue(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self.waiting.insert(bisect.bisect([r.arrival for r in self.waiting], req.arrival), req)

    def _batch_full(self) -> bool:
        return len(self.running) + len(self.prefilling) + len(self.incoming) >= self.max_batch_size

    def reserve_incoming(self, req: Request) -> bool:
        """Decode server: take pages for `req`'s prompt, whose KV a prefill server will write, if admission by
        need allows it now; older waiting requests (retracted or prefilled here) go first."""
        if self._batch_full() or (self.waiting and self.waiting[0].arrival < req.arrival):
            return False
        # +1: the prefill's first token joins the sequence before the first decode step
        _, ok = self._fits(req, len(req.prompt_ids) + 1)
        if not ok:
            return False
        pages = self.allocator.allocate(self.pages_needed_for(len(req.prompt_ids)))
        if pages is None:
            return False
        req.pages = pages
        req.status = RequestStatus.RUNNING
        self.incoming.append(req)
        return True

    def admit_incoming(self, req: Request) -> None:
        """`req`'s prompt KV arrived: it decodes from here on."""
        if req in self.incoming:
            self.incoming.remove(req)
        req.num_cached = len(req.prompt_ids)
        req.status = RequestStatus.RUNNING
        self.running.append(req)

    def drop_incoming(self, req: Request) -> None:
        """`req`'s transfer ended without its KV: forget it here; its pages go back when the transfer layer says
        no write can land in them any more (the servers' page reaper), not now."""
        if req in self.incoming:
            self.incoming.remove(req)

    # -- the next batch ---------------------------------------------------------------------------------

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def schedule(self) -> ScheduledBatch | None:
        decoding = self.running[: self.max_batch_size]
        if not self._grow(decoding):  # no admission in a step that had to retract: it would retract again
            self._admit()
        decoding = self.running[: self.max_batch_size]
        if self.prefilling and (not decoding or self.mixed_chunk_size <= 0):
            return self._extend()
        if self.prefilling:
            return self._mixed(decoding)
        if decoding:
            n = len(decoding)
            return ScheduledBatch(decoding, [1] * n, [True] * n, ForwardMode.DECODE)
        return None

    def _extend(self) -> ScheduledBatch:
        if self.chunked_prefill_size > 0:  # at most that many tokens: the last request taken may get a chunk
            batch = self._chunks([], [], [], self.chunked_prefill_size)
            return ScheduledBatch(batch.requests, batch.chunk_lens, batch.samples, ForwardMode.EXTEND)
        reqs: list[Request] = []
        tokens = 0
        for req in self.prefilling:
            n = req.seq_len - req.num_cached
            if reqs and tokens + n > self.max_prefill_tokens:
                break
            reqs.append(req)
            tokens += n
        lens = [r.seq_len - r.num_cached for r in reqs]
        return ScheduledBatch(reqs, lens, [True] * len(reqs), ForwardMode.EXTEND)

    def _mixed(self, decoding: list[Request]) -> ScheduledBatch:
        budget = self.mixed_chunk_size
        if self.chunked_prefill_size > 0:
            budget = min(budget, self.chunked_prefill_size)
        return self._chunks(list(decoding), [1] * len(decoding), [True] * len(decoding), budget)

    def _chunks(self, reqs: list[Request], lens: list[int], samples: list[bool], budget: int) -> ScheduledBatch:
        """Add prefill chunks to the rows given, in order, within `budget` tokens."""
        for req in self.prefilling:
            if budget <= 0:
                break
            left = req.seq_len - req.num_cached
            n = min(left, budget)
            reqs.append(req)
            lens.append(n)
            samples.append(n == left)
            budget -= n
        return ScheduledBatch(reqs, lens, samples, ForwardMode.MIXED)

    def _admit(self) -> None:
        pending = sum(r.seq_len - r.num_cached for r in self.prefilling)
        while self.waiting and not self._batch_full():
            req = self.waiting[0]
            if self.prefilling and pending + req.seq_len > self.max_prefill_tokens:
                break  # enough prefill work queued; admitting more would only hold pages early
            now, ok = self._fits(req, req.seq_len)
            pages = self.allocator.allocate(now) if ok else None
            if pages is None:
                break  # FIFO: later requests wait behind the head rather than starving it
            self.waiting.popleft()
            req.pages, req.num_cached, req.status = pages, 0, RequestStatus.RUNNING
            self.prefilling.append(req)
            pending += req.seq_len

    def _grow(self, decoding: list[Request]) -> bool:
        """Give every decoding request the page its next token needs, oldest first, retracting the newest
        requests while none is free. True if anything was retracted."""
        retracted = False
        for req in sorted(decoding, key=lambda r: r.arrival):
            need = self.pages_needed_for(req.seq_len) - len(req.pages)
            while need > 0 and req in self.running:  # it may have been retracted itself
                pages = self.allocator.allocate(need)
                if pages is not None:
                    req.pages.extend(pages)
                    break
                self._retract(max((*self.running, *self.prefilling), key=lambda r: r.arrival))
                retracted = True
        return retracted

    def _retract(self, req: Request) -> None:
        for queue in (self.running, self.prefilling):
            if req in queue:
                queue.remove(req)
        log.info("KV pool full: retracted request %s (%d tokens, %d pages)", req.rid, req.seq_len, len(req.pages))
        self.allocator.free(req.pages)
        req.pages, req.num_cached = [], 0
        req.retractions += 1
        self.headroom.observe_retraction()
        self._enqueue(req)

    # -- after the forward ------------------------------------------------------------------------------

    def complete(self, batch: ScheduledBatch) -> None:
        """The forward of `batch` ran: its tokens' KV is in the pages; prefills that reached their end decode."""
        for req, n, sampled in zip(batch.requests, batch.chunk_lens, batch.samples, strict=True):
            req.num_cached += n
            if sampled and req in self.prefilling:
                self.prefilling.remove(req)
                self.running.append(req)

    def finish(self, req: Request, reason: FinishReason) -> None:
        """End a request in any state and give its pages back."""
        if req.finished:
            return
        if req in self.waiting:
            self.waiting.remove(req)
        for queue in (self.prefilling, self.running, self.incoming):
            if req in queue:
                queue.remove(req)
        self.allocator.free(req.pages)
        req.pages = []
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        self.headroom.observe_finish(req)
