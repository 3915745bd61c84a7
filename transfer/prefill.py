"""Prefill side: receives decode's registrations and transfer infos, and pushes KV into decode's pages.

The scheduler holds a `KVSender` per request (room). It may call `send(start, end, pages, event)` once per
layer group and then `finish(pages, aux)`; each call becomes a chunk on the transfer worker's queue. The
worker submits a chunk only once its event completed (so it never reads pages the compute stream is still
writing), tracks the engine's handles, and concludes the room when nothing is in flight any more:
`Success` once, after every KV and aux write completed; otherwise `Failed`/`Abort` to decode, sent only
after the room's writes drained, so decode can free its pages at once.
"""

from __future__ import annotations

import logging
import queue
import time
from collections import deque
from dataclasses import dataclass, field

from engine.device import DeviceEvent
from engine.kvcache import KVPool
from transfer.aux import AuxBuffer, AuxRow
from transfer.backends import Copy, MemoryRegion, Status, TransferError
from transfer.bootstrap import RankInfo, register_rank
from transfer.config import TransferConfig
from transfer.manager import DuplicateRoomError, RoomHandle, TransferManager, now
from transfer.planner import aux_region, layer_copies, merge_runs
from transfer.protocol import Abort, AbortAck, Message, Registration, TransferInfo, TransferState
from transfer.protocol import Status as StatusMsg
from transfer.state import RoomState

log = logging.getLogger(__name__)

# The transfer worker's wait between polls of in-flight writes (backs off from min to max while idle).
_POLL_MIN_S = 0.0001
_POLL_MAX_S = 0.002


@dataclass
class _Peer:
    session: str
    endpoint: str
    tp_size: int


@dataclass
class _Chunk:
    room: int
    start: int
    end: int
    src_pages: list[int]
    event: DeviceEvent
    aux: AuxRow | None = None  # set on the final chunk


@dataclass
class _Room:
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
    bytes_sent: int = 0
    first_submit: float = 0.0


class KVSender(RoomHandle):
    """The prefill scheduler's handle on one room."""

    manager: PrefillTransferManager

    @property
    def ready(self) -> bool:
        """Decode's transfer info arrived: the forward may run."""
        return self.poll() >= TransferState.WAITING_FOR_INPUT

    @property
    def prompt_len(self) -> int | None:
        infos = self.manager._room(self.room).infos
        return next(iter(infos.values())).prompt_len if infos else None

    def send(self, start: int, end: int, src_pages: list[int], event: DeviceEvent, aux: AuxRow | None = None) -> None:
        """Queue layers [start, end) of `src_pages`; the worker waits for `event` before reading them.

        Passing `aux` makes this the room's last write (the aux row rides in the same batch);
        `Success` follows once every write of the room completed.
        """
        self.manager._enqueue(_Chunk(self.room, start, end, list(src_pages), event, aux))

    def finish(self, aux: AuxRow, event: DeviceEvent) -> None:
        """Queue the aux row alone as the room's last write."""
        self.send(0, 0, [], event, aux)

    def abort(self, reason: str = "aborted by prefill") -> None:
        self.manager._abort_local(self.room, reason)

    def safe_to_free(self) -> bool:
        """True once no write of this room can still read our pages."""
        r = self.manager._room(self.room)
        return r.state.terminal and r.pending == 0 and r.inflight == 0

    def release(self) -> None:
        """Forget the room; call after `safe_to_free()` (or it is failed first, and kept until then)."""
        self.manager._release(self.room)

    def transfer_seconds(self) -> float:
        r = self.manager._room(self.room)
        return (time.monotonic() - r.first_submit) if r.first_submit else 0.0


class PrefillTransferManager(TransferManager):
    role = "prefill"

    def __init__(
        self, cfg: TransferConfig, pool: KVPool, bootstrap_addr: str | None = None, aux: AuxBuffer | None = None
    ) -> None:
        super().__init__(cfg, pool, aux)
        self._rooms: dict[int, _Room] = {}
        self._early: dict[int, tuple[float, list[TransferInfo]]] = {}  # infos that beat the request here
        self._peers: dict[str, _Peer] = {}
        self._queue: queue.Queue[_Chunk] = queue.Queue()
        self._ready: deque[_Chunk] = deque()
        self._inflight: list[tuple[_Room, object, int, float]] = []  # room, handle, bytes, done no sooner than
        self._link_free_at = 0.0  # emulated link (TransferConfig.emulated_link_gbps)
        self._spawn(self._worker_loop, "worker")
        self.bytes_total = 0
        if bootstrap_addr:
            layout = pool.layout
            register_rank(
                bootstrap_addr,
                RankInfo(
                    tp_size=cfg.tp_size,
                    tp_rank=cfg.tp_rank,
                    rank_ip=cfg.host,
                    rank_port=self.zmq_port,
                    page_size=layout.page_size,
                    kv_dtype=layout.dtype_name,
                    num_layers=layout.num_layers,
                    num_kv_heads=layout.num_kv_heads,
                    head_dim=layout.head_dim,
                    backend=cfg.backend,
                ),
                timeout=cfg.timeouts.http,
            )

    # -- scheduler API --------------------------------------------------------------------------------

    def create_sender(self, room: int) -> KVSender:
        with self._lock:
            if room in self._rooms:
                raise DuplicateRoomError(f"bootstrap_room {room} is already in flight on this prefill")
            r = _Room(RoomState(room, self.timeouts))
            self._rooms[room] = r
            for info in self._early.pop(room, (0.0, []))[1]:
                self._accept_info(r, info)
        return KVSender(self, room)

    def _enqueue(self, chunk: _Chunk) -> None:
        with self._lock:
            r = self._room(chunk.room)
            if r.finished:
                raise ValueError(f"room {chunk.room}: send after finish")
            if r.state.state < TransferState.WAITING_FOR_INPUT and not r.state.terminal:
                raise ValueError(f"room {chunk.room}: decode's transfer info has not arrived")
            r.pending += 1
            if chunk.aux is not None:
                r.finished = True
        self._queue.put(chunk)

    def _abort_local(self, room: int, reason: str) -> None:
        with self._lock:
            r = self._rooms.get(room)
            if r is not None and r.state.fail(reason):
                r.aborted_by_us = True
                r.failed_at = now()
                self._conclude(room, r)

    def _release(self, room: int) -> None:
        with self._lock:
            r = self._rooms.get(room)
            if r is None:
                return
            r.released = True
            if not r.state.terminal:
                self._abort_local(room, "released before the transfer ended")
            # tells decode if nobody has yet; deletes the room now if drained, else when the last write resolves
            self._conclude(room, r)

    # -- control messages -----------------------------------------------------------------------------

    def _handle(self, msg: Message) -> None:
        if isinstance(msg, Registration):
            self._on_registration(msg)
        elif isinstance(msg, TransferInfo):
            self._on_transfer_info(msg)
        elif isinstance(msg, Abort):
            self._on_abort(msg)
        elif isinstance(msg, AbortAck):
            log.debug("prefill: decode acknowledged abort of room %d", msg.room)
        else:
            log.warning("prefill: unexpected %s message dropped", type(msg).__name__)

    def _on_registration(self, msg: Registration) -> None:
        if msg.tp_size != self.cfg.tp_size:
            log.error(
                "prefill: refusing decode %s with tp_size %d (prefill has %d): different TP sizes are "
                "not supported yet",
                msg.session,
                msg.tp_size,
                self.cfg.tp_size,
            )
            return
        expected = len(self.regions)
        bases = [*msg.k_bases, *msg.v_bases]
        if len(bases) + 1 != expected or msg.page_bytes != self.pool.page_bytes:
            log.error(
                "prefill: decode %s registered an incompatible layout (%d regions of %d-byte pages)",
                msg.session,
                len(bases),
                msg.page_bytes,
            )
            return
        regions = [MemoryRegion(b, msg.page_bytes, msg.num_pages) for b in bases]
        regions.append(MemoryRegion(msg.aux_base, msg.aux_row_bytes, msg.aux_rows))
        with self._lock:
            if msg.session in self._peers:
                self.backend.remove_peer(msg.session)
            self.backend.add_peer(msg.session, msg.backend_metadata, regions)
            self._peers[msg.session] = _Peer(msg.session, msg.endpoint, msg.tp_size)
        log.info("prefill: decode %s registered (%s)", msg.session, msg.backend)

    def _on_transfer_info(self, info: TransferInfo) -> None:
        with self._lock:
            peer = self._peers.get(info.session)
            if peer is None:
                # decode thinks it registered; we do not know it (e.g. this prefill restarted)
                self.send(
                    info.session,
                    StatusMsg(
                        info.room,
                        TransferState.FAILED,
                        self.cfg.tp_rank,
                        "prefill does not know this decode session; re-register",
                    ),
                )
                return
            r = self._rooms.get(info.room)
            if r is None:
                self._early.setdefault(info.room, (now(), []))[1].append(info)
                return
            self._accept_info(r, info)

    def _accept_info(self, r: _Room, info: TransferInfo) -> None:
        endpoint = self._peers[info.session].endpoint
        if info.session in r.infos or len(r.infos) >= max(r.required, 1) or r.state.terminal:
            self.send(
                endpoint,
                StatusMsg(info.room, TransferState.FAILED, self.cfg.tp_rank, f"duplicate bootstrap_room {info.room}"),
            )
            return
        r.infos[info.session] = info
        r.required = info.required_dsts
        if len(r.infos) >= r.required:
            r.state.advance(TransferState.WAITING_FOR_INPUT)

    def _on_abort(self, msg: Abort) -> None:
        with self._lock:
            r = self._rooms.get(msg.room)
            if r is None:
                self._early.pop(msg.room, None)
                self.send(msg.endpoint, AbortAck(msg.room, self.cfg.tp_rank))
                return
            r.abort_acks_to.append(msg.endpoint)
            if r.state.fail(f"aborted by decode: {msg.reason}" if msg.reason else "aborted by decode"):
                r.failed_at = now()
            self._conclude(msg.room, r)

    # -- deadlines ------------------------------------------------------------------------------------

    def _tick(self) -> None:
        t = now()
        with self._lock:
            for room, (since, _) in list(self._early.items()):
                if t - since > self.timeouts.bootstrap:
                    del self._early[room]  # decode's info for a request that never reached us
            for room, r in list(self._rooms.items()):
                if r.state.check_timeout():
                    r.failed_at = t
                    log.warning("prefill: room %d %s", room, r.state.error)
                self._conclude(room, r)

    # -- the transfer worker --------------------------------------------------------------------------

    def _worker_loop(self) -> None:
        idle_wait = _POLL_MIN_S
        while not self._stop.is_set():
            busy = bool(self._inflight or self._ready)
            try:
                self._ready.append(self._queue.get(timeout=idle_wait if busy else 0.05))
                while True:  # drain whatever else is queued without waiting
                    self._ready.append(self._queue.get_nowait())
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

    def _submit(self, chunk: _Chunk) -> None:
        with self._lock:
            r = self._rooms.get(chunk.room)
            if r is None:
                return
            r.pending -= 1
            if r.state.terminal:
                self._conclude(chunk.room, r)
                return
            for info in r.infos.values():
                try:
                    copies = self._copies(chunk, r, info)
                    handle = self.backend.submit_write(info.session, copies)
                except TransferError as e:
                    self._fail(chunk.room, r, f"{self.backend.name} write failed: {e}")
                    return
                nbytes = sum(c.count * self.regions[c.region].item_bytes for c in copies)
                r.inflight += 1
                self._inflight.append((r, handle, nbytes, self._emulated_arrival(nbytes)))
            if r.state.advance(TransferState.TRANSFERRING):
                r.first_submit = time.monotonic()
                for info in r.infos.values():
                    self.send(
                        self._peers[info.session].endpoint,
                        StatusMsg(chunk.room, TransferState.TRANSFERRING, self.cfg.tp_rank),
                    )

    def _copies(self, chunk: _Chunk, r: _Room, info: TransferInfo) -> list[Copy]:
        if len(chunk.src_pages) > len(info.dst_pages):
            raise TransferError(f"{len(chunk.src_pages)} source pages but decode reserved {len(info.dst_pages)}")
        runs = merge_runs(chunk.src_pages, info.dst_pages[: len(chunk.src_pages)])
        copies = layer_copies(chunk.start, chunk.end, self.num_layers, runs)
        if chunk.aux is not None:
            if r.aux_row is None:
                r.aux_row = self.aux.allocate()
                if r.aux_row is None:
                    raise TransferError("no free aux row on prefill")
            self.aux.write(r.aux_row, chunk.aux)
            copies.append(Copy(aux_region(self.num_layers), r.aux_row, info.aux_row, 1))
        return copies

    def _emulated_arrival(self, nbytes: int) -> float:
        """When a serial link of the emulated bandwidth would have delivered this write (0: no emulation)."""
        gbps = self.cfg.emulated_link_gbps
        if gbps is None:
            return 0.0
        self._link_free_at = max(time.monotonic(), self._link_free_at) + nbytes * 8 / (gbps * 1e9)
        return self._link_free_at

    def _poll_inflight(self) -> bool:
        """Resolve finished handles; True when any did."""
        still: list[tuple[_Room, object, int, float]] = []
        touched: list[_Room] = []
        for r, handle, nbytes, not_before in self._inflight:
            status, error = self.backend.poll(handle)
            if status == Status.PENDING or (status == Status.DONE and time.monotonic() < not_before):
                still.append((r, handle, nbytes, not_before))
                continue
            self.backend.release(handle)
            with self._lock:
                r.inflight -= 1
                if status == Status.DONE:
                    r.bytes_sent += nbytes
                    self.bytes_total += nbytes
                else:
                    self._fail(r.state.room, r, f"{self.backend.name} write failed: {error}")
            touched.append(r)
        self._inflight = still
        with self._lock:
            for r in touched:
                self._conclude(r.state.room, r)
        return bool(touched)

    def _fail(self, room: int, r: _Room, error: str) -> None:
        if r.state.fail(error):
            r.failed_at = now()
            log.warning("prefill: room %d failed: %s", room, error)

    def _conclude(self, room: int, r: _Room) -> None:
        """Tell decode the outcome, once, when nothing of the room is in flight any more. Lock held."""
        if r.concluded:
            for endpoint in r.abort_acks_to:  # late aborts of an already concluded room
                self.send(endpoint, AbortAck(room, self.cfg.tp_rank))
            r.abort_acks_to.clear()
            self._maybe_delete(room, r)
            return
        drained = r.pending == 0 and r.inflight == 0
        state = r.state.state
        if state == TransferState.TRANSFERRING and r.finished and drained:
            if r.state.advance(TransferState.SUCCESS):
                self._tell_decode(room, r, StatusMsg(room, TransferState.SUCCESS, self.cfg.tp_rank))
        elif state == TransferState.FAILED:
            hung = not drained and now() - r.failed_at > self.timeouts.abort_ack
            if not (drained or hung):
                return
            if r.aborted_by_us:
                self._tell_decode(room, r, Abort(room, self.endpoint, r.state.error))
            else:
                self._tell_decode(
                    room, r, StatusMsg(room, TransferState.FAILED, self.cfg.tp_rank, r.state.error, drained=drained)
                )
            for endpoint in r.abort_acks_to:
                self.send(endpoint, AbortAck(room, self.cfg.tp_rank))
            r.abort_acks_to.clear()
        if r.state.terminal and drained:
            self._free_aux(r)
            self._maybe_delete(room, r)

    def _tell_decode(self, room: int, r: _Room, msg: Message) -> None:
        r.concluded = True
        for info in r.infos.values():
            peer = self._peers.get(info.session)
            if peer is not None:
                self.send(peer.endpoint, msg)

    def _maybe_delete(self, room: int, r: _Room) -> None:
        told = r.concluded or not r.infos
        if r.released and told and r.pending == 0 and r.inflight == 0 and self._rooms.get(room) is r:
            self._free_aux(r)
            del self._rooms[room]

    def _free_aux(self, r: _Room) -> None:
        if r.aux_row is not None:
            self.aux.free(r.aux_row)
            r.aux_row = None
