"""Page allocator and pool layout."""

from __future__ import annotations

import pytest
import torch

from engine.kvcache import KVPool, PageAllocator
from engine.kvcache.pool import KVLayout


def test_allocations_are_contiguous_when_possible():
    alloc = PageAllocator(64)
    a = alloc.allocate(10)
    b = alloc.allocate(5)
    assert a == list(range(10)) and b == list(range(10, 15))
    alloc.free(a)
    # best fit: a 4-page request goes into the 10-page hole, not the big tail
    c = alloc.allocate(4)
    assert c == [0, 1, 2, 3]
    assert alloc.num_free == 64 - 5 - 4


def test_fragmented_allocation_uses_largest_runs_first():
    alloc = PageAllocator(20)
    pages = alloc.allocate(20)
    alloc.free(pages[2:4] + pages[6:12] + pages[15:16])  # holes of 2, 6, 1
    got = alloc.allocate(8)
    assert sorted(got) == list(range(2, 4)) + list(range(6, 12))
    assert got[:6] == list(range(6, 12))  # largest run first
    assert alloc.free_pages() == {15}


def test_exhaustion_and_double_free():
    alloc = PageAllocator(4)
    pages = alloc.allocate(4)
    assert alloc.allocate(1) is None
    assert alloc.num_free == 0
    alloc.free(pages)
    with pytest.raises(ValueError, match="double free"):
        alloc.free(pages[:1])
    with pytest.raises(ValueError, match="out of range"):
        alloc.free([4])
    assert alloc.num_free == 4 and alloc.free_pages() == {0, 1, 2, 3}


def test_pool_layer_buffers_are_single_regions():
    layout = KVLayout(num_layers=3, page_size=8, num_kv_heads=2, head_dim=16, dtype=torch.bfloat16)
    pool = KVPool(layout, num_pages=10)
    assert pool.page_bytes == 8 * 2 * 16 * 2
    for layer, (k_addr, v_addr) in enumerate(pool.buffer_addresses()):
        k = pool.k[layer]
        assert k.is_contiguous() and k_addr == k.data_ptr() and v_addr == pool.v[layer].data_ptr()
        # page i starts at base + i * page_bytes
        assert k[7].data_ptr() == k_addr + 7 * pool.page_bytes
    with pytest.raises(ValueError, match="holds no page"):
        KVPool.for_budget(layout, budget_bytes=100)
