"""Prefill scheduler: bootstrap queue → prefill batches → KV sends → answer once the transfer ended.

A request waits in `bootstrapping` until decode's transfer info arrived (its `KVSender` is ready), then in
`waiting` for a batch (token budget, batch size, free pages). A batch runs in `forward.prefill_and_send`:
layer group by layer group, each group's KV handed to the transfer worker as soon as its compute is
recorded (DESIGN §4), or as one whole forward whose KV and aux row go out together when pipelining does
not pay. Requests then sit in `inflight` until their transfer succeeded or failed; pages of a failed or
aborted request go back only when no write can still read them (`reaper`). A batch whose forward raises
fails every one of its jobs (500) and aborts their rooms; a row with non-finite logits fails its job alone.
`jobs` indexes every live job, so each path that ends one (`_forget`) leaves nothing behind.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

from contracts.metrics import BatchMode, Role, Stage, get_metrics
from engine.engine import Engine
from engine.request import Request
from engine.sampling import NON_FINITE_LOGITS, SamplingParams
from prefill_server.forward import prefill_and_send
from serving.ipc import GenerateRequest, RequestOutput, SchedulerStats
from serving.scheduler_loop import SchedulerLoop
from transfer.bootstrap import BootstrapServer
from transfer.config import TransferConfig
from transfer.manager import DuplicateRoomError
from transfer.planner import PipelineSettings
from transfer.prefill import KVSender, PrefillTransferManager
from transfer.protocol import TransferState

log = logging.getLogger(__name__)


@dataclass
class _Job:
    req: Request
    msg: GenerateRequest
    sender: KVSender | None  # None: a local request (health_generate), nothing to send
    since: float = field(default_factory=time.monotonic)
    token: int = -1
    logprob: float = 0.0


class PrefillScheduler(SchedulerLoop):
    role = Role.PREFILL

    def __init__(
        self,
        engine: Engine,
        transfer_cfg: TransferConfig,
        ipc_in: str,
        ipc_out: str,
        bootstrap_port: int,
        bootstrap_host: str = "0.0.0.0",
        pipeline: PipelineSettings | None = None,
    ) -> None:
        super().__init__(engine, ipc_in, ipc_out)
        self.pipeline = pipeline or PipelineSettings()
        self._bytes_counted = 0
        # Rank 0 runs the bootstrap server; every rank (rank 0 too) registers its own entry there, once the
        # server is up (the barrier), and the server answers decode only once all of them did.
        self.bootstrap = BootstrapServer(bootstrap_host, bootstrap_port).start() if self.sync.leader else None
        self.sync.barrier()
        addr = f"127.0.0.1:{self.bootstrap.port if self.bootstrap else bootstrap_port}"
        self.transfer = PrefillTransferManager(transfer_cfg, engine.pool, bootstrap_addr=addr)
        # Every live job by rid, whichever stage holds it (bootstrapping, waiting, a batch, inflight); a job
        # leaves it exactly when it is answered (`_forget`), so it is empty whenever nothing is in flight.
        self.jobs: dict[str, _Job] = {}
        self.bootstrapping: dict[str, _Job] = {}
        self.waiting: deque[_Job] = deque()
        self.inflight: dict[str, _Job] = {}

    def info(self) -> dict:
        port = self.bootstrap.port if self.bootstrap else None
        return {**super().info(), "bootstrap_port": port, "transfer_backend": self.transfer.cfg.backend}

    # -- requests -------------------------------------------------------------------------------------

    def on_generate(self, msg: GenerateRequest) -> None:
        if msg.rid in self.jobs:  # the front makes rids unique: never let a second one touch the first
            self.reject(msg.rid, f"request id {msg.rid!r} is already in use", 400, len(msg.input_ids))
            return
        # The prefill produces exactly one token: the decode side generates the rest.
        sampling = dict(msg.sampling, max_new_tokens=1)
        try:
            req = self.engine.make_request(msg.input_ids, SamplingParams(**sampling), msg.rid)
        except (ValueError, TypeError) as e:
            self.reject(msg.rid, str(e), 400, len(msg.input_ids))
            return
        job = _Job(req, msg, None)
        if msg.bootstrap_room is not None:
            try:
                job.sender = self.sync.track(self.transfer.create_sender(msg.bootstrap_room))
            except DuplicateRoomError as e:
                self.reject(msg.rid, str(e), 400, len(msg.input_ids))
                return
        try:
            self.jobs[req.rid] = job
            if job.sender is None:
                self.waiting.append(job)  # a local request (health_generate): nothing to wait for
            else:
                self.bootstrapping[req.rid] = job
        except Exception as e:  # whatever it was, the room must not outlive the request
            self._internal_error(job, e)

    def on_abort(self, rid: str) -> None:
        job = self.jobs.get(rid)
        if job is not None:
            self._drop(job, "aborted", 499, room_reason="aborted by client")

    # -- how a job ends (each path answers it exactly once and takes it out of every table) ---------------

    def _forget(self, job: _Job) -> None:
        rid = job.req.rid
        self.jobs.pop(rid, None)
        self.bootstrapping.pop(rid, None)
        self.inflight.pop(rid, None)
        if job in self.waiting:  # O(len(waiting)), on aborts and failures only
            self.waiting.remove(job)

    def _drop(self, job: _Job, error: str, status: int, room_reason: str | None = None) -> None:
        """End `job` without a result: answer `error`, abort its room, hold its pages until no write can read
        them (a local job's go back at the next reap)."""
        self._forget(job)
        if job.sender is not None:
            job.sender.abort(room_reason or error)  # a no-op on a room that already failed
        self.reaper.hold(job.req, job.sender)
        self.fail(job.req.rid, error, status, len(job.req.prompt_ids))

    def _transfer_failed(self, job: _Job, stage: Stage, what: str) -> None:
        assert job.sender is not None
        self._forget(job)
        self.fail_transfer(job.req, job.sender, stage, what)

    def _succeeded(self, job: _Job) -> None:
        self._forget(job)
        self._answer(job)
        if job.sender is not None:
            job.sender.release()  # after SUCCESS no write reads the pages any more
        self.engine.pool.allocator.free(job.req.pages)
        job.req.pages = []

    def _internal_error(self, job: _Job, e: Exception) -> None:
        """A bug or an unexpected error while handling `job`: it alone fails, the loop goes on."""
        log.exception("prefill: request %s failed", job.req.rid)
        try:
            self._drop(job, f"internal error: {type(e).__name__}: {e}", 500)
        except Exception:  # its room is broken too: answer it at least; its pages stay out (never reused)
            log.exception("prefill: cannot release request %s; its pages stay quarantined", job.req.rid)
            self._forget(job)
            self.fail(job.req.rid, f"internal error: {type(e).__name__}: {e}", 500, len(job.req.prompt_ids))

    # -- the loop -------------------------------------------------------------------------------------

    def _step(self) -> bool:
        self.sync.refresh()  # every rank sees the same room states from here on (serving/rank_sync.py)
        worked = self._poll_bootstrap()
        self._poll_waiting()
        batch = self._next_batch()
        if batch:
            self._forward(batch)
            worked = True
        worked |= self._poll_inflight()
        self.reaper.reap()
        return worked

    def _poll_bootstrap(self) -> bool:
        worked = False
        for job in list(self.bootstrapping.values()):
            try:
                worked |= self._poll_one_bootstrap(job)
            except Exception as e:
                self._internal_error(job, e)
                worked = True
        return worked

    def _poll_one_bootstrap(self, job: _Job) -> bool:
        assert job.sender is not None
        state = job.sender.poll()
        if state == TransferState.FAILED:
            self._transfer_failed(job, Stage.BOOTSTRAP, "bootstrap failed")
            return True
        if not job.sender.ready:
            return False
        del self.bootstrapping[job.req.rid]
        now = time.monotonic()
        self.metrics.request_stage.labels(self.role.value, Stage.BOOTSTRAP.value).observe(now - job.since)
        job.since = now
        self.waiting.append(job)
        return True

    def _poll_waiting(self) -> None:
        """Answer at once the jobs whose room failed while they waited for a batch (decode aborted, or the
        room's deadline passed): they would otherwise wait for pages, run, and only then be failed."""
        for job in list(self.waiting):
            try:
                if job.sender is not None and job.sender.poll() == TransferState.FAILED:
                    self._transfer_failed(job, Stage.WAIT_FOR_INPUT, "KV transfer failed")
            except Exception as e:
                self._internal_error(job, e)

    def _next_batch(self) -> list[_Job]:
        cfg = self.engine.cfg
        batch: list[_Job] = []
        tokens = 0
        alloc = self.engine.pool.allocator
        while self.waiting and len(batch) < cfg.max_batch_size:
            job = self.waiting[0]
            n = len(job.req.prompt_ids)
            if batch and tokens + n > cfg.max_prefill_tokens:
                break
            pages = alloc.allocate(self.engine.pool.pages_for(n))
            if pages is None:
                break
            self.waiting.popleft()
            job.req.pages = pages
            batch.append(job)
            tokens += n
        return batch

    def _forward(self, batch: list[_Job]) -> None:
        reqs = [j.req for j in batch]
        senders = [j.sender for j in batch]
        rooms = [j.msg.bootstrap_room or 0 for j in batch]
        t0 = time.monotonic()
        for job in batch:
            self.metrics.request_stage.labels(self.role.value, Stage.WAIT_FOR_INPUT.value).observe(t0 - job.since)
            if job.msg.arrival_time:
                self.metrics.queue_time.labels(self.role.value).observe(max(0.0, time.time() - job.msg.arrival_time))
        try:
            sample, groups = prefill_and_send(self.engine, reqs, senders, rooms, self.pipeline)
        except Exception as e:
            if not self.sync.single:
                raise  # the ranks cannot retry in lockstep: the loop stops this rank, and the server with it
            # Every job of the batch is answered, and its room aborted: a pipelined batch may already have
            # queued some layer groups, so the pages wait in the reaper until those writes drained.
            log.exception("prefill: a batch of %d requests failed in the forward", len(batch))
            for job in batch:
                self._drop(job, f"internal error in the prefill forward: {type(e).__name__}: {e}", 500)
            return
        t1 = time.monotonic()
        mode = BatchMode.PIPELINED if len(groups) > 1 else BatchMode.WHOLE
        self.metrics.prefill_batches.labels(mode.value).inc()
        rows = zip(batch, sample.tokens, sample.token_logprobs, sample.ok(), strict=True)
        for job, token, logprob, ok in rows:
            self.metrics.request_stage.labels(self.role.value, Stage.PREFILL_FORWARD.value).observe(t1 - t0)
            job.since = t1
            job.token, job.logprob = token, logprob
            try:
                self._after_forward(job, ok)
            except Exception as e:
                self._internal_error(job, e)

    def _after_forward(self, job: _Job, ok: bool) -> None:
        if not ok:  # this row's logits were NaN/inf: prefill_and_send sent no aux row, so no Success
            self._drop(job, NON_FINITE_LOGITS, 500)
        elif job.sender is None:
            self._succeeded(job)
        elif job.sender.poll() == TransferState.FAILED:  # aborted or timed out while computing
            # not counted as a transfer failure here (it never was); its pages wait like any other's
            self._forget(job)
            self.reaper.hold(job.req, job.sender)
            self.fail(job.req.rid, f"KV transfer failed: {job.sender.error}", 500, len(job.req.prompt_ids))
        else:
            self.inflight[job.req.rid] = job

    def _poll_inflight(self) -> bool:
        worked = False
        for job in list(self.inflight.values()):
            try:
                worked |= self._poll_one_inflight(job)
            except Exception as e:
                self._internal_error(job, e)
                worked = True
        return worked

    def _poll_one_inflight(self, job: _Job) -> bool:
        assert job.sender is not None
        state = job.sender.poll()
        if state == TransferState.SUCCESS:
            elapsed = time.monotonic() - job.since
            self.metrics.request_stage.labels(self.role.value, Stage.KV_TRANSFER.value).observe(elapsed)
            self.metrics.kv_transfer_seconds.labels(self.role.value).observe(elapsed)
            self._succeeded(job)
            return True
        if state == TransferState.FAILED:
            self._transfer_failed(job, Stage.KV_TRANSFER, "KV transfer failed")
            return True
        return False

    def _answer(self, job: _Job) -> None:
        text = self.engine.tokenizer.decode([job.token])
        self.send(
            RequestOutput(
                job.req.rid,
                token_ids=[job.token],
                text=text,
                logprobs=[job.logprob] if job.msg.return_logprob else [],
                finished=True,
                finish_reason="length",
                prompt_tokens=len(job.req.prompt_ids),
                completion_tokens=1,
            )
        )

    def step(self) -> bool:
        worked = self._step()
        sent = self.transfer.bytes_total
        if sent > self._bytes_counted:
            # every rank writes its own KV: the total adds them up, the per-rank counter tells them apart
            get_metrics().kv_transfer_bytes.labels(self.role.value).inc(sent - self._bytes_counted)
            get_metrics().kv_transfer_rank_bytes.labels(self.role.value, str(self.sync.rank)).inc(
                sent - self._bytes_counted
            )
            self._bytes_counted = sent
        return worked

    def stats(self) -> SchedulerStats:
        pool = self.engine.pool
        return SchedulerStats(
            running=len(self.inflight),
            queued=len(self.bootstrapping) + len(self.waiting),
            kv_pages_used=pool.num_pages - pool.allocator.num_free,
            kv_pages_total=pool.num_pages,
            in_flight_transfers=len(self.inflight),
        )
