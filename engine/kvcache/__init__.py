"""Paged KV cache: the per-layer buffers (registrable with RDMA engines) and their page allocator."""

from engine.kvcache.allocator import PageAllocator
from engine.kvcache.pool import KVPool

__all__ = ["KVPool", "PageAllocator"]
