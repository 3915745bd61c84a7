"""One prefill batch: the forward, layer group by layer group, with each group's KV handed to the transfer
worker as soon as its compute is recorded (DESIGN §4), then the first token and the aux row.

A row is a chunk of one prompt: tokens [start, start + length) computed on the KV of the tokens before them
(a cached prefix, earlier chunks). Only the pages the chunk wrote are sent, landing at the same page index on
decode; a row that reaches the end of its prompt samples the first token and carries the aux row, the others
sample nothing. `start` is page-aligned (cached prefixes are whole pages, chunk sizes multiples of the page
size), so no two chunks of a request write the same page.

Kept apart from the scheduler's bookkeeping so the benchmark runs exactly this code.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from engine.device import record_event
from engine.engine import Engine
from engine.kvcache import pages_for
from engine.request import Request
from engine.sampling import SampleOutput
from transfer.aux import AuxRow
from transfer.planner import PipelineSettings, plan_layer_groups
from transfer.prefill import KVSender
from transfer.protocol import TransferState

log = logging.getLogger(__name__)


@dataclass
class PrefillRow:
    req: Request  # its pages cover the whole prompt
    sender: KVSender | None  # None: a local request (health_generate), nothing to send
    room: int
    start: int  # first prompt token this row computes: the ones before it are in its pages already
    length: int

    @property
    def last(self) -> bool:
        return self.start + self.length == len(self.req.prompt_ids)

    def page_range(self, page_size: int) -> tuple[int, int]:
        """The pages this row writes, as [first, end) indices into the request's page table."""
        if self.start % page_size:
            raise ValueError(f"a prefill chunk must start on a page boundary, got token {self.start}")
        return self.start // page_size, pages_for(self.start + self.length, page_size)

    def live(self) -> bool:
        return self.sender is not None and self.sender.poll() != TransferState.FAILED


@dataclass
class ChunkResult:
    """What a batch of rows produced: `sample` holds one row per entry of `sampled` (the indices of the rows
    that reached the end of their prompt; None when none did), `groups` the layer groups used."""

    sample: SampleOutput | None
    sampled: list[int]
    groups: list[tuple[int, int]]
    cp_refusal: str | None = None  # on a context-parallel engine: why the batch ran whole (None: it ran split)


def send_cached_prefix(engine: Engine, row: PrefillRow) -> None:
    """Queue the pages a request found in the prefix cache, before its forward: their KV is already computed
    (the event orders the read after whatever the compute stream queued), so the write starts at once and
    overlaps the compute of the rest."""
    if row.start and row.live():
        n = row.start // engine.pool.page_size
        assert row.sender is not None
        row.sender.send(0, engine.runner.num_layers, row.req.pages[:n], record_event(engine.device))


def prefill_rows(engine: Engine, rows: list[PrefillRow], pipeline: PipelineSettings) -> ChunkResult:
    """Run the rows as one forward and send what each computed; see the module docstring.

    A sender that failed meanwhile (abort, timeout) is skipped; the caller sees it in its poll(). A sampled row
    whose logits were not finite (`sample.ok()`) gets no aux row, so its room cannot succeed: the caller fails
    that request and aborts its room.
    """
    runner, ps = engine.runner, engine.pool.page_size
    new_tokens = [r.req.prompt_ids[r.start : r.start + r.length] for r in rows]
    batch = runner.build_batch(new_tokens, [r.start for r in rows], [r.req.pages for r in rows])
    avg_tokens = sum(r.length for r in rows) / len(rows)
    remote = [r for r in rows if r.sender is not None]
    groups = plan_layer_groups(runner.num_layers, avg_tokens, pipeline) if remote else [(0, runner.num_layers)]
    pipelined = len(groups) > 1
    log.debug("prefill batch: %d rows, %.0f avg tokens, %s, %d groups",
              len(rows), avg_tokens, "pipelined" if pipelined else "whole", len(groups))  # fmt: skip

    def send(row: PrefillRow, start: int, end: int, event: object, last: bool = False) -> None:
        first, stop = row.page_range(ps)
        assert row.sender is not None
        row.sender.send(start, end, row.req.pages[first:stop], event, last=last, first_page=first)  # type: ignore[arg-type]

    fwd = runner.start_forward(batch)
    for start, end in groups:
        fwd.run_layers(start, end)
        if pipelined:
            # this group's KV is written once the compute stream passes here; the worker waits for it
            event = record_event(engine.device)
            for row in remote:
                if row.live():
                    send(row, start, end, event)
    sample, sampled, finished = _sample_and_write_aux(engine, rows, fwd.logits())
    event = record_event(engine.device)
    for i, row in enumerate(rows):
        if i in finished:
            if pipelined:
                row.sender.finish(event)  # type: ignore[union-attr]
            else:  # the chunk's KV and the aux row in one write
                send(row, 0, runner.num_layers, event, last=True)
        elif not pipelined and not row.last and row.live():
            send(row, 0, runner.num_layers, event)  # a middle chunk: its KV alone
    return ChunkResult(sample, sampled, groups, fwd.cp_refusal)


def _sample_and_write_aux(
    engine: Engine, rows: list[PrefillRow], logits: torch.Tensor
) -> tuple[SampleOutput | None, list[int], set[int]]:
    """Sample the rows that reached the end of their prompt and write their aux rows: (the sample, the indices
    of the sampled rows, the indices of those whose aux row was written)."""
    sampled = [i for i, r in enumerate(rows) if r.last]
    if not sampled:
        return None, sampled, set()
    reqs = [rows[i].req for i in sampled]
    sample = engine.sample(logits[sampled], [r.params for r in reqs], [r.generator for r in reqs])
    # The aux rows are written here, on this thread, before the event is recorded: on CUDA each is a
    # non-blocking copy on the compute stream, so the one event covers the last KV and every aux row, and the
    # worker reads neither before it completed.
    finished: set[int] = set()
    for j, (i, ok) in enumerate(zip(sampled, sample.ok(), strict=True)):
        row = rows[i]
        if not ok or not row.live():
            continue
        assert row.sender is not None
        if row.sender.write_aux(AuxRow(row.room, len(row.req.prompt_ids), sample.tokens[j], sample.token_logprobs[j])):
            finished.add(i)
        # else the room failed (no aux row free); the caller sees it in its poll()
    return sample, sampled, finished


def prefill_and_send(
    engine: Engine,
    reqs: list[Request],
    senders: list[KVSender | None],
    rooms: list[int],
    pipeline: PipelineSettings,
) -> tuple[SampleOutput, list[tuple[int, int]]]:
    """Whole fresh prompts (pages allocated), one row each: the sampled first tokens and the layer groups."""
    rows = [PrefillRow(r, s, room, 0, len(r.prompt_ids)) for r, s, room in zip(reqs, senders, rooms, strict=True)]
    result = prefill_rows(engine, rows, pipeline)
    assert result.sample is not None
    return result.sample, result.groups
