"""Mooncake Transfer Engine backend (P2P handshake, no metadata server).

API choice. `transfer_submit_write` + `transfer_check_status` are the only Python calls that give a
non-blocking completion check: each Copy becomes its own one-request batch, and checking a batch costs tens
of microseconds and never waits. (`get_batch_transfer_status` and the `*_sync_*` calls busy-wait until the
batch settles, burning a core.) `transfer_check_status` frees the batch when it reports 1 (done) or -1
(failed), so each batch id is checked until the first such answer and never again.

Submitting is done on one backend thread, because the first write to a session opens it with a blocking
handshake, and the engine holds one lock for every session while it does: a peer that accepts TCP but
never answers (frozen, not dead) blocks every submission for ~60 s. On that thread such a stall delays
other submissions but never the caller, and `poll()` keeps answering meanwhile.

A handle settles (DONE or FAILED) only when none of its requests is still moving bytes, so after FAILED
the caller may free or reuse both sides' pages at once.

How the TCP transport behaves when the target goes away (measured on loopback, 0.3.13, 2 cores):
- killed (kill -9) after earlier writes: a 1-request write fails in ~1 ms (EOF/EPIPE on the open
  connection); a 7-request write settles FAILED after ~1.0 s, as the requests queued behind the first
  wait for one reconnect retry (ECONNREFUSED) 1 s later. `transfer_check_status` returns -1.
- killed before any write: `transfer_submit_write` returns batch id 0 at once (handshake refused).
- frozen (SIGSTOP) after earlier writes: nothing errors; requests fail after `MC_TCP_PROGRESS_TIMEOUT_SEC`
  (default 30 s) per round of about 4 in flight to that peer: 1 request took 30 s, 7 took 60 s; with
  the timeout at 5 s, 1/8/20 requests took 5/10/27 s. Lower that variable where this matters.
- frozen before any write: the handshake holds the submit thread (and every other submission) ~60 s,
  then gives batch id 0; writes queued to that peer meanwhile then fail at once.
Mooncake cannot cancel a request, so `release()` of a pending handle abandons it (a small leak). `close()`
never waits for the submit thread (under 1 ms even mid-handshake), but interpreter exit joins that
thread, so it can wait out a stalled handshake. Destroying the engine with a request pending took <1 s.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from transfer.backends.base import BackendSettings, Copy, MemoryRegion, Status, TransferBackend, TransferError

log = logging.getLogger(__name__)

_INSTALL_HINT = (
    "on CPU machines install `mooncake-transfer-engine-non-cuda` (pip) plus Debian's libibverbs1 and libnuma1 "
    "(apt-get install libibverbs1 libnuma1); on GPU clusters install `mooncake-transfer-engine`"
)

# transfer_submit_write's failure values: 0 in 0.3.13; older builds return -1 through a uint64.
_BAD_BATCH_IDS = frozenset({0, -1, 2**64 - 1})

_CHECK_STATUS_MEANING = {
    -1: "transfer failed: the peer died, dropped the connection or rejected the write",
    -2: "transfer timed out in the engine",
}

# Requests of one write in the engine at once (see _submit_requests), and the wait between checks.
_WINDOW = 256
_SPIN_S = 0.0001

# One request: (local address, remote address, length in bytes).
_Request = tuple[int, int, int]


@dataclass
class _Peer:
    session_id: str
    regions: list[MemoryRegion]
    # Bumped when a submission to this peer fails; a job queued before that fails fast instead of
    # paying the (possibly 60 s) handshake again behind a peer that is known to be unreachable.
    submit_failures: int = 0
    removed: bool = False


@dataclass
class _Submitted:
    batch_ids: list[int]
    error: str = ""


class MooncakeWrite:
    """Handle of one submit_write: the engine batch ids (one per Copy) once the submit thread issued them."""

    def __init__(self, peer: str, session_id: str, num_requests: int, submitted: Future[_Submitted] | None) -> None:
        self.peer = peer
        self.session_id = session_id
        self.num_requests = num_requests
        self._submitted = submitted
        self._pending: list[int] | None = None if submitted is not None else []  # unsettled batch ids, in order
        self._errors: list[str] = []
        self._result: tuple[Status, str] | None = None if submitted is not None else (Status.DONE, "")
        # check_status frees a settled batch; two threads checking the same id would free it twice.
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        state = self._result[0].value if self._result else "pending"
        return f"MooncakeWrite(peer={self.peer!r}, session={self.session_id}, requests={self.num_requests}, {state})"


class MooncakeBackend(TransferBackend):
    name = "mooncake"

    def __init__(self, settings: BackendSettings) -> None:
        super().__init__(settings)
        try:
            from mooncake.engine import TransferEngine
        except (ImportError, OSError) as e:
            raise TransferError(f"cannot import the Mooncake transfer engine ({e}): {_INSTALL_HINT}") from e
        engine = TransferEngine()
        rc = engine.initialize(settings.host, "P2PHANDSHAKE", settings.protocol, settings.device_names)
        if rc != 0:
            raise TransferError(
                f"Mooncake TransferEngine.initialize({settings.host!r}, 'P2PHANDSHAKE', {settings.protocol!r}, "
                f"{settings.device_names!r}) returned {rc}: check that the host is an address of this machine, "
                "that the protocol is tcp or rdma, and for rdma that the device names exist (ibv_devices)"
            )
        self._engine: Any = engine
        self.session_id = f"{settings.host}:{engine.get_rpc_port()}"
        self._regions: list[MemoryRegion] = []
        self._registered: list[int] = []
        self._peers: dict[str, _Peer] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mooncake-submit")
        self._lock = threading.Lock()
        self._closed = False
        log.info("mooncake: engine up, session %s (%s)", self.session_id, settings.protocol)

    # -- registration ---------------------------------------------------------------------------------

    def register(self, regions: list[MemoryRegion], device: torch.device) -> None:
        engine = self._live_engine()
        if self._registered:
            raise TransferError("mooncake: register() called twice; register every region in one call")
        if not regions:
            raise TransferError("mooncake: register() needs at least one region")
        bases = [r.base for r in regions]
        sizes = [r.nbytes for r in regions]
        # "*" lets the engine find each buffer's device/NUMA location itself: the same call serves CPU
        # tensors here and CUDA pointers with the CUDA wheel.
        rc = engine.batch_register_memory(bases, sizes, "*")
        if rc != 0:
            raise TransferError(
                f"mooncake: batch_register_memory of {len(regions)} regions on {device} returned {rc} "
                "(overlapping regions, or memory the chosen transport cannot register)"
            )
        self._regions = list(regions)
        self._registered = bases

    def metadata(self) -> bytes:
        return self.session_id.encode()

    # -- peers ----------------------------------------------------------------------------------------

    def add_peer(self, peer: str, metadata: bytes, regions: list[MemoryRegion]) -> None:
        try:
            session_id = metadata.decode()
        except UnicodeDecodeError as e:
            raise TransferError(f"mooncake: peer {peer!r} sent metadata that is not a session id: {e}") from e
        host, _, port = session_id.rpartition(":")
        if not host or not port.isdigit():
            raise TransferError(f"mooncake: peer {peer!r} sent session id {session_id!r}; expected host:port")
        # Nothing to connect yet: the engine opens the session (handshake) on the first write.
        with self._lock:
            old = self._peers.get(peer)
            if old is not None:
                old.removed = True
            self._peers[peer] = _Peer(session_id, list(regions))

    def remove_peer(self, peer: str) -> None:
        with self._lock:
            p = self._peers.pop(peer, None)
        if p is not None:
            p.removed = True  # queued submissions to it fail instead of writing into a departed peer

    # -- writes ---------------------------------------------------------------------------------------

    def submit_write(self, peer: str, copies: list[Copy]) -> MooncakeWrite:
        engine = self._live_engine()
        with self._lock:
            p = self._peers.get(peer)
        if p is None:
            raise TransferError(f"mooncake: unknown peer {peer!r}; add_peer() it first")
        if not copies:
            return MooncakeWrite(peer, p.session_id, 0, None)
        requests = self._translate(peer, p, copies)
        job = self._executor.submit(self._submit_requests, engine, p, p.submit_failures, requests)
        return MooncakeWrite(peer, p.session_id, len(requests), job)

    def _translate(self, peer: str, p: _Peer, copies: list[Copy]) -> list[_Request]:
        local_regions, remote_regions = self._regions, p.regions
        if not local_regions:
            raise TransferError("mooncake: register() the local regions before writing")
        if len(local_regions) != len(remote_regions):
            raise TransferError(
                f"mooncake: peer {peer!r} has {len(remote_regions)} regions but this side has {len(local_regions)}"
            )
        requests: list[_Request] = []
        for c in copies:
            if not 0 <= c.region < len(local_regions):
                raise TransferError(f"mooncake: {c} names region {c.region}; there are {len(local_regions)}")
            local, remote = local_regions[c.region], remote_regions[c.region]
            if local.item_bytes != remote.item_bytes:
                raise TransferError(
                    f"mooncake: region {c.region} items are {local.item_bytes} bytes here but "
                    f"{remote.item_bytes} bytes on peer {peer!r}"
                )
            if c.count <= 0:
                raise TransferError(f"mooncake: {c} has a non-positive count")
            if c.src < 0 or c.src + c.count > local.num_items:
                raise TransferError(
                    f"mooncake: {c} reads local items [{c.src}, {c.src + c.count}) of region {c.region}, "
                    f"which has {local.num_items}"
                )
            if c.dst < 0 or c.dst + c.count > remote.num_items:
                raise TransferError(
                    f"mooncake: {c} writes items [{c.dst}, {c.dst + c.count}) of peer {peer!r}'s region "
                    f"{c.region}, which has {remote.num_items}"
                )
            size = local.item_bytes
            requests.append((local.base + c.src * size, remote.base + c.dst * size, c.count * size))
        return requests

    @staticmethod
    def _submit_requests(engine: Any, p: _Peer, failures_seen: int, requests: list[_Request]) -> _Submitted:
        """Runs on the submit thread; the engine is passed in so close() can drop its own reference.

        At most `_WINDOW` requests of this write are in the engine at once: the TCP transport rejects
        requests beyond its lane queue ("queue-full"), which a 4K-token request's ~2000 page runs exceed.
        Requests retired here are checked by this thread only; poll() takes over the rest once we return.
        """
        if p.submit_failures != failures_seen:
            return _Submitted([], f"an earlier write to {p.session_id} failed to submit; not retrying its handshake")
        batch_ids: deque[int] = deque()
        for local, remote, length in requests:
            while len(batch_ids) >= _WINDOW:
                rc = engine.transfer_check_status(batch_ids[0])
                if rc == 0:
                    time.sleep(_SPIN_S)
                    continue
                batch_ids.popleft()
                if rc != 1:
                    meaning = _CHECK_STATUS_MEANING.get(rc, "unexpected status")
                    return _Submitted(list(batch_ids), f"transfer_check_status returned {rc} ({meaning})")
            if p.removed:  # remove_peer() or close() since this write was queued
                return _Submitted(
                    list(batch_ids), f"peer {p.session_id} was removed before the write was fully submitted"
                )
            try:
                batch_id = engine.transfer_submit_write(p.session_id, local, remote, length)
            except Exception as e:  # a binding error must become FAILED, not kill the submit thread's result
                p.submit_failures += 1
                return _Submitted(list(batch_ids), f"transfer_submit_write raised {e!r}")
            if batch_id in _BAD_BATCH_IDS:
                p.submit_failures += 1
                return _Submitted(
                    list(batch_ids),
                    f"transfer_submit_write returned {batch_id}: could not open session {p.session_id} "
                    "(its process is gone or does not answer the handshake)",
                )
            batch_ids.append(batch_id)
        return _Submitted(list(batch_ids))

    def poll(self, handle: MooncakeWrite) -> tuple[Status, str]:
        with handle._lock:
            if handle._result is not None:
                return handle._result
            engine = self._engine
            if engine is None:
                # The engine may be gone: its batch ids must not be touched, and nobody waits for them now.
                handle._result = (Status.FAILED, f"mooncake write to {handle.peer}: backend closed while in flight")
                return handle._result
            if handle._pending is None:
                assert handle._submitted is not None
                if not handle._submitted.done():
                    return Status.PENDING, ""
                try:
                    submitted = handle._submitted.result()
                except CancelledError:
                    submitted = _Submitted([], "cancelled before submission (backend closed or handle released)")
                except Exception as e:  # defensive: _submit_requests catches engine errors itself
                    submitted = _Submitted([], f"submission raised {e!r}")
                handle._pending = submitted.batch_ids
                if submitted.error:
                    handle._errors.append(submitted.error)
            # Requests tend to finish in order, so a still-pending one ends this round: one cheap check per
            # poll while the write is in flight.
            while handle._pending:
                batch_id = handle._pending[0]
                try:
                    rc = engine.transfer_check_status(batch_id)
                except Exception as e:  # must become FAILED, never propagate into the caller's loop
                    handle._pending.pop(0)
                    handle._errors.append(f"transfer_check_status raised {e!r}")
                    continue
                if rc == 0:
                    return Status.PENDING, ""
                handle._pending.pop(0)
                if rc != 1:
                    meaning = _CHECK_STATUS_MEANING.get(rc, "unexpected status")
                    handle._errors.append(f"transfer_check_status returned {rc} ({meaning})")
            if handle._errors:
                more = f" (+{len(handle._errors) - 1} more)" if len(handle._errors) > 1 else ""
                handle._result = (
                    Status.FAILED,
                    f"mooncake write to {handle.peer} ({handle.session_id}) failed: {handle._errors[0]}{more}",
                )
            else:
                handle._result = (Status.DONE, "")
            return handle._result

    def release(self, handle: MooncakeWrite) -> None:
        # Settled batches were freed by transfer_check_status. A queued submission can still be called off;
        # requests already in the engine cannot be cancelled and are abandoned (their small batch
        # descriptors leak).
        with handle._lock:
            if handle._result is None and handle._submitted is not None:
                handle._submitted.cancel()

    # -- shutdown -------------------------------------------------------------------------------------

    def _live_engine(self) -> Any:
        engine = self._engine
        if engine is None:
            raise TransferError("mooncake: backend is closed")
        return engine

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            engine, self._engine = self._engine, None
            for p in self._peers.values():
                p.removed = True  # a submission still queued or running stops before its next request
            self._peers.clear()
        # Never wait: the submit thread may sit in a ~60 s handshake with a frozen peer. It holds its own
        # reference to the engine, so the engine is destroyed when the last user lets go of it.
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._registered:
            rc = engine.batch_unregister_memory(self._registered)
            if rc != 0:
                log.warning("mooncake: batch_unregister_memory returned %d", rc)
            self._registered = []
        log.info("mooncake: session %s closed", self.session_id)
