"""Prefill's table of registered decode ranks (mixed into PrefillTransferManager, under its lock).

A decode rank registers once per connection: its memory (K and V regions of one-head-of-a-page items, the aux
buffer), its TP rank and KV heads. Registration is refused (logged; the decode's infos then get UnknownSession
and it fails after its re-registrations) when the geometry differs (item size, layer count, the model's KV heads)
or when this prefill's TP layout cannot fill the decode's (transfer/head_map.py); decode's own bootstrap check
refuses such a prefill first, with both layouts named, so this is the prefill's guard against a misbehaving peer.
On success the peer is kept with the head slices this rank writes into it.

Restarts and bounds: a new session at a known endpoint means that decode restarted (the old session's rooms fail,
PEER_RESTARTED); the same session registering the same memory again is a no-op; at most MAX_PEERS sessions are
kept, idle ones forgotten first.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from contracts.metrics import FailureReason
from engine.parallel import kv_head_range
from transfer.backends import MemoryRegion
from transfer.head_map import HeadSlice, describe_tp, head_slices, tp_pair_problem
from transfer.manager import now
from transfer.protocol import Registration

if TYPE_CHECKING:
    from engine.kvcache import KVPool
    from transfer.backends import TransferBackend
    from transfer.config import TransferConfig
    from transfer.prefill_worker import PrefillRoom

log = logging.getLogger(__name__)

MAX_PEERS = 256  # registered decode sessions kept; idle ones beyond this are forgotten (they re-register)


@dataclass
class DecodePeer:
    """A registered decode rank (keyed by its session)."""

    endpoint: str  # its control socket
    metadata: bytes  # its backend metadata and regions: the same session registering them again is a no-op
    regions: list[MemoryRegion]
    tp_rank: int = 0
    tp_size: int = 1
    heads: int = 1  # KV heads its pool holds (items per page)
    slices: list[HeadSlice] = field(default_factory=list)  # what this prefill rank writes into it


class PeerTable:
    """The decode ranks this prefill rank knows, by session."""

    cfg: TransferConfig
    pool: KVPool
    backend: TransferBackend
    num_layers: int
    regions: list[MemoryRegion]
    _lock: threading.RLock
    _peers: OrderedDict[str, DecodePeer]
    _rooms: dict[int, PrefillRoom]
    _early: dict[int, tuple[float, list[Any]]]
    if TYPE_CHECKING:  # provided by the manager

        def _conclude(self, room: int, r: PrefillRoom) -> None: ...
        def forget_endpoint(self, endpoint: str) -> None: ...

    def _on_registration(self, msg: Registration) -> None:
        problem = self._registration_problem(msg)
        if problem:
            log.error("prefill: refusing decode %s (TP rank %d of %d): %s", msg.session, msg.tp_rank, msg.tp_size,
                      problem)  # fmt: skip
            return
        layout = self.pool.layout
        size, rank = self.cfg.writer
        slices = head_slices(layout.model_kv_heads, size, msg.tp_size, rank, msg.tp_rank)
        if self.cfg.full_kv_heads:  # our pool holds every head: offsets into it are model head indices
            first = kv_head_range(layout.model_kv_heads, size, rank).start
            slices = [HeadSlice(sl.src + first, sl.dst, sl.count) for sl in slices]
        bases = [*msg.k_bases, *msg.v_bases]
        regions = [MemoryRegion(b, msg.item_bytes, msg.num_items, msg.num_kv_heads) for b in bases]
        regions.append(MemoryRegion(msg.aux_base, msg.aux_row_bytes, msg.aux_rows))
        with self._lock:
            known = self._peers.get(msg.session)
            if known is not None and known.metadata == msg.backend_metadata and known.regions == regions:
                known.endpoint = msg.endpoint
                self._peers.move_to_end(msg.session)
                return
            for session, peer in list(self._peers.items()):
                if peer.endpoint == msg.endpoint and session != msg.session:
                    why = (
                        f"decode at {msg.endpoint} restarted (session {session} -> {msg.session}); "
                        "its in-flight transfers are lost"
                    )
                    self._drop_peer(session, why)
            if known is not None:
                self.backend.remove_peer(msg.session)
            self.backend.add_peer(msg.session, msg.backend_metadata, regions)
            self._peers[msg.session] = DecodePeer(
                msg.endpoint, msg.backend_metadata, regions, msg.tp_rank, msg.tp_size, msg.num_kv_heads, slices
            )
            self._evict_idle_peers()
        log.info("prefill: decode %s registered (%s, TP rank %d of %d, heads %s)", msg.session, msg.backend,
                 msg.tp_rank, msg.tp_size, slices)  # fmt: skip

    def _registration_problem(self, msg: Registration) -> str:
        """Why a decode rank's registration cannot be served ("" when it can)."""
        layout = self.pool.layout
        total = layout.model_kv_heads
        if len(msg.k_bases) != self.num_layers or len(msg.v_bases) != self.num_layers:
            return f"{len(msg.k_bases)}/{len(msg.v_bases)} K/V regions for {self.num_layers} layers"
        if msg.item_bytes != layout.head_bytes:
            return f"{msg.item_bytes}-byte KV items (one head of a page); ours are {layout.head_bytes} bytes"
        if msg.total_kv_heads != total:
            return f"a model of {msg.total_kv_heads} KV heads; ours has {total}"
        writers = self.cfg.writer[0]
        problem = tp_pair_problem(total, writers, msg.tp_size)
        if problem:
            theirs = describe_tp(msg.total_kv_heads, msg.tp_size)
            return f"prefill {describe_tp(total, writers)} vs decode {theirs}: {problem}"
        if not 0 <= msg.tp_rank < msg.tp_size:
            return f"TP rank {msg.tp_rank} outside its TP size {msg.tp_size}"
        want = kv_head_range(total, msg.tp_size, msg.tp_rank)
        if (msg.kv_head_start, msg.num_kv_heads) != (want.start, want.count) or msg.num_items % want.count:
            return (
                f"it holds KV heads [{msg.kv_head_start}, {msg.kv_head_start + msg.num_kv_heads}) in "
                f"{msg.num_items} items, not the heads [{want.start}, {want.stop}) of its rank"
            )
        return ""

    def _drop_peer(self, session: str, why: str) -> None:
        """Forget a decode session: its engine peer, its socket, its early infos; fail its rooms. Lock held."""
        peer = self._peers.pop(session, None)
        if peer is None:
            return
        self.backend.remove_peer(session)  # NIXL cancels its writes; Mooncake's stop at the next batch
        self.forget_endpoint(peer.endpoint)
        failed = 0
        for room, r in self._rooms.items():
            if session in r.infos and r.state.fail(why, FailureReason.PEER_RESTARTED):
                r.failed_at = now()
                failed += 1
                self._conclude(room, r)
        for room, (_, infos) in list(self._early.items()):
            infos[:] = [i for i in infos if i.session != session]
            if not infos:
                del self._early[room]
        log.warning("prefill: %s; failed %d rooms", why, failed)

    def _evict_idle_peers(self) -> None:
        """Keep at most MAX_PEERS sessions, forgetting the least recently used idle ones. Lock held."""
        if len(self._peers) <= MAX_PEERS:
            return
        busy = {session for r in self._rooms.values() for session in r.infos}
        for session in list(self._peers):
            if len(self._peers) <= MAX_PEERS:
                break
            if session not in busy:
                self._drop_peer(session, f"forgot idle decode session {session} ({MAX_PEERS} peers at most)")
