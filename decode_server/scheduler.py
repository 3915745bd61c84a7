"""Decode scheduler: admission by need, KV receive, then continuous-batching decode with the engine's runner,
sampler and stop handling.

A request moves: `admitting` (waiting for pages) → `receiving` (transfer in flight) → the engine's running batch →
done. Admission is the engine scheduler's rule (engine/scheduler.py `reserve_incoming`): the prompt's pages plus
the expected further output must fit beside the running requests' expected growth; pages for generated tokens are
taken as they come, and when the pool runs out the engine retracts the newest running request, which recomputes
its prompt + generated tokens here, in a MIXED batch, and goes on. A request the router sent without bootstrap
fields (a short prompt: conditional disaggregation) is prefilled here the same way.

Pages of a failed transfer go back only when the transfer layer says no write can still land in them (`reaper`
holds them until then). Every way a request ends (its last output, `fail`)
also drops its per-request bookkeeping (`logprobs`), so aborted requests leave nothing behind. A failure
belongs to its request only: the engine fails a row with non-finite logits or a forward that keeps raising
(`Engine.step`), and a room handle that raises fails its own request; the rest of the batch goes on.
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
        self._retractions_counted = 0

    def on_generate(self, msg: GenerateRequest) -> None:
        if msg.rid in self.logprobs:
            # the front makes rids unique, so this is a bug upstream; answering must not touch the live
            # request's bookkeeping (super().fail would drop its stream offsets)
            self.reject(msg.rid, f"request id {msg.rid!r} is already in use", 400, len(msg.input_ids))
            return
        try:
            req = self.engine.make_request(msg.input_ids, SamplingParams(**msg.sampling), msg.rid)
        except (ValueError, TypeError) as e:
            self.reject(msg.rid, str(e), 400, len(msg.input_ids))  # never admitted: nothing to forget
            return
        self.logprobs[req.rid] = msg.return_logprob
        try:
            if msg.bootstrap_room is None:
                # no prefill named: run it here (health_generate, or a colocated request)
                self.engine.scheduler.add(req)
                self.engine.track(req)
            else:
                self.admitting.append(_Pending(req, msg, since=time.monotonic()))
        except Exception as e:
            log.exception("decode: cannot queue %s", req.rid)
            self.engine.fail(req, f"internal error queueing the request: {e}")
            self.emit_output(req)

    def on_abort(self, rid: str) -> None:
        for p in list(self.admitting):
            if p.req.rid == rid:
                self.admitting.remove(p)
                self.fail(rid, "aborted", 499)
                return
        p = self.receiving.pop(rid, None)
        if p is not None:
            assert p.receiver is not None
            self.engine.scheduler.drop_incoming(p.req)
            p.receiver.abort("aborted by client")
            self.reaper.hold(p.req, p.receiver)
            self.fail(rid, "aborted", 499)
            return
        if self.engine.abort(rid):
            self.fail(rid, "aborted", 499)

    def step(self) -> bool:
        self.sync.refresh()  # every rank sees the same room states from here on (serving/rank_sync.py)
        worked = self._admit()
        worked |= self._poll_transfers()
        self.reaper.reap()
        if self.engine.has_work or self.engine.dp is not None:  # DP attention: every rank steps, to agree
            touched = self.engine.step()
            for req in touched:
                self.emit_output(req)
            worked |= bool(touched)
        return worked

    def emit_output(self, req: Request) -> None:
        """Send what `req` produced; its last output ends its bookkeeping (a failed request's is its error)."""
        if req.error is not None:  # the engine failed it (non-finite logits, a forward that raised)
            self.fail(req.rid, req.error, 500, len(req.prompt_ids))
            return
        self.emit(req, self.logprobs.get(req.rid, False))
        if req.finished:
            self.logprobs.pop(req.rid, None)

    def fail(self, rid: str, error: str, status: int, prompt_tokens: int = 0) -> None:
        # every failure and abort ends here: forget the request with its answer
        self.logprobs.pop(rid, None)
        super().fail(rid, error, status, prompt_tokens)

    def _admit(self) -> bool:
        worked = False
        while self.admitting:
            p = self.admitting[0]
            if not self.engine.scheduler.reserve_incoming(p.req):
                break  # FIFO: wait for pages to come back (or for older requests to go first)
            self.admitting.popleft()
            try:
                p.receiver = self._create_receiver(p)
            except NoAuxRowFree as e:  # try again once a room ended
                self._unadmit(p)
                self.admitting.appendleft(p)
                log.debug("decode: admission deferred: %s", e)
                break
            except DuplicateRoomError as e:
                self._unadmit(p)
                self.fail(p.req.rid, str(e), 400, len(p.req.prompt_ids))
                continue
            except Exception as e:  # e.g. a bootstrap address the transfer layer rejects
                log.exception("decode: cannot create the receiver of %s", p.req.rid)
                self._unadmit(p)
                self.fail(p.req.rid, f"cannot start the KV transfer: {e}", 500, len(p.req.prompt_ids))
                continue
            now = time.monotonic()
            self.metrics.request_stage.labels(self.role.value, Stage.DECODE_ADMIT.value).observe(now - p.since)
            p.since = now
            self.receiving[p.req.rid] = p
            worked = True
        return worked

    def _create_receiver(self, p: _Pending) -> KVReceiver:
        msg = p.msg
        addr = f"{msg.bootstrap_host}:{msg.bootstrap_port or DEFAULT_BOOTSTRAP_PORT}"
        prompt_pages = self.engine.pool.pages_for(len(p.req.prompt_ids))
        assert msg.bootstrap_room is not None
        receiver = self.transfer.create_receiver(
            msg.bootstrap_room, addr, p.req.pages[:prompt_pages], len(p.req.prompt_ids)
        )
        return self.sync.track(receiver)

    def _unadmit(self, p: _Pending) -> None:
        """Give back the pages of a request whose room was never created (no write can target them)."""
        self.engine.scheduler.drop_incoming(p.req)
        self.engine.pool.allocator.free(p.req.pages)
        p.req.pages = []

    def _poll_transfers(self) -> bool:
        worked = False
        for rid, p in list(self.receiving.items()):
            assert p.receiver is not None
            try:
                state = p.receiver.poll()
            except Exception as e:  # a bug in the transfer layer: this request fails, the others go on
                del self.receiving[rid]
                self.engine.scheduler.drop_incoming(p.req)
                self._internal_error(p, p.receiver, e)
                worked = True
                continue
            if state == TransferState.SUCCESS:
                self.metrics.kv_transfer_seconds.labels(self.role.value).observe(time.monotonic() - p.since)
                del self.receiving[rid]
                self._join(p, p.receiver)
                worked = True
            elif state == TransferState.FAILED:
                del self.receiving[rid]
                self.engine.scheduler.drop_incoming(p.req)
                self.fail_transfer(p.req, p.receiver, Stage.KV_TRANSFER, "KV transfer failed")
                worked = True
        return worked

    def _internal_error(self, p: _Pending, receiver: KVReceiver, e: Exception) -> None:
        log.exception("decode: request %s failed", p.req.rid)
        error = f"internal error: {type(e).__name__}: {e}"
        try:
            receiver.abort(error)
            self.reaper.hold(p.req, receiver)  # its pages go back once no write can land in them
        except Exception:  # the room is broken too: its pages stay out of the pool (never reused)
            log.exception("decode: cannot abort the room of %s; its pages stay quarantined", p.req.rid)
        self.fail(p.req.rid, error, 500, len(p.req.prompt_ids))

    def _join(self, p: _Pending, receiver: KVReceiver) -> None:
        """The room succeeded: join the running batch from the prefill's first token."""
        try:
            row = receiver.result()
            self.engine.admit_prefilled(p.req, row.first_token, row.logprob)
        except Exception as e:  # whatever it was, the request must be answered and its pages come back
            log.exception("decode: cannot join %s to the running batch", p.req.rid)
            self.engine.fail(p.req, f"internal error joining the running batch: {e}")  # frees its pages
        # after SUCCESS no write can land in the pages any more, so the room goes now and the pages are ours
        receiver.release()
        self.emit_output(p.req)  # a one-token request ends with the prefill's token

    def stats(self) -> SchedulerStats:
        pool, sched = self.engine.pool, self.engine.scheduler
        self._publish_admission_metrics()
        return SchedulerStats(
            running=len(sched.running) + len(sched.prefilling) + len(self.receiving),
            queued=len(self.admitting) + len(sched.waiting),
            kv_pages_used=pool.num_pages - pool.allocator.num_free,
            kv_pages_total=pool.num_pages,
            in_flight_transfers=len(self.receiving),
        )

    def _publish_admission_metrics(self) -> None:
        """The engine scheduler's admission state as metrics: retractions, the headroom estimate and its pages."""
        headroom = self.engine.scheduler.headroom
        role = self.role.value
        self.metrics.retractions.labels(role).inc(headroom.retractions - self._retractions_counted)
        self._retractions_counted = headroom.retractions
        self.metrics.headroom_ratio.labels(role).set(headroom.ratio)
        self.metrics.headroom_pages.labels(role).set(self.engine.scheduler.headroom_pages())
