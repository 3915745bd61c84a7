"""What both sides' transfer managers share: the backend with every KV region registered, the ZMQ control
sockets, and the threads that receive messages and enforce deadlines.

Threads: `recv` (control socket → `_handle`), `tick` (timeouts → `_tick`), plus whatever a side adds.
One re-entrant lock guards all room bookkeeping; ZMQ sockets are used from one thread at a time.

Every manager draws a random `instance` id when it starts: a process restarted on the same address is a new
peer to the other side (prefill publishes it in its bootstrap record, decode puts it in its session id).
The cache of outgoing sockets is bounded (least recently used closed first), so peers that come and go
(restarts on new ports) do not accumulate sockets.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import zmq

from contracts.codec import Record
from contracts.metrics import FailureReason
from engine.device import bind_thread
from engine.kvcache import KVPool
from engine.parallel import HeadRange, kv_head_range, kv_split_problem
from transfer.aux import AuxBuffer
from transfer.backends import BackendSettings, MemoryRegion, create_backend
from transfer.config import TransferConfig
from transfer.protocol import ProtocolError, TransferState, decode, encode

log = logging.getLogger(__name__)

_POLL_MS = 50
_TICK_S = 0.02
MAX_PUSH_SOCKETS = 256  # outgoing control sockets kept open; more peers than this reconnect on use
ERROR_BACKOFF_S = 0.05  # pause after an error outside any room, so a persistent one does not spin a loop


class DuplicateRoomError(ValueError):
    """A bootstrap_room that is still live on this side."""


class RoomHandle:
    """What a scheduler holds for one room: its state and, once failed, why; read through the owning manager."""

    def __init__(self, manager: TransferManager, room: int) -> None:
        self.manager = manager
        self.room = room

    def poll(self) -> TransferState:
        return self.manager._room(self.room).state.state

    @property
    def error(self) -> str:
        """The failure in words, for logs and the client ("" unless FAILED)."""
        return self.manager._room(self.room).state.error

    @property
    def reason(self) -> FailureReason | None:
        """The failure's typed reason (a metric label), set where it happened; None unless FAILED."""
        return self.manager._room(self.room).state.reason


def kv_regions(pool: KVPool) -> list[MemoryRegion]:
    """K of every layer, then V of every layer: the region order both sides share. An item is one KV head of one
    page (page p, local head h: item p * heads + h), the scratch page included, so both sides' items have the same
    size whatever their TP sizes (transfer/planner.py)."""
    layout = pool.layout
    n = (pool.num_pages + 1) * layout.num_kv_heads
    return [MemoryRegion(t.data_ptr(), layout.head_bytes, n, layout.num_kv_heads) for t in (*pool.k, *pool.v)]


def check_rank_layout(cfg: TransferConfig, pool: KVPool) -> None:
    """The pool must hold exactly the KV heads `engine.parallel.kv_head_range` gives this TP rank (all of them with
    `full_kv_heads`): the head map (transfer/head_map.py) computes both sides' heads from it."""
    layout = pool.layout
    total = layout.model_kv_heads
    size, rank = cfg.writer
    if cfg.full_kv_heads and kv_split_problem(total, size):
        raise ValueError(
            f"{cfg.tp_size} context-parallel ranks split the KV push by heads, and {cfg.tp_size} "
            f"{kv_split_problem(total, cfg.tp_size)}; use a --cp-size that divides {total} or is a multiple of it"
        )
    writes = kv_head_range(total, size, rank)
    want = HeadRange(0, total, total) if cfg.full_kv_heads else writes
    if (layout.kv_head_start, layout.num_kv_heads) != (want.start, want.count):
        raise ValueError(
            f"TP rank {cfg.tp_rank} of {cfg.tp_size} holds KV heads [{want.start}, {want.stop}) of "
            f"{layout.model_kv_heads}, but its KV pool holds [{layout.kv_head_start}, "
            f"{layout.kv_head_start + layout.num_kv_heads})"
        )


class TransferManager:
    role = ""

    def __init__(self, cfg: TransferConfig, pool: KVPool, aux: AuxBuffer | None = None) -> None:
        cfg.validate()
        check_rank_layout(cfg, pool)
        self.cfg = cfg
        self.timeouts = cfg.timeouts
        self.pool = pool
        self.num_layers = pool.layout.num_layers
        self.instance = uuid.uuid4().hex[:12]
        self.aux = aux or AuxBuffer(cfg.aux_rows, pool.device)
        self.regions = [*kv_regions(pool), self.aux.region]
        settings = BackendSettings(
            host=cfg.host,
            protocol=cfg.mooncake_protocol,
            device_names=cfg.device_names,
            # an engine must give up on a write no later than our own Transferring deadline would
            write_timeout=cfg.timeouts.transferring,
        )
        self.backend = create_backend(cfg.backend, settings)
        self.backend.register(self.regions, pool.device)

        self._zmq = zmq.Context()
        self._pull = self._zmq.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        if cfg.zmq_port:
            self._pull.bind(f"tcp://{cfg.host}:{cfg.zmq_port}")
            port = cfg.zmq_port
        else:
            port = self._pull.bind_to_random_port(f"tcp://{cfg.host}")
        self.zmq_port = port
        self.endpoint = f"tcp://{cfg.host}:{port}"
        self._push: OrderedDict[str, zmq.Socket] = OrderedDict()
        self._send_lock = threading.Lock()

        self._lock = threading.RLock()
        self._rooms: dict[int, Any] = {}  # room -> the side's per-room record
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._spawn(self._recv_loop, "recv")
        self._spawn(self._tick_loop, "tick")

    def live_rooms(self) -> int:
        with self._lock:
            return len(self._rooms)

    def _room(self, room: int) -> Any:
        with self._lock:
            r = self._rooms.get(room)
        if r is None:
            raise KeyError(f"room {room} is not live")
        return r

    # -- threads --------------------------------------------------------------------------------------

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        t = threading.Thread(target=self._thread_main, args=(target, name), name=f"{self.role}-{name}", daemon=True)
        t.start()
        self._threads.append(t)

    def _thread_main(self, target: Callable[[], None], name: str) -> None:
        """Run a manager thread's loop on the pool's device, and never let it die silently.

        Every manager thread may touch device memory (the worker's events and copies, decode's aux read, an aux
        row cleared on free), and a new thread starts on device 0: `cuda:N` needs `set_device` here. The loops
        guard their own work per room; whatever escapes them is logged and the loop starts again after a pause.
        """
        try:
            # a tensor's device always has its index; the pool's may be a bare "cuda", which set_device refuses
            bind_thread(self.aux.tensor.device)
        except Exception:  # keep the loop: its device work then fails per room, with the error
            log.exception("%s: cannot make %s current in the %s thread", self.role, self.aux.tensor.device, name)
        while not self._stop.is_set():
            try:
                target()
                return
            except Exception:
                log.exception("%s: %s thread failed; restarting it", self.role, name)
                self._stop.wait(ERROR_BACKOFF_S)

    def _recv_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._pull, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(_POLL_MS):
                continue
            data = self._pull.recv()
            try:
                msg = decode(data)
            except ProtocolError as e:
                log.warning("%s: dropped malformed control message (%d bytes): %s", self.role, len(data), e)
                continue
            try:
                self._handle(msg)
            except Exception:  # a bug in one message must not stop the control plane
                log.exception("%s: error handling %s", self.role, type(msg).__name__)

    def _tick_loop(self) -> None:
        while not self._stop.wait(_TICK_S):
            try:
                self._tick()
            except Exception:
                log.exception("%s: error in tick", self.role)

    def _handle(self, msg: Record) -> None:
        raise NotImplementedError

    def _tick(self) -> None:
        raise NotImplementedError

    # -- messaging ------------------------------------------------------------------------------------

    def send(self, endpoint: str, msg: Record) -> bool:
        """Best effort: a dead peer must not block the caller for long."""
        with self._send_lock:
            sock = self._push.get(endpoint)
            if sock is None:
                sock = self._zmq.socket(zmq.PUSH)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.SNDTIMEO, 1000)
                sock.connect(endpoint)
                self._push[endpoint] = sock
                while len(self._push) > MAX_PUSH_SOCKETS:
                    _, old = self._push.popitem(last=False)
                    old.close(linger=0)
            else:
                self._push.move_to_end(endpoint)
            try:
                sock.send(encode(msg))
                return True
            except zmq.ZMQError as e:
                log.warning("%s: cannot send %s to %s: %s", self.role, type(msg).__name__, endpoint, e)
                return False

    def forget_endpoint(self, endpoint: str) -> None:
        with self._send_lock:
            sock = self._push.pop(endpoint, None)
            if sock is not None:
                sock.close(linger=0)

    # -- lifecycle ------------------------------------------------------------------------------------

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        with self._send_lock:
            for sock in self._push.values():
                sock.close(linger=0)
            self._push.clear()
        self._pull.close(linger=0)
        self._zmq.term()
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def now() -> float:
    return time.monotonic()
