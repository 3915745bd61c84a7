"""NIXL transfer backend (UCX plugin): one-sided WRITEs from the prefill side into decode's registered memory.

Descriptor lists are prepared once: our own at register(), a peer's at add_peer(), one descriptor per item of
every region (region r's item i is index ``offset[r] + i``). A write is then only ``make_prepped_xfer`` with
two index arrays, so its cost does not grow with the pool. The lists go to NIXL in its compressed Nx5 form
(``base, item_bytes, dev, stride, count``: one row per region) where NIXL accepts it, else expanded (one Nx3
row per item). Measured for a decode pool of 64 regions x 4096 items (262,144 descriptors, 2-core box):
compressed, local prep ~1 ms and remote prep ~0.1 ms; expanded, building the array ~7 ms, local prep ~4 ms,
remote prep ~10 ms. Loading the peer's metadata (``add_remote_agent``) adds ~10 ms. Per write of 64 runs /
1,024 items: index expansion ~40 us, ``make_prepped_xfer`` ~4 us, ``transfer()`` ~150 us for 256 KiB (on one
host UCX copies through shared memory/CMA inside that call).

Items are one KV head of one page (transfer/planner.py), so a pool holds (pages + 1) x KV heads items per region:
8x the descriptors of page items for a rank of 8 heads. NIXL posts one operation per descriptor, and per-head
descriptors cost same-TP writes ~45% of their throughput on loopback, so writes are described at a granularity
(transfer/backends/nixl_dlist.py): whole pages for same-TP writes (one descriptor per page, as with page items),
one descriptor per head slice of a page otherwise; a list per granularity used, prepared on first use.

``metadata()`` is NIXL's agent metadata behind a small header carrying our memory type and GPU index: NIXL
finds a remote descriptor by (memory type, device id, address), and MemoryRegion does not say on which device
the peer's buffers live, so the peer must tell us.

Dead or stuck target (NIXL 1.5.1 and its bundled UCX; initiator and target on one host, kill -9 / SIGSTOP):
- Killed before a write (with or without an earlier write; NIXL connects in add_remote_agent): the next
  ``transfer()`` raises ``nixlRemoteDisconnectError`` within 0.4-2 ms. A write never reports success.
- Killed while a 256 MiB write is in flight over TCP (``UCX_TLS=tcp``, as between hosts without RDMA):
  ``check_xfer_state`` raises ``nixlRemoteDisconnectError`` 30-120 ms after the kill.
- With UCX's default transports on one host (shared memory/CMA, one-sided) the same write completes inside
  ``transfer()``, so there is nothing in flight to fail, and a stopped target is still written into.
- Stuck target over TCP (SIGSTOP: the socket stays open, nobody answers): the write stays "PROC" with no error
  for as long as we watched (300 s). NIXL/UCX do not time it out, so the caller's Transferring deadline must.
  A host that vanishes without closing its sockets likely looks the same until TCP/UCX keepalive gives up
  (not measured). Releasing such a write cancels it at once, and remove_peer/close take < 5 ms, so neither
  ``release()`` nor ``close()`` hangs on a dead or stuck peer. NIXL has no timeout to set, so the caller bounds
  a stuck write itself: ``cancel()`` releases it (the transfer layer does so once the room failed and the write
  outlived the abort-ack timeout), after which it reads none of our memory; bytes it already handed to the
  socket may still land at the peer, which is why the caller then tells the peer "not drained".
NIXL mostly raises rather than returning "ERR"; both become TransferError / FAILED carrying NIXL's error name
(the detailed reason is only in NIXL's log on stderr).
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import uuid
from dataclasses import dataclass
from typing import Any

import torch

from transfer.backends.base import BackendSettings, Copy, MemoryRegion, TransferBackend, TransferError, WriteStatus
from transfer.backends.gpu_memory import probe_nixl, require_gpu_memory
from transfer.backends.nixl_agent import PROGRESS_DELAY_US, UCX, make_agent, nixl_error
from transfer.backends.nixl_dlist import descriptor_rows, granularity, indices, offsets

log = logging.getLogger(__name__)

_LOCAL = "NIXL_INIT_AGENT"  # NIXL's name for "the local side" in prep_xfer_dlist
# metadata() header: magic, memory type (0 DRAM, 1 VRAM), device id
_MD_HEADER = struct.Struct("<5sBi")
_MD_MAGIC = b"PDNX1"
_MEM_TYPES = ("DRAM", "VRAM")


@dataclass
class _Peer:
    agent_name: Any  # as add_remote_agent returned it (bytes in NIXL 1.5); passed back to NIXL unchanged
    regions: list[MemoryRegion]
    mem_type: str
    dev_id: int
    dlists: dict[int, Any]  # granularity -> nixl_prepped_dlist_handle over the peer's items (nixl_dlist.py)
    layout_error: str  # non-empty when the peer's regions do not match ours; writes are refused


@dataclass(eq=False)
class _Write:
    """What submit_write returns: NIXL's handle plus the outcome once known (NIXL is not asked again)."""

    peer: str
    xfer: Any
    status: WriteStatus = WriteStatus.PENDING
    error: str = ""
    released: bool = False


class _Done:
    """The handle of an empty write: nothing to move, so it is finished from the start."""

    def __repr__(self) -> str:
        return "NixlBackend.EMPTY_WRITE"


EMPTY_WRITE = _Done()


class NixlBackend(TransferBackend):
    name = "nixl"

    def __init__(self, settings: BackendSettings) -> None:
        super().__init__(settings)
        # The peer knows us by this name (it is inside our metadata), so it must be unique across the cluster.
        self.agent_name = settings.agent_name or f"pdserve-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        delay_us = int(settings.extra.get("nixl_progress_delay_us", PROGRESS_DELAY_US))
        self._agent = make_agent(self.agent_name, delay_us)
        if UCX not in self._agent.backends:
            # nixl_agent only logs a warning when the plugin is missing; without it nothing can move.
            raise TransferError(f"NIXL's UCX plugin is not available (plugins: {self._agent.get_plugin_list()})")
        # The agent runs without NIXL's own locking (no listener thread); callers may poll from another thread.
        self._lock = threading.RLock()
        self._compressed = bool(settings.extra.get("nixl_compressed_dlist", True))
        self._regions: list[MemoryRegion] = []
        self._mem_type = "DRAM"
        self._dev_id = 0
        self._reg_descs: Any = None  # what register_memory returned, for deregistration
        self._registered = False
        self._local_dlists: dict[int, Any] = {}  # granularity -> our prepared descriptor list
        self._peers: dict[str, _Peer] = {}
        self._live: set[_Write] = set()
        self._closed = False

    # --- registration -------------------------------------------------------------------------------

    def register(self, regions: list[MemoryRegion], device: torch.device) -> None:
        with self._lock:
            self._check_open()
            if self._registered:
                raise TransferError("NIXL backend: register() was already called")
            for i, r in enumerate(regions):
                if r.base <= 0 or r.item_bytes <= 0 or r.num_items < 0:
                    raise TransferError(f"NIXL backend: invalid region {i}: {r}")
            device = torch.device(device)
            if device.type == "cuda":
                require_gpu_memory(probe_nixl(self._ucx_mem_types()))
                self._mem_type = "VRAM"
                self._dev_id = device.index if device.index is not None else torch.cuda.current_device()
            elif device.type == "cpu":
                self._mem_type, self._dev_id = "DRAM", 0
            else:
                raise TransferError(f"NIXL backend: unsupported device {device} (cpu or cuda)")
            # Whole regions are registered (one memory registration each); items are only descriptors.
            reg = [(r.base, r.nbytes, self._dev_id, "") for r in regions if r.num_items > 0]
            try:
                if reg:
                    self._reg_descs = self._agent.register_memory(reg, self._mem_type, backends=[UCX])
                self._local_dlists[1] = self._prep(_LOCAL, regions, self._mem_type, self._dev_id)
            except Exception as e:
                self._deregister()
                raise nixl_error(f"NIXL could not register {len(regions)} regions ({self._mem_type})", e) from e
            self._regions = list(regions)
            self._registered = True

    def _ucx_mem_types(self) -> list[str] | None:
        try:
            return list(self._agent.get_backend_mem_types(UCX))
        except Exception as e:  # an older NIXL without the query: decide on the other facts
            log.info("NIXL: cannot list the UCX memory types (%s)", e)
            return None

    def _prep(self, agent: Any, regions: list[MemoryRegion], mem_type: str, dev_id: int, g: int = 1) -> Any:
        if self._compressed:
            try:
                return self._agent.prep_xfer_dlist(
                    agent, descriptor_rows(regions, dev_id, True, g), mem_type, backends=[UCX]
                )
            except Exception as e:
                if agent != _LOCAL:
                    raise  # the local list went through compressed, so this failure is about the peer
                # NIXL before the Nx5 form: it takes the array for something else and fails; expand instead.
                log.info("NIXL rejected a compressed descriptor list (%s); using one row per item", e)
                self._compressed = False
        rows = descriptor_rows(regions, dev_id, False, g)
        return self._agent.prep_xfer_dlist(agent, rows, mem_type, backends=[UCX])

    def _dlists(self, state: _Peer, g: int) -> tuple[Any, Any]:
        """Our and the peer's descriptor lists at granularity `g`, prepared on first use. Lock held."""
        if g not in self._local_dlists:
            self._local_dlists[g] = self._prep(_LOCAL, self._regions, self._mem_type, self._dev_id, g)
        if g not in state.dlists:
            state.dlists[g] = self._prep(state.agent_name, state.regions, state.mem_type, state.dev_id, g)
        return self._local_dlists[g], state.dlists[g]

    def metadata(self) -> bytes:
        with self._lock:
            self._check_open()
            if not self._registered:
                raise TransferError("NIXL backend: metadata() before register()")
            header = _MD_HEADER.pack(_MD_MAGIC, _MEM_TYPES.index(self._mem_type), self._dev_id)
            return header + self._agent.get_agent_metadata()

    # --- peers --------------------------------------------------------------------------------------

    def add_peer(self, peer: str, metadata: bytes, regions: list[MemoryRegion]) -> None:
        with self._lock:
            self._check_open()
            if not self._registered:
                raise TransferError("NIXL backend: add_peer() before register()")
            if len(metadata) < _MD_HEADER.size or metadata[: len(_MD_MAGIC)] != _MD_MAGIC:
                raise TransferError(f"NIXL backend: metadata from peer {peer!r} is not from a NIXL backend")
            _, mem_code, dev_id = _MD_HEADER.unpack_from(metadata)
            if mem_code >= len(_MEM_TYPES):
                raise TransferError(f"NIXL backend: peer {peer!r} sent unknown memory type {mem_code}")
            if peer in self._peers:  # the peer re-registered (e.g. restarted): its old memory is gone
                self._remove_peer(peer, "peer re-registered")
            try:
                remote = self._agent.add_remote_agent(metadata[_MD_HEADER.size :])
            except Exception as e:
                raise nixl_error(f"NIXL could not load the metadata of peer {peer!r}", e) from e
            try:
                dlist = self._prep(remote, regions, _MEM_TYPES[mem_code], dev_id)
            except Exception as e:
                self._forget_remote(remote)
                raise nixl_error(
                    f"NIXL could not prepare the {len(regions)} regions of peer {peer!r} "
                    f"({_MEM_TYPES[mem_code]} device {dev_id})",
                    e,
                ) from e
            mem_type = _MEM_TYPES[mem_code]
            self._peers[peer] = _Peer(remote, list(regions), mem_type, dev_id, {1: dlist}, self._layout_error(regions))
            if self._peers[peer].layout_error:
                log.warning("NIXL peer %r: %s; writes to it will fail", peer, self._peers[peer].layout_error)

    def _layout_error(self, remote: list[MemoryRegion]) -> str:
        if len(remote) != len(self._regions):
            return f"peer has {len(remote)} regions, we have {len(self._regions)}"
        for i, (mine, theirs) in enumerate(zip(self._regions, remote, strict=True)):
            if mine.item_bytes != theirs.item_bytes:
                return f"region {i} items are {mine.item_bytes} bytes here but {theirs.item_bytes} at the peer"
        return ""

    def remove_peer(self, peer: str) -> None:
        with self._lock:
            if peer in self._peers:
                self._remove_peer(peer, "peer removed")

    def _remove_peer(self, peer: str, why: str) -> None:
        # Writes still in flight to it are cancelled first, so none outlives the descriptors it points at.
        for w in [w for w in self._live if w.peer == peer]:
            if w.status is WriteStatus.PENDING:
                w.status, w.error = WriteStatus.FAILED, f"write to {peer!r} cancelled: {why}"
            self._release_write(w)
        state = self._peers.pop(peer)
        for dlist in state.dlists.values():
            try:
                dlist.release()
            except Exception as e:
                log.warning("NIXL: releasing the descriptors of peer %r failed: %s", peer, e)
        self._forget_remote(state.agent_name)

    def _forget_remote(self, remote: Any) -> None:
        try:
            self._agent.remove_remote_agent(remote)
        except Exception as e:
            log.warning("NIXL: removing remote agent %r failed: %s", remote, e)

    # --- writes -------------------------------------------------------------------------------------

    def submit_write(self, peer: str, copies: list[Copy]) -> Any:
        with self._lock:
            self._check_open()
            state = self._peers.get(peer)
            if state is None:
                raise TransferError(f"NIXL backend: unknown peer {peer!r} (known: {sorted(self._peers)})")
            if state.layout_error:
                raise TransferError(f"NIXL backend: cannot write to peer {peer!r}: {state.layout_error}")
            self._check_copies(peer, state, copies)
            g = granularity(copies, self._regions, state.regions)
            local_idx = indices(copies, self._regions, offsets(self._regions, g), g, src=True)
            remote_idx = indices(copies, state.regions, offsets(state.regions, g), g, src=False)
            if local_idx.size == 0:
                return EMPTY_WRITE  # NIXL refuses empty index lists
            try:
                local, remote = self._dlists(state, g)
                xfer = self._agent.make_prepped_xfer("WRITE", local, local_idx, remote, remote_idx)
            except Exception as e:
                raise nixl_error(f"NIXL could not create a write of {local_idx.size} items to {peer!r}", e) from e
            # A NIXL handle allows one transfer in flight, so every write gets its own handle.
            write = _Write(peer, xfer)
            try:
                state_str = self._agent.transfer(xfer)
            except Exception as e:
                self._release_write(write)
                raise nixl_error(f"NIXL write to {peer!r} failed", e) from e
            if state_str == "ERR":
                self._release_write(write)
                raise TransferError(f"NIXL write to {peer!r} failed: transfer() returned ERR")
            if state_str == "DONE":  # small or shared-memory writes finish inside transfer()
                write.status = WriteStatus.DONE
            self._live.add(write)
            return write

    def _check_copies(self, peer: str, state: _Peer, copies: list[Copy]) -> None:
        n_regions = len(self._regions)
        for c in copies:
            if not 0 <= c.region < n_regions:
                raise TransferError(f"NIXL write to {peer!r}: {c} names region {c.region}; there are {n_regions}")
            if c.count < 0 or c.src < 0 or c.dst < 0:
                raise TransferError(f"NIXL write to {peer!r}: {c} has a negative index or count")
            if c.src + c.count > self._regions[c.region].num_items:
                raise TransferError(
                    f"NIXL write to {peer!r}: {c} reads past local region {c.region} "
                    f"({self._regions[c.region].num_items} items)"
                )
            if c.dst + c.count > state.regions[c.region].num_items:
                raise TransferError(
                    f"NIXL write to {peer!r}: {c} writes past the peer's region {c.region} "
                    f"({state.regions[c.region].num_items} items)"
                )

    def poll(self, handle: Any) -> tuple[WriteStatus, str]:
        if handle is EMPTY_WRITE:
            return WriteStatus.DONE, ""
        w: _Write = handle
        with self._lock:
            if w.status is not WriteStatus.PENDING:
                return w.status, w.error
            if w.released or self._closed:
                w.status, w.error = WriteStatus.FAILED, f"write to {w.peer!r} was released before it finished"
                return w.status, w.error
            try:
                state = self._agent.check_xfer_state(w.xfer)
            except Exception as e:  # e.g. nixlRemoteDisconnectError when the peer died mid-write
                state, w.error = "ERR", f"NIXL write to {w.peer!r} failed: {type(e).__name__}: {e}"
            if state == "DONE":
                w.status = WriteStatus.DONE
            elif state == "ERR":
                w.status = WriteStatus.FAILED
                w.error = w.error or f"NIXL write to {w.peer!r} failed: check_xfer_state returned ERR"
            return w.status, w.error

    def cancel(self, handle: Any) -> bool:
        if handle is EMPTY_WRITE:
            return True
        w: _Write = handle
        with self._lock:
            if w.status is WriteStatus.PENDING:
                w.status, w.error = WriteStatus.FAILED, f"write to {w.peer!r} cancelled"
            self._release_write(w)
        return True

    def release(self, handle: Any) -> None:
        if handle is EMPTY_WRITE:
            return
        with self._lock:
            self._release_write(handle)

    def _release_write(self, w: _Write) -> None:
        self._live.discard(w)
        if w.released:
            return
        w.released = True
        if self._closed:
            return
        try:
            # NIXL cancels a write still in flight (measured: immediate, also with a stuck peer).
            self._agent.release_xfer_handle(w.xfer)
        except Exception as e:
            # It could not be cancelled; nixl_xfer_handle's finaliser parks it for the agent to retry at teardown.
            log.warning("NIXL: releasing a write to %r failed: %s", w.peer, e)

    # --- teardown -----------------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            for w in list(self._live):
                if w.status is WriteStatus.PENDING:
                    w.status, w.error = WriteStatus.FAILED, f"write to {w.peer!r} cancelled: backend closed"
                self._release_write(w)
            for peer in list(self._peers):
                self._remove_peer(peer, "backend closed")
            self._deregister()
            self._closed = True
            self._agent = None  # the agent (UCX worker, progress thread) goes away with its last reference

    def _deregister(self) -> None:
        for dlist in self._local_dlists.values():
            try:
                dlist.release()
            except Exception as e:
                log.warning("NIXL: releasing the local descriptors failed: %s", e)
        self._local_dlists.clear()
        if self._reg_descs is not None:
            try:
                self._agent.deregister_memory(self._reg_descs, backends=[UCX])
            except Exception as e:
                log.warning("NIXL: deregistering memory failed: %s", e)
        self._reg_descs = None

    def _check_open(self) -> None:
        if self._closed:
            raise TransferError("NIXL backend is closed")
