"""Two-batch overlap's child batches (engine/two_batch_forward.py): running A and B layer by layer gives the
unsplit forward's logits and writes the same KV, for balanced EXTEND splits, two-chunk splits (skewed lengths, a
single long sequence, on a cached prefix), MIXED batches (a child of only decodes runs as DECODE) and DECODE
batches. Each run takes fresh pages (the cached prefix written by an ordinary forward) and frees them."""

from __future__ import annotations

import random

import pytest
import torch

from engine.batch import ForwardBatch, ForwardMode
from engine.two_batch import plan_two_batch
from engine.two_batch_forward import child_batches, run_two_batch

LAYERS = 3


def assert_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal to float32 rounding: the children's matmuls run over fewer rows than the parent's, which may sum
    in another order, so allow a few units of the last place at the tensor's own scale (logits reach ~25)."""
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=4e-6 * float(ref.abs().max()))


@pytest.fixture(scope="module")
def engine(model_factory):
    from engine.config import EngineConfig
    from engine.engine import Engine

    path = model_factory("llama", 7, num_hidden_layers=LAYERS)
    return Engine(EngineConfig(model=str(path), device="cpu", page_size=4, num_pages=256, skip_warmup=True))


def _tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(vocab) for _ in range(n)]


def scrub(pool, pages: list[int], seed: int) -> None:
    """Fill pages with large garbage: "fresh" pages are the ones the last run freed and still hold its KV, which
    would hide a child reading a slot before it is written (B's layer run before A's)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.tensor(pages, dtype=torch.int64)
    for buf in (*pool.k, *pool.v):
        buf[idx] = 100 * torch.randn(buf[idx].shape, generator=g, dtype=buf.dtype)


def run_case(engine, prefix_lens, extend_lens, split: bool, mixed: bool = False, threshold: float = 0.48, seed=0):
    """Logits ([B, V] and [T, V]) and every layer's K/V of every sequence's slots, from fresh pages. The tokens
    depend on `seed` only, so a split and an unsplit run see the same batch."""
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    prefixes = [_tokens(rng, p, vocab) for p in prefix_lens]
    new = [_tokens(rng, n, vocab) for n in extend_lens]
    runner, pool = engine.runner, engine.pool
    pages = [pool.allocator.allocate(pool.pages_for(p + n)) for p, n in zip(prefix_lens, extend_lens, strict=True)]
    assert all(p is not None for p in pages), "pool too small for the case"
    scrub(pool, [p for table in pages for p in table], seed)
    try:
        cached = [i for i, p in enumerate(prefix_lens) if p]
        if cached:  # the prefix, written by an ordinary forward
            prefill = runner.build_batch([prefixes[i] for i in cached], [0] * len(cached), [pages[i] for i in cached])
            runner.forward(prefill)
        batch = runner.build_batch(new, list(prefix_lens), pages, mixed=mixed)
        if split:
            plan = plan_two_batch(batch.mode, batch.prefix_lens, batch.extend_lens, threshold)
            logits = run_two_batch(runner, batch, plan)
            # again over the same slots: KV rewritten with identical values, so the all-token logits are comparable
            all_logits = run_two_batch(runner, batch, plan, all_tokens=True)
        else:
            plan = None
            logits = runner.forward(batch)
            all_logits = runner.forward(batch, all_tokens=True)
        slots = torch.cat([batch.kv_slots(i) for i in range(batch.batch_size)])
        kv = [(pool.gather_k(layer, slots).clone(), pool.gather_v(layer, slots).clone()) for layer in range(LAYERS)]
        return batch, plan, logits, all_logits, kv
    finally:
        for p in pages:
            pool.allocator.free(p)


def check_split_equals_whole(engine, prefix_lens, extend_lens, mixed=False, threshold=0.48, seed=0):
    free = engine.pool.allocator.num_free
    batch, _, ref, ref_all, ref_kv = run_case(engine, prefix_lens, extend_lens, False, mixed, threshold, seed)
    _, plan, got, got_all, got_kv = run_case(engine, prefix_lens, extend_lens, True, mixed, threshold, seed)
    assert engine.pool.allocator.num_free == free
    assert got.shape == ref.shape == (len(extend_lens), engine.model_config.vocab_size)
    assert_close(got, ref)
    assert_close(got_all, ref_all)
    for (k, v), (rk, rv) in zip(got_kv, ref_kv, strict=True):
        assert_close(k, rk)
        assert_close(v, rv)
    return batch, plan


def test_balanced_extend_split(engine):
    batch, plan = check_split_equals_whole(engine, [0, 0, 0, 0], [30, 20, 25, 26])
    assert not plan.split.two_chunk and plan.split.seq_index == 2
    a, b = child_batches(batch, plan)
    assert (a.mode, b.mode) == (ForwardMode.EXTEND, ForwardMode.EXTEND)
    assert (a.extend_lens, b.extend_lens) == ([30, 20], [25, 26])


@pytest.mark.parametrize(
    ("prefix_lens", "extend_lens"),
    [([0, 0], [10, 200]), ([0], [300]), ([0, 0, 0], [200, 7, 9]), ([12, 0], [10, 150]), ([37], [120])],
    ids=["skewed", "single-long", "cut-first", "skewed-on-prefix", "single-on-prefix"],
)
def test_two_chunk_split(engine, prefix_lens, extend_lens):
    batch, plan = check_split_equals_whole(engine, prefix_lens, extend_lens)
    assert plan.split.two_chunk
    s = plan.cut_seq
    a, b = child_batches(batch, plan)
    # B's part of the cut sequence extends A's part: its prefix is the original prefix plus A's tokens
    assert b.prefix_lens[0] == a.prefix_lens[-1] + a.extend_lens[-1] == prefix_lens[s] + a.extend_lens[-1]
    assert a.num_tokens == sum(extend_lens) // 2 and b.num_tokens - a.num_tokens in (0, 1)  # even halves
    # per-token tensors are the parent's rows (views), positions absolute
    assert torch.equal(torch.cat([a.positions, b.positions]), batch.positions)
    assert torch.equal(torch.cat([a.out_cache_loc, b.out_cache_loc]), batch.out_cache_loc)
    assert a.input_ids.data_ptr() == batch.input_ids.data_ptr()
    assert a.last_token_indices.tolist()[-1] == a.num_tokens - 1


def test_mixed_batches(engine):
    # prefill chunks with decodes (length 1 on a prefix): two-chunk, and a balanced split whose A is all decodes
    batch, plan = check_split_equals_whole(engine, [0, 9, 14, 5], [60, 1, 1, 1], mixed=True)
    assert batch.mode == ForwardMode.MIXED and plan.split.two_chunk
    a, b = child_batches(batch, plan)
    assert (a.mode, b.mode) == (ForwardMode.MIXED, ForwardMode.MIXED)
    batch, plan = check_split_equals_whole(engine, [6, 9, 14, 5, 0], [1, 1, 1, 1, 4], mixed=True)
    a, b = child_batches(batch, plan)
    assert (a.extend_lens, b.extend_lens) == ([1, 1, 1, 1], [4])
    assert (a.mode, b.mode) == (ForwardMode.DECODE, ForwardMode.MIXED)  # as ForwardBatch.build labels it
    # threshold 0 disables two-chunk: the sequence-boundary split of a skewed MIXED batch
    _, plan = check_split_equals_whole(engine, [3, 0, 8], [1, 40, 1], mixed=True, threshold=0.0)
    assert not plan.split.two_chunk


@pytest.mark.parametrize("bs", [1, 2, 5])
def test_decode_split(engine, bs):
    rng = random.Random(bs)
    prefix = [rng.randrange(1, 40) for _ in range(bs)]
    batch, plan = check_split_equals_whole(engine, prefix, [1] * bs, seed=bs)
    assert batch.mode == ForwardMode.DECODE
    a, b = child_batches(batch, plan)
    assert (a is None) == (bs == 1)  # one sequence: A is empty
    assert b.mode == ForwardMode.DECODE and b.batch_size == bs - bs // 2


def test_random_batches(engine):
    rng = random.Random(1234)
    for case in range(6):
        bs = rng.randrange(1, 5)
        mixed = case % 2 == 1
        extend = [rng.choice([1, rng.randrange(2, 80)]) if mixed else rng.randrange(1, 90) for _ in range(bs)]
        prefix = [rng.choice([0, rng.randrange(1, 30)]) for _ in range(bs)]
        if mixed:  # decode rows sit on a prefix
            prefix = [p or 1 if n == 1 else p for p, n in zip(prefix, extend, strict=True)]
        check_split_equals_whole(engine, prefix, extend, mixed=mixed, threshold=rng.choice([0.0, 0.3, 0.48]), seed=case)


def test_plan_must_match_the_batch(engine):
    batch = ForwardBatch.build([[1, 2, 3], [4, 5]], [0, 2], [[0], [1, 2]], page_size=4)
    with pytest.raises(ValueError, match="does not split"):
        child_batches(batch, plan_two_batch(batch.mode, [0, 0], [3, 2]))
    with pytest.raises(ValueError, match="rows"):
        child_batches(batch, plan_two_batch(batch.mode, [0, 2], [3, 2], num_rows=6))
    a, b = child_batches(batch, plan_two_batch(batch.mode, [0, 2], [3, 2], threshold=0.0))
    assert (a.prefix_lens, a.extend_lens, b.prefix_lens, b.extend_lens) == ([0], [3], [2], [2])
    assert b.page_tables == [[1, 2]] and b.last_token_indices.tolist() == [1]
