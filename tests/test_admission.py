"""Admission by need, retraction and MIXED batches in the engine (engine/scheduler.py, engine/headroom.py)."""

from __future__ import annotations

import math

import pytest
import torch

from engine.batch import ForwardMode
from engine.config import EngineConfig
from engine.engine import Engine
from engine.headroom import CLIP_TOKENS, HeadroomEstimator
from engine.request import FinishReason, Request
from engine.sampling import SamplingParams

LLAMA = dict(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)


def make_engine(model_factory, **cfg) -> Engine:
    path = model_factory("llama", 21, **LLAMA)
    return Engine(EngineConfig(model=str(path), device="cpu", page_size=4, skip_warmup=True, **cfg))


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(5, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run_all(engine: Engine, prompts: list[list[int]], params: list[SamplingParams]) -> tuple[list[Request], int]:
    """Run to completion; returns the requests and the most that ran (prefilling or decoding) in one step."""
    reqs = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    most = 0
    while engine.has_work:
        engine.step()
        most = max(most, len(engine.scheduler.running) + len(engine.scheduler.prefilling))
        # the pool is never over-drawn, whatever was retracted
        held = sum(len(r.pages) for r in reqs)
        assert held + engine.pool.allocator.num_free == engine.pool.num_pages
    return reqs, most


# -- the estimate --------------------------------------------------------------------------------------


def req_with(max_new: int, produced: int, reason: FinishReason | None = None) -> Request:
    r = Request(prompt_ids=[1, 2], params=SamplingParams(max_new_tokens=max_new))
    r.output_ids = [3] * produced
    r.finish_reason = reason
    return r


def test_estimate_learns_from_finished_requests_and_rises_after_a_retraction():
    h = HeadroomEstimator(init_ratio=0.7, min_ratio=0.01)
    assert h.remaining_tokens(req_with(1000, 0)) == 700  # before anything finished: the initial ratio
    assert h.remaining_tokens(req_with(10**6, 0)) == math.ceil(0.7 * CLIP_TOKENS)  # a huge budget counts as the clip
    for _ in range(8):  # replies of 40 tokens out of budgets of 1000
        h.observe_finish(req_with(1000, 40, FinishReason.STOP))
    assert h.ratio == pytest.approx(1.5 * 0.04)  # the mean, with the safety factor
    assert h.remaining_tokens(req_with(1000, 10)) == 60  # ceil(0.06 * 990)
    h.observe_finish(req_with(1000, 1000, FinishReason.ABORT))  # aborts say nothing about lengths
    assert h.ratio == pytest.approx(0.06)
    h.observe_retraction()
    assert h.ratio == pytest.approx(0.12) and h.retractions == 1
    h.observe_finish(req_with(1000, 40, FinishReason.STOP))
    assert 0.06 < h.ratio < 0.12  # relaxes as requests finish without a retraction


def test_worst_case_reserves_the_whole_budget_and_bad_settings_are_refused():
    h = HeadroomEstimator("worst_case")
    assert h.remaining_tokens(req_with(10**6, 5)) == 10**6 - 5 and h.ratio == 1.0
    with pytest.raises(ValueError, match="min_ratio"):
        HeadroomEstimator(min_ratio=1.5)
    with pytest.raises(ValueError, match="admission policy"):
        HeadroomEstimator("greedy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mixed_chunk_size"):
        EngineConfig(mixed_chunk_size=-1).validate()


# -- admission by need and retraction ----------------------------------------------------------------------


def test_need_admits_far_more_than_worst_case(model_factory):
    prompts = [ids(6, s) for s in range(12)]
    params = [SamplingParams(max_new_tokens=200, ignore_eos=True)] * 12
    worst = make_engine(model_factory, num_pages=120, admission_policy="worst_case")
    need = make_engine(model_factory, num_pages=120, init_headroom_ratio=0.05, min_headroom_ratio=0.05)
    want, worst_most = run_all(worst, prompts, params)
    got, need_most = run_all(need, prompts, params)
    assert worst_most == 2  # 206 tokens = 52 pages each, of 120
    assert need_most >= 5 * worst_most  # 6 + 10 expected tokens = 4 pages each: all twelve start at once
    assert [r.output_ids for r in got] == [r.output_ids for r in want]  # they run longer than expected: retracted
    assert need.scheduler.headroom.retractions > 0


@pytest.mark.parametrize("mixed_chunk_size", [0, 7])
def test_retraction_keeps_outputs_identical(model_factory, mixed_chunk_size: int):
    prompts = [ids(n, 30 + n) for n in (5, 9, 14, 3, 11, 7)]
    greedy = SamplingParams(max_new_tokens=40, ignore_eos=True)
    seeded = [SamplingParams(max_new_tokens=40, ignore_eos=True, temperature=0.9, seed=100 + i) for i in range(6)]
    big = make_engine(model_factory, num_pages=400)
    for params in ([greedy] * 6, seeded):
        # 40 pages of 4 tokens: all six fit at admission (no headroom kept), not their 40 new tokens each. A fresh
        # engine each time: the first run's finished requests teach the estimate to keep enough headroom.
        small = make_engine(
            model_factory, num_pages=40, init_headroom_ratio=0, min_headroom_ratio=0, mixed_chunk_size=mixed_chunk_size
        )
        want, _ = run_all(big, prompts, params)
        got, _ = run_all(small, prompts, params)
        assert [r.output_ids for r in got] == [r.output_ids for r in want]
        assert sum(r.retractions for r in got) > 0
        assert small.pool.allocator.num_free == small.pool.num_pages  # idle again
        assert not small.scheduler.waiting and not small.scheduler.running
        assert small.scheduler.headroom.retractions > 0


def test_abort_of_a_retracted_request_and_a_request_that_cannot_fit(model_factory):
    e = make_engine(model_factory, num_pages=12, init_headroom_ratio=0.0, min_headroom_ratio=0.0)
    a = e.add_request(ids(8, 1), SamplingParams(max_new_tokens=30, ignore_eos=True))
    b = e.add_request(ids(8, 2), SamplingParams(max_new_tokens=30, ignore_eos=True))
    while b.retractions == 0:
        e.step()
    assert b in e.scheduler.waiting and not b.pages
    e.abort(b.rid)
    while e.has_work:
        e.step()
    assert len(a.output_ids) == 30 and e.pool.allocator.num_free == 12
    with pytest.raises(ValueError, match="pool holds"):
        e.add_request(ids(20, 3), SamplingParams(max_new_tokens=40))


# -- MIXED batches -------------------------------------------------------------------------------------


def test_mixed_forward_equals_separate_extend_and_decode(model_factory):
    e = make_engine(model_factory, num_pages=200)
    alloc, pool = e.pool.allocator, e.pool
    prefix, rest = ids(10, 7), ids(9, 8)  # an extend on a cached (non page-aligned) prefix
    dec_a, dec_b = ids(6, 9), ids(13, 10)  # two requests decoding their next token

    def filled(tokens: list[int], total: int) -> list[int]:
        pages = alloc.allocate(pool.pages_for(total))
        e.runner.forward(e.runner.build_batch([tokens], [0], [pages]))
        return pages

    pa, pb, pc = filled(dec_a[:-1], 6), filled(dec_b[:-1], 13), filled(prefix, 19)
    mixed = e.runner.build_batch([rest, dec_a[-1:], dec_b[-1:]], [10, 5, 12], [pc, pa, pb], mixed=True)
    assert mixed.mode == ForwardMode.MIXED
    got = e.runner.forward(mixed)
    # the same rows again, separately, on fresh copies of the same KV
    qa, qb, qc = filled(dec_a[:-1], 6), filled(dec_b[:-1], 13), filled(prefix, 19)
    ext = e.runner.forward(e.runner.build_batch([rest], [10], [qc]))
    dec = e.runner.forward(e.runner.build_batch([dec_a[-1:], dec_b[-1:]], [5, 12], [qa, qb]))
    want = torch.cat([ext, dec])
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    for pages in (pa, pb, pc, qa, qb, qc):
        alloc.free(pages)


def test_mixed_batches_chunk_a_long_prompt_beside_running_decodes(model_factory):
    long_prompt, shorts = ids(40, 50), [ids(5, 51), ids(6, 52)]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    ref = make_engine(model_factory, num_pages=200, mixed_chunk_size=0)
    want = [r.output_ids for r in run_all(ref, [*shorts, long_prompt], [params] * 3)[0]]
    e = make_engine(model_factory, num_pages=200, mixed_chunk_size=16)
    modes = []
    schedule = e.scheduler.schedule

    def spy():
        batch = schedule()
        if batch is not None:
            modes.append((batch.mode, list(batch.chunk_lens)))
        return batch

    e.scheduler.schedule = spy  # type: ignore[method-assign]
    reqs = [e.add_request(p, params) for p in shorts]
    e.step()  # the two short prompts prefill alone; then they decode
    late = e.add_request(long_prompt, params)
    while e.has_work:
        e.step()
    # 40 prompt tokens ride along in chunks of at most 16, the decodes in every one of those forwards
    mixed = [lens for mode, lens in modes if mode == ForwardMode.MIXED]
    assert [lens[2] for lens in mixed[:3]] == [16, 16, 8] and all(lens[:2] == [1, 1] for lens in mixed[:3])
    assert [r.output_ids for r in (*reqs, late)] == want
