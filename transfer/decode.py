"""Decode side: resolves prefills through their bootstrap servers, registers its KV memory with each
(once per prefill instance), sends per-room transfer info, and follows each room to Success or Failed.

Tensor parallelism. Each decode rank runs its own manager (its own pool of its KV heads, its own session). For a
room it resolves the prefill's layout (its TP size p), registers with EVERY prefill rank (their endpoints from
`GET /route?tp_rank=i`) and sends each the room's info with `required_dsts` = this decode's TP size; each prefill
rank writes this rank the heads the head map gives the pair (transfer/head_map.py). The room succeeds here once
EVERY prefill rank reported Success; decode rank 0 then checks the aux row (only prefill rank 0 writes it, only to
decode rank 0) and `result()` is valid there; other ranks' rooms succeed without it. A failure reported by any
prefill rank (or our own) fails the room and aborts it at every prefill rank that may still write (`Leg`s).

Identity. Decode's session is its endpoint plus its instance id, so a decode restarted on the same port is a
new session to every prefill. Each prefill rank publishes its instance id in its bootstrap record and /health;
decode remembers the instance it registered with, and each room the instance its info went to.

Prefill restarts (transfer/decode_watch.py watches): a new instance at the address — seen by the heartbeat, or
by an `UnknownSession` answer from the new process — means the old process is gone. Its rooms fail at once
(PEER_RESTARTED) if it had started writing; rooms only waiting for input get a short grace (`Timeouts.http`)
in which the new instance may answer `UnknownSession` for them (their info reached the new process, not the
old one); those, and any room answered `UnknownSession`, re-register and send their info again (at most
MAX_RESENDS times per room). Rooms still bootstrapping simply resolve the new instance.

Pages of a failed room stay reserved until no write can still land in them, i.e. until for every prefill rank
its info reached (every leg):
- safe at once: the info never reached a prefill; the prefill rank said it drained (a terminal status, its own
  abort, our abort's ack); the instance that could write is gone (restarted on the same endpoint, or its
  control socket refuses connections / cannot be reached);
- quarantined, without time limit, while the prefill is frozen (its bootstrap accepts connections but does not
  answer: SIGSTOP, a hang) or was frozen when the room failed: it may write once it runs again, so only its
  acknowledgement, its restart or its death frees them (logged once per room);
- otherwise (a live prefill that never acknowledged) after the abort-ack timeout.
`KVReceiver.safe_to_free()` applies these rules.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from contracts.codec import Record
from contracts.metrics import FailureReason
from engine.kvcache import KVPool
from transfer.aux import AuxBuffer, AuxRow
from transfer.bootstrap import BootstrapError, LayoutMismatch, RankInfo, check_layout, fetch_route, room_writers
from transfer.config import TransferConfig
from transfer.decode_watch import Leg, PrefillRank, PrefillWatch, Room, _Prefill
from transfer.manager import DuplicateRoomError, RoomHandle, TransferManager, now
from transfer.protocol import Abort, AbortAck, Registration, Status, TransferInfo, TransferState, UnknownSession
from transfer.state import RoomState

log = logging.getLogger(__name__)

MAX_RESENDS = 2  # UnknownSession answers one room may act on (re-register, send again) before it fails


class NoAuxRowFree(RuntimeError):
    """Every aux row is held by a room in flight: the scheduler should retry the request later."""


class KVReceiver(RoomHandle):
    """The decode scheduler's handle on one room."""

    manager: DecodeTransferManager

    def result(self) -> AuxRow:
        """The first token etc., valid once poll() is SUCCESS, on decode TP rank 0 (the only one the aux row
        reaches: the other ranks get the first token from rank 0)."""
        r = self.manager._room(self.room)
        if r.result is None:
            rank = self.manager.cfg.tp_rank
            if rank != 0 and r.state.state == TransferState.SUCCESS:
                raise ValueError(f"room {self.room}: the aux row reaches decode rank 0 only; this is rank {rank}")
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


class DecodeTransferManager(PrefillWatch, TransferManager):
    role = "decode"

    def __init__(self, cfg: TransferConfig, pool: KVPool, aux: AuxBuffer | None = None) -> None:
        super().__init__(cfg, pool, aux)
        self.session = f"{self.endpoint}#{self.instance}"
        self._rooms: dict[int, Room] = {}
        self._prefills: dict[str, _Prefill] = {}
        self._frozen: set[str] = set()  # prefill addresses whose bootstrap accepts connections but does not answer
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
            self._rooms[room] = Room(RoomState(room, self.timeouts), bootstrap_addr, list(dst_pages), prompt_len, row)
        self._bootstrapper.submit(self._bootstrap_guarded, room)
        return KVReceiver(self, room)

    def _safe_to_free(self, room: int) -> bool:
        with self._lock:
            r = self._room(room)
            if r.state.state == TransferState.SUCCESS:
                return True
            if r.state.state != TransferState.FAILED:
                return False
            if not r.live_legs():  # every prefill rank it reached drained, or is gone
                return True
            if r.await_ack or r.bootstrap_addr in self._frozen:
                if not r.quarantine_logged:
                    r.quarantine_logged = True
                    log.warning("decode: room %d: holding its %d pages: prefill %s stopped answering and may still "
                                "write into them; they are freed once it acknowledges, restarts or is gone", room,
                                len(r.dst_pages), r.bootstrap_addr)  # fmt: skip
                return False
            return now() - r.failed_at > self.timeouts.abort_ack

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

    def _bootstrap_guarded(self, room: int) -> None:
        """A pool thread swallows what its task raises: fail the room with it instead of leaving it to time out."""
        try:
            self._bootstrap(room)
        except Exception as e:
            log.exception("decode: room %d: bootstrap failed", room)
            self._fail(room, f"bootstrap failed: {type(e).__name__}: {e}", FailureReason.FAILED, tell_prefill=True)

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
                self._fail(room, str(e), FailureReason.FAILED)
                return
            except BootstrapError as e:
                # prefill may still be starting: retry until the room's bootstrap deadline
                r.last_error = str(e)
                self._stop.wait(delay)
                delay = min(delay * 2, 1.0)
        with self._lock:
            if r.state.terminal:
                return
            r.writers = set(room_writers(room, prefill.tp_size, prefill.dp_size))
            for rank in sorted(r.writers):  # every prefill rank writing the room not holding our info yet
                if rank in r.legs:
                    continue
                where = prefill.ranks[rank]
                info = TransferInfo(room, self.session, self.endpoint, where.instance, r.dst_pages, r.aux_row,
                                    r.prompt_len, required_dsts=self.cfg.tp_size)  # fmt: skip
                if not self.send(where.endpoint, info):
                    self._fail(room, f"cannot reach prefill rank {rank} control socket {where.endpoint}",
                               FailureReason.FAILED)  # fmt: skip
                    return
                r.legs[rank] = Leg(where.instance, where.endpoint, prefill.generation)
            if not any(leg.superseded for leg in r.legs.values()):
                r.stale_until = 0.0
            r.state.advance(TransferState.WAITING_FOR_INPUT)

    def _resolve(self, addr: str) -> _Prefill:
        with self._lock:
            p = self._prefills.setdefault(addr, _Prefill(addr))
        with p.lock:  # one lookup + registration per prefill instance, however many rooms wait on it
            if p.registered:
                return p
            layout = fetch_route(addr, timeout=self.timeouts.http)
            check_layout(self.layout, layout, addr)
            tp_size, dp_size = int(layout["tp_size"]), int(layout.get("dp_size", 1))
            ranks = {rank: self._rank(addr, rank) for rank in range(tp_size)}
            registration = self._registration()
            for rank, where in ranks.items():  # every rank: each writes its share of the heads into our pages
                if not self.send(where.endpoint, registration):
                    raise BootstrapError(f"cannot reach prefill rank {rank} control socket {where.endpoint}")
            with self._lock:
                p.tp_size, p.dp_size, p.ranks = tp_size, dp_size, ranks
                p.generation += 1
                p.registered = True
                p.misses = 0
                if self._prefills.get(addr) is not p:  # dropped meanwhile (declared lost): it answers again
                    self._prefills[addr] = p
            log.info("decode: rank %d registered with prefill %s (TP%d: %s)", self.cfg.tp_rank, addr, tp_size,
                     ", ".join(f"{w.endpoint} instance {w.instance}" for w in ranks.values()))  # fmt: skip
            return p

    def _rank(self, addr: str, rank: int) -> PrefillRank:
        where = fetch_route(addr, tp_rank=rank, timeout=self.timeouts.http)
        instance = where.get("instance")
        if not instance or not isinstance(instance, str):
            raise LayoutMismatch(
                f"prefill at {addr} publishes no instance id in its bootstrap record: it runs an older "
                "pdserve; run the same version on prefill and decode"
            )
        return PrefillRank(f"tcp://{where['rank_ip']}:{where['rank_port']}", instance)

    def _registration(self) -> Registration:
        kv = self.regions[: 2 * self.num_layers]
        return Registration(
            session=self.session,
            endpoint=self.endpoint,
            backend=self.cfg.backend,
            backend_metadata=self.backend.metadata(),
            k_bases=[x.base for x in kv[: self.num_layers]],
            v_bases=[x.base for x in kv[self.num_layers :]],
            item_bytes=kv[0].item_bytes,
            num_items=kv[0].num_items,
            aux_base=self.aux.region.base,
            aux_row_bytes=self.aux.region.item_bytes,
            aux_rows=self.aux.rows,
            tp_rank=self.cfg.tp_rank,
            tp_size=self.cfg.tp_size,
            kv_head_start=self.pool.layout.kv_head_start,
            num_kv_heads=self.pool.layout.num_kv_heads,
            total_kv_heads=self.pool.layout.model_kv_heads,
        )

    # -- control messages -----------------------------------------------------------------------------

    def _handle(self, msg: Record) -> None:
        if getattr(msg, "session", self.session) not in ("", self.session):
            # meant for an earlier decode on this endpoint (we restarted): not ours
            log.debug("decode: dropped %s for session %s", type(msg).__name__, msg.session)  # type: ignore[attr-defined]
        elif isinstance(msg, Status):
            self._on_status(msg)
        elif isinstance(msg, UnknownSession):
            self._on_unknown_session(msg)
        elif isinstance(msg, Abort):
            with self._lock:
                r = self._rooms.get(msg.room)
                leg = r.legs.get(msg.sender_rank) if r is not None else None
                if leg is not None:
                    leg.ended = leg.released = True  # prefill aborts only once its writes drained
                if r is not None:
                    self._fail(msg.room, msg.reason or "aborted by prefill", FailureReason.ABORTED)
            self.send(msg.endpoint, AbortAck(msg.room, self.cfg.tp_rank))
        elif isinstance(msg, AbortAck):
            with self._lock:
                r = self._rooms.get(msg.room)
                leg = r.legs.get(msg.sender_rank) if r is not None else None
                if leg is not None:
                    leg.released = True
        else:
            log.warning("decode: unexpected %s message dropped", type(msg).__name__)

    def _on_status(self, msg: Status) -> None:
        try:
            state = TransferState(msg.state)
        except ValueError:
            log.warning("decode: room %d: unknown state %r dropped", msg.room, msg.state)
            return
        if state == TransferState.SUCCESS:
            self._on_success(msg.room, msg.sender_rank)
            return
        with self._lock:
            r = self._rooms.get(msg.room)
            if r is None:
                return
            if state == TransferState.FAILED:
                leg = r.legs.get(msg.sender_rank)
                if leg is not None:
                    leg.ended, leg.released = True, msg.drained
                try:
                    reason = FailureReason(msg.reason)
                except ValueError:  # empty or unknown: count it, under the generic reason
                    reason = FailureReason.FAILED
                self._fail(msg.room, msg.error or "prefill reported failure", reason)
            else:
                r.state.advance(state)

    def _on_success(self, room: int, rank: int) -> None:
        """Prefill rank `rank` completed every write of the room; once every rank did, the room succeeded: on
        decode rank 0 check the aux row and take the first token from it.

        The row is read without the lock (on CUDA a device→host copy: the scheduler must not wait on it), then
        the result applied under the lock only if the room is still the same live one."""
        with self._lock:
            r = self._rooms.get(room)
            if r is None:
                return
            leg = r.legs.get(rank)
            if leg is not None:
                leg.ended = leg.released = True  # every write of its part completed, even if we gave up on it
            if rank not in r.writers or r.state.terminal:  # a rank that does not write this room has no say
                return
            r.done.add(rank)
            r.state.advance(TransferState.TRANSFERRING)
            if not r.writers <= r.done:
                return
            if self.cfg.tp_rank != 0:  # the aux row reaches decode rank 0 only
                r.state.advance(TransferState.SUCCESS)
                return
            aux_row = r.aux_row
        try:
            row = self.aux.read(aux_row)
        except Exception as e:
            log.exception("decode: room %d: reading aux row %d failed", room, aux_row)
            self._fail(room, f"reading the aux row failed: {type(e).__name__}: {e}", FailureReason.FAILED)
            return
        with self._lock:
            if self._rooms.get(room) is not r or r.state.terminal:
                return  # released or failed meanwhile (its row may belong to another room by now)
            if row.room != room or row.prompt_len != r.prompt_len:
                self._fail(
                    room,
                    f"aux row mismatch: expected room {room} / {r.prompt_len} tokens, "
                    f"got room {row.room} / {row.prompt_len}",
                    FailureReason.FAILED,
                )
                return
            r.result = row
            r.state.advance(TransferState.TRANSFERRING)
            r.state.advance(TransferState.SUCCESS)

    def _on_unknown_session(self, msg: UnknownSession) -> None:
        """A prefill rank does not know us: re-register and send it the room's info again."""
        with self._lock:
            r = self._rooms.get(msg.room)
            leg = r.legs.get(msg.sender_rank) if r is not None else None
            if r is None or leg is None or r.state.terminal:
                return
            addr = r.bootstrap_addr
            if msg.instance != leg.instance:
                # another process answers on the endpoint we sent to, so the instance we registered with is gone
                self._instance_gone(addr, msg.sender_rank, leg.instance, msg.instance, same_endpoint=True)
            if r.state.terminal:
                return
            if r.resends >= MAX_RESENDS:
                error = (
                    f"prefill at {addr} (instance {msg.instance}) does not know this decode session even after "
                    f"{r.resends} re-registrations"
                )
                self._fail(msg.room, error, FailureReason.FAILED)
                return
            r.resends += 1
            del r.legs[msg.sender_rank]  # nobody there holds its info now; it is sent again as a fresh one
            p = self._prefills.get(addr)
            if p is not None and p.generation == leg.generation:
                p.registered = False  # the registration this room relied on is not known there: register again
        log.info("decode: room %d: prefill %s rank %d (%s) does not know us; registering again", msg.room, addr,
                 msg.sender_rank, msg.instance)  # fmt: skip
        self._bootstrapper.submit(self._bootstrap_guarded, msg.room)

    def _fail(self, room: int, error: str, reason: FailureReason, tell_prefill: bool = True) -> None:
        with self._lock:
            r = self._rooms.get(room)
            if r is not None and r.state.fail(error, reason):
                self._failed(room, r, tell_prefill)

    def _failed(self, room: int, r: Room, tell_prefill: bool = True) -> None:
        """Bookkeeping after a room failed; lock held. `tell_prefill`: abort it at every prefill rank that may
        still write into its pages and has not told us its own outcome."""
        r.failed_at = now()
        timed_out_bootstrapping = (
            r.state.reason is FailureReason.TIMED_OUT and r.state.failed_in == TransferState.BOOTSTRAPPING
        )
        if r.last_error and timed_out_bootstrapping:  # say why bootstrapping never succeeded
            r.state.error += f" (last error: {r.last_error})"
        if r.bootstrap_addr in self._frozen:
            r.await_ack = True  # a frozen prefill may write once it runs again: only its word frees the pages
        log.warning("decode: room %d failed: %s", room, r.state.error)
        if not tell_prefill:
            return
        for leg in r.live_legs():
            if not leg.ended:
                abort = Abort(room, self.endpoint, r.state.error, session=self.session, sender_rank=self.cfg.tp_rank)
                self.send(leg.endpoint, abort)

    # -- deadlines ------------------------------------------------------------------------------------

    def _tick(self) -> None:
        t = now()
        with self._lock:
            for room, r in self._rooms.items():
                if r.state.check_timeout():
                    self._failed(room, r, tell_prefill=True)
                elif r.stale_until and t > r.stale_until and not r.state.terminal:
                    # no new instance answered for it: it reached the old process, which is gone
                    self._fail(room, r.stale_why, FailureReason.PEER_RESTARTED)

    def close(self) -> None:
        self._bootstrapper.shutdown(wait=False, cancel_futures=True)
        super().close()
