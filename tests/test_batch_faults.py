"""Failing batches end their requests: a prefill forward that raises, a decode step that raises for one
request, NaN logits in one row. In one process: the real prefill and decode schedulers, each on its own
real tiny engine, with a real Mooncake transfer over loopback between them; only the fault is injected (by
wrapping the engine's runner or sampler, which is what a pure unit test may fake).

Every request must be answered, the others of the batch go on with the right greedy tokens, and every
table, room and page is given back (`PD.assert_idle`).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import zmq

from decode_server.scheduler import DecodeScheduler
from engine.config import EngineConfig
from engine.engine import Engine
from engine.sampling import NON_FINITE_LOGITS, SampleOutput, SamplingParams
from harness.stack import free_port
from prefill_server.scheduler import PrefillScheduler
from serving.ipc import GenerateRequest, RequestOutput, unpack
from transfer.config import Timeouts, TransferConfig
from transfer.planner import PipelineSettings

GREEDY = {"max_new_tokens": 6, "temperature": 0.0, "ignore_eos": True}
PROMPTS = [[1, 2, 3, 4, 5], [9, 8, 7], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57]]
_rooms = itertools.count(1000)


def make_engine() -> Engine:
    return Engine(EngineConfig(model="builtin:tiny-llama", device="cpu", num_pages=64))


class PD:
    """A prefill and a decode scheduler in this process, driven by `run`; answers collected per side."""

    def __init__(
        self,
        tmp: Path,
        prefill: Engine,
        decode: Engine,
        pipeline: PipelineSettings | None = None,
        aux_rows: int = 1024,
        timeouts: Timeouts | None = None,
    ) -> None:
        self.ctx = zmq.Context()
        self.fronts = {}
        for side in ("prefill", "decode"):
            sock = self.ctx.socket(zmq.PULL)  # stands in for the side's front
            sock.bind(f"ipc://{tmp}/{side}-out")
            self.fronts[side] = sock
        cfg = TransferConfig(backend="mooncake", host="127.0.0.1", timeouts=timeouts or Timeouts())
        self.port = free_port()
        self.p = PrefillScheduler(
            prefill, cfg, f"ipc://{tmp}/p-in", f"ipc://{tmp}/prefill-out", self.port, "127.0.0.1", pipeline
        )
        dcfg = TransferConfig(backend="mooncake", host="127.0.0.1", aux_rows=aux_rows, timeouts=timeouts or Timeouts())
        self.d = DecodeScheduler(decode, dcfg, f"ipc://{tmp}/d-in", f"ipc://{tmp}/decode-out")
        self.outputs: dict[str, dict[str, list[RequestOutput]]] = {"prefill": {}, "decode": {}}

    def request(
        self, rid: str, prompt: list[int], sampling: dict[str, Any] | None = None, **kw: Any
    ) -> GenerateRequest:
        return GenerateRequest(
            rid, list(prompt), dict(sampling or GREEDY), bootstrap_host="127.0.0.1", bootstrap_port=self.port,
            bootstrap_room=next(_rooms), return_logprob=True, **kw,
        )  # fmt: skip

    def submit(self, msg: GenerateRequest) -> None:
        """What the router does: the same request to both sides."""
        self.p.on_generate(msg)
        self.d.on_generate(msg)

    def step(self) -> None:
        self.p.step()
        self.d.step()
        for side, sock in self.fronts.items():
            while sock.poll(0):
                out = unpack(sock.recv())
                if isinstance(out, RequestOutput):
                    self.outputs[side].setdefault(out.rid, []).append(out)

    def last(self, side: str, rid: str) -> RequestOutput | None:
        outs = self.outputs[side].get(rid)
        return outs[-1] if outs and outs[-1].finished else None

    def run(self, rids: list[str], sides: tuple[str, ...] = ("prefill", "decode"), timeout: float = 30.0) -> None:
        """Step both schedulers until every rid got its last output on each of `sides`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.last(side, rid) for side in sides for rid in rids):
                return
            self.step()
            time.sleep(0.001)
        missing = [(side, rid) for side in sides for rid in rids if not self.last(side, rid)]
        raise AssertionError(f"no answer for {missing}")

    def tokens(self, rid: str) -> list[int]:
        """The decode side's whole answer (it streams the prefill's first token too)."""
        return [t for out in self.outputs["decode"][rid] for t in out.token_ids]

    def count(self, side: str, rid: str) -> int:
        """How many last outputs `rid` got on `side` (every request is answered exactly once)."""
        return sum(o.finished for o in self.outputs[side].get(rid, []))

    def assert_idle(self, timeout: float = 15.0) -> None:
        """Every table empty, every room released, every page free on both sides."""
        p, d = self.p, self.d
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self._idle():
            self.step()  # the reapers give pages back once the transfer layer says no write can land
            time.sleep(0.01)
        assert not p.jobs and not p.bootstrapping and not len(p.batcher) and not p.inflight, p.jobs
        assert len(p.book) == 0 and p.book.pages_in_use == 0  # no request holds a page; cached ones are unlocked
        assert not d.admitting and not d.receiving and not d.logprobs, d.logprobs
        for sched in (p, d):
            eng = sched.engine
            assert not sched._sent and len(sched.reaper) == 0 and sched.reaper.quarantined == 0
            assert not eng._requests and not eng._detok
            assert not eng.scheduler.running and not eng.scheduler.waiting
            assert eng.pool.allocator.num_free + _cached_pages(sched) == eng.pool.num_pages
            assert not sched.transfer._rooms, sched.transfer._rooms

    def _idle(self) -> bool:
        return all(
            not len(s.reaper)
            and not s.transfer._rooms
            and s.engine.pool.allocator.num_free + _cached_pages(s) == s.engine.pool.num_pages
            for s in (self.p, self.d)
        )

    def close(self) -> None:
        for sched in (self.p, self.d):
            sched.transfer.close()
            sched.close()
        self.p.bootstrap.stop()
        for sock in self.fronts.values():
            sock.close(linger=0)
        self.ctx.term()


class PoisonRows:
    """Wraps an engine's sampler: rows whose request has `seed == mark` get `value` logits (NaN, inf)."""

    MARK = 424242

    def __init__(self, sampler: Callable[..., SampleOutput], value: float = float("nan")) -> None:
        self.sampler = sampler
        self.value = value
        self.hits = 0

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], generators: list[Any]) -> SampleOutput:
        rows = [i for i, p in enumerate(params) if p.seed == self.MARK]
        if rows:
            self.hits += 1
            logits = logits.clone()
            logits[rows, 5] = self.value
        return self.sampler(logits, params, generators)


def _cached_pages(sched: Any) -> int:
    """Pages the prefill server's prefix cache keeps for reuse (none on decode)."""
    book = getattr(sched, "book", None)
    return book.cache_pages if book is not None else 0


@pytest.fixture(scope="module")
def engines() -> tuple[Engine, Engine]:
    return make_engine(), make_engine()


@pytest.fixture(scope="module")
def reference(engines: tuple[Engine, Engine]) -> dict[int, list[int]]:
    """Greedy tokens of each prompt on the colocated engine (the answer PD must give)."""
    eng = engines[0]
    outs = eng.generate(PROMPTS, SamplingParams(**GREEDY))
    return {i: o.token_ids for i, o in enumerate(outs)}


@pytest.fixture
def pd_factory(engines: tuple[Engine, Engine], tmp_path: Path) -> Iterator[Callable[..., PD]]:
    made: list[PD] = []
    saved = [(e, e.runner.forward, e.runner.start_forward, e.sampler) for e in engines]

    def make(**kw: Any) -> PD:
        tmp = tmp_path / str(len(made))
        tmp.mkdir()
        pd = PD(tmp, *engines, **kw)
        made.append(pd)
        return pd

    try:
        yield make
    finally:
        for pd in made:
            pd.close()
        for eng, forward, start_forward, sampler in saved:  # undo any injected fault
            eng.runner.forward, eng.runner.start_forward, eng.sampler = forward, start_forward, sampler


@pytest.mark.parametrize("pipelined", [False, True], ids=["whole", "pipelined"])
def test_prefill_forward_that_raises_fails_every_job_and_frees_everything(
    pd_factory, engines, reference, pipelined: bool
):
    pipeline = PipelineSettings(min_tokens=1, group_size=2) if pipelined else PipelineSettings(enabled=False)
    pd = pd_factory(pipeline=pipeline)
    prefill = engines[0]
    real_start = prefill.runner.start_forward
    armed = {"on": True, "raised": 0}

    def start_forward(batch):  # while armed, every forward raises, a pipelined one after some groups went out
        fwd = real_start(batch)
        real_run = fwd.run_layers

        def run_layers(start: int, end: int) -> None:
            if armed["on"] and (start >= 2 or not pipelined):
                armed["raised"] += 1
                raise RuntimeError("injected: CUDA error: an illegal memory access")
            real_run(start, end)

        fwd.run_layers = run_layers
        return fwd

    prefill.runner.start_forward = start_forward
    msgs = [pd.request(f"r{i}", p) for i, p in enumerate(PROMPTS)]
    for m in msgs:
        pd.submit(m)
    rids = [m.rid for m in msgs]
    pd.run(rids)
    for rid in rids:
        out = pd.last("prefill", rid)
        assert out is not None and out.status == 500, out
        assert "internal error in the prefill forward" in (out.error or "") and "illegal memory" in (out.error or "")
        dout = pd.last("decode", rid)  # the room was aborted: decode fails at once rather than wait for KV
        assert dout is not None and dout.status == 500 and dout.error, dout
        assert pd.count("prefill", rid) == pd.count("decode", rid) == 1
    assert armed["raised"] >= 1
    pd.assert_idle()

    # the scheduler keeps serving: the next batch runs and answers right
    armed["on"] = False
    again = [pd.request(f"again{i}", p) for i, p in enumerate(PROMPTS)]
    for m in again:
        pd.submit(m)
    pd.run([m.rid for m in again])
    for i, m in enumerate(again):
        assert pd.tokens(m.rid) == reference[i]
    pd.assert_idle()


def test_local_prefill_jobs_are_answered_when_the_forward_raises(pd_factory, engines):
    pd = pd_factory()
    prefill = engines[0]
    real_start = prefill.runner.start_forward

    def start_forward(batch):
        prefill.runner.start_forward = real_start  # once
        raise RuntimeError("injected: out of memory")

    prefill.runner.start_forward = start_forward
    for i, p in enumerate(PROMPTS):  # no room: health_generate-style local requests
        pd.p.on_generate(GenerateRequest(f"local{i}", p, dict(GREEDY)))
    pd.run([f"local{i}" for i in range(3)], sides=("prefill",))
    assert all(pd.last("prefill", f"local{i}").status == 500 for i in range(3))
    pd.assert_idle()


def test_decode_step_that_raises_for_one_request_drops_only_it(pd_factory, engines, reference):
    pd = pd_factory()
    decode = engines[1]
    real_forward = decode.runner.forward
    failures = {"n": 0}

    def forward(batch, all_tokens=False):
        bad = decode._requests.get("bad")
        if bad is not None and any(t and t[0] == bad.pages[0] for t in batch.page_tables):
            failures["n"] += 1
            raise RuntimeError("injected: a kernel failed for this sequence")
        return real_forward(batch, all_tokens)

    decode.runner.forward = forward
    msgs = [pd.request(f"r{i}", p) for i, p in enumerate(PROMPTS)]
    bad = pd.request("bad", [7, 7, 7, 7])
    for m in [msgs[0], bad, *msgs[1:]]:
        pd.submit(m)
    pd.run([m.rid for m in [*msgs, bad]])
    out = pd.last("decode", "bad")
    assert out is not None and out.status == 500 and "internal error in the forward" in (out.error or ""), out
    assert failures["n"] <= 2  # the batch's try and its own retry: then it left the running batch
    for i, m in enumerate(msgs):
        assert pd.last("decode", m.rid).status == 200
        assert pd.tokens(m.rid) == reference[i]
    pd.assert_idle()


@pytest.mark.parametrize("side", ["prefill", "decode"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_logits_fail_only_their_request(pd_factory, engines, reference, side: str, value: float):
    pd = pd_factory()
    eng = engines[0] if side == "prefill" else engines[1]
    eng.sampler = poison = PoisonRows(eng.sampler, value)
    msgs = [pd.request(f"r{i}", p) for i, p in enumerate(PROMPTS)]
    bad = pd.request("bad", [3, 1, 4, 1, 5], dict(GREEDY, seed=PoisonRows.MARK))
    for m in [msgs[0], bad, *msgs[1:]]:
        pd.submit(m)
    pd.run([m.rid for m in [*msgs, bad]])
    assert poison.hits >= 1
    out = pd.last(side, "bad")
    assert out is not None and out.status == 500 and out.error == NON_FINITE_LOGITS, out
    assert pd.count("decode", "bad") == 1
    if side == "prefill":  # its room was aborted: decode's half fails too, at once
        assert pd.last("decode", "bad").status == 500
    for i, m in enumerate(msgs):
        assert pd.last("decode", m.rid).status == 200
        assert pd.tokens(m.rid) == reference[i]
    pd.assert_idle()


def _broken_poll():
    raise KeyError("injected: room 1 is not live")


@pytest.mark.parametrize("side", ["prefill", "decode"])
def test_a_room_handle_that_raises_fails_only_its_request(pd_factory, reference, side: str):
    """A bug in the transfer layer surfacing in one room's poll() used to raise out of every step (so the
    scheduler stopped serving everyone); now that request fails with a 500 and the rest go on."""
    pd = pd_factory()
    bad = pd.request("bad", PROMPTS[1])
    pd.submit(bad)
    if side == "prefill":
        pd.p.jobs["bad"].sender.poll = _broken_poll
    else:
        pd.step()  # admitted: its receiver exists
        pd.d.receiving["bad"].receiver.poll = _broken_poll
    msgs = [pd.request(f"r{i}", p) for i, p in enumerate(PROMPTS)]
    for m in msgs:
        pd.submit(m)
    pd.run(["bad"], sides=(side,))
    out = pd.last(side, "bad")
    assert out.status == 500 and "internal error: KeyError" in (out.error or ""), out
    # its room may have failed before the two sides met, so the other half waits for the router, which
    # aborts the other leg of a failed one
    (pd.d if side == "prefill" else pd.p).on_abort("bad")
    pd.run([m.rid for m in msgs] + ["bad"], sides=("decode",))
    for other in ("prefill", "decode"):
        assert pd.last(other, "bad").status in (499, 500) and pd.count(other, "bad") == 1
    for i, m in enumerate(msgs):
        assert pd.tokens(m.rid) == reference[i]
    pd.assert_idle()
