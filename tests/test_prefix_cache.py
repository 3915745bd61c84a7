"""The radix prefix cache, the prefill server's page book and its batcher, as pure units (no model, no transfer)."""

from __future__ import annotations

import random

import pytest

from engine.kvcache import PageAllocator
from engine.kvcache.prefix_cache import PrefixCache
from engine.request import Request
from engine.sampling import SamplingParams
from prefill_server.batcher import PrefillBatcher, PrefillJob
from prefill_server.page_book import PageBook
from serving.ipc import GenerateRequest

PS = 4


def toks(*runs: int) -> list[int]:
    """A prompt of whole pages: each argument is the token every slot of one page holds."""
    return [t for r in runs for t in [r] * PS]


def test_match_insert_and_split() -> None:
    alloc = PageAllocator(32)
    cache = PrefixCache(alloc, PS)
    assert cache.match(toks(1, 2)) == ([], cache.root)
    pages = alloc.allocate(3)
    _node, adopted = cache.insert(toks(1, 2, 3), pages)
    assert adopted == set(pages) and cache.num_pages == 3
    got, n = cache.match([*toks(1, 2, 9), 5])  # diverges inside the edge: split after two pages
    assert got == pages[:2] and n.tokens == tuple(toks(1, 2))
    assert cache.match(toks(1, 2, 3, 4))[0] == pages
    assert cache.match_len([*toks(1, 2, 3), 1, 2]) == 3 * PS  # a partial page never matches
    # a second prompt sharing two pages: only its own third page is adopted
    other = alloc.allocate(3)
    _node2, adopted2 = cache.insert(toks(1, 2, 7), other)
    assert adopted2 == {other[2]} and cache.num_pages == 4
    assert cache.match(toks(1, 2, 7))[0] == [*pages[:2], other[2]]


def test_locked_pages_are_never_evicted_and_eviction_is_lru() -> None:
    alloc = PageAllocator(8)
    cache = PrefixCache(alloc, PS)
    a, b = alloc.allocate(2), alloc.allocate(2)
    na, _ = cache.insert(toks(1, 2), a)
    _nb, _ = cache.insert(toks(3, 4), b)
    cache.match(toks(1, 2))  # a is now more recently used than b
    assert cache.evict(1) == 2 and cache.match_len(toks(3, 4)) == 0 and cache.match_len(toks(1, 2)) == 2 * PS
    _, node = cache.match(toks(1, 2))
    cache.lock(node)
    assert cache.evictable_pages == 0 and cache.evict(10) == 0
    assert cache.allocate(7) is None  # 6 free, the 2 cached ones locked
    cache.unlock(node)
    assert cache.allocate(8) is not None and cache.num_pages == 0  # evicted to make room
    with pytest.raises(ValueError, match="not locked"):
        cache.unlock(na)


def test_evicting_a_leaf_makes_its_parent_evictable() -> None:
    alloc = PageAllocator(8)
    cache = PrefixCache(alloc, PS)
    cache.insert(toks(1, 2, 3), alloc.allocate(3))
    assert cache.match(toks(1, 5))[0] and len(cache.root.children) == 1  # a one-page match splits (1) off
    mine = alloc.allocate(3)
    _, adopted = cache.insert(toks(1, 2, 6), mine)  # splits (2,3) into (2) + (3), adds (6)
    assert adopted == {mine[2]}
    alloc.free(mine[:2])  # the caller's duplicates of (1) and (2)
    assert cache.num_pages == 4 and cache.clear() == 4 and alloc.num_free == 8 and not cache.root.children


def test_random_operations_keep_pages_consistent() -> None:
    """Random prompts from a small alphabet (lots of sharing), taken, published and released in random order:
    every matched page holds the KV of exactly the tokens matched, and no page is lost or owned twice."""
    rng = random.Random(0)
    alloc = PageAllocator(40)
    book = PageBook(alloc, PS)
    written: dict[int, tuple[int, ...]] = {}  # page -> the tokens whose KV it holds
    live: list[Request] = []
    for _ in range(400):
        if live and rng.random() < 0.45:
            req = live.pop(rng.randrange(len(live)))
            if rng.random() < 0.8:
                book.publish(req)
            book.release(req)
        else:
            prompt = [rng.randrange(3) for _ in range(rng.randrange(1, 6 * PS))]
            req = Request(prompt, SamplingParams(max_new_tokens=1))
            if not book.take(req):
                continue
            for i in range(req.num_cached // PS):  # what the cache gave must be what this prompt would compute
                assert written[req.pages[i]] == tuple(prompt[i * PS : (i + 1) * PS])
            for i in range(req.num_cached // PS, len(req.pages)):
                written[req.pages[i]] = tuple(prompt[i * PS : (i + 1) * PS])
            live.append(req)
        held = {p for r in live for p in r.pages}
        assert alloc.num_free + len(held | _tree_pages(book.cache)) == alloc.num_pages
    for req in live:
        book.release(req)
    in_tree = alloc.num_pages - alloc.num_free
    assert book.pages_in_use == 0 and in_tree == book.cache_pages > 0 and book.cache.clear() == in_tree
    assert alloc.num_free == alloc.num_pages


def _tree_pages(cache: PrefixCache) -> set[int]:
    return {p for n in cache._nodes() for p in n.pages}


def test_page_book_keeps_one_token_to_compute_and_moves_the_lock_on_publish() -> None:
    alloc = PageAllocator(16)
    book = PageBook(alloc, PS)
    a = Request(toks(1, 2), SamplingParams(max_new_tokens=1))
    assert book.take(a) and a.num_cached == 0 and len(a.pages) == 2
    book.publish(a)
    book.release(a)
    assert book.cache_pages == 2 and book.pages_in_use == 0
    same = Request(toks(1, 2), SamplingParams(max_new_tokens=1))
    assert book.take(same) and same.num_cached == PS  # the last page is recomputed: its last token samples
    longer = Request([*toks(1, 2, 3), 4], SamplingParams(max_new_tokens=1))
    assert book.take(longer) and longer.num_cached == 2 * PS and len(longer.pages) == 4
    assert book.pages_in_use == 2 + 1 + 2  # both cached pages locked, same's own page, longer's two own pages
    for r in (same, longer):
        book.release(r)
    assert book.pages_in_use == 0


def test_without_the_cache_pages_are_plain_allocations() -> None:
    alloc = PageAllocator(4)
    book = PageBook(alloc, PS, prefix_cache=False)
    a = Request(toks(1, 2), SamplingParams(max_new_tokens=1))
    assert book.take(a) and book.cached_tokens(a) == 0
    book.publish(a)
    book.release(a)
    assert alloc.num_free == 4 and book.cache_pages == 0


# -- the batcher -------------------------------------------------------------------------------------------


def _job(n: int, first: int = 0) -> PrefillJob:
    prompt = [first + i for i in range(n)]
    return PrefillJob(Request(prompt, SamplingParams(max_new_tokens=1)), GenerateRequest("r", prompt, {}), None)


def _batcher(chunk: int, pages: int = 256, max_prefill: int = 10_000) -> PrefillBatcher:
    return PrefillBatcher(PageBook(PageAllocator(pages), PS), PS, 8, max_prefill, chunk)


def _run(b: PrefillBatcher) -> list[tuple[int, int, int]]:
    rows = b.next_rows()
    b.complete(rows)
    return [(len(j.req.prompt_ids), s, n) for j, s, n in rows]


def test_a_long_prompt_runs_in_page_aligned_chunks_and_short_ones_go_between() -> None:
    b = _batcher(chunk=32)
    long = _job(100)
    b.waiting.append(long)
    assert _run(b) == [(100, 0, 32)]
    b.waiting.extend([_job(10, 1000), _job(40, 2000), _job(6, 3000)])
    # shorts first (within half the budget: the long prompt keeps 16), the 40-token one waits, long takes the rest
    assert _run(b) == [(10, 0, 10), (6, 0, 6), (100, 32, 16)]
    assert _run(b) == [(100, 48, 32)]  # the 40 does not fit beside the long prompt's reserve: the long one goes on
    assert _run(b) == [(100, 80, 20), (40, 0, 12)]  # the long prompt ends; what is left starts the 40, page-aligned
    assert _run(b) == [(40, 12, 28)]
    assert not b.waiting and not b.prefilling


def test_chunking_off_runs_whole_prompts_within_the_token_budget() -> None:
    b = _batcher(chunk=0, max_prefill=64)
    b.waiting.extend([_job(100), _job(30, 1000), _job(30, 2000), _job(10, 3000)])
    assert _run(b) == [(100, 0, 100)]  # the first always goes, however long
    assert _run(b) == [(30, 0, 30), (30, 0, 30)]
    assert _run(b) == [(10, 0, 10)]


def test_a_cached_prefix_is_skipped_and_a_full_pool_stops_new_prompts() -> None:
    b = _batcher(chunk=64, pages=10)
    first = _job(24)
    b.waiting.append(first)
    _run(b)
    b.book.publish(first.req)
    b.book.release(first.req)
    again = _job(24)
    b.waiting.append(again)
    assert _run(b) == [(24, 20, 4)]  # 5 pages cached; the last is recomputed
    big = _job(200, 5000)  # 50 pages: never fits this pool
    b.waiting.append(big)
    assert _run(b) == [] and list(b.waiting) == [big]
