"""The paged KV pool.

Each layer has one contiguous K buffer and one V buffer in the "HND" layout,
[num_pages + 1, kv_heads, page_size, head_dim] (the last page is scratch), so page i of layer l starts at
`base(l) + i * page_bytes` and head h of that page at `+ h * head_bytes`: each buffer is a single memory region
that a transfer engine registers once, a page run is one (address, length) descriptor, and so is any range of
heads of one page (what a decode rank of another TP size owns). The transfer layer's unit is one head of one
page (`head_bytes`), so both sides agree on it whatever their TP sizes.

Attention reaches the buffers through `store` (the new tokens' K/V into their slots) and `gather_k`/`gather_v`
(K/V of given slots, token-major); a slot is `page * page_size + offset`, as the batch builds it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.kvcache.allocator import PageAllocator


def pages_for(num_tokens: int, page_size: int) -> int:
    """Pages that hold `num_tokens` tokens: the one place the round-up is written."""
    return -(-num_tokens // page_size)


@dataclass(frozen=True)
class KVLayout:
    """What the decode side must agree on with the prefill side (DESIGN §3.2)."""

    num_layers: int
    page_size: int
    num_kv_heads: int  # the heads this pool holds (one rank's share under tensor parallelism)
    head_dim: int
    dtype: torch.dtype
    kv_head_start: int = 0  # the first of the model's KV heads held here
    total_kv_heads: int | None = None  # the model's KV heads (None: all of them are held here)

    @property
    def model_kv_heads(self) -> int:
        return self.num_kv_heads if self.total_kv_heads is None else self.total_kv_heads

    @property
    def dtype_name(self) -> str:
        """The dtype's wire name ("bfloat16", "float32", ...), as the bootstrap layout check compares it."""
        return str(self.dtype).removeprefix("torch.")

    def wire(self) -> dict[str, int | str]:
        """The model's KV geometry under the names the bootstrap route carries (DESIGN §3.2): what both sides
        compare. `num_kv_heads` is the model's (not this rank's share): sides of different TP sizes agree on it."""
        return {
            "page_size": self.page_size,
            "kv_dtype": self.dtype_name,
            "num_layers": self.num_layers,
            "num_kv_heads": self.model_kv_heads,
            "head_dim": self.head_dim,
        }

    @property
    def head_bytes(self) -> int:
        """Bytes of one KV head of one page: the transfer layer's item, the same on every rank of any TP size."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return self.page_size * self.head_dim * itemsize

    @property
    def page_bytes(self) -> int:
        return self.num_kv_heads * self.head_bytes


class KVPool:
    def __init__(self, layout: KVLayout, num_pages: int, device: torch.device | str = "cpu") -> None:
        self.layout = layout
        self.num_pages = num_pages
        self.device = torch.device(device)
        # One physical page more than the allocator hands out: the scratch page, which nothing owns. Padding
        # rows of a CUDA-graph decode batch write their (discarded) KV there, never into a request's page.
        self.scratch_page = num_pages
        shape = (num_pages + 1, layout.num_kv_heads, layout.page_size, layout.head_dim)  # HND
        self.k = [torch.zeros(shape, dtype=layout.dtype, device=self.device) for _ in range(layout.num_layers)]
        self.v = [torch.zeros(shape, dtype=layout.dtype, device=self.device) for _ in range(layout.num_layers)]
        self.allocator = PageAllocator(num_pages)

    @property
    def page_size(self) -> int:
        return self.layout.page_size

    @property
    def page_bytes(self) -> int:
        return self.layout.page_bytes

    def pages_for(self, num_tokens: int) -> int:
        return pages_for(num_tokens, self.page_size)

    def store(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the K/V of new tokens, k and v [T, kv_heads, head_dim], into `slots` [T] (int64, on the pool's
        device; page * page_size + offset). Device work only: no host sync, so it runs inside a CUDA graph."""
        page, offset = slots // self.page_size, slots % self.page_size
        dtype = self.layout.dtype
        # advanced indices around a slice: the indexed view is [T, kv_heads, head_dim], the same as k and v
        self.k[layer][page, :, offset] = k.to(dtype)
        self.v[layer][page, :, offset] = v.to(dtype)

    def gather_k(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """K of `slots` (any shape [...]) as [..., kv_heads, head_dim]: a copy, token-major."""
        return self.k[layer][slots // self.page_size, :, slots % self.page_size]

    def gather_v(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        return self.v[layer][slots // self.page_size, :, slots % self.page_size]

    def buffer_addresses(self) -> list[tuple[int, int]]:
        """(K base address, V base address) per layer, for registering with a transfer engine."""
        return [(k.data_ptr(), v.data_ptr()) for k, v in zip(self.k, self.v, strict=True)]

    @staticmethod
    def for_budget(layout: KVLayout, budget_bytes: int, device: torch.device | str = "cpu") -> KVPool:
        per_page = 2 * layout.num_layers * layout.page_bytes
        num_pages = budget_bytes // per_page - 1  # the scratch page comes out of the budget
        if num_pages < 1:
            raise ValueError(
                f"KV budget of {budget_bytes} bytes holds no page ({per_page} bytes each); "
                "raise --kv-cache-gb or lower --page-size"
            )
        return KVPool(layout, int(num_pages), device)
