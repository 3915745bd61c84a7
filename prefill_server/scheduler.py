"""Prefill scheduler: bootstrap queue → prefill batches → KV sends → answer once the transfer ended.

A request waits in `bootstrapping` until decode's transfer info arrived (its `KVSender` is ready), then in
`waiting` for a batch (token budget, batch size, free pages). A batch runs in `forward.prefill_and_send`:
layer group by layer group, each group's KV handed to the transfer worker as soon as its compute is
recorded (DESIGN §4), or as one whole forward whose KV and aux row go out together when pipelining does
not pay. Requests then sit in `inflight` until their transfer succeeded or failed; pages of a failed or
aborted request go back only when no write can still read them (`reaper`).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

from contracts.metrics import BatchMode, Role, Stage
from engine.engine import Engine
from engine.request import Request
from engine.sampling import SamplingParams
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
        self.bootstrap = BootstrapServer(bootstrap_host, bootstrap_port).start()
        addr = f"127.0.0.1:{self.bootstrap.port}"
        self.transfer = PrefillTransferManager(transfer_cfg, engine.pool, bootstrap_addr=addr)
        self.bootstrapping: dict[str, _Job] = {}
        self.waiting: deque[_Job] = deque()
        self.inflight: dict[str, _Job] = {}

    def info(self) -> dict:
        return {**super().info(), "bootstrap_port": self.bootstrap.port, "transfer_backend": self.transfer.cfg.backend}

    # -- requests -------------------------------------------------------------------------------------

    def on_generate(self, msg: GenerateRequest) -> None:
        # The prefill produces exactly one token: the decode side generates the rest.
        sampling = dict(msg.sampling, max_new_tokens=1)
        try:
            req = self.engine.make_request(msg.input_ids, SamplingParams(**sampling), msg.rid)
        except ValueError as e:
            self.fail(msg.rid, str(e), 400, len(msg.input_ids))
            return
        if msg.bootstrap_room is None:
            self.waiting.append(_Job(req, msg, None))
            return
        try:
            sender = self.transfer.create_sender(msg.bootstrap_room)
        except DuplicateRoomError as e:
            self.fail(msg.rid, str(e), 400, len(msg.input_ids))
            return
        self.bootstrapping[req.rid] = _Job(req, msg, sender)

    def on_abort(self, rid: str) -> None:
        job = self.bootstrapping.pop(rid, None) or self.inflight.pop(rid, None)
        if job is None:
            job = next((j for j in self.waiting if j.req.rid == rid), None)
            if job is None:
                return
            self.waiting.remove(job)
        if job.sender is not None:
            job.sender.abort("aborted by client")
        self.reaper.hold(job.req, job.sender)
        self.fail(rid, "aborted", 499, len(job.req.prompt_ids))

    # -- the loop -------------------------------------------------------------------------------------

    def _step(self) -> bool:
        worked = self._poll_bootstrap()
        batch = self._next_batch()
        if batch:
            self._forward(batch)
            worked = True
        worked |= self._poll_inflight()
        self.reaper.reap()
        return worked

    def _poll_bootstrap(self) -> bool:
        worked = False
        for rid, job in list(self.bootstrapping.items()):
            assert job.sender is not None
            state = job.sender.poll()
            if job.sender.ready and state != TransferState.FAILED:
                del self.bootstrapping[rid]
                now = time.monotonic()
                self.metrics.request_stage.labels(self.role.value, Stage.BOOTSTRAP.value).observe(now - job.since)
                job.since = now
                self.waiting.append(job)
                worked = True
            elif state == TransferState.FAILED:
                del self.bootstrapping[rid]
                self.fail_transfer(job.req, job.sender, Stage.BOOTSTRAP, "bootstrap failed")
                worked = True
        return worked

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
        sample, groups = prefill_and_send(self.engine, reqs, senders, rooms, self.pipeline)
        t1 = time.monotonic()
        mode = BatchMode.PIPELINED if len(groups) > 1 else BatchMode.WHOLE
        self.metrics.prefill_batches.labels(mode.value).inc()
        for job in batch:
            self.metrics.request_stage.labels(self.role.value, Stage.PREFILL_FORWARD.value).observe(t1 - t0)
            job.since = t1
        for job, token, logprob in zip(batch, sample.token_ids.tolist(), sample.logprobs.tolist(), strict=True):
            job.token, job.logprob = token, logprob
            if job.sender is None:
                self._answer(job)
                self.engine.pool.allocator.free(job.req.pages)
            elif job.sender.poll() == TransferState.FAILED:  # aborted or timed out while computing
                # not counted as a transfer failure here (it never was); its pages wait like any other's
                self.reaper.hold(job.req, job.sender)
                self.fail(job.req.rid, f"KV transfer failed: {job.sender.error}", 500, len(job.req.prompt_ids))
            else:
                self.inflight[job.req.rid] = job

    def _poll_inflight(self) -> bool:
        worked = False
        for rid, job in list(self.inflight.items()):
            assert job.sender is not None
            state = job.sender.poll()
            if state == TransferState.SUCCESS:
                del self.inflight[rid]
                elapsed = time.monotonic() - job.since
                self.metrics.request_stage.labels(self.role.value, Stage.KV_TRANSFER.value).observe(elapsed)
                self.metrics.kv_transfer_seconds.labels(self.role.value).observe(elapsed)
                self._answer(job)
                job.sender.release()
                self.engine.pool.allocator.free(job.req.pages)
                worked = True
            elif state == TransferState.FAILED:
                del self.inflight[rid]
                self.fail_transfer(job.req, job.sender, Stage.KV_TRANSFER, "KV transfer failed")
                worked = True
        return worked

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
            self.metrics.kv_transfer_bytes.labels(self.role.value).inc(sent - self._bytes_counted)
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
