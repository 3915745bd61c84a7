"""The decode scheduler's per-request bookkeeping, on a real tiny engine and a real transfer manager.

Every way a request can end (abort while admitting, while receiving its KV, while running; a failed
transfer; a normal finish) must leave nothing behind: `logprobs` held an entry for every aborted request
(a slow leak), and pages of a failed room must come back once no write can land in them.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import zmq

from contracts.metrics import FailureReason, Stage
from decode_server.scheduler import DecodeScheduler
from engine.config import EngineConfig
from engine.engine import Engine
from harness.stack import free_port
from serving.ipc import GenerateRequest, RequestOutput, unpack
from transfer.config import Timeouts, TransferConfig

SAMPLING = {"max_new_tokens": 200, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(EngineConfig(model="builtin:tiny-llama", device="cpu", num_pages=64))


@pytest.fixture
def decode(engine: Engine, tmp_path: Path):
    ctx = zmq.Context()
    front = ctx.socket(zmq.PULL)  # stands in for the front: collects what the scheduler answers
    front.bind(f"ipc://{tmp_path}/from-scheduler")
    # nothing listens on the bootstrap port: a room stays bootstrapping until its (short) deadline
    cfg = TransferConfig(backend="mooncake", timeouts=Timeouts(bootstrap=3.0))  # outlasts the aborts below
    sched = DecodeScheduler(engine, cfg, f"ipc://{tmp_path}/to-scheduler", f"ipc://{tmp_path}/from-scheduler")
    outputs: dict[str, RequestOutput] = {}

    def finished(rid: str, timeout: float = 20.0) -> RequestOutput:
        """Step the scheduler until `rid`'s last output reached the front."""
        deadline = time.monotonic() + timeout
        while rid not in outputs and time.monotonic() < deadline:
            sched.step()
            while front.poll(0):
                msg = unpack(front.recv())
                if isinstance(msg, RequestOutput) and msg.finished:
                    outputs[msg.rid] = msg
            time.sleep(0.01)
        assert rid in outputs, f"{rid} did not finish"
        return outputs[rid]

    try:
        yield sched, finished
    finally:
        sched.transfer.close()
        sched.close()
        front.close(linger=0)
        ctx.term()


def remote(rid: str, room: int) -> GenerateRequest:
    return GenerateRequest(
        rid, [1, 2, 3, 4, 5], dict(SAMPLING), bootstrap_host="127.0.0.1", bootstrap_port=free_port(),
        bootstrap_room=room, return_logprob=True,
    )  # fmt: skip


def test_requests_ending_in_every_state_leave_no_bookkeeping(decode, engine: Engine):
    sched, finished = decode
    alloc = engine.pool.allocator
    failures = sched.metrics.kv_transfer_failures.labels(
        "decode", Stage.KV_TRANSFER.value, FailureReason.TIMED_OUT.value
    )
    failures_before = failures._value.get()

    # running: a local request decodes in the engine's batch
    sched.on_generate(GenerateRequest("running", [1, 2, 3], dict(SAMPLING), return_logprob=True))
    sched.step()
    assert engine.scheduler.running and sched.logprobs.keys() == {"running"}

    # receiving: pages reserved, the room bootstrapping towards a prefill that is not there
    sched.on_generate(remote("receiving", 1))
    sched.on_generate(remote("times-out", 2))
    sched.step()
    assert set(sched.receiving) == {"receiving", "times-out"}

    # admitting: no free page left, so it waits in line
    hog = alloc.allocate(alloc.num_free)
    assert hog is not None
    sched.on_generate(remote("admitting", 3))
    sched.step()
    assert [p.req.rid for p in sched.admitting] == ["admitting"]
    assert sched.logprobs.keys() == {"running", "receiving", "times-out", "admitting"}

    for rid in ("admitting", "receiving", "running"):
        sched.on_abort(rid)
        out = finished(rid)
        assert (out.finish_reason, out.status) == ("abort", 499), out
    alloc.free(hog)

    out = finished("times-out")  # its room's bootstrap deadline passes
    assert out.status == 500 and "KV transfer failed" in (out.error or ""), out
    assert failures._value.get() == failures_before + 1

    sched.on_generate(GenerateRequest("completes", [1, 2], dict(SAMPLING, max_new_tokens=3), return_logprob=True))
    assert len(finished("completes").logprobs) > 0

    assert sched.logprobs == {}
    deadline = time.monotonic() + 10
    while (len(sched.reaper) or alloc.num_free != engine.pool.num_pages) and time.monotonic() < deadline:
        sched.step()  # rooms that never sent their transfer info are safe to free at once
        time.sleep(0.05)
    assert len(sched.reaper) == 0 and alloc.num_free == engine.pool.num_pages
    assert not sched.admitting and not sched.receiving and not engine.scheduler.running
