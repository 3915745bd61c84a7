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


def test_pool_is_hnd_so_a_head_range_of_a_page_is_contiguous():
    layout = KVLayout(num_layers=1, page_size=4, num_kv_heads=3, head_dim=8, dtype=torch.float16)
    pool = KVPool(layout, num_pages=5)
    k = pool.k[0]
    assert k.shape == (6, 3, 4, 8)  # [pages + 1 (scratch last), heads, page_size, head_dim]
    assert layout.head_bytes == 4 * 8 * 2 and pool.page_bytes == 3 * layout.head_bytes
    # head h of page p is item p * heads + h of the buffer, in head_bytes units
    assert k[2, 1].data_ptr() == k.data_ptr() + (2 * 3 + 1) * layout.head_bytes
    assert k[2, 1:3].is_contiguous()


def test_store_and_gather_by_slot_are_token_major():
    layout = KVLayout(num_layers=2, page_size=4, num_kv_heads=2, head_dim=3, dtype=torch.float32)
    pool = KVPool(layout, num_pages=6)
    slots = torch.tensor([9, 2, 23, 10])  # page 2 offset 1, page 0 offset 2, page 5 offset 3, page 2 offset 2
    k, v = torch.randn(4, 2, 3), torch.randn(4, 2, 3)
    pool.store(1, slots, k, v)
    assert torch.equal(pool.k[1][2, :, 1], k[0]) and torch.equal(pool.v[1][5, :, 3], v[2])
    assert torch.equal(pool.gather_k(1, slots), k) and torch.equal(pool.gather_v(1, slots), v)
    assert torch.equal(pool.gather_k(1, slots.view(2, 2)), k.view(2, 2, 2, 3))  # any slot shape
    assert not pool.k[0].any()  # other layers untouched
    assert int((pool.k[1] != 0).sum()) == 4 * 2 * 3
