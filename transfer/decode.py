"""Decode side: resolves prefills through their bootstrap servers, registers its KV memory with each
(once per connection), sends per-room transfer info, and follows each room to Success or Failed.

A failed room's pages stay reserved until no write can still land in them: prefill said it drained
(a terminal status or its own abort), it acknowledged our abort, it is known dead, or the abort-ack
timeout passed. `KVReceiver.safe_to_free()` says when.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from contracts.codec import Record
from contracts.metrics import FailureReason
from engine.kvcache import KVPool
from transfer.aux import AuxBuffer, AuxRow
from transfer.bootstrap import BootstrapError, LayoutMismatch, RankInfo, check_layout, fetch_route, health
from transfer.config import TransferConfig
from transfer.manager import DuplicateRoomError, RoomHandle, TransferManager, now
from transfer.protocol import Abort, AbortAck, Registration, Status, TransferInfo, TransferState
from transfer.state import RoomState

log = logging.getLogger(__name__)


class NoAuxRowFree(RuntimeError):
    """Every aux row is held by a room in flight: the scheduler should retry the request later."""


@dataclass
class _Prefill:
    """A prefill instance as decode knows it (one per bootstrap address)."""

    addr: str
    endpoint: str = ""
    registered: bool = False
    misses: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class _Room:
    state: RoomState
    bootstrap_addr: str
    dst_pages: list[int]
    prompt_len: int
    aux_row: int
    info_sent: bool = False
    released_by_prefill: bool = False  # prefill said no write of this room can still land
    failed_at: float = 0.0
    result: AuxRow | None = None
    last_error: str = ""  # why bootstrapping has not succeeded yet


class KVReceiver(RoomHandle):
    """The decode scheduler's handle on one room."""

    manager: DecodeTransferManager

    def result(self) -> AuxRow:
        """The first token etc., valid once poll() is SUCCESS."""
        r = self.manager._room(self.room)
        if r.result is None:
            raise ValueError(f"room {self.room} has not succeeded")
        return r.result

    def abort(self, reason: str = "aborted by decode") -> None:
        self.manager._fail(self.room, reason, FailureReason.ABORTED, tell_prefill=True)

    def safe_to_free(self) -> bool:
        return self.manager._safe_to_free(self.room)

    def release(self) -> None:
        """Forget the room (aborting it first if still live). Pages are the caller's: free them only when
        `safe_to_free()` was True."""
        self.manager._release(self.room)


class DecodeTransferManager(TransferManager):
    role = "decode"

    def __init__(self, cfg: TransferConfig, pool: KVPool, aux: AuxBuffer | None = None) -> None:
        super().__init__(cfg, pool, aux)
        self.session = self.endpoint
        self._rooms: dict[int, _Room] = {}
        self._prefills: dict[str, _Prefill] = {}
        self._dead: set[str] = set()  # prefills declared lost; cleared when one answers again
        self._bootstrapper = ThreadPoolExecutor(max_workers=4, thread_name_prefix="decode-bootstrap")
        self._spawn(self._heartbeat_loop, "heartbeat")
        # Derived exactly as a prefill rank derives what it registers, so both sides compare like with like.
        me = RankInfo.of(pool.layout, cfg.backend, cfg.tp_size, cfg.tp_rank, cfg.host, self.zmq_port)
        self.layout = me.layout()

    # -- scheduler API --------------------------------------------------------------------------------

    def create_receiver(self, room: int, bootstrap_addr: str, dst_pages: list[int], prompt_len: int) -> KVReceiver:
        """Start receiving `room` into `dst_pages`. Raises DuplicateRoomError or NoAuxRowFree."""
        with self._lock:
            if room in self._rooms:
                raise DuplicateRoomError(f"bootstrap_room {room} is already in flight on this decode")
            row = self.aux.allocate()
            if row is None:
                raise NoAuxRowFree("too many rooms in flight (no free aux row); retry later")
            self._rooms[room] = _Room(RoomState(room, self.timeouts), bootstrap_addr, list(dst_pages), prompt_len, row)
        self._bootstrapper.submit(self._bootstrap, room)
        return KVReceiver(self, room)

    def _safe_to_free(self, room: int) -> bool:
        with self._lock:
            r = self._room(room)
            if r.state.state == TransferState.SUCCESS:
                return True
            if r.state.state != TransferState.FAILED:
                return False
            return (
                not r.info_sent
                or r.released_by_prefill
                or r.bootstrap_addr in self._dead
                or now() - r.failed_at > self.timeouts.abort_ack
            )

    def _release(self, room: int) -> None:
        with self._lock:
            r = self._rooms.get(room)
            if r is None:
                return
            if not r.state.terminal:
                self._fail(room, "released before the transfer ended", FailureReason.ABORTED, tell_prefill=True)
            del self._rooms[room]
            self.aux.free(r.aux_row)

    # -- bootstrap (in a small thread pool: it does blocking HTTP) --------------------------------------

    def _bootstrap(self, room: int) -> None:
        delay = 0.05
        while True:
            with self._lock:
                r = self._rooms.get(room)
            if r is None or r.state.terminal:
                return
            try:
                prefill = self._resolve(r.bootstrap_addr)
                break
            except LayoutMismatch as e:
                self._fail(room, str(e), FailureReason.FAILED, tell_prefill=False)
                return
            except BootstrapError as e:
                # prefill may still be starting: retry until the room's bootstrap deadline
                r.last_error = str(e)
                self._stop.wait(delay)
                delay = min(delay * 2, 1.0)
        with self._lock:
            if r.state.terminal:
                return
            info = TransferInfo(room, self.session, r.dst_pages, r.aux_row, r.prompt_len)
            r.info_sent = self.send(prefill.endpoint, info)
            if r.info_sent:
                r.state.advance(TransferState.WAITING_FOR_INPUT)
            else:
                error = f"cannot reach prefill control socket {prefill.endpoint}"
                self._fail(room, error, FailureReason.FAILED, tell_prefill=False)

    def _resolve(self, addr: str) -> _Prefill:
        with self._lock:
            p = self._prefills.setdefault(addr, _Prefill(addr))
        with p.lock:  # one lookup + registration per prefill, however many rooms wait on it
            if p.registered:
                return p
            layout = fetch_route(addr, timeout=self.timeouts.http)
            check_layout(self.layout, layout, addr)
            rank = fetch_route(addr, tp_rank=self.cfg.tp_rank, timeout=self.timeouts.http)
            p.endpoint = f"tcp://{rank['rank_ip']}:{rank['rank_port']}"
            kv = self.regions[: 2 * self.num_layers]
            reg = Registration(
                session=self.session,
                endpoint=self.endpoint,
                backend=self.cfg.backend,
                backend_metadata=self.backend.metadata(),
                k_bases=[x.base for x in kv[: self.num_layers]],
                v_bases=[x.base for x in kv[self.num_layers :]],
                page_bytes=self.pool.page_bytes,
                num_pages=self.pool.num_pages,
                aux_base=self.aux.region.base,
                aux_row_bytes=self.aux.region.item_bytes,
                aux_rows=self.aux.rows,
                tp_rank=self.cfg.tp_rank,
                tp_size=self.cfg.tp_size,
            )
            if not self.send(p.endpoint, reg):
                raise BootstrapError(f"cannot reach prefill control socket {p.endpoint}")
            p.registered = True
            with self._lock:
                self._dead.discard(addr)
            log.info("decode: registered with prefill %s (%s)", addr, p.endpoint)
            return p

    # -- control messages -----------------------------------------------------------------------------

    def _handle(self, msg: Record) -> None:
        if isinstance(msg, Status):
            self._on_status(msg)
        elif isinstance(msg, Abort):
            with self._lock:
                r = self._rooms.get(msg.room)
                if r is not None:
                    r.released_by_prefill = True  # prefill aborts only once its writes drained
                    self._fail(msg.room, msg.reason or "aborted by prefill", FailureReason.ABORTED, tell_prefill=False)
            self.send(msg.endpoint, AbortAck(msg.room, self.cfg.tp_rank))
        elif isinstance(msg, AbortAck):
            with self._lock:
                r = self._rooms.get(msg.room)
                if r is not None:
                    r.released_by_prefill = True
        else:
            log.warning("decode: unexpected %s message dropped", type(msg).__name__)

    def _on_status(self, msg: Status) -> None:
        with self._lock:
            r = self._rooms.get(msg.room)
            if r is None:
                return
            try:
                state = TransferState(msg.state)
            except ValueError:
                log.warning("decode: room %d: unknown state %r dropped", msg.room, msg.state)
                return
            if state == TransferState.FAILED:
                r.released_by_prefill = msg.drained
                try:
                    reason = FailureReason(msg.reason)
                except ValueError:  # empty or unknown: count it, under the generic reason
                    reason = FailureReason.FAILED
                self._fail(msg.room, msg.error or "prefill reported failure", reason, tell_prefill=False)
            elif state == TransferState.SUCCESS:
                row = self.aux.read(r.aux_row)
                if row.room != msg.room or row.prompt_len != r.prompt_len:
                    r.released_by_prefill = True
                    self._fail(
                        msg.room,
                        f"aux row mismatch: expected room {msg.room} / {r.prompt_len} tokens, "
                        f"got room {row.room} / {row.prompt_len}",
                        FailureReason.FAILED,
                        tell_prefill=False,
                    )
                    return
                r.result = row
                r.state.advance(TransferState.TRANSFERRING)
                r.state.advance(TransferState.SUCCESS)
            else:
                r.state.advance(state)

    def _fail(self, room: int, error: str, reason: FailureReason, tell_prefill: bool) -> None:
        with self._lock:
            r = self._rooms.get(room)
            if r is not None and r.state.fail(error, reason):
                self._failed(room, r, tell_prefill)

    def _failed(self, room: int, r: _Room, tell_prefill: bool) -> None:
        """Bookkeeping after a room failed; lock held."""
        r.failed_at = now()
        timed_out_bootstrapping = (
            r.state.reason is FailureReason.TIMED_OUT and r.state.failed_in == TransferState.BOOTSTRAPPING
        )
        if r.last_error and timed_out_bootstrapping:  # say why bootstrapping never succeeded
            r.state.error += f" (last error: {r.last_error})"
        log.warning("decode: room %d failed: %s", room, r.state.error)
        if tell_prefill and r.info_sent and r.bootstrap_addr not in self._dead:
            p = self._prefills.get(r.bootstrap_addr)
            if p is not None and p.endpoint:
                self.send(p.endpoint, Abort(room, self.endpoint, r.state.error))

    # -- deadlines and liveness -----------------------------------------------------------------------

    def _tick(self) -> None:
        with self._lock:
            for room, r in self._rooms.items():
                if r.state.check_timeout():
                    self._failed(room, r, tell_prefill=True)

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.timeouts.heartbeat_interval):
            with self._lock:
                watched = {r.bootstrap_addr for r in self._rooms.values() if not r.state.terminal}
            for addr in watched:
                if health(addr, timeout=min(self.timeouts.http, self.timeouts.heartbeat_interval)):
                    with self._lock:
                        if addr in self._prefills:
                            self._prefills[addr].misses = 0
                    continue
                self._missed(addr)

    def _missed(self, addr: str) -> None:
        with self._lock:
            p = self._prefills.get(addr)
            misses = (p.misses + 1) if p else self.timeouts.heartbeat_failures
            if p:
                p.misses = misses
            if misses < self.timeouts.heartbeat_failures:
                return
            log.error("decode: lost prefill %s after %d missed heartbeats", addr, misses)
            self._dead.add(addr)
            self._prefills.pop(addr, None)
            ever_reached = p is not None and p.registered
            for room, r in self._rooms.items():
                if r.bootstrap_addr == addr:
                    why = f"lost connection with prefill {addr}" if ever_reached else f"prefill {addr} unreachable"
                    why += f" ({r.last_error})" if r.last_error else ""
                    self._fail(room, why, FailureReason.FAILED, tell_prefill=False)
        if p is not None and p.endpoint:
            self.forget_endpoint(p.endpoint)

    def close(self) -> None:
        self._bootstrapper.shutdown(wait=False, cancel_futures=True)
        super().close()
