"""Prefill scheduler: bootstrap queue → prefill batches → KV sends → answer once the transfer ended.

A request waits in `bootstrapping` until decode's transfer info arrived (its `KVSender` is ready), then in the
batcher (prefill_server/batcher.py) for its rows: its whole prompt in one forward, or chunk by chunk when it is
longer than `--chunked-prefill-size`, other prompts' rows running between its chunks. Its pages are taken when
its first row is formed, starting with the longest prefix the prefix cache holds (prefill_server/page_book.py);
those cached pages are sent at once, before the forward, and each row's pages as soon as they are computed:
layer group by layer group when pipelining pays (DESIGN §4), else after the forward (`forward.prefill_rows`).
The last row samples the first token and carries the aux row. The request then sits in `inflight` until its
transfer succeeded or failed; its pages go back (cached ones unlocked, its own freed) only when no write can
still read them (`reaper`). A batch whose forward raises fails every one of its jobs (500) and aborts their rooms;
a row with non-finite logits fails its job alone. `jobs` indexes every live job, so each path that ends one
(`_forget`) leaves nothing behind.
"""

from __future__ import annotations

import logging
import time

from contracts.metrics import BatchMode, Role, Stage, get_metrics
from engine.engine import Engine
from engine.sampling import NON_FINITE_LOGITS, SampleOutput, SamplingParams
from prefill_server.batcher import PrefillBatcher, PrefillJob, Row
from prefill_server.forward import PrefillRow, prefill_rows, send_cached_prefix
from prefill_server.page_book import PageBook
from serving.ipc import GenerateRequest, RequestOutput, SchedulerStats
from serving.scheduler_loop import SchedulerLoop
from transfer.bootstrap import BootstrapServer
from transfer.config import TransferConfig
from transfer.manager import DuplicateRoomError
from transfer.planner import PipelineSettings
from transfer.prefill import PrefillTransferManager
from transfer.protocol import TransferState

log = logging.getLogger(__name__)


_Job = PrefillJob


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
        prefix_cache: bool = True,
    ) -> None:
        super().__init__(engine, ipc_in, ipc_out)
        self.pipeline = pipeline or PipelineSettings()
        cfg = engine.cfg
        self.book = PageBook(engine.pool.allocator, cfg.page_size, prefix_cache)
        self.reaper.release_pages = self.book.release
        for counter in (self.metrics.prompt_tokens, self.metrics.cached_prompt_tokens, self.metrics.prefill_chunks):
            counter.labels(self.role.value)  # exported from 0, so rate() and the hit rate work from the start
        if engine.cp is not None:
            self.metrics.cp_batches.labels(self.role.value)
        self.batcher = PrefillBatcher(
            self.book, cfg.page_size, cfg.max_batch_size, cfg.max_prefill_tokens, cfg.chunked_prefill_size
        )
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
        self.inflight: dict[str, _Job] = {}

    def info(self) -> dict:
        port = self.bootstrap.port if self.bootstrap else None
        return {
            **super().info(),
            "bootstrap_port": port,
            "transfer_backend": self.transfer.cfg.backend,
            "chunked_prefill_size": self.batcher.chunk_size,
            "prefix_cache": self.book.cache is not None,
        }

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
                self.batcher.waiting.append(job)  # a local request (health_generate): nothing to wait for
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
        self.batcher.remove(job)

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
        self.book.release(job.req)

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
        rows = self.batcher.next_rows()
        if rows:
            self._forward(rows)
            worked = True
        elif self.engine.dp is not None:  # DP attention: agree with the other ranks; run IDLE if one has a batch
            self.engine.runner.idle_step(bool(self.jobs))
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
        self.batcher.waiting.append(job)
        return True

    def _poll_waiting(self) -> None:
        """Answer at once the jobs whose room failed while they waited for a batch or between chunks (decode
        aborted, or the room's deadline passed): they would otherwise run on, and only then be failed."""
        for job in self.batcher.jobs():
            try:
                if job.sender is not None and job.sender.poll() == TransferState.FAILED:
                    # between two chunks of its prompt, its first chunks' KV may be on the way already
                    stage = Stage.KV_TRANSFER if job.cached >= 0 else Stage.WAIT_FOR_INPUT
                    self._transfer_failed(job, stage, "KV transfer failed")
            except Exception as e:
                self._internal_error(job, e)

    def _forward(self, rows: list[Row]) -> None:
        t0 = time.monotonic()
        for job, start, _ in rows:
            if start == job.cached:  # its first row
                self._count_start(job, t0)
        room_rows = [PrefillRow(j.req, j.sender, j.msg.bootstrap_room or 0, start, n) for j, start, n in rows]
        try:
            for (job, start, _), row in zip(rows, room_rows, strict=True):
                if start == job.cached:
                    send_cached_prefix(self.engine, row)
            result = prefill_rows(self.engine, room_rows, self.pipeline)
        except Exception as e:
            if not self.sync.single:
                raise  # the ranks cannot retry in lockstep: the loop stops this rank, and the server with it
            # Every job of the batch is answered, and its room aborted: a pipelined batch may already have
            # queued some layer groups, so the pages wait in the reaper until those writes drained.
            log.exception("prefill: a batch of %d rows failed in the forward", len(rows))
            for job, _, _ in rows:
                self._drop(job, f"internal error in the prefill forward: {type(e).__name__}: {e}", 500)
            return
        t1 = time.monotonic()
        self.batcher.complete(rows)
        mode = BatchMode.PIPELINED if len(result.groups) > 1 else BatchMode.WHOLE
        self.metrics.prefill_batches.labels(mode.value).inc()
        chunks = sum(1 for job, start, n in rows if not (start == job.cached and start + n == len(job.req.prompt_ids)))
        if chunks:
            self.metrics.prefill_chunks.labels(self.role.value).inc(chunks)
        if self.engine.cp is not None:
            if result.cp_refusal is None:
                self.metrics.cp_batches.labels(self.role.value).inc()
            else:
                self.metrics.cp_fallbacks.labels(self.role.value, result.cp_refusal).inc()
        if result.sample is not None:
            self._sampled([rows[i][0] for i in result.sampled], result.sample, t1 - t0)

    def _sampled(self, jobs: list[_Job], sample: SampleOutput, forward_s: float) -> None:
        """`jobs`' last rows ran and sampled their first tokens (one row of `sample` each)."""
        now = time.monotonic()
        for job, token, logprob, ok in zip(jobs, sample.tokens, sample.token_logprobs, sample.ok(), strict=True):
            self.metrics.request_stage.labels(self.role.value, Stage.PREFILL_FORWARD.value).observe(forward_s)
            job.since = now
            job.token, job.logprob = token, logprob
            try:
                if ok:
                    self.book.publish(job.req)  # its KV is complete and finite: later prompts may reuse it
                self._after_forward(job, ok)
            except Exception as e:
                self._internal_error(job, e)

    def _count_start(self, job: _Job, now: float) -> None:
        """`job`'s prefill starts: its wait, and its prompt tokens with those the prefix cache gave it."""
        role = self.role.value
        self.metrics.request_stage.labels(role, Stage.WAIT_FOR_INPUT.value).observe(now - job.since)
        if job.msg.arrival_time:
            self.metrics.queue_time.labels(role).observe(max(0.0, time.time() - job.msg.arrival_time))
        self.metrics.prompt_tokens.labels(self.role.value).inc(len(job.req.prompt_ids))
        if job.cached:
            self.metrics.cached_prompt_tokens.labels(self.role.value).inc(job.cached)

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

    def close(self) -> None:
        if self.book.cache is not None:  # the pool may outlive this loop (tests build several on one engine)
            self.book.cache.clear()
        super().close()

    def stats(self) -> SchedulerStats:
        pool = self.engine.pool
        self.metrics.prefix_cache_pages.labels(self.role.value).set(self.book.cache_pages)
        return SchedulerStats(
            running=len(self.inflight) + len(self.batcher.prefilling),
            queued=len(self.bootstrapping) + len(self.batcher.waiting),
            kv_pages_used=self.book.pages_in_use,  # cached pages nobody holds are free to take
            kv_pages_total=pool.num_pages,
            in_flight_transfers=len(self.inflight),
            prefix_cache_pages=self.book.cache_pages,
        )
