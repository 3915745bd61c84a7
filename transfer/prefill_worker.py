"""The prefill side's transfer worker: the thread that turns queued chunks into backend writes.

Kept apart from the manager's control plane (transfer/prefill.py) because it is the one hot loop of the
transfer layer: it submits a chunk only once the device event of the compute that wrote its pages
completed, polls the engine's handles, and hands each room back to the manager's `_conclude` whenever one
of its writes resolves. It shares the manager's lock and room records (`PrefillRoom`).
"""

from __future__ import annotations

import queue
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from contracts.metrics import FailureReason
from engine.device import DeviceEvent
from transfer.aux import AuxRow
from transfer.backends import Copy, TransferError, WriteStatus
from transfer.planner import aux_region, layer_copies, merge_runs
from transfer.protocol import Status, TransferInfo, TransferState
from transfer.state import RoomState

if TYPE_CHECKING:
    from transfer.prefill import PrefillTransferManager

# The worker's wait between polls of in-flight writes (backs off from min to max while idle).
_POLL_MIN_S = 0.0001
_POLL_MAX_S = 0.002


@dataclass
class Chunk:
    """Layers [start, end) of a room's pages, readable once `event` completed; `aux` marks the last one."""

    room: int
    start: int
    end: int
    src_pages: list[int]
    event: DeviceEvent
    aux: AuxRow | None = None  # set on the final chunk


@dataclass
class PrefillRoom:
    """Prefill's record of one room, shared by the control plane and the worker under the manager's lock."""

    state: RoomState
    infos: dict[str, TransferInfo] = field(default_factory=dict)
    required: int = 1
    pending: int = 0  # chunks queued, not yet submitted
    inflight: int = 0  # engine handles not yet complete
    finished: bool = False  # the final (aux) chunk was submitted
    aux_row: int | None = None
    aborted_by_us: bool = False
    released: bool = False  # the scheduler is done with it; delete once drained
    abort_acks_to: list[str] = field(default_factory=list)
    concluded: bool = False  # decode was told the outcome
    failed_at: float = 0.0
    cancelled: bool = False  # a write was called off mid-flight: bytes it sent may still land at decode


class TransferWorker:
    """The worker thread's state and loop, run by the manager that owns the rooms it writes."""

    def __init__(self, manager: PrefillTransferManager) -> None:
        self.m = manager
        self.queue: queue.Queue[Chunk] = queue.Queue()
        self._ready: deque[Chunk] = deque()
        self._inflight: list[tuple[PrefillRoom, object, int, float]] = []  # room, handle, bytes, done no sooner
        self._link_free_at = 0.0  # emulated link (TransferConfig.emulated_link_gbps)
        self.bytes_total = 0  # KV and aux bytes whose writes completed

    def run(self) -> None:
        idle_wait = _POLL_MIN_S
        while not self.m._stop.is_set():
            busy = bool(self._inflight or self._ready)
            try:
                self._ready.append(self.queue.get(timeout=idle_wait if busy else 0.05))
                while True:  # drain whatever else is queued without waiting
                    self._ready.append(self.queue.get_nowait())
            except queue.Empty:
                pass
            progressed = False
            # In order: a chunk goes out only once the compute that wrote its pages has finished.
            while self._ready and self._ready[0].event.query():
                self._submit(self._ready.popleft())
                progressed = True
            if self._inflight:
                progressed |= self._poll_inflight()
            # Back off while big writes are in flight: on a small host, a hot poll loop steals CPU from the
            # engine's own threads; any progress resets the wait, so short transfers stay fast.
            idle_wait = _POLL_MIN_S if progressed else min(idle_wait * 2, _POLL_MAX_S)

    def _submit(self, chunk: Chunk) -> None:
        m = self.m
        with m._lock:
            r = m._rooms.get(chunk.room)
            if r is None:
                return
            r.pending -= 1
            if r.state.terminal:
                m._conclude(chunk.room, r)
                return
            for info in r.infos.values():
                try:
                    copies = self._copies(chunk, r, info)
                    handle = m.backend.submit_write(info.session, copies)
                except TransferError as e:
                    m._fail(chunk.room, r, f"{m.backend.name} write failed: {e}", FailureReason.FAILED)
                    return
                nbytes = sum(c.count * m.regions[c.region].item_bytes for c in copies)
                r.inflight += 1
                self._inflight.append((r, handle, nbytes, self._emulated_arrival(nbytes)))
            if r.state.advance(TransferState.TRANSFERRING):
                for info in r.infos.values():
                    peer = m._peers.get(info.session)
                    if peer is not None:
                        status = Status(chunk.room, TransferState.TRANSFERRING, m.cfg.tp_rank, session=info.session)
                        m.send(peer.endpoint, status)

    def _copies(self, chunk: Chunk, r: PrefillRoom, info: TransferInfo) -> list[Copy]:
        m = self.m
        if len(chunk.src_pages) > len(info.dst_pages):
            raise TransferError(f"{len(chunk.src_pages)} source pages but decode reserved {len(info.dst_pages)}")
        runs = merge_runs(chunk.src_pages, info.dst_pages[: len(chunk.src_pages)])
        copies = layer_copies(chunk.start, chunk.end, m.num_layers, runs)
        if chunk.aux is not None:
            if r.aux_row is None:
                r.aux_row = m.aux.allocate()
                if r.aux_row is None:
                    raise TransferError("no free aux row on prefill")
            m.aux.write(r.aux_row, chunk.aux)
            copies.append(Copy(aux_region(m.num_layers), r.aux_row, info.aux_row, 1))
        return copies

    def _emulated_arrival(self, nbytes: int) -> float:
        """When a serial link of the emulated bandwidth would have delivered this write (0: no emulation)."""
        gbps = self.m.cfg.emulated_link_gbps
        if gbps is None:
            return 0.0
        self._link_free_at = max(time.monotonic(), self._link_free_at) + nbytes * 8 / (gbps * 1e9)
        return self._link_free_at

    def _hung(self, r: PrefillRoom) -> bool:
        """The room failed and its writes outlived the abort-ack timeout: they may be cancelled."""
        return r.state.state == TransferState.FAILED and time.monotonic() - r.failed_at > self.m.timeouts.abort_ack

    def _poll_inflight(self) -> bool:
        """Resolve finished handles; True when any did."""
        m = self.m
        still: list[tuple[PrefillRoom, object, int, float]] = []
        touched: list[PrefillRoom] = []
        for r, handle, nbytes, not_before in self._inflight:
            status, error = m.backend.poll(handle)
            if status == WriteStatus.PENDING and self._hung(r) and m.backend.cancel(handle):
                # its room failed long ago and the engine does not give up on its own (a stopped peer)
                status, error = WriteStatus.FAILED, "cancelled: the room failed and the write hung"
                r.cancelled = True
            if status == WriteStatus.PENDING or (status == WriteStatus.DONE and time.monotonic() < not_before):
                still.append((r, handle, nbytes, not_before))
                continue
            m.backend.release(handle)
            with m._lock:
                r.inflight -= 1
                if status == WriteStatus.DONE:
                    self.bytes_total += nbytes
                else:
                    m._fail(r.state.room, r, f"{m.backend.name} write failed: {error}", FailureReason.FAILED)
            touched.append(r)
        self._inflight = still
        with m._lock:
            for r in touched:
                m._conclude(r.state.room, r)
        return bool(touched)
