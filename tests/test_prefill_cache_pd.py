"""Chunked prefill and the prefix cache under aborts, sharing and eviction: a real prefill and decode scheduler in this
process (real Mooncake transfers, real ZMQ), stepped by the test so it can act between chunks. Every answer equals
transformers' greedy generation, and afterwards no request holds a page."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.request import Request
from engine.sampling import SamplingParams
from tests.test_batch_faults import GREEDY, PD
from tests.test_poison import _step_until
from tests.test_serving_e2e import reference  # noqa: F401 (fixture)

STEP_TIMEOUT_S = 90  # generous: CI shares two cores with other test processes
CHUNK = 32  # two pages: a 100-token prompt runs as 4 chunks; a prompt under way keeps one page of each forward


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def prefill_engine(pages: int) -> Engine:
    return Engine(EngineConfig(model="builtin:tiny-llama", device="cpu", num_pages=pages, chunked_prefill_size=CHUNK))


@pytest.fixture(scope="module")
def engines() -> tuple[Engine, Engine, Engine]:
    """A prefill engine with room for long prompts, one with a pool of 12 pages, and the decode engine."""
    decode = Engine(EngineConfig(model="builtin:tiny-llama", device="cpu", num_pages=128))
    return prefill_engine(64), prefill_engine(12), decode


@pytest.fixture
def pd(engines: tuple[Engine, Engine, Engine], tmp_path: Path) -> Iterator[PD]:
    made = PD(tmp_path, engines[0], engines[2])
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def small_pd(engines: tuple[Engine, Engine, Engine], tmp_path: Path) -> Iterator[PD]:
    made = PD(tmp_path, engines[1], engines[2])
    try:
        yield made
    finally:
        made.close()


def _job(pd: PD, rid: str):
    return next((j for j in pd.p.batcher.jobs() if j.req.rid == rid), None)


def test_an_abort_between_chunks_frees_everything(pd, reference):  # noqa: F811
    generate = reference[0]
    long = ids(100, 1)
    pd.submit(pd.request("long", long))
    started = lambda: (j := _job(pd, "long")) is not None and j.req.num_cached >= 2 * CHUNK  # noqa: E731
    _step_until(pd, started, timeout=STEP_TIMEOUT_S)
    assert _job(pd, "long") in pd.p.batcher.prefilling  # mid-prompt: some chunks sent, more to come
    pd.p.on_abort("long")
    pd.d.on_abort("long")
    pd.run(["long"])
    assert pd.last("prefill", "long").status == 499 and pd.last("decode", "long").status == 499
    pd.assert_idle()
    # nothing of the aborted prompt was cached; the same prompt now runs in full and right
    assert pd.p.book.cached_tokens(Request(long, SamplingParams())) == 0
    pd.submit(pd.request("again", long))
    pd.run(["again"])
    assert pd.tokens("again") == generate(long, GREEDY["max_new_tokens"])
    pd.assert_idle()


def test_a_request_sharing_pages_with_an_aborted_one_is_unaffected(pd, reference):  # noqa: F811
    generate = reference[0]
    n = GREEDY["max_new_tokens"]
    system = ids(64, 2)
    first, b, c = system + ids(8, 3), system + ids(600, 4), system + ids(10, 5)
    pd.submit(pd.request("first", first))
    pd.run(["first"])
    assert pd.tokens("first") == generate(first, n)
    # b starts on the cached system prompt (4 pages) and runs in chunks; c, short, runs between them on the same
    # pages; b is aborted while both hold them
    pd.submit(pd.request("b", b))
    _step_until(pd, lambda: (j := _job(pd, "b")) is not None and j.req.num_cached > 64, timeout=STEP_TIMEOUT_S)
    assert pd.p.jobs["b"].cached == 64
    pd.submit(pd.request("c", c))
    # c (10 new tokens) can be computed, sent and answered within one step: watch its job, not the table
    c_job = pd.p.jobs["c"]
    # only decode steps until c's transfer info reached the prefill, so b cannot finish while c bootstraps
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while not c_job.sender.ready:
        assert time.monotonic() < deadline, "c's transfer info never reached the prefill"
        pd.d.step()
        time.sleep(0.001)
    _step_until(pd, lambda: c_job.cached == 64, timeout=STEP_TIMEOUT_S)
    assert _job(pd, "b") in pd.p.batcher.prefilling
    pd.p.on_abort("b")
    pd.d.on_abort("b")
    pd.run(["b", "c"])
    assert pd.last("decode", "b").status == 499
    assert pd.tokens("c") == generate(c, n)
    pd.submit(pd.request("b2", b))
    pd.run(["b2"])
    assert pd.tokens("b2") == generate(b, n)
    pd.assert_idle()


def test_eviction_under_a_small_pool_keeps_outputs_exact(small_pd, reference):  # noqa: F811
    """12 pages of 16 tokens; eight 70-token prompts in two families sharing 48 tokens (14 whole pages to cache),
    each run twice, then one prompt twice in one batch: the cache must evict to admit them, and every answer
    stays exact."""
    pd, generate = small_pd, reference[0]
    n = GREEDY["max_new_tokens"]
    heads = [ids(48, 10), ids(48, 11)]
    prompts = [heads[i % 2] + ids(22, 20 + i) for i in range(8)]
    book, pool = pd.p.book, pd.p.engine.pool
    evicted = book.cache.evicted
    for round_ in range(2):
        for i, p in enumerate(prompts):
            rid = f"r{round_}-{i}"
            pd.submit(pd.request(rid, p))
            pd.run([rid])
            assert pd.tokens(rid) == generate(p, n), rid
            assert book.cache_pages + pool.allocator.num_free <= pool.num_pages
    twins = [pd.request(f"twin{i}", prompts[0]) for i in range(2)]
    for m in twins:
        pd.submit(m)
    pd.run([m.rid for m in twins])
    for m in twins:
        assert pd.tokens(m.rid) == generate(prompts[0], n)
    assert book.cache.evicted > evicted
    pd.assert_idle()


def test_colocated_generate_chunks_its_prefills_token_exactly(engines, reference):  # noqa: F811
    """`pdserve generate`'s engine with --chunked-prefill-size 32: prompts of 1, 2.5 and 4 chunks in one batch."""
    generate = reference[0]
    eng = engines[0]
    assert eng.cfg.chunked_prefill_size == CHUNK
    prompts = [ids(CHUNK, 30), ids(CHUNK * 5 // 2, 31), ids(CHUNK * 4, 32), ids(5, 33)]
    real, seen = eng.scheduler.schedule, []

    def schedule():
        batch = real()
        if batch is not None:  # EXTEND, or MIXED once some decode: the prefill rows' tokens
            rows = [
                (n, s)
                for n, s, r in zip(batch.chunk_lens, batch.samples, batch.requests, strict=True)
                if r.num_cached < len(r.prompt_ids)
            ]
            seen.append((sum(n for n, _ in rows), [s for _, s in rows]))
        return batch

    eng.scheduler.schedule = schedule
    try:
        outs = eng.generate(prompts, SamplingParams(**GREEDY))
    finally:
        eng.scheduler.schedule = real
    assert all(n <= CHUNK for n, _ in seen) and any(not all(s) for _, s in seen), seen  # chunks that sample nothing
    for p, out in zip(prompts, outs, strict=True):
        assert out.token_ids == generate(p, GREEDY["max_new_tokens"]), len(p)
