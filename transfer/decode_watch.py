"""Decode's watch over its prefills: the heartbeat, restart detection and loss (the rules are in
transfer/decode.py's docstring; this is the part that applies them to rooms).

A prefill is one bootstrap address with `tp_size` ranks; a room's info goes to every rank (one `Leg` each), and
each leg is watched on its own: which instance holds it, whether that rank answered, whether it is gone.

Every `Timeouts.heartbeat_interval` decode probes `GET /health` of each prefill it knows (registered, resolving,
or holding pages of a failed room), and opens a TCP connection to each prefill rank's control socket it knows.
The answer is one of:
- ok, with each rank's endpoint and instance: a different instance for a rank than the one we registered with
  (or sent a room to) means that rank restarted (`_instance_gone`);
- gone (connection refused or unreachable), a rank missing from the answer, or a rank whose control socket
  refuses connections: after `heartbeat_failures` such beats the prefill is lost; the legs of ranks whose socket
  refuses connections (or that are missing) are gone: nothing of them can write any more;
- frozen (connection accepted, no answer): counted as a miss too, but the process exists and may write once it
  runs again, so the pages of its rooms stay quarantined until it acknowledges our aborts.
"""

from __future__ import annotations

import logging
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlparse

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
class PrefillRank:
    endpoint: str  # its control socket
    instance: str


@dataclass
class _Prefill:
    """A prefill as decode knows it (one per bootstrap address): its ranks once registered with all of them."""

    addr: str
    tp_size: int = 1
    dp_size: int = 1  # DP attention: each room is written by one rank (transfer.bootstrap.room_writers)
    ranks: dict[int, PrefillRank] = field(default_factory=dict)  # the instances we registered with
    registered: bool = False
    generation: int = 0  # bumped with every registration
    misses: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Leg:
    """A room's info at one prefill rank."""

    instance: str  # the prefill rank instance holding our info
    endpoint: str
    generation: int
    ended: bool = False  # it told us its outcome (a terminal status or its abort): it needs no Abort from us
    released: bool = False  # it said no write of the room can still land
    gone: bool = False  # the instance that could write into the room's pages is gone
    superseded: bool = False  # its instance was replaced (handled once)


@dataclass
class Room:
    state: RoomState
    bootstrap_addr: str
    dst_pages: list[int]
    prompt_len: int
    aux_row: int
    writers: set[int] = field(default_factory=lambda: {0})  # prefill ranks that must report Success (once resolved)
    legs: dict[int, Leg] = field(default_factory=dict)  # prefill rank -> where its info went
    done: set[int] = field(default_factory=set)  # prefill ranks that reported Success
    resends: int = 0  # UnknownSession answers acted on
    stale_until: float = 0.0  # a prefill rank restarted: fail it then, unless the new instance answers for it
    stale_why: str = ""
    await_ack: bool = False  # its prefill was frozen: only its acknowledgement (or death) frees the pages
    quarantine_logged: bool = False
    failed_at: float = 0.0
    result: AuxRow | None = None
    last_error: str = ""  # why bootstrapping has not succeeded yet

    def live_legs(self) -> list[Leg]:
        """Legs whose prefill rank may still write into the room's pages."""
        return [leg for leg in self.legs.values() if not (leg.released or leg.gone)]


def endpoint_dead(endpoint: str, timeout: float) -> bool:
    """Nothing listens at a tcp://host:port control socket any more (refused or unreachable). A connection that
    only times out is not proof: the host may be slow, or the process stopped (the kernel still accepts)."""
    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname, url.port), timeout=timeout):
            return False
    except TimeoutError:
        return False
    except OSError:
        return True


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

        def _fail(self, room: int, error: str, reason: FailureReason, tell_prefill: bool = True) -> None: ...
        def send(self, endpoint: str, msg: Abort) -> bool: ...
        def forget_endpoint(self, endpoint: str) -> None: ...

    def _heartbeat_loop(self) -> None:
        timeout = min(self.timeouts.http, self.timeouts.heartbeat_interval)
        while not self._stop.wait(self.timeouts.heartbeat_interval):
            for addr in self._watched():
                try:
                    dead = {ep for ep in self._endpoints(addr) if endpoint_dead(ep, timeout)}
                    self._beat(addr, probe(addr, timeout=timeout), dead)
                except Exception:  # one prefill's odd answer must not stop the watch over the others
                    log.exception("decode: heartbeat of prefill %s failed", addr)

    def _watched(self) -> set[str]:
        with self._lock:
            addrs = set(self._prefills)
            for r in self._rooms.values():
                if not r.state.terminal or r.live_legs():
                    addrs.add(r.bootstrap_addr)
            self._frozen &= addrs  # bounded: only what we still watch
        return addrs

    def _endpoints(self, addr: str) -> set[str]:
        """Control sockets of the prefill's ranks we registered with or hold rooms at."""
        with self._lock:
            p = self._prefills.get(addr)
            eps = {rank.endpoint for rank in p.ranks.values()} if p is not None else set()
            for r in self._rooms.values():
                if r.bootstrap_addr == addr:
                    eps |= {leg.endpoint for leg in r.live_legs()}
        return eps

    def _expected_ranks(self, addr: str, p: _Prefill | None) -> set[int]:
        if p is not None and p.registered:
            return set(range(p.tp_size))
        return {i for r in self._rooms.values() if r.bootstrap_addr == addr for i in r.legs}

    def _beat(self, addr: str, pr: Probe, dead: set[str] | None = None) -> None:
        dead = dead or set()
        with self._lock:
            p = self._prefills.get(addr)
            missing: set[int] = set()
            if pr.ok:
                self._frozen.discard(addr)
                for rank, where in pr.ranks.items():
                    self._check_instance(addr, rank, where)
                self._ask_again(addr)
                missing = {i for i in self._expected_ranks(addr, p) if i not in pr.ranks}
                down = {i for i, w in pr.ranks.items() if f"tcp://{w.get('rank_ip')}:{w.get('rank_port')}" in dead}
                if not missing and not down & self._expected_ranks(addr, p):
                    if p is not None:
                        p.misses = 0
                    return
                error = f"prefill ranks {sorted(missing | down)} not registered there or not listening"
            else:
                error = pr.error
                if pr.frozen and addr not in self._frozen:
                    self._frozen.add(addr)
                    for r in self._rooms.values():
                        if r.bootstrap_addr == addr and r.legs:
                            r.await_ack = True  # it may write once it runs again, whatever our deadlines say
                elif not pr.frozen:
                    self._frozen.discard(addr)
            misses = (p.misses + 1) if p else self.timeouts.heartbeat_failures
            if p is not None:
                p.misses = misses
            if misses < self.timeouts.heartbeat_failures:
                return
            self._lost(addr, p, misses, gone=not pr.frozen, error=error, dead=dead, missing=missing)

    def _check_instance(self, addr: str, rank: int, where: dict) -> None:
        """The prefill answers for `rank`: does its instance still match ours? Lock held."""
        current = where.get("instance", "")
        endpoint = f"tcp://{where.get('rank_ip')}:{where.get('rank_port')}"
        p = self._prefills.get(addr)
        known = set()
        if p is not None and p.registered and rank in p.ranks:
            known.add((p.ranks[rank].instance, p.ranks[rank].endpoint))
        for r in self._rooms.values():
            leg = r.legs.get(rank) if r.bootstrap_addr == addr else None
            if leg is not None and not leg.superseded:
                known.add((leg.instance, leg.endpoint))
        for old, old_endpoint in known:
            if old != current:
                self._instance_gone(addr, rank, old, current, same_endpoint=old_endpoint == endpoint)

    def _ask_again(self, addr: str) -> None:
        """The prefill answers again: ask once more for what we wait on (acks are idempotent). Lock held."""
        for r in self._rooms.values():
            if r.bootstrap_addr == addr and r.await_ack:
                for leg in r.live_legs():
                    abort = Abort(r.state.room, self.endpoint, r.state.error, session=self.session,
                                  sender_rank=self.cfg.tp_rank)  # fmt: skip
                    self.send(leg.endpoint, abort)

    def _instance_gone(self, addr: str, rank: int, old: str, new: str, same_endpoint: bool) -> None:
        """Prefill rank `rank`'s instance `old` at `addr` was replaced by `new`. Lock held.

        When `new` holds the old one's endpoint, the old process is gone (it held the port): nothing of it can write
        into the rooms' pages any more. Otherwise it may still live somewhere; the usual page rules apply."""
        who = f"prefill at {addr}" + (f" rank {rank}" if rank else "")
        why = f"{who} restarted (instance {old} -> {new or '?'}); its in-flight transfers are lost"
        p = self._prefills.get(addr)
        mine = p.ranks.get(rank) if p is not None and p.registered else None
        if mine is not None and mine.instance == old:
            p.registered = False  # type: ignore[union-attr]  # the next room registers with the new instance
            if not same_endpoint:
                self.forget_endpoint(mine.endpoint)  # on the same endpoint the socket already reconnected
        failed = waiting = 0
        for room, r in self._rooms.items():
            leg = r.legs.get(rank) if r.bootstrap_addr == addr else None
            if leg is None or leg.instance != old or leg.superseded:
                continue
            leg.superseded = True
            leg.gone = leg.gone or same_endpoint
            if r.state.terminal:
                continue
            if r.state.state >= TransferState.TRANSFERRING:
                self._fail(room, why, FailureReason.PEER_RESTARTED)
                failed += 1
            elif not r.stale_until:
                # its info may have reached the new process instead (it then answers UnknownSession): wait a little
                r.stale_until, r.stale_why = now() + self.timeouts.http, why
                waiting += 1
        if mine is not None or failed or waiting:
            log.warning("decode: %s: failed %d rooms, %d more unless the new one answers", why, failed, waiting)

    def _lost(self, addr: str, p: _Prefill | None, misses: int, gone: bool, error: str, dead: set[str],
              missing: set[int]) -> None:  # fmt: skip
        """Heartbeats gave up on `addr`. Lock held. Legs at ranks whose control socket refuses connections (or that
        are missing from the bootstrap's answer) are gone; a frozen prefill's are not."""
        self._prefills.pop(addr, None)
        ever_reached = p is not None and p.registered
        changed = 0
        for room, r in self._rooms.items():
            if r.bootstrap_addr != addr:
                continue
            for rank, leg in r.legs.items():
                if not leg.gone and (leg.endpoint in dead or rank in missing):
                    leg.gone = True
                    changed += 1
            if r.state.terminal:
                continue
            changed += 1
            why = f"lost connection with prefill {addr}" if ever_reached or r.legs else f"prefill {addr} unreachable"
            why += f" ({r.last_error})" if r.last_error else ""
            # a live or frozen rank gets our abort (a frozen one once it runs again), and acknowledges it once drained
            self._fail(room, why, FailureReason.FAILED)
        if p is not None or changed:  # not again at every beat for an address we only keep watching
            how = "gone" if gone else "not answering (frozen?)"
            log.error("decode: lost prefill %s after %d missed heartbeats: %s (%s)", addr, misses, how, error)
        if p is not None:
            for rank in p.ranks.values():
                if rank.endpoint in dead:
                    self.forget_endpoint(rank.endpoint)
