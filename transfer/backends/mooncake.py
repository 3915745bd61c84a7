"""Mooncake Transfer Engine backend (P2P handshake, no metadata server).

API choice. Each write goes to the engine as `batch_transfer_sync_write` calls of at most `_BATCH` requests
(one request per page run per layer buffer), made on one backend thread; the handle is that job's Future,
so `poll()` never blocks. The engine slices and spreads a batch itself, which measured as fast as the engine
goes (bench/transfer.py). Two things rule out the alternatives: the TCP transport rejects more single
requests than its lane queue holds ("queue-full"; ~2000 page runs of a 4K-token request exceed it), and
`transfer_check_status` on an async *batch* id reports done before the batch has landed.

Each peer has its own submit thread, and its session is opened (the P2P handshake, `get_first_buffer_address`)
on that thread as soon as the peer is added, while it has just proven alive by registering. Why: the engine
opens a session under one lock shared by every session, and a handshake with a peer that accepts TCP but never
answers (frozen, not dead) holds that lock ~60 s (not configurable in 0.3.13); done at registration, later writes
never handshake in the data path, and a frozen peer stalls only its own thread's writes.

A handle settles (DONE or FAILED) only once the engine returned, i.e. no byte of it is still moving, so
after FAILED the caller may free or reuse both sides' pages at once.

Bounded by our deadlines (set from `BackendSettings.write_timeout`, the caller's Transferring timeout, unless
the operator set them): `MC_TRANSFER_TIMEOUT` (the binding's whole-call limit, at least 5 s, plus 1 s per GiB)
and `MC_TCP_PROGRESS_TIMEOUT_SEC` / `MC_TCP_STATUS_TIMEOUT_SEC` (the TCP transport's no-progress and
status-frame limits, default 30 s each). The transport limits are what end a stopped peer's write: after them
the transport has dropped the request, so nothing reads our pages any more. The whole-call limit alone would
not do: the binding returns then while the transport may still hold the slices.

How the TCP transport behaves when the target goes away (measured on loopback, 0.3.13, 2 cores):
- killed (kill -9), before or after earlier writes: the write fails in ~1 ms (EOF/EPIPE, or the handshake
  is refused).
- frozen (SIGSTOP) after the session was opened: FAILED after `MC_TCP_PROGRESS_TIMEOUT_SEC` (3 s in tests).
- frozen before the session was opened: the handshake holds its thread ~60 s, whatever the variables say.
Mooncake cannot cancel a request, so `cancel()`/`release()` of a pending handle can only call off a write not
yet started. `close()` never waits for a submit thread (under 1 ms even mid-handshake), but interpreter exit
joins those threads, so it can wait out a stalled handshake.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from transfer.backends.base import BackendSettings, Copy, MemoryRegion, TransferBackend, TransferError, WriteStatus
from transfer.backends.gpu_memory import probe_mooncake, require_gpu_memory

log = logging.getLogger(__name__)

_INSTALL_HINT = (
    "on CPU machines install `mooncake-transfer-engine-non-cuda` (pip) plus Debian's libibverbs1 and libnuma1 "
    "(apt-get install libibverbs1 libnuma1); on GPU machines the build for torch's CUDA major: "
    "`mooncake-transfer-engine` (CUDA 12) or `mooncake-transfer-engine-cuda13`"
)

# Requests per engine batch (see _submit_requests).
_BATCH = 2048

# One request: (local address, remote address, length in bytes).
_Request = tuple[int, int, int]


_TIMEOUT_VARS = ("MC_TCP_PROGRESS_TIMEOUT_SEC", "MC_TCP_STATUS_TIMEOUT_SEC", "MC_TRANSFER_TIMEOUT")


# Names of the variables pdserve itself set in this environment (so a child process, which inherits them, can tell
# our values from an operator's and set its own).
_OURS_VAR = "PDSERVE_MC_TIMEOUTS_SET"


def set_engine_timeouts(write_timeout: float) -> dict[str, str]:
    """Bound the engine's own timeouts by ours, before the engine is built; returns what is in effect.
    A value the operator set is kept (it is theirs to choose); one an earlier pdserve engine set here (in this
    process, or a parent whose environment we inherited) is replaced."""
    seconds = str(max(1, math.ceil(write_timeout)))
    ours = set(filter(None, os.environ.get(_OURS_VAR, "").split(",")))
    for name in _TIMEOUT_VARS:
        if name not in os.environ or name in ours:
            os.environ[name] = seconds
            ours.add(name)
    os.environ[_OURS_VAR] = ",".join(sorted(ours))
    return {k: os.environ[k] for k in _TIMEOUT_VARS}


@dataclass
class _Peer:
    session_id: str
    regions: list[MemoryRegion]
    # Bumped when a submission to this peer fails; a job queued before that fails fast instead of
    # paying the (possibly 60 s) handshake again behind a peer that is known to be unreachable.
    submit_failures: int = 0
    removed: bool = False
    executor: ThreadPoolExecutor | None = None  # its submit thread


class MooncakeWrite:
    """Handle of one submit_write: the submit thread's job, whose result is "" or the error."""

    def __init__(self, peer: str, session_id: str, num_requests: int, job: Future[str] | None) -> None:
        self.peer = peer
        self.session_id = session_id
        self.num_requests = num_requests
        self._job = job
        self._result: tuple[WriteStatus, str] | None = None if job is not None else (WriteStatus.DONE, "")

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
        self.engine_timeouts = set_engine_timeouts(settings.write_timeout)
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
        self._lock = threading.Lock()
        self._closed = False
        log.info("mooncake: engine up, session %s (%s), %s", self.session_id, settings.protocol, self.engine_timeouts)

    # -- registration ---------------------------------------------------------------------------------

    def register(self, regions: list[MemoryRegion], device: torch.device) -> None:
        engine = self._live_engine()
        if self._registered:
            raise TransferError("mooncake: register() called twice; register every region in one call")
        if not regions:
            raise TransferError("mooncake: register() needs at least one region")
        if torch.device(device).type == "cuda":
            # the CPU wheel would register device pointers as host memory and fail only at the first write
            require_gpu_memory(probe_mooncake())
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
        engine = self._live_engine()
        p = _Peer(session_id, list(regions))
        p.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mooncake-submit")
        with self._lock:
            old = self._peers.get(peer)
            self._peers[peer] = p
        if old is not None:
            self._retire(old)
        # Open the session now, on the peer's own thread (ahead of its first write): see the module docstring.
        p.executor.submit(self._open_session, engine, p)

    @staticmethod
    def _open_session(engine: Any, p: _Peer) -> None:
        if p.removed:
            return
        try:
            if not engine.get_first_buffer_address(p.session_id):
                log.warning("mooncake: cannot open session %s yet; its first write will try again", p.session_id)
        except Exception as e:  # the first write reports the failure where it matters
            log.warning("mooncake: opening session %s raised %r", p.session_id, e)

    def remove_peer(self, peer: str) -> None:
        with self._lock:
            p = self._peers.pop(peer, None)
        if p is not None:
            self._retire(p)

    @staticmethod
    def _retire(p: _Peer) -> None:
        p.removed = True  # queued submissions to it fail instead of writing into a departed peer
        if p.executor is not None:
            # A write the engine is running finishes (or times out) on its own; queued ones are called off.
            p.executor.shutdown(wait=False, cancel_futures=True)

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
        assert p.executor is not None
        try:
            job = p.executor.submit(self._submit_requests, engine, p, p.submit_failures, requests)
        except RuntimeError as e:  # its thread was shut down: the peer was removed meanwhile
            raise TransferError(f"mooncake: peer {peer!r} was removed: {e}") from e
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
    def _submit_requests(engine: Any, p: _Peer, failures_seen: int, requests: list[_Request]) -> str:
        """Runs on the submit thread: the whole write, in engine batches. Returns "" or what went wrong.

        The engine is passed in so close() can drop its own reference. Batches of at most `_BATCH`
        requests, because the TCP transport rejects more than its lane queue holds.
        """
        if p.submit_failures != failures_seen:
            return f"an earlier write to {p.session_id} failed; not retrying its handshake"
        for i in range(0, len(requests), _BATCH):
            if p.removed:  # remove_peer() or close() since this write was queued
                return f"peer {p.session_id} was removed before the write was fully submitted"
            batch = requests[i : i + _BATCH]
            try:
                rc = engine.batch_transfer_sync_write(
                    p.session_id, [r[0] for r in batch], [r[1] for r in batch], [r[2] for r in batch]
                )
            except Exception as e:  # a binding error must become FAILED, not kill the submit thread's result
                p.submit_failures += 1
                return f"batch_transfer_sync_write raised {e!r}"
            if rc != 0:
                p.submit_failures += 1
                return (
                    f"batch_transfer_sync_write returned {rc}: the write to session {p.session_id} failed "
                    "(its process is gone, dropped the connection or does not answer the handshake)"
                )
        return ""

    def poll(self, handle: MooncakeWrite) -> tuple[WriteStatus, str]:
        if handle._result is not None:
            return handle._result
        assert handle._job is not None
        if self._engine is None:
            handle._result = (WriteStatus.FAILED, f"mooncake write to {handle.peer}: backend closed while in flight")
            return handle._result
        if not handle._job.done():
            return WriteStatus.PENDING, ""
        try:
            error = handle._job.result()
        except CancelledError:
            error = "cancelled before submission (backend closed, handle released or peer removed)"
        except Exception as e:  # defensive: _submit_requests catches engine errors itself
            error = f"submission raised {e!r}"
        if error:
            handle._result = (
                WriteStatus.FAILED,
                f"mooncake write to {handle.peer} ({handle.session_id}) failed: {error}",
            )
        else:
            handle._result = (WriteStatus.DONE, "")
        return handle._result

    def release(self, handle: MooncakeWrite) -> None:
        self.cancel(handle)

    def cancel(self, handle: MooncakeWrite) -> bool:
        # A queued write can still be called off; one the engine started cannot be cancelled.
        if handle._result is not None:
            return True
        assert handle._job is not None
        if handle._job.cancel():
            error = f"mooncake write to {handle.peer}: cancelled before submission (handle released)"
            handle._result = (WriteStatus.FAILED, error)
            return True
        return False

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
            peers = list(self._peers.values())
            self._peers.clear()
        # Never wait: a submit thread may sit in a ~60 s handshake with a frozen peer. It holds its own
        # reference to the engine, so the engine is destroyed when the last user lets go of it.
        for p in peers:
            self._retire(p)  # a submission still queued or running stops before its next request
        if self._registered:
            rc = engine.batch_unregister_memory(self._registered)
            if rc != 0:
                log.warning("mooncake: batch_unregister_memory returned %d", rc)
            self._registered = []
        log.info("mooncake: session %s closed", self.session_id)
