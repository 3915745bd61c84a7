"""Decode's watch over its prefills: the heartbeat, restart detection and loss (the rules are in
transfer/decode.py's docstring; this is the part that applies them to rooms).

Every `Timeouts.heartbeat_interval` decode probes `GET /health` of each prefill it knows (registered, resolving,
or holding pages of a failed room). The answer is one of:
- ok, with each rank's endpoint and instance: a different instance for our rank than the one we registered with
  (or sent a room to) means that rank restarted (`_instance_gone`);
- gone (connection refused or unreachable) or our rank missing from the answer: after `heartbeat_failures`
  such beats the prefill is lost and nothing of it can write any more;
- frozen (connection accepted, no answer): counted as a miss too, but the process exists and may write once it
  runs again, so the pages of its rooms stay quarantined until it acknowledges our aborts.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from contracts.metrics import FailureReason
from transfer.aux import AuxRow
from transfer.bootstrap import Probe, probe
from transfer.manager import now
from transfer.protocol import Abort, TransferState
from transfer.state import RoomState

if TYPE_CHECKING:
    from transfer.config import Timeouts, TransferConfig

log = logging.getLogger(__name__)


@dataclass
class _Prefill:
    """A prefill rank as decode knows it (one per bootstrap address)."""

    addr: str
    endpoint: str = ""
    instance: str = ""  # the instance we registered with
    registered: bool = False
    generation: int = 0  # bumped with every registration
    misses: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Room:
    state: RoomState
    bootstrap_addr: str
    dst_pages: list[int]
    prompt_len: int
    aux_row: int
    info_sent: bool = False
    sent_to: str = ""  # the prefill instance holding our info ("" when none does)
    sent_endpoint: str = ""
    sent_generation: int = 0
    resends: int = 0  # UnknownSession answers acted on
    stale_until: float = 0.0  # its prefill restarted: fail it then, unless the new instance answers for it
    stale_why: str = ""
    released_by_prefill: bool = False  # prefill said no write of this room can still land
    writer_gone: bool = False  # the prefill instance that could write into its pages is gone
    superseded: bool = False  # the instance its info went to was replaced (handled once)
    await_ack: bool = False  # its prefill was frozen: only its acknowledgement (or death) frees the pages
    quarantine_logged: bool = False
    failed_at: float = 0.0
    result: AuxRow | None = None
    last_error: str = ""  # why bootstrapping has not succeeded yet


class PrefillWatch:
    """Mixed into DecodeTransferManager; works on its rooms and prefills under its lock."""

    cfg: TransferConfig
    timeouts: Timeouts
    _lock: threading.RLock
    _stop: threading.Event
    _rooms: dict[int, Room]
    _prefills: dict[str, _Prefill]
    _frozen: set[str]
    _bootstrapper: ThreadPoolExecutor
    endpoint: str
    session: str
    if TYPE_CHECKING:  # provided by the manager (declared here only for the type checker, never shadowing it)

        def _fail(self, room: int, error: str, reason: FailureReason, tell_prefill: bool) -> None: ...
        def send(self, endpoint: str, msg: Abort) -> bool: ...
        def forget_endpoint(self, endpoint: str) -> None: ...

    def _heartbeat_loop(self) -> None:
        timeout = min(self.timeouts.http, self.timeouts.heartbeat_interval)
        while not self._stop.wait(self.timeouts.heartbeat_interval):
            for addr in self._watched():
                try:
                    self._beat(addr, probe(addr, timeout=timeout))
                except Exception:  # one prefill's odd answer must not stop the watch over the others
                    log.exception("decode: heartbeat of prefill %s failed", addr)

    def _watched(self) -> set[str]:
        with self._lock:
            addrs = set(self._prefills)
            for r in self._rooms.values():
                if not r.state.terminal or (r.sent_to and not (r.released_by_prefill or r.writer_gone)):
                    addrs.add(r.bootstrap_addr)
            self._frozen &= addrs  # bounded: only what we still watch
        return addrs

    def _beat(self, addr: str, pr: Probe) -> None:
        with self._lock:
            p = self._prefills.get(addr)
            rank = pr.ranks.get(self.cfg.tp_rank) if pr.ok else None
            if rank is not None:
                self._frozen.discard(addr)
                if p is not None:
                    p.misses = 0
                self._check_instance(addr, rank)
                return
            if pr.frozen and addr not in self._frozen:
                self._frozen.add(addr)
                for r in self._rooms.values():
                    if r.bootstrap_addr == addr and r.sent_to:
                        r.await_ack = True  # it may write once it runs again, whatever our deadlines say
            elif not pr.frozen:
                self._frozen.discard(addr)
            misses = (p.misses + 1) if p else self.timeouts.heartbeat_failures
            if p is not None:
                p.misses = misses
            if misses < self.timeouts.heartbeat_failures:
                return
            error = pr.error if not pr.ok else f"rank {self.cfg.tp_rank} is not registered there"
            self._lost(addr, p, misses, gone=not pr.frozen, error=error)

    def _check_instance(self, addr: str, rank: dict) -> None:
        """The prefill answers: does its instance for our rank still match? Lock held."""
        current = rank.get("instance", "")
        endpoint = f"tcp://{rank.get('rank_ip')}:{rank.get('rank_port')}"
        p = self._prefills.get(addr)
        known = {(p.instance, p.endpoint)} if p is not None and p.registered else set()
        known |= {
            (r.sent_to, r.sent_endpoint)
            for r in self._rooms.values()
            if r.bootstrap_addr == addr and r.sent_to and not r.superseded
        }
        for old, old_endpoint in known:
            if old != current:
                self._instance_gone(addr, old, current, same_endpoint=old_endpoint == endpoint)
        for r in self._rooms.values():  # it runs again: ask once more for what we wait on (acks are idempotent)
            if r.bootstrap_addr == addr and r.await_ack and not (r.released_by_prefill or r.writer_gone):
                self.send(r.sent_endpoint, Abort(r.state.room, self.endpoint, r.state.error, session=self.session))

    def _instance_gone(self, addr: str, old: str, new: str, same_endpoint: bool) -> None:
        """Prefill instance `old` at `addr` was replaced by `new`. Lock held.

        When `new` holds the old one's endpoint, the old process is gone (it held the port): its rooms' pages
        are safe at once. Otherwise it may still live somewhere; the usual page rules apply."""
        why = f"prefill at {addr} restarted (instance {old} -> {new or '?'}); its in-flight transfers are lost"
        p = self._prefills.get(addr)
        was_registered = p is not None and p.instance == old and p.registered
        if was_registered:
            p.registered = False  # the next room registers with the new instance
            if not same_endpoint:
                self.forget_endpoint(p.endpoint)  # on the same endpoint the socket already reconnected to the new one
        failed = waiting = 0
        for room, r in self._rooms.items():
            if r.bootstrap_addr != addr or r.sent_to != old or r.superseded:
                continue
            r.superseded = True
            r.writer_gone = r.writer_gone or same_endpoint
            if r.state.terminal:
                continue
            if r.state.state >= TransferState.TRANSFERRING:
                self._fail(room, why, FailureReason.PEER_RESTARTED, tell_prefill=False)
                failed += 1
            elif not r.stale_until:
                # its info may have reached the new process instead (it then answers UnknownSession): wait a little
                r.stale_until, r.stale_why = now() + self.timeouts.http, why
                waiting += 1
        if was_registered or failed or waiting:
            log.warning("decode: %s: failed %d rooms, %d more unless the new one answers", why, failed, waiting)

    def _lost(self, addr: str, p: _Prefill | None, misses: int, gone: bool, error: str) -> None:
        """Heartbeats gave up on `addr`. Lock held."""
        self._prefills.pop(addr, None)
        ever_reached = p is not None and p.registered
        changed = 0
        for room, r in self._rooms.items():
            if r.bootstrap_addr != addr:
                continue
            if gone and r.sent_to and not r.writer_gone:
                r.writer_gone = True
                changed += 1
            if r.state.terminal:
                continue
            changed += 1
            why = f"lost connection with prefill {addr}" if ever_reached or r.sent_to else f"prefill {addr} unreachable"
            why += f" ({r.last_error})" if r.last_error else ""
            # a frozen prefill gets our abort once it runs again, and acknowledges it once its writes drained
            self._fail(room, why, FailureReason.FAILED, tell_prefill=not gone)
        if p is not None or changed:  # not again at every beat for an address we only keep watching
            how = "gone" if gone else "not answering (frozen?)"
            log.error("decode: lost prefill %s after %d missed heartbeats: %s (%s)", addr, misses, how, error)
        if gone and p is not None and p.endpoint:
            self.forget_endpoint(p.endpoint)
