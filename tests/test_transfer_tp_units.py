"""The decode manager's per-prefill-rank bookkeeping under tensor parallelism, in process (a recording fake engine,
control messages fed to the handler as the receive loop would): a room succeeds only once every prefill rank
reported Success, the aux row is read on decode rank 0 only, a failure reported by one prefill rank aborts the
room at the others, and pages are safe once every rank that got the info drained. The real thing end to end is
tests/test_tp_transfer.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import zmq

from engine.kvcache import KVLayout, KVPool
from engine.parallel import kv_head_range
from tests.test_transfer_worker import FakeBackend, backend, wait_for  # noqa: F401 (fixture)
from transfer.aux import AuxRow
from transfer.config import Timeouts, TransferConfig
from transfer.decode import DecodeTransferManager
from transfer.decode_watch import Leg
from transfer.manager import check_rank_layout
from transfer.protocol import Abort, AbortAck, Status, TransferState, decode


def pool_of(heads: int, tp: int, rank: int) -> KVPool:
    r = kv_head_range(heads, tp, rank)
    layout = KVLayout(num_layers=2, page_size=4, num_kv_heads=r.count, head_dim=4, dtype=torch.float32,
                      kv_head_start=r.start, total_kv_heads=heads)  # fmt: skip
    return KVPool(layout, 16)


class FakePrefillRanks:
    """Control sockets standing in for prefill ranks: what decode sends each."""

    def __init__(self, n: int) -> None:
        self.ctx = zmq.Context()
        self.socks = [self.ctx.socket(zmq.PULL) for _ in range(n)]
        self.endpoints = []
        for s in self.socks:
            s.setsockopt(zmq.LINGER, 0)
            self.endpoints.append(f"tcp://127.0.0.1:{s.bind_to_random_port('tcp://127.0.0.1')}")

    def received(self, rank: int, timeout_ms: int = 5000) -> list:  # the first message: a fresh TCP connect
        out = []
        while self.socks[rank].poll(timeout_ms):
            out.append(decode(self.socks[rank].recv()))
            timeout_ms = 50
        return out

    def close(self) -> None:
        for s in self.socks:
            s.close(linger=0)
        self.ctx.term()


@pytest.fixture
def ranks() -> Iterator[FakePrefillRanks]:
    r = FakePrefillRanks(2)
    yield r
    r.close()


def manager(rank: int, tp: int = 2) -> DecodeTransferManager:
    cfg = TransferConfig(aux_rows=4, tp_rank=rank, tp_size=tp, timeouts=Timeouts(http=0.2, abort_ack=30))
    return DecodeTransferManager(cfg, pool_of(4, tp, rank))


def open_room(mgr: DecodeTransferManager, ranks: FakePrefillRanks, room: int = 1):
    """A room whose info went to both prefill ranks (as `_bootstrap` leaves it)."""
    receiver = mgr.create_receiver(room, "127.0.0.1:1", [0, 1], 4)  # nobody there: bootstrap keeps failing
    with mgr._lock:
        r = mgr._room(room)
        r.writers = {0, 1}
        r.legs = {i: Leg(f"inst{i}", ep, 1) for i, ep in enumerate(ranks.endpoints)}
        r.state.advance(TransferState.WAITING_FOR_INPUT)
    return receiver


def test_success_needs_every_prefill_rank_and_the_aux_row_is_read_on_rank_0_only(backend, ranks):  # noqa: F811
    for rank in (0, 1):
        mgr = manager(rank)
        backend.mgr = mgr
        try:
            receiver = open_room(mgr, ranks)
            mgr.aux.write(mgr._room(1).aux_row, AuxRow(1, 4, 42, -0.5))  # as prefill rank 0's write would land
            mgr._handle(Status(1, TransferState.SUCCESS, 0, session=mgr.session))
            assert receiver.poll() == TransferState.TRANSFERRING and not receiver.safe_to_free()
            mgr._handle(Status(1, TransferState.SUCCESS, 7, session=mgr.session))  # no such rank: ignored
            assert receiver.poll() == TransferState.TRANSFERRING
            mgr._handle(Status(1, TransferState.SUCCESS, 1, session=mgr.session))
            assert receiver.poll() == TransferState.SUCCESS and receiver.safe_to_free()
            if rank == 0:
                assert receiver.result() == AuxRow(1, 4, 42, -0.5)
            else:
                with pytest.raises(ValueError, match="aux row reaches decode rank 0 only"):
                    receiver.result()
        finally:
            mgr.close()


def test_one_prefill_rank_failing_aborts_the_room_at_the_other(backend, ranks):  # noqa: F811
    mgr = manager(1)
    backend.mgr = mgr
    try:
        receiver = open_room(mgr, ranks)
        mgr._handle(Status(1, TransferState.FAILED, 1, "write failed", drained=True, reason="failed",
                           session=mgr.session))  # fmt: skip
        assert receiver.poll() == TransferState.FAILED and "write failed" in receiver.error
        aborts = [m for m in ranks.received(0) if isinstance(m, Abort)]
        assert [(a.room, a.sender_rank) for a in aborts] == [(1, 1)]  # rank 0 may still write: told to stop
        # rank 1 failed itself: not told (nothing is expected, so a short wait)
        assert not [m for m in ranks.received(1, timeout_ms=500) if isinstance(m, Abort)]
        assert not receiver.safe_to_free()  # rank 0 has not said it drained
        mgr._handle(AbortAck(1, 0))
        assert receiver.safe_to_free()
    finally:
        mgr.close()


def test_an_abort_from_one_prefill_rank_is_acked_and_the_other_is_told(backend, ranks):  # noqa: F811
    mgr = manager(0)
    backend.mgr = mgr
    try:
        receiver = open_room(mgr, ranks)
        mgr._handle(Abort(1, ranks.endpoints[0], "aborted by prefill", session=mgr.session, sender_rank=0))
        assert receiver.poll() == TransferState.FAILED
        assert any(isinstance(m, AbortAck) for m in ranks.received(0))
        assert any(isinstance(m, Abort) for m in ranks.received(1))
        assert not receiver.safe_to_free()
        mgr._handle(Status(1, TransferState.FAILED, 1, "aborted by decode", drained=True, session=mgr.session))
        assert wait_for(receiver.safe_to_free, 2)
    finally:
        mgr.close()


def test_a_pool_that_does_not_hold_the_ranks_heads_is_refused():
    cfg = TransferConfig(tp_rank=1, tp_size=2)
    check_rank_layout(cfg, pool_of(4, 2, 1))
    with pytest.raises(
        ValueError, match=r"TP rank 1 of 2 holds KV heads \[2, 4\) of 4, but its KV pool holds \[0, 2\)"
    ):
        check_rank_layout(cfg, pool_of(4, 2, 0))


def test_context_parallel_ranks_hold_every_head_and_must_split_the_push():
    """CP ranks (`full_kv_heads`) hold every head but write only their TP-rank share: a CP size that cannot share
    the heads like a TP size is refused with the fix."""
    check_rank_layout(TransferConfig(tp_rank=1, tp_size=2, full_kv_heads=True), pool_of(4, 1, 0))
    with pytest.raises(ValueError, match="TP rank 1 of 2 holds KV heads"):  # the full pool, but not told so
        check_rank_layout(TransferConfig(tp_rank=1, tp_size=2), pool_of(4, 1, 0))
    with pytest.raises(ValueError, match="use a --cp-size that divides 4 or is a multiple of it"):
        check_rank_layout(TransferConfig(tp_rank=1, tp_size=3, full_kv_heads=True), pool_of(4, 1, 0))


def test_dp_attention_rooms_are_written_whole_by_their_owner_rank():
    """DP attention: room R is written by prefill rank R % dp alone, as a one-rank prefill (every head, the aux row),
    whatever the TP size; a DP size that is not the TP size, or ranks without every head, are refused."""
    from transfer.bootstrap import room_writers, writer_ranks

    assert [room_writers(r, 2, 2) for r in (4, 7)] == [[0], [1]]
    assert room_writers(7, 2, 1) == [0, 1]
    assert writer_ranks({"tp_size": 2, "dp_size": 2}) == 1 and writer_ranks({"tp_size": 2}) == 2
    cfg = TransferConfig(tp_rank=1, tp_size=3, full_kv_heads=True, dp_size=3)
    cfg.validate()
    assert cfg.writer == (1, 0) and cfg.writes_aux
    check_rank_layout(cfg, pool_of(4, 1, 0))  # 3 does not divide 4 heads: no matter, the owner writes them all
    assert TransferConfig(tp_rank=1, tp_size=2).writes_aux is False
    for bad in (dict(tp_size=2, dp_size=3, full_kv_heads=True), dict(tp_size=2, dp_size=2)):
        with pytest.raises(ValueError, match="DP attention ranks"):
            TransferConfig(**bad).validate()


def test_a_dp_prefill_room_succeeds_on_its_owner_ranks_word_alone(backend, ranks):  # noqa: F811
    mgr = manager(0)
    backend.mgr = mgr
    try:
        receiver = open_room(mgr, ranks)
        with mgr._lock:
            mgr._room(1).writers = {1}  # room 1 of a DP2 prefill: rank 1 owns it
        mgr.aux.write(mgr._room(1).aux_row, AuxRow(1, 4, 42, -0.5))  # the owner's aux row
        mgr._handle(Status(1, TransferState.SUCCESS, 0, session=mgr.session))  # not a writer of this room: ignored
        assert receiver.poll() == TransferState.WAITING_FOR_INPUT
        mgr._handle(Status(1, TransferState.SUCCESS, 1, session=mgr.session))
        assert receiver.poll() == TransferState.SUCCESS and receiver.result() == AuxRow(1, 4, 42, -0.5)
    finally:
        mgr.close()
