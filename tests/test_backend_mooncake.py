"""MooncakeBackend against real engines moving real bytes over TCP loopback (in one process and across two)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import pytest

pytest.importorskip("mooncake.engine")

import torch

from transfer.backends.base import BackendSettings, Copy, MemoryRegion, TransferError, WriteStatus
from transfer.backends.mooncake import MooncakeBackend

LAYERS, PAGES, PAGE_BYTES = 4, 32, 256
AUX_ROWS, AUX_ROW_BYTES = 8, 64
AUX = LAYERS  # region index of the aux buffer
SRC_SEED, DST_SEED = 0, 1

# Multi-item runs, shifted indices, first and last items, every region including aux.
COPIES = [
    Copy(0, 0, 0, 1),
    Copy(0, 3, 17, 4),
    Copy(1, 31, 0, 1),
    Copy(2, 8, 24, 8),
    Copy(3, 1, 2, 2),
    Copy(3, 20, 10, 5),
    Copy(AUX, 2, 7, 1),
]

REPO = Path(__file__).resolve().parent.parent


def make_buffers(seed: int) -> list[torch.Tensor]:
    """4 "layer" buffers of 32 pages and an aux buffer of 8 rows, filled with seeded random bytes."""
    g = torch.Generator().manual_seed(seed)
    bufs = [torch.randint(0, 256, (PAGES, PAGE_BYTES), dtype=torch.uint8, generator=g) for _ in range(LAYERS)]
    bufs.append(torch.randint(0, 256, (AUX_ROWS, AUX_ROW_BYTES), dtype=torch.uint8, generator=g))
    return bufs


def regions_of(bufs: list[torch.Tensor]) -> list[MemoryRegion]:
    return [MemoryRegion(b.data_ptr(), b.shape[1], b.shape[0]) for b in bufs]


def expected_after(dst: list[torch.Tensor], src: list[torch.Tensor], copies: list[Copy]) -> list[torch.Tensor]:
    out = [b.clone() for b in dst]
    for c in copies:
        out[c.region][c.dst : c.dst + c.count] = src[c.region][c.src : c.src + c.count]
    return out


def new_backend(bufs: list[torch.Tensor]) -> MooncakeBackend:
    backend = MooncakeBackend(BackendSettings(host="127.0.0.1", protocol="tcp"))
    backend.register(regions_of(bufs), torch.device("cpu"))
    return backend


def wait(backend: MooncakeBackend, handle: Any, deadline_s: float) -> tuple[WriteStatus, str, float]:
    t0 = time.monotonic()
    while True:
        status, error = backend.poll(handle)
        elapsed = time.monotonic() - t0
        if status != WriteStatus.PENDING or elapsed > deadline_s:
            return status, error, elapsed
        time.sleep(0.001)


# -- the target in another process ---------------------------------------------------------------------


def target_main() -> None:
    """Child process: register DST_SEED buffers, announce them, then answer `dump` with their bytes."""
    bufs = make_buffers(DST_SEED)
    backend = new_backend(bufs)
    say({"meta": backend.metadata().hex(), "regions": [[r.base, r.item_bytes, r.num_items] for r in regions_of(bufs)]})
    for line in sys.stdin:
        if line.strip() == "dump":
            say({"bytes": [b.numpy().tobytes().hex() for b in bufs]})
        else:
            break
    backend.close()


def say(obj: dict[str, Any]) -> None:
    # Prefixed, so a stray line from the native library on stdout cannot be mistaken for ours.
    print("@@" + json.dumps(obj), flush=True)


def hear(stream: IO[str]) -> dict[str, Any]:
    for line in stream:
        if line.startswith("@@"):
            return json.loads(line[2:])
    raise RuntimeError("target process ended without answering")


class Target:
    def __init__(self, log_path: Path) -> None:
        self._log = open(log_path, "w")  # noqa: SIM115 (closed in stop())
        path = [str(REPO), str(REPO / "tests")]
        code = f"import sys; sys.path[:0] = {path!r}; import {__name__} as t; t.target_main()"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            cwd=REPO,
        )
        hello = hear(self.proc.stdout)  # type: ignore[arg-type]
        self.metadata = bytes.fromhex(hello["meta"])
        self.regions = [MemoryRegion(*r) for r in hello["regions"]]

    def dump(self) -> list[torch.Tensor]:
        self.proc.stdin.write("dump\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        raw = hear(self.proc.stdout)["bytes"]  # type: ignore[arg-type]
        shapes = [(PAGES, PAGE_BYTES)] * LAYERS + [(AUX_ROWS, AUX_ROW_BYTES)]
        return [
            torch.frombuffer(bytearray.fromhex(h), dtype=torch.uint8).view(s) for h, s in zip(raw, shapes, strict=True)
        ]

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("exit\n")  # type: ignore[union-attr]
                self.proc.stdin.flush()  # type: ignore[union-attr]
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()
        self._log.close()


@pytest.fixture
def target(tmp_path: Path):
    t = Target(tmp_path / "target.log")
    yield t
    t.stop()


@pytest.fixture(scope="module")
def pair():
    """Initiator `a` (SRC_SEED bytes) and target `b` (DST_SEED bytes) in this process; a knows b as "b"."""
    src, dst = make_buffers(SRC_SEED), make_buffers(DST_SEED)
    a, b = new_backend(src), new_backend(dst)
    a.add_peer("b", b.metadata(), regions_of(dst))
    yield a, b, src, dst
    a.close()
    b.close()


# -- tests -------------------------------------------------------------------------------------------


def test_write_in_process(pair) -> None:
    a, _b, src, dst = pair
    before = [t.clone() for t in dst]
    # Two writes in flight at once, each over several regions.
    handles = [a.submit_write("b", COPIES[:3]), a.submit_write("b", COPIES[3:])]
    for h in handles:
        status, error, elapsed = wait(a, h, deadline_s=10)
        assert status == WriteStatus.DONE, (error, elapsed)
        assert a.poll(h) == (WriteStatus.DONE, "")  # settled handles keep their answer
        a.release(h)
    want = expected_after(before, src, COPIES)
    for i, (got, exp) in enumerate(zip(dst, want, strict=True)):
        assert torch.equal(got, exp), f"region {i}"
    assert any(not torch.equal(g, o) for g, o in zip(dst, before, strict=True))


def test_empty_write_is_done_at_once(pair) -> None:
    a, *_ = pair
    h = a.submit_write("b", [])
    assert a.poll(h) == (WriteStatus.DONE, "")
    a.release(h)


def test_write_to_another_process(pair, target: Target) -> None:
    a, _b, src, _dst = pair
    a.add_peer("child", target.metadata, target.regions)
    try:
        status, error, _ = wait(a, a.submit_write("child", COPIES), deadline_s=10)
        assert status == WriteStatus.DONE, error
        got = target.dump()
    finally:
        a.remove_peer("child")
    want = expected_after(make_buffers(DST_SEED), src, COPIES)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(g, w), f"region {i}"


@pytest.mark.parametrize(
    ("copy", "words"),
    [
        (Copy(0, PAGES - 1, 0, 2), "reads local items [31, 33) of region 0, which has 32"),
        (Copy(1, 0, PAGES - 3, 4), "writes items [29, 33) of peer 'b''s region 1, which has 32"),
        (Copy(AUX, 0, AUX_ROWS, 1), "region 4, which has 8"),
        (Copy(0, -1, 0, 1), "reads local items [-1, 0)"),
        (Copy(LAYERS + 1, 0, 0, 1), "names region 5; there are 5"),
        (Copy(0, 0, 0, 0), "non-positive count"),
    ],
)
def test_out_of_range_copies_are_refused(pair, copy: Copy, words: str) -> None:
    a, *_ = pair
    with pytest.raises(TransferError) as info:
        a.submit_write("b", [Copy(0, 0, 0, 1), copy])
    assert words in str(info.value)


def test_layout_mismatches_and_unknown_peer_are_refused(pair) -> None:
    a, b, _src, dst = pair
    with pytest.raises(TransferError, match="unknown peer 'nobody'"):
        a.submit_write("nobody", [Copy(0, 0, 0, 1)])
    regions = regions_of(dst)
    a.add_peer("short", b.metadata(), regions[:-1])
    a.add_peer("wide", b.metadata(), [*regions[:-1], MemoryRegion(regions[-1].base, 32, 16)])
    try:
        with pytest.raises(TransferError, match="has 4 regions but this side has 5"):
            a.submit_write("short", [Copy(0, 0, 0, 1)])
        with pytest.raises(TransferError, match="region 4 items are 64 bytes here but 32 bytes"):
            a.submit_write("wide", [Copy(AUX, 0, 0, 1)])
    finally:
        a.remove_peer("short")
        a.remove_peer("wide")
    with pytest.raises(TransferError, match="expected host:port"):
        a.add_peer("bad", b"not a session", regions)
    with pytest.raises(TransferError, match="register\\(\\) called twice"):
        a.register(regions_of(make_buffers(0)), torch.device("cpu"))


def test_queued_writes_are_called_off_by_release_remove_peer_and_close(pair) -> None:
    _a, b, _src, dst = pair
    before = [t.clone() for t in dst]
    src = make_buffers(SRC_SEED)  # kept alive: the engine reads it
    c = new_backend(src)
    c.add_peer("b", b.metadata(), regions_of(dst))
    c.add_peer("b2", b.metadata(), regions_of(dst))
    gate = threading.Event()
    for peer in ("b", "b2"):  # occupy each peer's submit thread, as a stalled write would
        c._peers[peer].executor.submit(gate.wait, 10)
    try:
        released = c.submit_write("b", COPIES)
        orphaned = c.submit_write("b2", COPIES)
        in_flight = c.submit_write("b", COPIES)
        t0 = time.monotonic()
        assert c.poll(released) == (WriteStatus.PENDING, "")
        assert time.monotonic() - t0 < 0.05  # poll never waits for the submit thread
        c.release(released)
        c.remove_peer("b2")
        gate.set()
        status, error, _ = wait(c, released, 10)
        assert status == WriteStatus.FAILED and "cancelled before submission" in error
        status, error, _ = wait(c, orphaned, 10)
        assert status == WriteStatus.FAILED and "removed" in error
        status, error, _ = wait(c, in_flight, 10)
        assert status == WriteStatus.DONE, error
        want = expected_after(before, src, COPIES)  # only in_flight landed
        assert all(torch.equal(x, y) for x, y in zip(dst, want, strict=True))
        gate.clear()
        c._peers["b"].executor.submit(gate.wait, 10)
        queued = c.submit_write("b", COPIES)
    finally:
        gate.set()
        c.close()
    status, error = c.poll(queued)
    assert status == WriteStatus.FAILED and "backend closed" in error


def test_dead_peer_fails_fast_and_close_does_not_hang(tmp_path: Path) -> None:
    target = Target(tmp_path / "target.log")
    src = make_buffers(SRC_SEED)
    a, fresh = new_backend(src), new_backend(src)
    try:
        a.add_peer("child", target.metadata, target.regions)
        status, error, _ = wait(a, a.submit_write("child", COPIES[:2]), deadline_s=10)
        assert status == WriteStatus.DONE, error  # connected, as in service
        target.kill()

        # Measured: ~1 ms (EOF/EPIPE on the open connection). 30 s is the engine's own progress timeout.
        status, error, elapsed = wait(a, a.submit_write("child", COPIES), deadline_s=30)
        print(f"write to a killed, connected peer: {status.value} after {elapsed * 1000:.1f} ms: {error}")
        assert status == WriteStatus.FAILED and elapsed < 30
        assert "returned" in error and "child" in error  # the engine's code and the peer are in the message

        # A backend that never talked to it fails at the handshake (connection refused), also at once.
        fresh.add_peer("child", target.metadata, target.regions)
        status, error, elapsed = wait(fresh, fresh.submit_write("child", COPIES), deadline_s=30)
        print(f"write to a killed, never-contacted peer: {status.value} after {elapsed * 1000:.1f} ms: {error}")
        assert status == WriteStatus.FAILED and elapsed < 30
        assert "batch_transfer_sync_write returned" in error
    finally:
        target.stop()
        for backend in (a, fresh):
            t0 = time.monotonic()
            backend.close()
            backend.close()  # idempotent
            assert time.monotonic() - t0 < 10
    with pytest.raises(TransferError, match="closed"):
        a.submit_write("child", COPIES)


def test_import_and_initialize_failures_say_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    import mooncake.engine

    class RefusingEngine:
        def initialize(self, *args: str) -> int:
            return -1

    monkeypatch.setattr(mooncake.engine, "TransferEngine", RefusingEngine)
    with pytest.raises(TransferError, match="returned -1: check that the host"):
        MooncakeBackend(BackendSettings())
    monkeypatch.setitem(sys.modules, "mooncake.engine", None)
    with pytest.raises(TransferError, match="mooncake-transfer-engine-non-cuda"):
        MooncakeBackend(BackendSettings())


def test_engine_timeouts_follow_ours_unless_the_operator_set_them(monkeypatch):
    from transfer.backends.mooncake import _TIMEOUT_VARS, set_engine_timeouts

    for name in (*_TIMEOUT_VARS, "PDSERVE_MC_TIMEOUTS_SET"):
        monkeypatch.delenv(name, raising=False)
    assert set(set_engine_timeouts(120).values()) == {"120"}
    # a later engine (this process, or a child that inherited the environment) sets its own: they were ours
    assert set(set_engine_timeouts(2.5).values()) == {"3"}
    monkeypatch.setenv("PDSERVE_MC_TIMEOUTS_SET", "")  # as an operator's environment: every value is theirs
    monkeypatch.setenv("MC_TRANSFER_TIMEOUT", "77")
    assert set_engine_timeouts(5)["MC_TRANSFER_TIMEOUT"] == "77"
