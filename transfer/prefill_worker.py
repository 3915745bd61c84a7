"""The prefill side's transfer worker: the thread that turns queued chunks into backend writes.

Kept apart from the manager's control plane (transfer/prefill.py) because it is the one hot loop of the
transfer layer: it submits a chunk only once the device event of the compute that wrote its pages
completed, polls the engine's handles, and hands each room back to the manager's `_conclude` whenever one
of its writes resolves. It shares the manager's lock and room records (`PrefillRoom`).

The lock is the scheduler's too (it queues the next layer group under it), so the worker holds it only for
bookkeeping: no engine call (`submit_write`, `poll`, `release`, `cancel`) and no device work runs under it.
A chunk's writes are counted in flight before the lock is let go and uncounted only once they resolved (or
never started), so a room cannot conclude, and its pages cannot be freed, while an engine may read them.

Order: chunks are submitted strictly in queue order, so a room's last chunk, the one carrying its aux row,
goes out only after every earlier chunk of the room was submitted; `Success` follows only once every write
of the room completed (transfer/prefill.py), and decode trusts the aux row only on `Success`.

Nothing that goes wrong here stops the loop: an error while handling a chunk or a write fails that room
(`FailureReason.FAILED`, the error in its message), so it ends at once rather than at its deadline; an error
outside any room is logged with its traceback and the loop goes on after a short pause.
"""

from __future__ import annotations

import logging
import queue
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from contracts.metrics import FailureReason
from engine.device import DeviceEvent
from transfer.backends import Copy, TransferError, WriteStatus
from transfer.manager import ERROR_BACKOFF_S
from transfer.planner import aux_region, kv_copies
from transfer.protocol import Status, TransferInfo, TransferState
from transfer.state import RoomState

if TYPE_CHECKING:
    from transfer.prefill import PrefillTransferManager

log = logging.getLogger(__name__)

# The worker's wait between polls of in-flight writes (backs off from min to max while idle).
_POLL_MIN_S = 0.0001
_POLL_MAX_S = 0.002


def describe(e: BaseException) -> str:
    """An exception in words for a room's error: an engine's own TransferError as is, anything else by type."""
    return str(e) if isinstance(e, TransferError) else f"{type(e).__name__}: {e}"


@dataclass
class Chunk:
    """Layers [start, end) of a room's pages, readable once `event` completed.

    `last` marks the room's final chunk: its aux row (written by the scheduler before `event` was recorded,
    `KVSender.write_aux`) rides along. `first_page` is the index of `src_pages[0]` in the request's page table
    (a chunk of a chunked prefill, or the cached prefix alone): it lands in decode's pages from that index on."""

    room: int
    start: int
    end: int
    src_pages: list[int]
    event: DeviceEvent
    last: bool = False
    first_page: int = 0


@dataclass
class PrefillRoom:
    """Prefill's record of one room, shared by the control plane and the worker under the manager's lock."""

    state: RoomState
    infos: dict[str, TransferInfo] = field(default_factory=dict)
    required: int = 1
    pending: int = 0  # chunks queued, not yet submitted
    inflight: int = 0  # engine writes started (or about to be) and not yet resolved
    finished: bool = False  # the final (aux) chunk was queued
    aux_row: int | None = None  # our row, written by the scheduler thread
    aborted_by_us: bool = False
    released: bool = False  # the scheduler is done with it; delete once drained
    abort_acks_to: list[str] = field(default_factory=list)
    concluded: bool = False  # decode was told the outcome
    failed_at: float = 0.0
    cancelled: bool = False  # a write was called off mid-flight: bytes it sent may still land at decode


@dataclass
class _Write:
    """One engine write in flight."""

    room: PrefillRoom
    handle: object
    nbytes: int
    not_before: float = 0.0  # done no sooner (emulated link)


class TransferWorker:
    """The worker thread's state and loop, run by the manager that owns the rooms it writes."""

    def __init__(self, manager: PrefillTransferManager) -> None:
        self.m = manager
        self.queue: queue.Queue[Chunk] = queue.Queue()
        self._ready: deque[Chunk] = deque()
        self._inflight: list[_Write] = []  # touched by this thread only
        self._link_free_at = 0.0  # emulated link (TransferConfig.emulated_link_gbps)
        self.bytes_total = 0  # KV and aux bytes whose writes completed

    def run(self) -> None:
        """The loop (on the pool's device: the manager's threads bind it, transfer/manager.py)."""
        idle_wait = _POLL_MIN_S
        while not self.m._stop.is_set():
            try:
                progressed = self._step(idle_wait)
            except Exception:
                log.exception("prefill: transfer worker error outside any room; going on")
                self.m._stop.wait(ERROR_BACKOFF_S)
                progressed = False
            # Back off while big writes are in flight: on a small host, a hot poll loop steals CPU from the
            # engine's own threads; any progress resets the wait, so short transfers stay fast.
            idle_wait = _POLL_MIN_S if progressed else min(idle_wait * 2, _POLL_MAX_S)

    def _step(self, idle_wait: float) -> bool:
        busy = bool(self._inflight or self._ready)
        try:
            self._ready.append(self.queue.get(timeout=idle_wait if busy else 0.05))
            while True:  # drain whatever else is queued without waiting
                self._ready.append(self.queue.get_nowait())
        except queue.Empty:
            pass
        progressed = self._submit_ready()
        if self._inflight:
            progressed |= self._poll_inflight()
        return progressed

    # -- submitting -----------------------------------------------------------------------------------

    def _submit_ready(self) -> bool:
        """In order: a chunk goes out only once the compute that wrote its pages has finished."""
        progressed = False
        while self._ready:
            chunk = self._ready[0]
            try:
                if not chunk.event.query():
                    break
            except Exception as e:  # a device error: this room cannot be read; the others may still be
                self._ready.popleft()
                self._drop(chunk, f"the device event of layers {chunk.start}..{chunk.end} failed: {describe(e)}")
                progressed = True
                continue
            self._ready.popleft()
            progressed = True
            try:
                self._submit(chunk)
            except Exception as e:  # a bug: fail the room rather than leave it to its deadline
                log.exception("prefill: room %d: error submitting layers %d..%d", chunk.room, chunk.start, chunk.end)
                self._fail_room(chunk.room, f"transfer worker error: {describe(e)}")
        return progressed

    def _submit(self, chunk: Chunk) -> None:
        m = self.m
        with m._lock:
            r = self._claim(chunk)
            if r is None:
                return
            plan = self._plan(chunk, r)
            if plan is None:  # the room ended (or just failed): maybe it drained now
                m._conclude(chunk.room, r)
                return
            # under another TP size a decode rank may get nothing from this rank: no engine call for it
            plan = [p for p in plan if p[1]]
            r.inflight += len(plan)  # from here the room cannot conclude nor its pages be freed
        # The engine call runs without the lock: the scheduler takes it to queue its next group meanwhile.
        writes: list[_Write] = []
        error = ""
        for session, copies, nbytes in plan:
            try:
                writes.append(_Write(r, m.backend.submit_write(session, copies), nbytes))
            except Exception as e:
                error = f"{m.backend.name} write failed: {describe(e)}"
                break
        with m._lock:
            for w in writes:
                w.not_before = self._emulated_arrival(w.nbytes)
                self._inflight.append(w)
            r.inflight -= len(plan) - len(writes)  # those never started
            if error:
                m._fail(chunk.room, r, error, FailureReason.FAILED)
                m._conclude(chunk.room, r)
                return
            if r.state.advance(TransferState.TRANSFERRING):
                for info in r.infos.values():
                    peer = m._peers.get(info.session)
                    if peer is not None:
                        status = Status(chunk.room, TransferState.TRANSFERRING, m.cfg.tp_rank, session=info.session)
                        m.send(peer.endpoint, status)
            if not writes:  # nothing of this chunk to write: the room may be complete now
                m._conclude(chunk.room, r)

    def _plan(self, chunk: Chunk, r: PrefillRoom) -> list[tuple[str, list[Copy], int]] | None:
        """(session, copies, bytes) per decode destination (copies may be empty: nothing of this chunk goes
        there); None when the room ended, or failed planning. Lock held."""
        m = self.m
        if r.state.terminal:
            return None
        plan = []
        try:
            for info in r.infos.values():
                copies = self._copies(chunk, r, info)
                plan.append((info.session, copies, sum(c.count * m.regions[c.region].item_bytes for c in copies)))
        except TransferError as e:
            m._fail(chunk.room, r, f"cannot write room {chunk.room}: {e}", FailureReason.FAILED)
            return None
        return plan

    def _copies(self, chunk: Chunk, r: PrefillRoom, info: TransferInfo) -> list[Copy]:
        """What this rank writes of the chunk into one decode rank: its head slices of each page (every head, in
        page runs, under the same TP size), then the aux row (rank 0 to decode rank 0 only)."""
        m = self.m
        end = chunk.first_page + len(chunk.src_pages)
        if chunk.first_page < 0 or end > len(info.dst_pages):
            raise TransferError(f"source pages [{chunk.first_page}, {end}) but decode reserved {len(info.dst_pages)}")
        peer = m._peers.get(info.session)
        if peer is None:
            raise TransferError(f"decode session {info.session} is not registered any more")
        dst = info.dst_pages[chunk.first_page : end]
        heads = m.pool.layout.num_kv_heads
        copies = kv_copies(chunk.start, chunk.end, m.num_layers, chunk.src_pages, dst, peer.slices, heads, peer.heads)
        if chunk.last and m.cfg.writes_aux and peer.tp_rank == 0:
            if r.aux_row is None:  # KVSender refuses a last chunk without a row: a bug if seen
                raise TransferError("the aux row was not written before the room's last chunk")
            copies.append(Copy(aux_region(m.num_layers), r.aux_row, info.aux_row, 1))  # last: after every KV copy
        return copies

    def _emulated_arrival(self, nbytes: int) -> float:
        """When a serial link of the emulated bandwidth would have delivered this write (0: no emulation)."""
        gbps = self.m.cfg.emulated_link_gbps
        if gbps is None:
            return 0.0
        self._link_free_at = max(time.monotonic(), self._link_free_at) + nbytes * 8 / (gbps * 1e9)
        return self._link_free_at

    def _claim(self, chunk: Chunk) -> PrefillRoom | None:
        """With the lock held: the chunk's room, the chunk no longer counted as pending (None: room gone)."""
        r = self.m._rooms.get(chunk.room)
        if r is not None:
            r.pending -= 1
        return r

    def _drop(self, chunk: Chunk, error: str) -> None:
        """A queued chunk that will never be submitted: its room fails."""
        m = self.m
        with m._lock:
            r = self._claim(chunk)
            if r is None:
                return
            m._fail(chunk.room, r, error, FailureReason.FAILED)
            m._conclude(chunk.room, r)

    def _fail_room(self, room: int, error: str) -> None:
        m = self.m
        with m._lock:
            r = m._rooms.get(room)
            if r is not None:
                m._fail(room, r, error, FailureReason.FAILED)
                m._conclude(room, r)

    # -- polling --------------------------------------------------------------------------------------

    def _hung(self, r: PrefillRoom) -> bool:
        """The room failed and its writes outlived the abort-ack timeout: they may be cancelled."""
        return r.state.state == TransferState.FAILED and time.monotonic() - r.failed_at > self.m.timeouts.abort_ack

    def _poll_one(self, w: _Write) -> tuple[WriteStatus, str]:
        """Where `w` stands (PENDING while the emulated link would still carry it). No lock held."""
        m = self.m
        try:
            status, error = m.backend.poll(w.handle)
            if status == WriteStatus.PENDING and self._hung(w.room) and m.backend.cancel(w.handle):
                # its room failed long ago and the engine does not give up on its own (a stopped peer)
                status, error = WriteStatus.FAILED, "cancelled: the room failed and the write hung"
                w.room.cancelled = True
        except Exception as e:
            # The handle is lost to us: we cannot tell whether bytes are still in flight. Try to stop it, and
            # tell decode its pages are not drained (it quarantines them).
            log.exception("prefill: room %d: polling a write failed", w.room.state.room)
            self._call_quietly(self.m.backend.cancel, w.handle)
            w.room.cancelled = True
            return WriteStatus.FAILED, f"polling the write raised {describe(e)}"
        if status == WriteStatus.DONE and time.monotonic() < w.not_before:
            return WriteStatus.PENDING, ""
        return status, error

    def _call_quietly(self, fn, handle: object) -> None:
        try:
            fn(handle)
        except Exception:
            log.exception("prefill: %s of a write handle failed", getattr(fn, "__name__", "engine call"))

    def _poll_inflight(self) -> bool:
        """Resolve finished handles; True when any did."""
        m = self.m
        still: list[_Write] = []
        resolved: list[tuple[_Write, WriteStatus, str]] = []
        for w in self._inflight:
            status, error = self._poll_one(w)
            if status == WriteStatus.PENDING:
                still.append(w)
                continue
            self._call_quietly(m.backend.release, w.handle)
            resolved.append((w, status, error))
        self._inflight = still
        if not resolved:
            return False
        with m._lock:
            for w, status, error in resolved:
                r = w.room
                r.inflight -= 1
                if status == WriteStatus.DONE:
                    self.bytes_total += w.nbytes
                else:
                    m._fail(r.state.room, r, f"{m.backend.name} write failed: {error}", FailureReason.FAILED)
            for w, _, _ in resolved:
                m._conclude(w.room.state.room, w.room)
        return True
