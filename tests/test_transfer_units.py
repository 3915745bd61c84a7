"""Pure unit tests of the transfer layer's pieces: wire protocol, state machine, run merging, aux rows."""

from __future__ import annotations

import msgpack
import pytest

from contracts.metrics import FailureReason
from transfer.aux import AuxBuffer, AuxRow
from transfer.backends.base import Copy
from transfer.bootstrap import LayoutMismatch, check_layout
from transfer.config import Timeouts
from transfer.head_map import HeadSlice
from transfer.planner import item_spans, kv_copies, layer_copies, merge_runs
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
        Registration("s", "tcp://h:1", "nixl", b"\x00meta", [1, 2], [3, 4], 4096, 10, 99, 64, 8, 1, 2, 4, 4, 8),
        TransferInfo(2**63 - 1, "s", "tcp://h:1", "i1", dst_pages=[5, 6, 9], aux_row=3, prompt_len=40, required_dsts=2),
        Status(room=7, state=TransferState.SUCCESS, sender_rank=0, session="tcp://h:1#a1"),
        Abort(room=7, endpoint="tcp://h:2", reason="client went away", sender_rank=3),
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
    copies = layer_copies(1, 3, num_layers=4, spans=[(0, 5, 2), (7, 9, 1)])
    assert copies == [
        Copy(1, 0, 5, 2), Copy(1, 7, 9, 1), Copy(5, 0, 5, 2), Copy(5, 7, 9, 1),
        Copy(2, 0, 5, 2), Copy(2, 7, 9, 1), Copy(6, 0, 5, 2), Copy(6, 7, 9, 1),
    ]  # fmt: skip


def test_items_are_heads_of_pages_and_same_tp_keeps_one_copy_per_page_run():
    runs = merge_runs([3, 4, 5, 9], [7, 8, 9, 2])  # two runs: pages 3..5 -> 7..9, 9 -> 2
    # same TP, 4 heads on both sides: one span per page run, of 4 items per page
    assert item_spans(runs, [HeadSlice(0, 0, 4)], 4, 4) == [(12, 28, 12), (36, 8, 4)]
    # P2 -> D1 (prefill rank 1 holds heads 2..3 of 4): its 2 heads of each page land at offset 2 of decode's 4
    assert item_spans(runs, [HeadSlice(0, 2, 2)], 2, 4) == [(6, 30, 2), (8, 34, 2), (10, 38, 2), (18, 10, 2)]
    # P1 -> D2 (decode rank 1 holds heads 2..3): one slice of each prefill page, whole pages at decode
    assert item_spans(runs, [HeadSlice(2, 0, 2)], 4, 2) == [(14, 14, 2), (18, 16, 2), (22, 18, 2), (38, 4, 2)]
    copies = kv_copies(0, 2, 2, [3, 4, 5, 9], [7, 8, 9, 2], [HeadSlice(0, 0, 4)], 4, 4)
    assert len(copies) == 2 * 2 * 2  # layers x (K, V) x page runs
    assert kv_copies(0, 2, 2, [3], [7], [], 4, 4) == []  # a pair with nothing to copy


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
    check_layout(local, local | {"tp_size": 2}, "p:8998")  # prefill TP2 fills a decode TP1: each rank its half
    check_layout(local | {"tp_size": 16}, local | {"tp_size": 4}, "p:8998")  # 8 heads, each on 2 decode ranks
    with pytest.raises(LayoutMismatch, match=r"prefill TP2 x 8 KV heads vs decode TP3 x 8 KV heads\): decode TP3"):
        check_layout(local | {"tp_size": 3}, local | {"tp_size": 2}, "p:8998")
    with pytest.raises(LayoutMismatch, match=r"num_kv_heads: prefill 4 vs decode 8\); prefill TP2 x 4 KV heads vs "
                       r"decode TP1 x 8 KV heads"):  # fmt: skip
        check_layout(local, local | {"tp_size": 2, "num_kv_heads": 4}, "p:8998")
