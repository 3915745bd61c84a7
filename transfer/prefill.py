"""Prefill side: receives decode's registrations and transfer infos, and pushes KV into decode's pages.

The scheduler holds a `KVSender` per request (room). It may call `send(start, end, pages, event)` once per
layer group; once the first token is sampled it writes the aux row (`write_aux(aux)`, on its own thread, ordered
on the compute stream), records an event, and queues the room's last chunk with it (`finish(event)`, or
`send(..., event, last=True)` for KV and aux in one write); each call becomes a chunk on the transfer worker's
queue (transfer/prefill_worker.py). The worker submits a chunk only once its event completed (so it never reads
pages the compute stream is still writing), tracks the engine's handles, and hands the room back here when
a write resolves. This module concludes the room when nothing is in flight any more: `Success` once, after
every KV and aux write completed; otherwise `Failed`/`Abort` to decode, sent only after the room's writes
drained, so decode can free its pages at once.

Tensor parallelism (transfer/head_map.py). Each prefill rank runs its own manager, registered at the prefill's
bootstrap server under its rank. Every decode rank registers with every prefill rank and sends each the room's
info with `required_dsts` = decode's TP size: the room is ready here once that many decode ranks' infos arrived.
This rank then writes each decode rank exactly the head slices the head map gives the pair (possibly nothing),
and sends `Success` to every decode rank once its writes completed (decode succeeds once every prefill rank did);
a failure is sent to every decode rank it heard from. Only rank 0 writes the aux row, and only to decode rank 0
(`write_aux` is a no-op on other ranks, and their last chunk carries no aux copy).

Peers (decode ranks, transfer/prefill_peers.py) are known by session: decode's endpoint plus its instance id. A
Registration from a new session at the endpoint of a known one means that decode restarted: the old session's engine
peer is removed, its socket forgotten, and its rooms failed (PEER_RESTARTED) — their pages come back once their
writes drained, as for any failed room. The same session registering again with the same memory is a no-op (it
re-resolved after a pause), so writes in flight to it are not cancelled. At most MAX_PEERS peers are kept (idle ones
are forgotten first; such a decode gets UnknownSession and registers again), and at most MAX_EARLY early infos.

A TransferInfo from a session we do not know, or addressed to another instance than ours (decode registered with
our predecessor at this address), is answered with `UnknownSession`, a message of its own: decode re-registers
and sends the info again.

Pages: a room's source pages are safe to free once no chunk is queued and no write is in flight. A write to a
peer that stopped answering is bounded by the engine (Mooncake: its timeouts, set to our Transferring timeout)
or, where the engine has none (NIXL), cancelled by the worker once its room failed and the abort-ack timeout
passed; decode is then told "not drained", since bytes already sent may still land.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import replace

from contracts.codec import Record
from contracts.metrics import FailureReason
from engine.device import DeviceEvent
from engine.kvcache import KVPool
from transfer.aux import AuxBuffer, AuxRow
from transfer.bootstrap import RankInfo, register_rank
from transfer.config import TransferConfig
from transfer.manager import DuplicateRoomError, RoomHandle, TransferManager, now
from transfer.prefill_peers import DecodePeer, PeerTable
from transfer.prefill_worker import Chunk, PrefillRoom, TransferWorker
from transfer.protocol import Abort, AbortAck, Registration, Status, TransferInfo, TransferState, UnknownSession
from transfer.state import RoomState

log = logging.getLogger(__name__)

MAX_EARLY = 4096  # transfer infos held for requests that have not reached this prefill yet


class KVSender(RoomHandle):
    """The prefill scheduler's handle on one room."""

    manager: PrefillTransferManager

    @property
    def ready(self) -> bool:
        """Decode's transfer info arrived: the forward may run."""
        return self.poll() >= TransferState.WAITING_FOR_INPUT

    def send(
        self,
        start: int,
        end: int,
        src_pages: list[int],
        event: DeviceEvent,
        last: bool = False,
        first_page: int = 0,
    ) -> None:
        """Queue layers [start, end) of `src_pages`; the worker waits for `event` before reading them.

        `first_page`: where `src_pages` start in the request's page table (a later chunk of a chunked prefill,
        or the cached prefix sent ahead of the forward); they land in decode's pages from that index on.
        `last` makes this the room's final write, carrying the aux row `write_aux` wrote before `event` was
        recorded; `Success` follows once every write of the room completed.
        """
        self.manager._enqueue(Chunk(self.room, start, end, list(src_pages), event, last, first_page))

    def write_aux(self, aux: AuxRow) -> bool:
        """Write the room's aux row now, on the calling thread (on CUDA: non-blocking, on the current stream).

        Call it before recording the event passed to `finish`/`send(last=True)`, which then covers the write.
        False when the room failed instead (no aux row free: it fails with that reason) or had already ended.
        On TP ranks other than 0 nothing is written (rank 0 writes the row to decode rank 0): True unless ended.
        """
        return self.manager._write_aux(self.room, aux)

    def finish(self, event: DeviceEvent) -> None:
        """Queue the aux row alone as the room's last write (after `write_aux`)."""
        self.send(0, 0, [], event, last=True)

    def abort(self, reason: str = "aborted by prefill") -> None:
        self.manager._abort_local(self.room, reason)

    def safe_to_free(self) -> bool:
        """True once no write of this room can still read our pages."""
        r = self.manager._room(self.room)
        return r.state.terminal and r.pending == 0 and r.inflight == 0

    def release(self) -> None:
        """Forget the room; call after `safe_to_free()` (or it is failed first, and kept until then)."""
        self.manager._release(self.room)


class PrefillTransferManager(PeerTable, TransferManager):
    role = "prefill"

    def __init__(
        self, cfg: TransferConfig, pool: KVPool, bootstrap_addr: str | None = None, aux: AuxBuffer | None = None
    ) -> None:
        super().__init__(cfg, pool, aux)
        self._rooms: dict[int, PrefillRoom] = {}
        self._early: dict[int, tuple[float, list[TransferInfo]]] = {}  # infos that beat the request here
        # Rooms that ended here before decode's info arrived (the request failed or was aborted first): a late
        # info is answered FAILED at once instead of waiting in `_early` until decode's own deadline.
        self._ended: OrderedDict[int, tuple[float, str, str]] = OrderedDict()  # room -> (when, error, reason)
        self._peers: OrderedDict[str, DecodePeer] = OrderedDict()  # least recently used first
        self._worker = TransferWorker(self)
        self._spawn(self._worker.run, "worker")
        if bootstrap_addr:
            info = RankInfo.of(
                pool.layout, cfg.backend, cfg.tp_size, cfg.tp_rank, cfg.host, self.zmq_port, self.instance, cfg.dp_size
            )
            register_rank(bootstrap_addr, info, timeout=cfg.timeouts.http)

    @property
    def bytes_total(self) -> int:
        """KV and aux bytes whose writes completed, over this manager's life."""
        return self._worker.bytes_total

    # -- scheduler API --------------------------------------------------------------------------------

    def create_sender(self, room: int) -> KVSender:
        with self._lock:
            if room in self._rooms:
                raise DuplicateRoomError(f"bootstrap_room {room} is already in flight on this prefill")
            r = PrefillRoom(RoomState(room, self.timeouts))
            self._rooms[room] = r
            self._ended.pop(room, None)  # the room number is in use again
            for info in self._early.pop(room, (0.0, []))[1]:
                self._accept_info(r, info)
        return KVSender(self, room)

    def _enqueue(self, chunk: Chunk) -> None:
        with self._lock:
            r = self._room(chunk.room)
            if r.finished:
                raise ValueError(f"room {chunk.room}: send after finish")
            if r.state.state < TransferState.WAITING_FOR_INPUT and not r.state.terminal:
                raise ValueError(f"room {chunk.room}: decode's transfer info has not arrived")
            if chunk.last and r.aux_row is None and not r.state.terminal and self.cfg.writes_aux:
                raise ValueError(f"room {chunk.room}: write_aux must come before the last chunk")
            r.pending += 1
            if chunk.last:
                r.finished = True
        self._worker.queue.put(chunk)

    def _write_aux(self, room: int, aux: AuxRow) -> bool:
        with self._lock:
            r = self._room(room)
            if r.finished:
                raise ValueError(f"room {room}: write_aux after the last chunk")
            if r.state.terminal:
                return False
            if not self.cfg.writes_aux:
                return True  # only rank 0 writes the aux row (under DP attention, each rank its own rooms')
            if r.aux_row is None:
                r.aux_row = self.aux.allocate()
                if r.aux_row is None:
                    error = (
                        f"no free aux row on prefill: all {self.aux.rows} rows are held by rooms in flight "
                        "(TransferConfig.aux_rows); retry once some finished"
                    )
                    self._fail(room, r, error, FailureReason.FAILED)
                    self._conclude(room, r)
                    return False
            # Under the lock so the row cannot be freed meanwhile; on CUDA only a non-blocking copy is queued.
            self.aux.write(r.aux_row, aux)
        return True

    def _abort_local(self, room: int, reason: str) -> None:
        with self._lock:
            r = self._rooms.get(room)
            if r is not None and r.state.fail(reason, FailureReason.ABORTED):
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

    def _handle(self, msg: Record) -> None:
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

    def _on_transfer_info(self, info: TransferInfo) -> None:
        with self._lock:
            if info.session not in self._peers or info.prefill_instance != self.instance:
                # decode registered with our predecessor at this address, or we forgot it: it registers again
                self.send(info.endpoint, UnknownSession(info.room, info.session, self.cfg.tp_rank, self.instance))
                return
            self._peers.move_to_end(info.session)
            r = self._rooms.get(info.room)
            if r is None and info.room in self._ended:
                _, error, reason = self._ended[info.room]
                status = Status(info.room, TransferState.FAILED, self.cfg.tp_rank, error, reason=reason,
                                session=info.session)  # fmt: skip
                self.send(info.endpoint, status)  # nothing of it was written: drained
                return
            if r is None:
                if info.room not in self._early and len(self._early) >= MAX_EARLY:
                    dropped = next(iter(self._early))
                    del self._early[dropped]
                    log.warning("prefill: %d early transfer infos held; dropped room %d's", MAX_EARLY, dropped)
                self._early.setdefault(info.room, (now(), []))[1].append(info)
                return
            self._accept_info(r, info)

    def _accept_info(self, r: PrefillRoom, info: TransferInfo) -> None:
        """Take one decode rank's info for the room; the room is ready once every decode rank's arrived."""
        peer = self._peers[info.session]
        ranks = {self._peers[s].tp_rank for s in r.infos if s in self._peers}
        other = info.session in r.infos or peer.tp_rank in ranks or (r.infos and info.required_dsts != r.required)
        if other or len(r.infos) >= max(r.required, 1) or r.state.terminal:
            error = f"duplicate bootstrap_room {info.room}"
        elif info.required_dsts != peer.tp_size:
            error = f"room {info.room}: info for {info.required_dsts} decode ranks from a decode of TP{peer.tp_size}"
        else:
            r.infos[info.session] = info
            r.required = info.required_dsts
            if len(r.infos) >= r.required:
                r.state.advance(TransferState.WAITING_FOR_INPUT)
            return
        status = Status(info.room, TransferState.FAILED, self.cfg.tp_rank, error, reason=FailureReason.FAILED.value,
                        session=info.session)  # fmt: skip
        self.send(peer.endpoint, status)

    def _on_abort(self, msg: Abort) -> None:
        with self._lock:
            r = self._rooms.get(msg.room)
            if r is None:
                self._early.pop(msg.room, None)
                self.send(msg.endpoint, AbortAck(msg.room, self.cfg.tp_rank))
                return
            r.abort_acks_to.append(msg.endpoint)
            error = f"aborted by decode: {msg.reason}" if msg.reason else "aborted by decode"
            if r.state.fail(error, FailureReason.ABORTED):
                r.failed_at = now()
            self._conclude(msg.room, r)

    # -- deadlines ------------------------------------------------------------------------------------

    def _tick(self) -> None:
        t = now()
        with self._lock:
            for room, (since, _) in list(self._early.items()):
                if t - since > self.timeouts.bootstrap:
                    del self._early[room]  # decode's info for a request that never reached us
            while self._ended and t - next(iter(self._ended.values()))[0] > self.timeouts.bootstrap:
                self._ended.popitem(last=False)
            for room, r in list(self._rooms.items()):
                if r.state.check_timeout():
                    r.failed_at = t
                    log.warning("prefill: room %d %s", room, r.state.error)
                self._conclude(room, r)

    # -- outcomes (the worker calls these with the lock held) -------------------------------------------

    def _fail(self, room: int, r: PrefillRoom, error: str, reason: FailureReason) -> None:
        if r.state.fail(error, reason):
            r.failed_at = now()
            log.warning("prefill: room %d failed: %s", room, error)

    def _conclude(self, room: int, r: PrefillRoom) -> None:
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
                self._tell_decode(room, r, Status(room, TransferState.SUCCESS, self.cfg.tp_rank))
        elif state == TransferState.FAILED:
            hung = not drained and now() - r.failed_at > self.timeouts.abort_ack
            if not (drained or hung):
                return
            if r.aborted_by_us:
                self._tell_decode(room, r, Abort(room, self.endpoint, r.state.error, sender_rank=self.cfg.tp_rank))
            else:
                self._tell_decode(
                    room,
                    r,
                    Status(
                        room,
                        TransferState.FAILED,
                        self.cfg.tp_rank,
                        r.state.error,
                        drained=drained and not r.cancelled,
                        reason=(r.state.reason or FailureReason.FAILED).value,
                    ),
                )
            for endpoint in r.abort_acks_to:
                self.send(endpoint, AbortAck(room, self.cfg.tp_rank))
            r.abort_acks_to.clear()
        if r.state.terminal and drained:
            self._free_aux(r)
            self._maybe_delete(room, r)

    def _tell_decode(self, room: int, r: PrefillRoom, msg: Status | Abort) -> None:
        r.concluded = True
        for info in r.infos.values():
            peer = self._peers.get(info.session)
            if peer is not None:  # a session forgotten or restarted is not told (its endpoint may be a new one)
                self.send(peer.endpoint, replace(msg, session=info.session))

    def _maybe_delete(self, room: int, r: PrefillRoom) -> None:
        told = r.concluded or not r.infos
        if r.released and told and r.pending == 0 and r.inflight == 0 and self._rooms.get(room) is r:
            self._free_aux(r)
            del self._rooms[room]
            if not r.infos and r.state.state == TransferState.FAILED:
                reason = (r.state.reason or FailureReason.FAILED).value
                self._ended[room] = (now(), f"the prefill request ended before decode asked: {r.state.error}", reason)
                if len(self._ended) > MAX_EARLY:
                    self._ended.popitem(last=False)

    def _free_aux(self, r: PrefillRoom) -> None:
        if r.aux_row is not None:
            self.aux.free(r.aux_row, clear=False)  # only ever sent after `write_aux` wrote it whole
            r.aux_row = None
