"""The scheduler process's skeleton, shared by the prefill and decode servers.

It owns the model and the transfer manager, reads `GenerateRequest`/`AbortRequest` from the front, runs
`step()` whenever there is work, and pushes `RequestOutput`s and periodic `SchedulerStats` back. The two
servers differ only in `on_generate`, `on_abort` and `step`; what they share beyond the loop is here too:
answering the front (`emit`, `fail`) and giving up on a failed transfer (`fail_transfer`, `reaper`).

A message from the front that does not decode (another protocol version, an unknown type, garbage) is
logged and dropped: one bad message must not take the scheduler, and every request it holds, down.

Under tensor parallelism every rank runs this loop (serving/rank_sync.py): rank 0 alone talks to the front
and broadcasts what it read each turn, so every rank dispatches the same messages in the same order; the
other ranks send nothing back and count no request metrics (rank 0 counts each request once).
"""

from __future__ import annotations

import logging
import time
from typing import Any, ClassVar

import zmq

from contracts.codec import CodecError
from contracts.metrics import Role, Stage, get_metrics
from engine.engine import Engine
from engine.request import Request
from serving.ipc import AbortRequest, GenerateRequest, IpcMessage, Ready, RequestOutput, SchedulerStats, pack, unpack
from serving.page_reaper import PageReaper, TransferHandle
from serving.rank_sync import RankSync

log = logging.getLogger(__name__)

_STATS_EVERY_S = 0.5
_IDLE_WAIT_MS = 2
# With several ranks every loop turn is a broadcast from rank 0: idle turns wait a little longer so an idle
# server does not spend its CPUs on collectives (a message still wakes rank 0 at once).
_IDLE_WAIT_TP_MS = 10


class _NullMetric:
    """What the metrics of a rank other than 0 are: rank 0 counts each request, once."""

    def labels(self, *args: Any, **kwargs: Any) -> _NullMetric:
        return self

    def __getattr__(self, name: str) -> Any:  # inc, observe, set, ...
        return lambda *args, **kwargs: None


class _NullMetrics:
    def __getattr__(self, name: str) -> _NullMetric:
        return _NullMetric()


class SchedulerLoop:
    role: ClassVar[Role]  # set by each server's subclass; `role.value` is its metric label and log name

    def __init__(self, engine: Engine, ipc_to_scheduler: str, ipc_from_scheduler: str) -> None:
        self.engine = engine
        self.sync = RankSync(engine.tp, data_parallel=engine.dp is not None)
        # rank 0 counts each request once; under DP attention each rank counts its own
        self.metrics = get_metrics() if self.sync.leader or self.sync.data_parallel else _NullMetrics()
        self.reaper = PageReaper(engine.pool.allocator, self.metrics, self.role)  # type: ignore[arg-type]
        runner = engine.runner
        self._tbo_counted = (runner.tbo_steps, runner.two_chunk_steps, runner.idle_steps)  # warm-up's not counted
        if engine.runner.tbo_threshold is not None:
            for counter in (self.metrics.tbo_steps, self.metrics.tbo_two_chunk_steps):
                counter.labels(self.role.value)  # exported from 0
        if engine.dp is not None:
            self.metrics.dp_idle_steps.labels(self.role.value)
        self._ctx = zmq.Context()
        self._in = self._ctx.socket(zmq.PULL)
        self._out = self._ctx.socket(zmq.PUSH)
        if self.sync.leader:  # the other ranks hear the front through rank 0
            self._in.connect(ipc_to_scheduler)
        if self.sync.leader or self.sync.data_parallel:  # under DP attention each rank answers its own requests
            self._out.connect(ipc_from_scheduler)
        self._poller = zmq.Poller()
        self._poller.register(self._in, zmq.POLLIN)
        self._idle_wait_ms = _IDLE_WAIT_MS if self.sync.single else _IDLE_WAIT_TP_MS
        self._sent: dict[str, tuple[int, int]] = {}  # rid -> (tokens, text chars) already sent to the front
        self._last_stats = 0.0

    # -- to implement ---------------------------------------------------------------------------------

    def on_generate(self, req: GenerateRequest) -> None:
        raise NotImplementedError

    def on_abort(self, rid: str) -> None:
        raise NotImplementedError

    def step(self) -> bool:
        """Advance whatever can advance; False when there was nothing to do."""
        raise NotImplementedError

    def stats(self) -> SchedulerStats:
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        cfg = self.engine.model_config
        return {
            "role": self.role.value,
            "tp_size": self.engine.cfg.tp_size,
            "cp_size": self.engine.cfg.cp_size,
            "dp_size": self.engine.cfg.dp_size if self.engine.dp is not None else 1,
            "architecture": cfg.architecture,
            "num_layers": cfg.num_layers,
            "vocab_size": cfg.vocab_size,
            "context_length": self.engine.context_length,
            "dtype": str(cfg.dtype).removeprefix("torch."),
            "device": str(self.engine.device),
            "page_size": self.engine.pool.page_size,
            "kv_pages": self.engine.pool.num_pages,
        }

    # -- the loop -------------------------------------------------------------------------------------

    def run(self) -> None:
        self.send(Ready(self.info()))
        while True:
            self.run_once()

    def run_once(self) -> None:
        """One turn of the loop: take every waiting message, step, send stats when due, idle briefly."""
        inbox: list[bytes] = []
        while self.sync.leader and self._in.poll(0):
            inbox.append(self._in.recv())
        for data in self.sync.exchange_inbox(inbox):
            try:
                msg = unpack(data)
            except CodecError as e:
                log.warning(
                    "%s scheduler: dropped a bad message from the front (%d bytes): %s", self.role.value, len(data), e
                )
                continue
            self._dispatch(msg)
        worked = False
        try:
            worked = self.step()
        except Exception:  # keep serving; the servers fail the requests a failure belongs to before this
            log.exception("%s scheduler: step failed", self.role.value)
            if not self.sync.single:
                # The ranks can no longer be known to be in lockstep (a peer may wait in a collective this rank
                # never reaches): stop this rank; the launcher then takes the whole server down.
                log.error(
                    "%s scheduler rank %d: stopping the server after a failed step", self.role.value, self.sync.rank
                )
                raise
        self._count_overlap()
        now = time.monotonic()
        if (self.sync.leader or self.sync.data_parallel) and now - self._last_stats >= _STATS_EVERY_S:
            self._last_stats = now
            stats = self.stats()
            stats.rank = self.sync.rank
            self.send(stats)
        if not worked and self.sync.leader:  # the other ranks wait in the next turn's broadcast
            self._poller.poll(self._idle_wait_ms)

    def _count_overlap(self) -> None:
        """Export the forwards the runner ran as two overlapped micro-batches since the last turn (with two-chunk),
        and its IDLE forwards (DP attention)."""
        runner, role = self.engine.runner, self.role.value
        steps, two_chunk, idle = runner.tbo_steps, runner.two_chunk_steps, runner.idle_steps
        if (steps, two_chunk, idle) != self._tbo_counted:
            self.metrics.tbo_steps.labels(role).inc(steps - self._tbo_counted[0])
            self.metrics.tbo_two_chunk_steps.labels(role).inc(two_chunk - self._tbo_counted[1])
            if idle != self._tbo_counted[2]:
                self.metrics.dp_idle_steps.labels(role).inc(idle - self._tbo_counted[2])
            self._tbo_counted = (steps, two_chunk, idle)

    def close(self) -> None:
        """Close the sockets (the server process simply exits; tests that build a loop call this)."""
        self._in.close(linger=0)
        self._out.close(linger=0)
        self._ctx.term()

    def _dispatch(self, msg: IpcMessage) -> None:
        try:
            if isinstance(msg, GenerateRequest):
                if self.sync.owns(msg.bootstrap_room, msg.rid):  # DP attention: another rank's request
                    self.on_generate(msg)
            elif isinstance(msg, AbortRequest):
                self.on_abort(msg.rid)
            else:
                log.warning("%s scheduler: ignored a %s from the front", self.role.value, type(msg).__name__)
        except Exception as e:
            log.exception("%s scheduler: cannot handle %s", self.role.value, type(msg).__name__)
            if isinstance(msg, GenerateRequest):
                self.fail(msg.rid, f"internal error: {e}", 500)

    # -- outputs --------------------------------------------------------------------------------------

    def send(self, msg: IpcMessage) -> None:
        # every rank answers the same; rank 0 speaks for them; under DP attention each rank answers its requests
        if self.sync.leader or (self.sync.data_parallel and isinstance(msg, (RequestOutput, SchedulerStats))):
            self._out.send(pack(msg))

    def fail(self, rid: str, error: str, status: int, prompt_tokens: int = 0) -> None:
        """End the live request `rid` with `error`: its last output, and its stream offsets forgotten."""
        self._sent.pop(rid, None)
        self.reject(rid, error, status, prompt_tokens)

    def reject(self, rid: str, error: str, status: int, prompt_tokens: int = 0) -> None:
        """Answer `error` to a request this scheduler never took in, touching none of its tables (the rid
        may even be a live request's, when a duplicate is refused)."""
        self.send(
            RequestOutput(
                rid, finished=True, finish_reason="abort", error=error, status=status, prompt_tokens=prompt_tokens
            )
        )

    def fail_transfer(self, req: Request, handle: TransferHandle, stage: Stage, what: str) -> None:
        """`req`'s KV transfer failed in `stage`: fail the request (`what` prefixes the transfer layer's error
        in the answer), count the failure and hold its pages until no write can touch them."""
        self.fail(req.rid, f"{what}: {handle.error}", 500, len(req.prompt_ids))
        self.reaper.failed(req, handle, stage)

    def emit(self, req: Request, return_logprob: bool) -> None:
        """Send what `req` produced since the last emit. While it runs, text that could still turn out to be
        the start of a stop string is held back (a later token may complete the match and cut it)."""
        sent_tokens, sent_chars = self._sent.get(req.rid, (0, 0))
        text = req.output_text
        if not req.finished and req.params.stop:
            text = text[: max(sent_chars, len(text) - (max(map(len, req.params.stop)) - 1))]
        new_tokens = req.output_ids[sent_tokens:]
        if not new_tokens and len(text) == sent_chars and not req.finished:
            return
        out = RequestOutput(
            req.rid,
            token_ids=new_tokens,
            text=text[sent_chars:],
            logprobs=req.output_logprobs[sent_tokens:] if return_logprob else [],
            finished=req.finished,
            finish_reason=req.finish_reason.value if req.finish_reason else None,
            prompt_tokens=len(req.prompt_ids),
            completion_tokens=len(req.output_ids),
        )
        if req.finished:
            self._sent.pop(req.rid, None)
        else:
            self._sent[req.rid] = (len(req.output_ids), len(text))
        self.send(out)
