"""Decode scheduler: admission (reserve every page a request can need, never over-commit), KV receive,
then continuous-batching decode with the engine's runner, sampler and stop handling.

A request moves: `admitting` (waiting for free pages) → `receiving` (transfer in flight) → the engine's
running batch → done. Pages of a failed transfer go back only when the transfer layer says no write can
still land in them (`reaper` holds them until then). Every way a request ends (its last output, `fail`)
also drops its per-request bookkeeping (`logprobs`), so aborted requests leave nothing behind.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

from contracts.metrics import Role, Stage
from contracts.pd import DEFAULT_BOOTSTRAP_PORT
from engine.engine import Engine
from engine.request import Request
from engine.sampling import SamplingParams
from serving.ipc import GenerateRequest, SchedulerStats
from serving.scheduler_loop import SchedulerLoop
from transfer.config import TransferConfig
from transfer.decode import DecodeTransferManager, KVReceiver, NoAuxRowFree
from transfer.manager import DuplicateRoomError
from transfer.protocol import TransferState

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    req: Request
    msg: GenerateRequest
    receiver: KVReceiver | None = None
    since: float = 0.0


class DecodeScheduler(SchedulerLoop):
    role = Role.DECODE

    def __init__(self, engine: Engine, transfer_cfg: TransferConfig, ipc_in: str, ipc_out: str) -> None:
        super().__init__(engine, ipc_in, ipc_out)
        self.transfer = DecodeTransferManager(transfer_cfg, engine.pool)
        self.admitting: deque[_Pending] = deque()
        self.receiving: dict[str, _Pending] = {}
        self.logprobs: dict[str, bool] = {}  # rid -> return_logprob, for every request not yet ended

    def on_generate(self, msg: GenerateRequest) -> None:
        try:
            req = self.engine.make_request(msg.input_ids, SamplingParams(**msg.sampling), msg.rid)
        except ValueError as e:
            # never admitted, so nothing to forget; `msg.rid` may even be a live request's (a duplicate id)
            super().fail(msg.rid, str(e), 400, len(msg.input_ids))
            return
        self.logprobs[req.rid] = msg.return_logprob
        if msg.bootstrap_room is None:
            # no prefill named: run it here (health_generate, or a colocated request)
            self.engine.scheduler.add(req)
            self.engine.track(req)
            return
        self.admitting.append(_Pending(req, msg, since=time.monotonic()))

    def on_abort(self, rid: str) -> None:
        for p in list(self.admitting):
            if p.req.rid == rid:
                self.admitting.remove(p)
                self.fail(rid, "aborted", 499)
                return
        p = self.receiving.pop(rid, None)
        if p is not None:
            assert p.receiver is not None
            p.receiver.abort("aborted by client")
            self.reaper.hold(p.req, p.receiver)
            self.fail(rid, "aborted", 499)
            return
        if self.engine.abort(rid):
            self.fail(rid, "aborted", 499)

    def step(self) -> bool:
        worked = self._admit()
        worked |= self._poll_transfers()
        self.reaper.reap()
        if self.engine.has_work:
            touched = self.engine.step()
            for req in touched:
                self.emit_output(req)
            worked |= bool(touched)
        return worked

    def emit_output(self, req: Request) -> None:
        """Send what `req` produced; its last output ends its bookkeeping."""
        self.emit(req, self.logprobs.get(req.rid, False))
        if req.finished:
            self.logprobs.pop(req.rid, None)

    def fail(self, rid: str, error: str, status: int, prompt_tokens: int = 0) -> None:
        # every failure and abort ends here: forget the request with its answer
        self.logprobs.pop(rid, None)
        super().fail(rid, error, status, prompt_tokens)

    def _admit(self) -> bool:
        worked = False
        alloc = self.engine.pool.allocator
        while self.admitting:
            p = self.admitting[0]
            pages = alloc.allocate(self.engine.scheduler.pages_needed(p.req))
            if pages is None:
                break  # FIFO: wait for pages to come back
            self.admitting.popleft()
            p.req.pages = pages
            msg = p.msg
            addr = f"{msg.bootstrap_host}:{msg.bootstrap_port or DEFAULT_BOOTSTRAP_PORT}"
            prompt_pages = self.engine.pool.pages_for(len(p.req.prompt_ids))
            try:
                p.receiver = self.transfer.create_receiver(
                    msg.bootstrap_room, addr, pages[:prompt_pages], len(p.req.prompt_ids)
                )
            except DuplicateRoomError as e:
                alloc.free(pages)
                self.fail(p.req.rid, str(e), 400, len(p.req.prompt_ids))
                continue
            except NoAuxRowFree as e:  # try again once a room ended
                alloc.free(pages)
                p.req.pages = []
                self.admitting.appendleft(p)
                log.debug("decode: admission deferred: %s", e)
                break
            now = time.monotonic()
            self.metrics.request_stage.labels(self.role.value, Stage.DECODE_ADMIT.value).observe(now - p.since)
            p.since = now
            self.receiving[p.req.rid] = p
            worked = True
        return worked

    def _poll_transfers(self) -> bool:
        worked = False
        for rid, p in list(self.receiving.items()):
            assert p.receiver is not None
            state = p.receiver.poll()
            if state == TransferState.SUCCESS:
                self.metrics.kv_transfer_seconds.labels(self.role.value).observe(time.monotonic() - p.since)
                row = p.receiver.result()
                p.receiver.release()
                del self.receiving[rid]
                self.engine.admit_prefilled(p.req, row.first_token, row.logprob)
                self.emit_output(p.req)  # a one-token request ends with the prefill's token
                worked = True
            elif state == TransferState.FAILED:
                del self.receiving[rid]
                self.fail_transfer(p.req, p.receiver, Stage.KV_TRANSFER, "KV transfer failed")
                worked = True
        return worked

    def stats(self) -> SchedulerStats:
        pool = self.engine.pool
        return SchedulerStats(
            running=len(self.engine.scheduler.running) + len(self.receiving),
            queued=len(self.admitting) + len(self.engine.scheduler.waiting),
            kv_pages_used=pool.num_pages - pool.allocator.num_free,
            kv_pages_total=pool.num_pages,
            in_flight_transfers=len(self.receiving),
        )
