"""The front <-> scheduler channel on `contracts.codec`: strict decoding, and a scheduler loop that survives
bad input.

A scheduler holds every in-flight request of its server, so a message it cannot read (a front of another
version, a bug, stray bytes on the socket) must cost that message only. The loop test feeds bad bytes over
the loop's real ZMQ ipc socket and checks the next valid request is still handled.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import SimpleNamespace

import msgpack
import pytest
import zmq

from contracts.codec import CodecError
from contracts.metrics import Role
from engine.kvcache import PageAllocator
from serving.ipc import (
    AbortRequest,
    GenerateRequest,
    IpcMessage,
    Ready,
    RequestOutput,
    SchedulerStats,
    pack,
    unpack,
)
from serving.scheduler_loop import SchedulerLoop

MESSAGES: list[IpcMessage] = [
    GenerateRequest("r1", [1, 2, 3], {"max_new_tokens": 4, "stop": ["\n"]}),
    GenerateRequest(
        "r2",
        [7],
        {},
        bootstrap_host="10.0.0.1",
        bootstrap_port=8998,
        bootstrap_room=2**63 - 1,
        return_logprob=True,
        stream=True,
        arrival_time=1700000000.25,
    ),
    AbortRequest("r1"),
    RequestOutput("r1", token_ids=[5, 6], text="hi", logprobs=[-0.5, -1.0], finished=True, finish_reason="stop"),
    RequestOutput("r3", finished=True, finish_reason="abort", error="KV transfer failed: x", status=500),
    SchedulerStats(running=1, queued=2, kv_pages_used=3, kv_pages_total=4, in_flight_transfers=1),
    Ready({"role": "decode", "kv_pages": 10, "nested": {"a": [1, 2]}}),
]


def raw(**fields: object) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


def generate_fields(**override: object) -> dict[str, object]:
    fields: dict[str, object] = {"v": 1, "type": "generate", "rid": "r", "input_ids": [1], "sampling": {}}
    fields.update(override)
    return fields


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_roundtrips(msg: IpcMessage):
    assert unpack(pack(msg)) == msg


def test_a_float_field_accepts_an_integer():
    msg = unpack(raw(**generate_fields(arrival_time=3)))
    assert isinstance(msg, GenerateRequest)
    assert msg.arrival_time == 3.0 and isinstance(msg.arrival_time, float)


BAD = {
    "missing field": raw(**{k: v for k, v in generate_fields().items() if k != "input_ids"}),
    "unknown field": raw(**generate_fields(priority=1)),
    "wrong type: list of str": raw(**generate_fields(input_ids=["a"])),
    "wrong type: str for list": raw(**generate_fields(input_ids="abc")),
    "wrong type: bool for int": raw(**generate_fields(bootstrap_room=True)),
    "wrong type: str for float": raw(**generate_fields(arrival_time="now")),
    "wrong type: None for required": raw(**generate_fields(rid=None)),
    "unknown type": raw(**generate_fields(type="shutdown")),
    "type not a string": raw(**generate_fields(type=1)),
    "unknown version": raw(**generate_fields(v=2)),
    "no version": raw(**{k: v for k, v in generate_fields().items() if k != "v"}),
    "not a map": msgpack.packb([1, "generate"]),
    "garbage": b"\xc1\xff\x00 not msgpack",
    "truncated": pack(MESSAGES[1])[:-3],
    "empty": b"",
}


@pytest.mark.parametrize("data", BAD.values(), ids=BAD.keys())
def test_bad_input_raises_codec_error(data: bytes):
    with pytest.raises(CodecError):
        unpack(data)


class _RecordingLoop(SchedulerLoop):
    """A scheduler without a model: it only records what the loop dispatches to it."""

    role = Role.DECODE

    def __init__(self, ipc_in: str, ipc_out: str) -> None:
        # all the base loop reads: the pool, the group, and the runner's two-batch-overlap counters
        runner = SimpleNamespace(tbo_steps=0, two_chunk_steps=0, idle_steps=0, tbo_threshold=None)
        engine = SimpleNamespace(pool=SimpleNamespace(allocator=PageAllocator(4)), tp=None, dp=None, runner=runner)
        super().__init__(engine, ipc_in, ipc_out)  # type: ignore[arg-type]
        self.handled: list[IpcMessage] = []

    def on_generate(self, req: GenerateRequest) -> None:
        self.handled.append(req)

    def on_abort(self, rid: str) -> None:
        self.handled.append(AbortRequest(rid))

    def step(self) -> bool:
        return False

    def stats(self) -> SchedulerStats:
        return SchedulerStats(running=0, queued=0, kv_pages_used=0, kv_pages_total=4)


def test_scheduler_loop_drops_bad_messages_and_handles_the_next(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    to_scheduler, from_scheduler = f"ipc://{tmp_path}/to-scheduler", f"ipc://{tmp_path}/from-scheduler"
    ctx = zmq.Context()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    push.bind(to_scheduler)  # the front binds both, as in a real server
    pull.bind(from_scheduler)
    loop = None
    try:  # everything inside: a socket left open would hang the context's term() at garbage collection
        loop = _RecordingLoop(to_scheduler, from_scheduler)
        bad = [BAD["garbage"], BAD["unknown version"], BAD["unknown type"], BAD["wrong type: list of str"]]
        for data in bad:
            push.send(data)
        valid = GenerateRequest("after-the-bad-ones", [1, 2], {"max_new_tokens": 1})
        push.send(pack(valid))
        push.send(pack(AbortRequest("after-the-bad-ones")))

        with caplog.at_level(logging.WARNING, logger="serving.scheduler_loop"):
            deadline = time.monotonic() + 10
            while len(loop.handled) < 2 and time.monotonic() < deadline:
                loop.run_once()  # raises if a bad message escapes the guard
        assert loop.handled == [valid, AbortRequest("after-the-bad-ones")]
        dropped = [r for r in caplog.records if "dropped a bad message" in r.getMessage()]
        assert len(dropped) == len(bad), [r.getMessage() for r in caplog.records]

        # and it still talks to the front
        assert pull.poll(5000), "the loop sent no stats"
        assert isinstance(unpack(pull.recv()), SchedulerStats)
    finally:
        if loop is not None:
            loop.close()
        push.close(linger=0)
        pull.close(linger=0)
        ctx.term()
