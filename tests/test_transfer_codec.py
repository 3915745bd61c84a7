"""The transfer control channel in process, without a real transfer engine: its wire bytes, its receive loop
against bad input, and the typed outcomes (reasons, errors) the schedulers read from room handles."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest
import torch
import zmq

from contracts.metrics import FailureReason
from engine.kvcache import KVLayout, KVPool
from transfer import manager as manager_module
from transfer.backends.base import BackendSettings, Copy, MemoryRegion, TransferBackend, WriteStatus
from transfer.config import Timeouts, TransferConfig
from transfer.decode import DecodeTransferManager, NoAuxRowFree
from transfer.prefill import PrefillTransferManager
from transfer.protocol import PROTOCOL_VERSION, Registration, Status, TransferState, encode


class NullBackend(TransferBackend):
    """Registers nothing and completes every write at once: enough for the control plane."""

    name = "null"

    def register(self, regions: list[MemoryRegion], device: torch.device) -> None:
        pass

    def metadata(self) -> bytes:
        return b"null"

    def add_peer(self, peer: str, metadata: bytes, regions: list[MemoryRegion]) -> None:
        pass

    def remove_peer(self, peer: str) -> None:
        pass

    def submit_write(self, peer: str, copies: list[Copy]) -> Any:
        return object()

    def poll(self, handle: Any) -> tuple[WriteStatus, str]:
        return WriteStatus.DONE, ""

    def close(self) -> None:
        pass


@pytest.fixture
def pool(monkeypatch: pytest.MonkeyPatch) -> KVPool:
    monkeypatch.setattr(manager_module, "create_backend", lambda name, settings: NullBackend(BackendSettings()))
    return KVPool(KVLayout(num_layers=2, page_size=4, num_kv_heads=1, head_dim=4, dtype=torch.float32), 8)


@pytest.fixture
def push() -> Iterator[Callable[[str, bytes], None]]:
    ctx = zmq.Context()
    socks: dict[str, zmq.Socket] = {}

    def send(endpoint: str, data: bytes) -> None:
        if endpoint not in socks:
            socks[endpoint] = ctx.socket(zmq.PUSH)
            socks[endpoint].setsockopt(zmq.LINGER, 0)
            socks[endpoint].connect(endpoint)
        socks[endpoint].send(data)

    yield send
    for s in socks.values():
        s.close(linger=0)
    ctx.term()


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def test_wire_bytes_are_the_documented_map():
    msg = Status(room=7, state=TransferState.FAILED, sender_rank=1, error="boom", drained=False, reason="timed_out",
                 session="tcp://d:1#abc")  # fmt: skip
    expected = {"v": PROTOCOL_VERSION, "type": "status", "room": 7, "state": 0, "sender_rank": 1, "error": "boom",
                "drained": False, "reason": "timed_out", "session": "tcp://d:1#abc"}  # fmt: skip
    assert encode(msg) == msgpack.packb(expected, use_bin_type=True)


def registration(session: str, pool: KVPool, aux_rows: int) -> Registration:
    n = pool.layout.num_layers
    heads = pool.layout.num_kv_heads
    return Registration(session, session, "mooncake", b"", [1] * n, [1] * n, pool.layout.head_bytes,
                        (pool.num_pages + 1) * heads, 1, 64, aux_rows, 0, 1, 0, heads, heads)  # fmt: skip


def test_receive_loop_drops_bad_input_and_keeps_serving(pool: KVPool, push):
    cfg = TransferConfig(aux_rows=4)
    with PrefillTransferManager(cfg, pool) as prefill:
        bad = [
            b"\xc1 not msgpack at all",
            msgpack.packb({"v": PROTOCOL_VERSION + 1, "type": "abort_ack", "room": 1, "sender_rank": 0}),
            msgpack.packb({"v": PROTOCOL_VERSION, "type": "launch_missiles", "room": 1}),
        ]
        for data in bad:
            push(prefill.endpoint, data)
        push(prefill.endpoint, encode(registration("tcp://127.0.0.1:1", pool, 4)))
        assert wait_for(lambda: "tcp://127.0.0.1:1" in prefill._peers)
        assert all(t.is_alive() for t in prefill._threads)


def test_decode_without_a_free_aux_row_raises_its_own_error(pool: KVPool):
    cfg = TransferConfig(aux_rows=1, timeouts=Timeouts(http=0.2))
    with DecodeTransferManager(cfg, pool) as decode:
        first = decode.create_receiver(1, "127.0.0.1:1", [0], 4)
        with pytest.raises(NoAuxRowFree):
            decode.create_receiver(2, "127.0.0.1:1", [1], 4)
        assert issubclass(NoAuxRowFree, RuntimeError)  # callers that caught RuntimeError still do
        assert first.reason is None
        first.abort("client went away")
        assert first.poll() == TransferState.FAILED and first.reason is FailureReason.ABORTED
        assert first.error == "client went away"


def test_timeouts_and_aborts_carry_their_reason(pool: KVPool):
    cfg = TransferConfig(aux_rows=4, timeouts=Timeouts(bootstrap=0.3, http=0.2))
    with DecodeTransferManager(cfg, pool) as decode, PrefillTransferManager(cfg, pool) as prefill:
        receiver = decode.create_receiver(1, "127.0.0.1:1", [0], 4)  # nobody listens there: bootstrap times out
        sender = prefill.create_sender(2)
        sender.abort()
        assert sender.reason is FailureReason.ABORTED
        assert wait_for(lambda: receiver.poll() == TransferState.FAILED)
        assert receiver.reason is FailureReason.TIMED_OUT
        assert "timed out in BOOTSTRAPPING" in receiver.error and "last error" in receiver.error
        waiting = prefill.create_sender(3)
        assert wait_for(lambda: waiting.poll() == TransferState.FAILED) and waiting.reason is FailureReason.TIMED_OUT
