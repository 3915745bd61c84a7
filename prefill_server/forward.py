"""One prefill batch: the forward, layer group by layer group, with each group's KV handed to the transfer
worker as soon as its compute is recorded (DESIGN §4), then the first token and the aux row.

Kept apart from the scheduler's bookkeeping so the benchmark runs exactly this code.
"""

from __future__ import annotations

import logging

from engine.device import record_event
from engine.engine import Engine
from engine.request import Request
from engine.sampling import SampleOutput
from transfer.aux import AuxRow
from transfer.planner import PipelineSettings, plan_layer_groups
from transfer.prefill import KVSender
from transfer.protocol import TransferState

log = logging.getLogger(__name__)


def prefill_and_send(
    engine: Engine,
    reqs: list[Request],
    senders: list[KVSender | None],
    rooms: list[int],
    pipeline: PipelineSettings,
) -> tuple[SampleOutput, list[tuple[int, int]]]:
    """Run `reqs` (fresh prompts, pages allocated) and send their KV; `None` senders are local requests.

    Returns the sampled first tokens and the layer groups used (one group: the whole-forward path).
    A sender that failed meanwhile (abort, timeout) is skipped; the caller sees it in its poll(). A row
    whose logits were not finite (`sample.ok()`) gets no aux row, so its room cannot succeed: the caller
    fails that request and aborts its room.
    """
    runner = engine.runner
    batch = runner.build_batch([r.prompt_ids for r in reqs], [0] * len(reqs), [r.pages for r in reqs])
    avg_tokens = sum(len(r.prompt_ids) for r in reqs) / len(reqs)
    remote = [(r, s) for r, s in zip(reqs, senders, strict=True) if s is not None]
    groups = plan_layer_groups(runner.num_layers, avg_tokens, pipeline) if remote else [(0, runner.num_layers)]
    pipelined = len(groups) > 1
    log.debug("prefill batch: %d requests, %.0f avg tokens, %s, %d groups",
              len(reqs), avg_tokens, "pipelined" if pipelined else "whole", len(groups))  # fmt: skip

    fwd = runner.start_forward(batch)
    for start, end in groups:
        fwd.run_layers(start, end)
        if pipelined:
            # this group's KV is written once the compute stream passes here; the worker waits for it
            event = record_event(engine.device)
            for req, sender in remote:
                if sender.poll() != TransferState.FAILED:
                    sender.send(start, end, req.pages, event)
    logits = fwd.logits()
    sample = engine.sample(logits, [r.params for r in reqs], [r.generator for r in reqs])
    tokens, logprobs, ok = sample.tokens, sample.token_logprobs, sample.ok()
    # The aux rows are written here, on this thread, before the event is recorded: on CUDA each is a
    # non-blocking copy on the compute stream, so the one event covers the last KV and every aux row, and the
    # worker reads neither before it completed.
    written: list[tuple[Request, KVSender]] = []
    for i, (req, sender) in enumerate(zip(reqs, senders, strict=True)):
        if sender is None or not ok[i] or sender.poll() == TransferState.FAILED:
            continue
        if sender.write_aux(AuxRow(rooms[i], len(req.prompt_ids), tokens[i], logprobs[i])):
            written.append((req, sender))
        # else the room failed (no aux row free); the caller sees it in its poll()
    event = record_event(engine.device)
    for req, sender in written:
        if pipelined:
            sender.finish(event)
        else:  # the whole KV and the aux row in one write
            sender.send(0, runner.num_layers, req.pages, event, last=True)
    return sample, groups
