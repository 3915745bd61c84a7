"""Decode scheduler: admission (reserve every page a request can need, never over-commit), KV receive,
then continuous-batching decode with the engine's runner, sampler and stop handling.

A request moves: `admitting` (waiting for free pages) → `receiving` (transfer in flight) → the engine's
running batch → done. Pages of a failed transfer go back only when the transfer layer says no write can
still land in them (`zombies` holds them until then).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

from contracts.metrics import count_failure, get_metrics
from engine.engine import Engine
from engine.request import FinishReason, Request
from engine.sampling import SamplingParams
from serving.ipc import GenerateRequest, SchedulerStats
from serving.scheduler_loop import SchedulerLoop
from transfer.config import TransferConfig
from transfer.decode import DecodeTransferManager, KVReceiver
from transfer.manager import DuplicateRoomError
from transfer.protocol import TransferState

log = logging.getLogger(__name__)

DEFAULT_BOOTSTRAP_PORT = 8998


@dataclass
class _Pending:
    req: Request
    msg: GenerateRequest
    receiver: KVReceiver | None = None
    since: float = 0.0


class DecodeScheduler(SchedulerLoop):
    role = "decode"

    def __init__(self, engine: Engine, transfer_cfg: TransferConfig, ipc_in: str, ipc_out: str) -> None:
        super().__init__(engine, ipc_in, ipc_out)
        self.transfer = DecodeTransferManager(transfer_cfg, engine.pool)
        self.admitting: deque[_Pending] = deque()
        self.receiving: dict[str, _Pending] = {}
        self.zombies: list[_Pending] = []  # failed transfers whose pages may still be written
        self.logprobs: dict[str, bool] = {}
        self.metrics = get_metrics()

    def on_generate(self, msg: GenerateRequest) -> None:
        try:
            req = self.engine.make_request(msg.input_ids, SamplingParams(**msg.sampling), msg.rid)
        except ValueError as e:
            self.fail(msg.rid, str(e), 400, len(msg.input_ids))
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
            self.zombies.append(p)
            self.fail(rid, "aborted", 499)
            return
        if self.engine.abort(rid):
            self.fail(rid, "aborted", 499)

    def step(self) -> bool:
        worked = self._admit()
        worked |= self._poll_transfers()
        self._reap_zombies()
        if self.engine.has_work:
            touched = self.engine.step()
            for req in touched:
                self.emit(req, self.logprobs.get(req.rid, False))
                if req.finished:
                    self.logprobs.pop(req.rid, None)
            worked |= bool(touched)
        return worked

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
            except RuntimeError as e:  # no aux row free: try again later
                alloc.free(pages)
                p.req.pages = []
                self.admitting.appendleft(p)
                log.debug("decode: admission deferred: %s", e)
                break
            now = time.monotonic()
            self.metrics.request_stage.labels(self.role, "decode_admit").observe(now - p.since)
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
                self.metrics.kv_transfer_seconds.labels(self.role).observe(time.monotonic() - p.since)
                row = p.receiver.result()
                p.receiver.release()
                del self.receiving[rid]
                self.engine.admit_prefilled(p.req, row.first_token, row.logprob)
                self.emit(p.req, self.logprobs.get(rid, False))
                if p.req.finished:  # a one-token request ends with the prefill's token
                    self.logprobs.pop(rid, None)
                worked = True
            elif state == TransferState.FAILED:
                del self.receiving[rid]
                count_failure(self.metrics, self.role, "kv_transfer", p.receiver.error)
                self.zombies.append(p)
                self.fail(rid, f"KV transfer failed: {p.receiver.error}", 500, len(p.req.prompt_ids))
                self.logprobs.pop(rid, None)
                worked = True
        return worked

    def _reap_zombies(self) -> None:
        for p in list(self.zombies):
            assert p.receiver is not None
            if p.receiver.safe_to_free():
                p.receiver.release()
                self.engine.pool.allocator.free(p.req.pages)
                p.req.pages = []
                p.req.finish_reason = FinishReason.ABORT
                self.zombies.remove(p)

    def stats(self) -> SchedulerStats:
        pool = self.engine.pool
        return SchedulerStats(
            running=len(self.engine.scheduler.running) + len(self.receiving),
            queued=len(self.admitting) + len(self.engine.scheduler.waiting),
            kv_pages_used=pool.num_pages - pool.allocator.num_free,
            kv_pages_total=pool.num_pages,
            in_flight_transfers=len(self.receiving),
        )
