"""Pure unit tests of the transfer layer's pieces: wire protocol, state machine, run merging, aux rows."""

from __future__ import annotations

import msgpack
import pytest

from contracts.metrics import FailureReason
from transfer.aux import AuxBuffer, AuxRow
from transfer.backends.base import Copy
from transfer.bootstrap import LayoutMismatch, check_layout
from transfer.config import Timeouts
from transfer.planner import layer_copies, merge_runs
from transfer.protocol import (
    PROTOCOL_VERSION,
    Abort,
    ProtocolError,
    Registration,
    Status,
    TransferInfo,
    TransferState,
    UnknownSession,
    decode,
    encode,
)
from transfer.state import RoomState


def test_messages_round_trip():
    msgs = [
        Registration("s", "tcp://h:1", "nixl", b"\x00meta", [1, 2], [3, 4], 4096, 10, 99, 64, 8, 0, 1),
        TransferInfo(2**63 - 1, "s", "tcp://h:1", "i1", dst_pages=[5, 6, 9], aux_row=3, prompt_len=40),
        Status(room=7, state=TransferState.SUCCESS, sender_rank=0, session="tcp://h:1#a1"),
        Abort(room=7, endpoint="tcp://h:2", reason="client went away"),
        UnknownSession(room=7, session="tcp://h:1#a1", sender_rank=0, instance="b2"),
    ]
    for msg in msgs:
        assert decode(encode(msg)) == msg


@pytest.mark.parametrize(
    "data",
    [
        b"\xc1garbage",
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"v": PROTOCOL_VERSION + 1, "type": "status", "room": 1, "state": 4, "sender_rank": 0}),
        msgpack.packb({"v": PROTOCOL_VERSION, "type": "launch_missiles"}),
        msgpack.packb({"v": PROTOCOL_VERSION, "type": "status", "room": 1, "state": 4}),  # missing field
        msgpack.packb({"v": PROTOCOL_VERSION, "type": "status", "room": "1", "state": 4, "sender_rank": 0}),
        msgpack.packb({"v": PROTOCOL_VERSION, "type": "status", "room": 1, "state": 4, "sender_rank": 0, "x": 1}),
        msgpack.packb(
            {
                "v": PROTOCOL_VERSION,
                "type": "transfer_info",
                "room": 1,
                "session": "s",
                "endpoint": "tcp://h:1",
                "prefill_instance": "i",
                "dst_pages": [1, "2"],
                "aux_row": 0,
                "prompt_len": 3,
            }
        ),
    ],
    ids=["not-msgpack", "not-a-map", "version", "unknown-type", "missing", "wrong-type", "extra", "bad-list"],
)
def test_malformed_messages_are_rejected(data: bytes):
    with pytest.raises(ProtocolError):
        decode(data)


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_state_machine_moves_forward_only_and_failure_is_sticky():
    room = RoomState(1, Timeouts(), FakeClock())
    assert room.state == TransferState.BOOTSTRAPPING
    assert room.advance(TransferState.TRANSFERRING)
    assert not room.advance(TransferState.WAITING_FOR_INPUT)  # backwards
    assert not room.advance(TransferState.TRANSFERRING)  # repeated
    assert room.advance(TransferState.SUCCESS)
    assert not room.advance(TransferState.SUCCESS)  # success declared once
    assert not room.fail("late", FailureReason.FAILED)  # success is final too
    assert room.state == TransferState.SUCCESS

    failed = RoomState(2, Timeouts(), FakeClock())
    assert failed.fail("boom", FailureReason.FAILED) and not failed.fail("again", FailureReason.ABORTED)
    assert not failed.advance(TransferState.SUCCESS)
    assert failed.state == TransferState.FAILED and failed.error == "boom"
    assert failed.reason is FailureReason.FAILED and failed.failed_in == TransferState.BOOTSTRAPPING


@pytest.mark.parametrize(
    ("state", "limit"),
    [
        (TransferState.BOOTSTRAPPING, "bootstrap"),
        (TransferState.WAITING_FOR_INPUT, "waiting_for_input"),
        (TransferState.TRANSFERRING, "transferring"),
    ],
)
def test_every_non_final_state_times_out(state: TransferState, limit: str):
    clock = FakeClock()
    timeouts = Timeouts(bootstrap=10, waiting_for_input=20, transferring=30)
    room = RoomState(1, timeouts, clock)
    if state != TransferState.BOOTSTRAPPING:
        room.advance(state)
    clock.t = getattr(timeouts, limit) - 0.01
    assert not room.check_timeout()
    clock.t = getattr(timeouts, limit) + 0.01
    assert room.check_timeout()
    assert room.state == TransferState.FAILED and f"timed out in {state.name}" in room.error
    assert room.reason is FailureReason.TIMED_OUT and room.failed_in == state
    assert not room.check_timeout()


def test_deadline_restarts_on_each_move():
    clock = FakeClock()
    room = RoomState(1, Timeouts(bootstrap=10, waiting_for_input=10), clock)
    clock.t = 9
    room.advance(TransferState.WAITING_FOR_INPUT)
    clock.t = 18
    assert not room.check_timeout()


def test_merge_runs():
    assert merge_runs([], []) == []
    assert merge_runs([0, 1, 2], [10, 11, 12]) == [(0, 10, 3)]
    # contiguous on one side only: no merge
    assert merge_runs([0, 1, 2], [10, 12, 13]) == [(0, 10, 1), (1, 12, 2)]
    assert merge_runs([5, 6, 9, 10], [1, 2, 3, 4]) == [(5, 1, 2), (9, 3, 2)]
    assert merge_runs([3, 2, 1], [3, 2, 1]) == [(3, 3, 1), (2, 2, 1), (1, 1, 1)]
    with pytest.raises(ValueError, match="2 source pages but 1"):
        merge_runs([1, 2], [1])


def test_layer_copies_cover_k_and_v_of_each_layer():
    copies = layer_copies(1, 3, num_layers=4, runs=[(0, 5, 2), (7, 9, 1)])
    assert copies == [
        Copy(1, 0, 5, 2), Copy(1, 7, 9, 1), Copy(5, 0, 5, 2), Copy(5, 7, 9, 1),
        Copy(2, 0, 5, 2), Copy(2, 7, 9, 1), Copy(6, 0, 5, 2), Copy(6, 7, 9, 1),
    ]  # fmt: skip


def test_aux_rows():
    aux = AuxBuffer(4)
    rows = [aux.allocate() for _ in range(4)]
    assert sorted(rows) == [0, 1, 2, 3] and aux.allocate() is None
    value = AuxRow(room=2**63 - 1, prompt_len=4000, first_token=-1 + 2**31, logprob=-0.25)
    aux.write(2, value)
    assert aux.read(2) == value
    aux.free(2)
    assert aux.read(2) == AuxRow(0, 0, 0, 0.0)  # freed rows are cleared
    with pytest.raises(ValueError, match="twice"):
        aux.free(2)
    assert aux.region.item_bytes == 64 and aux.region.num_items == 4


def test_layout_check_names_every_difference():
    local = {"tp_size": 1, "page_size": 16, "kv_dtype": "bfloat16", "num_layers": 32, "num_kv_heads": 8,
             "head_dim": 128, "backend": "mooncake"}  # fmt: skip
    check_layout(local, dict(local), "p:8998")
    with pytest.raises(LayoutMismatch, match=r"page_size: prefill 32 vs decode 16.*head_dim: prefill 64"):
        check_layout(local, local | {"page_size": 32, "head_dim": 64}, "p:8998")
    with pytest.raises(LayoutMismatch, match="kv_dtype"):
        check_layout(local, local | {"kv_dtype": "float16"}, "p:8998")
    with pytest.raises(LayoutMismatch, match="prefill TP != decode TP"):
        check_layout(local, local | {"tp_size": 2}, "p:8998")
