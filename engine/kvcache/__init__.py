"""Paged KV cache: the per-layer buffers (registrable with RDMA engines) and their page allocator."""

from engine.kvcache.allocator import PageAllocator
from engine.kvcache.pool import KVLayout, KVPool, pages_for

__all__ = ["KVLayout", "KVPool", "PageAllocator", "pages_for"]
