"""Poisonous sampling parameters, alone and mixed into a batch, and a leak audit of both schedulers.

`temperature: 1e-300` / `top_p: 1e-300` are valid JSON but 0 in float32: they used to make the sampler
raise on every step of their batch, stalling or failing its other requests and leaving pages held. Now
they behave as greedy / keep-the-top-token, and values that cannot be computed get a 400 naming the field.

Same in-process setup as tests/test_batch_faults.py: the real prefill and decode schedulers on real tiny
engines with a real Mooncake transfer over loopback.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.engine import Engine
from engine.sampling import SamplingParams
from serving.ipc import GenerateRequest
from tests.test_batch_faults import GREEDY, PD, PROMPTS, PoisonRows, make_engine

# Each behaves as greedy: tiny temperatures are greedy, a tiny top_p keeps only the top token, top_k 1
# leaves one candidate whatever the (huge) temperature.
GREEDY_POISON = [
    {"temperature": 1e-300},
    {"temperature": 5e-324},
    {"temperature": 1.0, "top_p": 1e-300},
    {"temperature": 0.7, "top_p": 5e-324, "top_k": 0, "seed": 3},
    {"temperature": 1e300, "top_k": 1},
]
SAMPLED_POISON = [{"temperature": 1e300}, {"temperature": 10**30}, {"temperature": 1e38, "top_p": 0.5, "top_k": 5}]


@pytest.fixture(scope="module")
def engines() -> tuple[Engine, Engine]:
    return make_engine(), make_engine()


@pytest.fixture(scope="module")
def reference(engines: tuple[Engine, Engine]) -> dict[int, list[int]]:
    outs = engines[0].generate(PROMPTS, SamplingParams(**GREEDY))
    return {i: o.token_ids for i, o in enumerate(outs)}


@pytest.fixture
def pd_factory(engines: tuple[Engine, Engine], tmp_path: Path) -> Iterator[Callable[..., PD]]:
    made: list[PD] = []
    samplers = [e.sampler for e in engines]

    def make(**kw: Any) -> PD:
        tmp = tmp_path / str(len(made))
        tmp.mkdir()
        made.append(PD(tmp, *engines, **kw))
        return made[-1]

    try:
        yield make
    finally:
        for pd in made:
            pd.close()
        for eng, sampler in zip(engines, samplers, strict=True):
            eng.sampler = sampler


def test_poison_parameters_alone(pd_factory, reference):
    pd = pd_factory()
    for j, poison in enumerate(GREEDY_POISON):
        msg = pd.request(f"alone{j}", PROMPTS[0], dict(GREEDY, **poison))
        pd.submit(msg)
        pd.run([msg.rid], timeout=20)
        assert pd.last("decode", msg.rid).status == 200
        assert pd.tokens(msg.rid) == reference[0], poison
    pd.assert_idle()


def test_poison_parameters_mixed_into_a_batch(pd_factory, reference):
    pd = pd_factory()
    normal = [pd.request(f"normal{i}", p) for i, p in enumerate(PROMPTS)]
    greedy_poison = [pd.request(f"gp{j}", PROMPTS[j % 3], dict(GREEDY, **kw)) for j, kw in enumerate(GREEDY_POISON)]
    sampled = [pd.request(f"sp{j}", PROMPTS[1], dict(GREEDY, **kw)) for j, kw in enumerate(SAMPLED_POISON)]
    # all before the first step, interleaved, so that they share prefill batches and the decode batch
    for msg in [x for group in zip(normal, greedy_poison, sampled, strict=False) for x in group] + greedy_poison[3:]:
        pd.submit(msg)
    pd.run([m.rid for m in normal + greedy_poison + sampled], timeout=30)
    for i, msg in enumerate(normal):
        assert pd.last("decode", msg.rid).status == 200
        assert pd.tokens(msg.rid) == reference[i]
    for j, msg in enumerate(greedy_poison):
        assert pd.last("decode", msg.rid).status == 200
        assert pd.tokens(msg.rid) == reference[j % 3], GREEDY_POISON[j]
    for msg in sampled:  # a random token each, but a whole answer
        assert pd.last("decode", msg.rid).status == 200
        assert len(pd.tokens(msg.rid)) == GREEDY["max_new_tokens"]
    pd.assert_idle()


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("temperature", float("nan"), "temperature must be a finite number"),
        ("temperature", float("inf"), "temperature must be a finite number"),
        ("temperature", float("-inf"), "temperature must be a finite number"),
        ("top_p", float("nan"), "top_p must be a finite number"),
        ("top_p", 0.0, r"top_p must be in \(0, 1\]"),
        ("top_p", 10**400, "top_p must be a finite number"),
        ("temperature", 10**400, "temperature must be a finite number"),
    ],
)
def test_values_that_cannot_be_computed_get_400_on_both_sides(pd_factory, reference, field, value, match):
    pd = pd_factory()
    bad = pd.request("bad", PROMPTS[0], dict(GREEDY, **{field: value}))
    good = pd.request("good", PROMPTS[0])
    pd.submit(bad)
    pd.submit(good)
    pd.run(["bad", "good"])
    for side in ("prefill", "decode"):
        out = pd.last(side, "bad")
        assert out.status == 400 and re.search(match, out.error or ""), out
    assert pd.tokens("good") == reference[0]
    pd.assert_idle()


def _step_until(pd: PD, cond: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition never held"
        pd.step()
        time.sleep(0.001)


def test_every_table_is_empty_after_a_mixed_set_of_requests(pd_factory, engines, reference):
    """Normal, one-token, stop-string, local, duplicate-room, duplicate-rid, invalid, poisoned and NaN requests,
    aborts in each state of both schedulers, and admission deferred for want of aux rows: afterwards no table
    holds anything and every page is free."""
    prefill, decode = engines
    pd = pd_factory(aux_rows=2)  # more rooms than aux rows: admission waits (NoAuxRowFree) and retries
    decode.sampler = PoisonRows(decode.sampler)
    expect: dict[str, int] = {}  # rid -> the decode side's status

    def submit(msg: GenerateRequest, status: int = 200) -> None:
        pd.submit(msg)
        expect[msg.rid] = status

    for i, p in enumerate(PROMPTS):
        submit(pd.request(f"n{i}", p))
    submit(pd.request("one", PROMPTS[0], dict(GREEDY, max_new_tokens=1)))
    submit(pd.request("stop", PROMPTS[1], dict(GREEDY, stop=["never-in-this-text", "\x00"])))
    submit(pd.request("poison", PROMPTS[2], dict(GREEDY, temperature=1e-300, top_p=1e-300)))
    submit(pd.request("nan", PROMPTS[0], dict(GREEDY, seed=PoisonRows.MARK)), 500)
    submit(pd.request("invalid", PROMPTS[0], dict(GREEDY, temperature=-1.0)), 400)
    first = pd.request("first", PROMPTS[1])
    dup_room = pd.request("dup-room", PROMPTS[1])
    dup_room.bootstrap_room = first.bootstrap_room
    submit(first)
    submit(dup_room, 400)
    pd.p.on_generate(GenerateRequest("p-local", PROMPTS[0], dict(GREEDY)))  # no room: health_generate
    pd.d.on_generate(GenerateRequest("d-local", PROMPTS[2], dict(GREEDY)))
    expect["d-local"] = 200
    pd.d.on_generate(pd.request("n0", PROMPTS[0]))  # a duplicate rid: refused, n0 unharmed
    pd.run(list(expect), sides=("decode",))
    pd.run(["p-local"], sides=("prefill",))

    for rid, status in expect.items():
        assert pd.last("decode", rid).status == status, (rid, pd.last("decode", rid))
    assert pd.count("decode", "n0") == 2  # its own answer and the duplicate's refusal
    refusals = [o for o in pd.outputs["decode"]["n0"] if o.finished and o.status == 400]
    assert len(refusals) == 1 and "already in use" in (refusals[0].error or "")
    for i in range(3):
        assert pd.tokens(f"n{i}") == reference[i]
    assert pd.tokens("one") == reference[0][:1] and pd.tokens("poison") == reference[2]
    assert pd.tokens("d-local") == reference[2]
    assert pd.last("prefill", "dup-room").status == 400 and pd.last("prefill", "p-local").status == 200
    pd.assert_idle()
    _aborts_in_every_state(pd, prefill, decode)
    pd.assert_idle()


def _aborts_in_every_state(pd: PD, prefill: Engine, decode: Engine) -> None:
    p, d = pd.p, pd.d
    # prefill bootstrapping: decode never heard of it, so no transfer info comes
    pd.p.on_generate(pd.request("a-boot", PROMPTS[0]))
    # decode receiving: prefill never heard of it, so its room waits for input
    pd.d.on_generate(pd.request("a-recv", PROMPTS[0]))
    _step_until(pd, lambda: "a-recv" in d.receiving and "a-boot" in p.bootstrapping)
    # prefill waiting for pages (decode receiving), then decode admitting for pages (prefill bootstrapping)
    hogs = []
    p.book.cache.clear()  # cached pages would be evicted to make room: the hog must hold every page
    for eng, rid in ((prefill, "a-wait-p"), (decode, "a-wait-d")):
        alloc = eng.pool.allocator
        hogs.append((alloc, alloc.allocate(alloc.num_free)))
        pd.submit(pd.request(rid, PROMPTS[1]))
        if rid == "a-wait-p":
            _step_until(pd, lambda: "a-wait-p" in [j.req.rid for j in p.batcher.waiting] and "a-wait-p" in d.receiving)
    _step_until(pd, lambda: [x.req.rid for x in d.admitting] == ["a-wait-d"] and "a-wait-d" in p.bootstrapping)
    for rid in ("a-boot", "a-recv", "a-wait-p", "a-wait-d"):
        p.on_abort(rid)
        d.on_abort(rid)
    for alloc, pages in hogs:
        alloc.free(pages)
    # decode running: aborted after a few tokens
    pd.submit(pd.request("a-run", PROMPTS[2], dict(GREEDY, max_new_tokens=400)))
    _step_until(pd, lambda: len(pd.tokens("a-run") if "a-run" in pd.outputs["decode"] else []) >= 3)
    p.on_abort("a-run")
    d.on_abort("a-run")
    # prefill inflight: a slow (emulated) link keeps its KV writes going while it is aborted
    kv_bytes = prefill.model_config.kv_bytes_per_token * 16
    p.transfer.cfg.emulated_link_gbps = kv_bytes * 8 / 1e9 / 1.0  # about a second per page
    try:
        pd.submit(pd.request("a-inflight", PROMPTS[0]))
        _step_until(pd, lambda: "a-inflight" in p.inflight)
        p.on_abort("a-inflight")
        d.on_abort("a-inflight")
        pd.run(["a-boot", "a-wait-p", "a-wait-d", "a-inflight"], sides=("prefill",))
        pd.run(["a-recv", "a-wait-p", "a-wait-d", "a-run", "a-inflight"], sides=("decode",))
    finally:
        p.transfer.cfg.emulated_link_gbps = None
    for side, rids in (("prefill", ["a-boot", "a-wait-p", "a-wait-d", "a-inflight"]),
                       ("decode", ["a-recv", "a-wait-p", "a-wait-d", "a-run", "a-inflight"])):  # fmt: skip
        for rid in rids:
            assert pd.last(side, rid).status == 499, (side, rid, pd.last(side, rid))
            assert pd.count(side, rid) == 1
