"""The prefill transfer worker and decode's aux read, in process, against a recording fake engine (a pure unit
test of the worker: the real engines are covered end to end in test_transfer_e2e.py).

What is checked: the aux row is written by the thread that calls the sender (the scheduler's), before the event
the worker waits on, and goes out only after every KV copy of its room; no engine call runs while the manager's
lock is held, and the scheduler can queue while one is in progress; an error while handling a chunk, a write or
an event fails that room with the error's text and the worker goes on; the manager's threads bind the pool's
device and survive an error.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import zmq

from contracts.metrics import FailureReason
from engine.config import EngineConfig
from engine.engine import Engine
from engine.kvcache import KVLayout, KVPool
from engine.sampling import SamplingParams
from harness.transfer_peer import ManualEvent
from prefill_server.forward import prefill_and_send
from transfer import manager as manager_module
from transfer.aux import AuxBuffer, AuxRow
from transfer.backends.base import BackendSettings, Copy, MemoryRegion, TransferBackend, WriteStatus
from transfer.config import Timeouts, TransferConfig
from transfer.decode import DecodeTransferManager
from transfer.planner import PipelineSettings, aux_region
from transfer.prefill import KVSender, PrefillTransferManager
from transfer.protocol import Registration, Status, TransferInfo, TransferState, decode


class Done:
    """An event that completed already (the CPU path)."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None


@dataclass
class Submit:
    peer: str
    copies: list[Copy]
    thread: int
    aux_rows: dict[int, AuxRow]  # what each aux copy's source row held when the write was submitted


@dataclass
class FakeBackend(TransferBackend):
    """Records every engine call, checks none comes with the manager's lock held, and lets a test make calls
    fail, block, or stay pending."""

    settings: BackendSettings = field(default_factory=BackendSettings)
    name: str = "fake"
    mgr: Any = None
    submits: list[Submit] = field(default_factory=list)
    calls_under_lock: list[str] = field(default_factory=list)
    on_submit: Callable[[str, list[Copy]], None] | None = None  # may raise or block
    on_poll: Callable[[int], WriteStatus] | None = None  # may raise; default DONE
    cancelled: list[int] = field(default_factory=list)
    released: list[int] = field(default_factory=list)

    def _check(self, what: str) -> None:
        if self.mgr is not None and self.mgr._lock._is_owned():  # held by the calling thread
            self.calls_under_lock.append(what)

    def register(self, regions: list[MemoryRegion], device: torch.device) -> None:
        pass

    def metadata(self) -> bytes:
        return b"fake"

    def add_peer(self, peer: str, metadata: bytes, regions: list[MemoryRegion]) -> None:
        pass

    def remove_peer(self, peer: str) -> None:
        pass

    def submit_write(self, peer: str, copies: list[Copy]) -> Any:
        self._check("submit_write")
        aux = aux_region(self.mgr.num_layers)
        rows = {c.src: self.mgr.aux.read(c.src) for c in copies if c.region == aux}
        self.submits.append(Submit(peer, list(copies), threading.get_ident(), rows))
        if self.on_submit is not None:
            self.on_submit(peer, copies)
        return len(self.submits) - 1

    def poll(self, handle: Any) -> tuple[WriteStatus, str]:
        self._check("poll")
        status = self.on_poll(handle) if self.on_poll is not None else WriteStatus.DONE
        return status, "" if status != WriteStatus.FAILED else "fake failure"

    def release(self, handle: Any) -> None:
        self._check("release")
        self.released.append(handle)

    def cancel(self, handle: Any) -> bool:
        self._check("cancel")
        self.cancelled.append(handle)
        return True

    def close(self) -> None:
        pass


LAYOUT = KVLayout(num_layers=2, page_size=4, num_kv_heads=1, head_dim=4, dtype=torch.float32)


@pytest.fixture
def backend(monkeypatch: pytest.MonkeyPatch) -> FakeBackend:
    fake = FakeBackend()
    monkeypatch.setattr(manager_module, "create_backend", lambda name, settings: fake)
    return fake


class FakeDecode:
    """A decode control socket that collects the statuses prefill sends, registered with `mgr`."""

    def __init__(self, mgr: PrefillTransferManager) -> None:
        self.mgr = mgr
        self.ctx = zmq.Context()
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        port = self.pull.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.session = f"{self.endpoint}#fake"
        n, pool = mgr.num_layers, mgr.pool
        heads = pool.layout.num_kv_heads
        mgr._handle(Registration(self.session, self.endpoint, "fake", b"", [1] * n, [1] * n, pool.layout.head_bytes,
                                 (pool.num_pages + 1) * heads, 1, 64, 16, 0, 1, 0, heads, heads))  # fmt: skip
        assert self.session in mgr._peers

    def open(self, room: int, dst_pages: list[int], aux_row: int = 0, prompt_len: int = 4) -> KVSender:
        sender = self.mgr.create_sender(room)
        self.mgr._handle(TransferInfo(room, self.session, self.endpoint, self.mgr.instance, dst_pages, aux_row,
                                      prompt_len))  # fmt: skip
        assert sender.ready
        return sender

    def final(self, room: int, timeout: float = 10.0) -> Status:
        """The terminal status prefill sent for `room`."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.pull.poll(50):
                msg = decode(self.pull.recv())
                if isinstance(msg, Status) and msg.room == room and msg.state in (0, TransferState.SUCCESS):
                    return msg
        raise AssertionError(f"no terminal status for room {room}")

    def close(self) -> None:
        self.pull.close(linger=0)
        self.ctx.term()


@pytest.fixture
def prefill(backend: FakeBackend) -> Iterator[tuple[PrefillTransferManager, FakeDecode]]:
    pool = KVPool(LAYOUT, 16)
    mgr = PrefillTransferManager(TransferConfig(aux_rows=4, timeouts=Timeouts(abort_ack=0.2)), pool)
    backend.mgr = mgr
    peer = FakeDecode(mgr)
    yield mgr, peer
    peer.close()
    mgr.close()


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.005)
    return cond()


def worker_alive(mgr: PrefillTransferManager) -> bool:
    return any(t.name == "prefill-worker" and t.is_alive() for t in mgr._threads)


def finish(sender: KVSender, room: int, event: Any = None) -> None:
    assert sender.write_aux(AuxRow(room, 4, 7, -0.5))
    sender.finish(event or Done())


def succeeded(sender: KVSender) -> bool:
    return wait_for(lambda: sender.poll() in (TransferState.SUCCESS, TransferState.FAILED)) and (
        sender.poll() == TransferState.SUCCESS
    )


# -- the aux row ---------------------------------------------------------------------------------------------


def test_prefill_and_send_writes_aux_on_its_own_thread_and_sends_it_after_every_kv_copy(
    backend: FakeBackend, model_factory, monkeypatch: pytest.MonkeyPatch
):
    path = model_factory("llama", 31, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2)
    engine = Engine(EngineConfig(model=str(path), device="cpu", page_size=4, num_pages=64))
    layers = engine.pool.layout.num_layers
    writers: list[int] = []
    real_write = AuxBuffer.write

    def write(self: AuxBuffer, row: int, value: AuxRow) -> None:
        writers.append(threading.get_ident())
        real_write(self, row, value)

    monkeypatch.setattr(AuxBuffer, "write", write)
    mgr = PrefillTransferManager(TransferConfig(aux_rows=4), engine.pool)
    backend.mgr = mgr
    peer = FakeDecode(mgr)
    try:
        prompt = list(range(3, 40))
        n_pages = engine.pool.pages_for(len(prompt))
        for room, settings, groups in ((1, PipelineSettings(min_tokens=1, group_size=2), 3),
                                       (2, PipelineSettings(enabled=False), 1)):  # fmt: skip
            backend.submits.clear()
            sender = peer.open(room, list(range(n_pages)), aux_row=room, prompt_len=len(prompt))
            req = engine.make_request(prompt, SamplingParams(max_new_tokens=1))
            req.pages = engine.pool.allocator.allocate(n_pages)
            sample, used = prefill_and_send(engine, [req], [sender], [room], settings)
            assert len(used) == groups
            assert succeeded(sender), sender.error
            assert peer.final(room).state == TransferState.SUCCESS
            # written by the caller (the scheduler thread), never by the worker
            assert writers == [threading.get_ident()]
            writers.clear()
            assert all(s.thread != threading.get_ident() for s in backend.submits)
            # the aux copy is the very last copy of the room, after every layer's K and V, and held the row then
            copies = [c for s in backend.submits for c in s.copies]
            aux = aux_region(layers)
            assert [c.region for c in copies].count(aux) == 1 and copies[-1].region == aux
            assert copies[-1].dst == room
            assert {c.region for c in copies[:-1]} == set(range(2 * layers))
            expected = AuxRow(room, len(prompt), int(sample.token_ids[0]), float(sample.logprobs[0]))
            assert backend.submits[-1].aux_rows == {copies[-1].src: expected}
            sender.release()
            engine.pool.allocator.free(req.pages)
        assert mgr.aux.num_free == mgr.aux.rows and mgr.live_rooms() == 0
    finally:
        peer.close()
        mgr.close()


def test_aux_chunk_waits_behind_the_rooms_earlier_chunks(prefill):
    mgr, peer = prefill
    backend: FakeBackend = mgr.backend
    sender = peer.open(1, [5, 6])
    first = ManualEvent()
    sender.send(0, 1, [0, 1], first)
    sender.send(1, 2, [0, 1], Done())
    finish(sender, 1)  # its event is complete already, but it must not overtake the KV still being computed
    time.sleep(0.2)
    assert backend.submits == [] and sender.poll() == TransferState.WAITING_FOR_INPUT
    first.complete()
    assert succeeded(sender), sender.error
    aux = aux_region(mgr.num_layers)
    assert [[c.region for c in s.copies] for s in backend.submits] == [[0, 2], [1, 3], [aux]]


def test_no_free_aux_row_fails_the_room_clearly(backend: FakeBackend):
    mgr = PrefillTransferManager(TransferConfig(aux_rows=1), KVPool(LAYOUT, 16))
    backend.mgr = mgr
    peer = FakeDecode(mgr)
    try:
        a, b = peer.open(1, [0]), peer.open(2, [1])
        assert a.write_aux(AuxRow(1, 4, 1, 0.0))
        assert not b.write_aux(AuxRow(2, 4, 1, 0.0))
        assert b.poll() == TransferState.FAILED and b.reason is FailureReason.FAILED
        assert "no free aux row" in b.error
        b.finish(Done())  # a scheduler that finishes anyway is not an error: the room already ended
        a.finish(Done())
        assert succeeded(a), a.error
        status = peer.final(2)
        assert status.state == 0 and "no free aux row" in status.error
        for s in (a, b):
            assert wait_for(s.safe_to_free)
            s.release()
        assert mgr.aux.num_free == 1
    finally:
        peer.close()
        mgr.close()


def test_last_chunk_without_aux_row_is_refused(prefill):
    _, peer = prefill
    sender = peer.open(1, [0])
    with pytest.raises(ValueError, match="write_aux must come before"):
        sender.finish(Done())


# -- the lock ------------------------------------------------------------------------------------------------


def test_no_engine_call_under_the_lock_and_the_scheduler_queues_meanwhile(prefill):
    mgr, peer = prefill
    backend: FakeBackend = mgr.backend
    entered, unblock = threading.Event(), threading.Event()
    polls: dict[int, int] = {}

    def slow_submit(peer_name: str, copies: list[Copy]) -> None:
        if len(backend.submits) == 1:
            entered.set()
            assert unblock.wait(10)

    def pending_twice(handle: int) -> WriteStatus:
        polls[handle] = polls.get(handle, 0) + 1
        return WriteStatus.DONE if polls[handle] > 2 else WriteStatus.PENDING

    backend.on_submit, backend.on_poll = slow_submit, pending_twice
    sender = peer.open(1, [5, 6])
    sender.send(0, 1, [0, 1], Done())
    assert entered.wait(10)
    # the engine is inside submit_write: the scheduler still gets the lock and queues its next group
    queued = threading.Thread(target=lambda: (sender.send(1, 2, [0, 1], Done()), finish(sender, 1)))
    queued.start()
    queued.join(5)
    assert not queued.is_alive()
    assert not sender.safe_to_free()  # a write is being started: the pages are not ours to free
    unblock.set()
    assert succeeded(sender), sender.error
    assert len(backend.submits) == 3 and sorted(backend.released) == [0, 1, 2]
    # a write that hangs in a failed room is cancelled, also outside the lock
    backend.on_poll = lambda handle: WriteStatus.PENDING
    hung = peer.open(2, [7])
    finish(hung, 2)
    assert wait_for(lambda: len(backend.submits) == 4)
    hung.abort("client went away")
    assert not hung.safe_to_free()
    assert wait_for(hung.safe_to_free)
    assert backend.cancelled == [3]
    assert backend.calls_under_lock == []


# -- the exception guard -------------------------------------------------------------------------------------


def test_a_raising_submit_fails_its_room_and_the_worker_goes_on(prefill):
    mgr, peer = prefill
    backend: FakeBackend = mgr.backend

    def explode(peer_name: str, copies: list[Copy]) -> None:
        if len(backend.submits) == 1:
            raise RuntimeError("engine exploded")

    backend.on_submit = explode
    bad = peer.open(1, [0])
    finish(bad, 1)
    assert not succeeded(bad)
    assert bad.reason is FailureReason.FAILED and "RuntimeError: engine exploded" in bad.error
    status = peer.final(1)
    assert status.state == 0 and "engine exploded" in status.error and status.drained
    assert wait_for(bad.safe_to_free)
    good = peer.open(2, [1])
    finish(good, 2)
    assert succeeded(good), good.error
    assert worker_alive(mgr)


def test_a_raising_poll_fails_its_room_and_the_worker_goes_on(prefill):
    mgr, peer = prefill
    backend: FakeBackend = mgr.backend

    def poll(handle: int) -> WriteStatus:
        if handle == 0:
            raise RuntimeError("handle table corrupt")
        return WriteStatus.DONE

    backend.on_poll = poll
    bad = peer.open(1, [0])
    finish(bad, 1)
    assert not succeeded(bad)
    assert "polling the write raised RuntimeError: handle table corrupt" in bad.error
    status = peer.final(1)
    assert status.state == 0 and not status.drained  # we lost track of the write: decode must not reuse the pages
    assert backend.cancelled == [0] and 0 in backend.released
    good = peer.open(2, [1])
    finish(good, 2)
    assert succeeded(good), good.error
    assert worker_alive(mgr)


class BrokenEvent:
    def query(self) -> bool:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def synchronize(self) -> None:
        raise RuntimeError("unreachable")


def test_an_event_that_raises_fails_its_room_and_others_go_on(prefill):
    mgr, peer = prefill
    backend: FakeBackend = mgr.backend
    bad, good = peer.open(1, [0], aux_row=0), peer.open(2, [1], aux_row=1)
    bad.send(0, 2, [0], BrokenEvent())
    bad.write_aux(AuxRow(1, 4, 7, -0.5))  # False if the worker failed the room already
    bad.finish(Done())  # its last chunk is dropped with the room
    good.send(0, 2, [1], Done())
    finish(good, 2)
    assert succeeded(good), good.error
    assert bad.poll() == TransferState.FAILED and "illegal memory access" in bad.error
    assert wait_for(bad.safe_to_free)
    assert all(s.copies[0].dst == 1 for s in backend.submits)  # nothing of the broken room went out
    assert worker_alive(mgr)


def test_an_error_outside_any_room_is_logged_and_the_loop_goes_on(prefill, caplog: pytest.LogCaptureFixture):
    mgr, peer = prefill
    worker = mgr._worker
    real_poll, calls = worker._poll_inflight, []

    def broken_poll() -> bool:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("bookkeeping bug")
        return real_poll()

    worker._poll_inflight = broken_poll
    sender = peer.open(1, [0])
    finish(sender, 1)
    assert succeeded(sender), sender.error
    assert worker_alive(mgr)
    assert "bookkeeping bug" in caplog.text


# -- threads -------------------------------------------------------------------------------------------------


def test_manager_threads_bind_the_pool_device_and_survive_errors(backend: FakeBackend, monkeypatch):
    bound: list[tuple[str, torch.device]] = []
    monkeypatch.setattr(manager_module, "bind_thread", lambda d: bound.append((threading.current_thread().name, d)))
    pool = KVPool(LAYOUT, 16)
    mgr = PrefillTransferManager(TransferConfig(aux_rows=4), pool)
    try:
        assert wait_for(lambda: {name for name, _ in bound} >= {"prefill-recv", "prefill-tick", "prefill-worker"})
        assert all(d == pool.device for _, d in bound)
        runs, ran_again = [], threading.Event()

        def flaky() -> None:
            runs.append(1)
            if len(runs) == 1:
                raise RuntimeError("first run fails")
            ran_again.set()

        mgr._spawn(flaky, "flaky")
        assert ran_again.wait(10)
    finally:
        mgr.close()


# -- decode's aux read ---------------------------------------------------------------------------------------


@pytest.fixture
def decode_mgr(backend: FakeBackend) -> Iterator[DecodeTransferManager]:
    mgr = DecodeTransferManager(TransferConfig(aux_rows=4, timeouts=Timeouts(http=0.2)), KVPool(LAYOUT, 16))
    backend.mgr = mgr
    yield mgr
    mgr.close()


def test_decode_reads_the_aux_row_outside_the_lock(decode_mgr: DecodeTransferManager, monkeypatch):
    mgr = decode_mgr
    receiver = mgr.create_receiver(1, "127.0.0.1:1", [0], 4)
    row = mgr._room(1).aux_row
    mgr.aux.write(row, AuxRow(1, 4, 42, -0.25))  # as the engine would have
    held: list[bool] = []
    real_read = mgr.aux.read
    monkeypatch.setattr(mgr.aux, "read", lambda r: (held.append(mgr._lock._is_owned()), real_read(r))[1])
    mgr._handle(Status(1, TransferState.SUCCESS, 0, session=mgr.session))
    assert receiver.poll() == TransferState.SUCCESS and receiver.result() == AuxRow(1, 4, 42, -0.25)
    assert held == [False]


def test_decode_aux_read_error_fails_that_room_only(decode_mgr: DecodeTransferManager, monkeypatch):
    mgr = decode_mgr
    bad, good = mgr.create_receiver(1, "127.0.0.1:1", [0], 4), mgr.create_receiver(2, "127.0.0.1:1", [1], 4)
    mgr.aux.write(mgr._room(2).aux_row, AuxRow(2, 4, 9, 0.0))
    bad_row, real_read = mgr._room(1).aux_row, mgr.aux.read

    def read(r: int) -> AuxRow:
        if r == bad_row:
            raise RuntimeError("CUDA error: unspecified launch failure")
        return real_read(r)

    monkeypatch.setattr(mgr.aux, "read", read)
    for room in (1, 2):
        mgr._handle(Status(room, TransferState.SUCCESS, 0, session=mgr.session))
    assert bad.poll() == TransferState.FAILED and "unspecified launch failure" in bad.error
    assert bad.reason is FailureReason.FAILED
    assert good.poll() == TransferState.SUCCESS and good.result().first_token == 9


def test_decode_bootstrap_error_fails_the_room_at_once(decode_mgr: DecodeTransferManager, monkeypatch):
    mgr = decode_mgr

    def resolve(addr: str):
        raise KeyError("rank_ip")

    monkeypatch.setattr(mgr, "_resolve", resolve)
    receiver = mgr.create_receiver(1, "127.0.0.1:1", [0], 4)
    assert wait_for(lambda: receiver.poll() == TransferState.FAILED, 5)  # not at the 300 s bootstrap deadline
    assert "bootstrap failed: KeyError" in receiver.error and receiver.safe_to_free()
