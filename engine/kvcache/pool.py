"""The paged KV pool.

Each layer has one contiguous K buffer and one V buffer of shape [num_pages, page_size, kv_heads, head_dim],
so page i of layer l starts at `base(l) + i * page_bytes`: each buffer is a single memory region that a
transfer engine can register once, and a page run is one (address, length) descriptor.
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
        """The layout under the names the bootstrap route carries (DESIGN §3.2): what both sides compare."""
        return {
            "page_size": self.page_size,
            "kv_dtype": self.dtype_name,
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
        }

    @property
    def page_bytes(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return self.page_size * self.num_kv_heads * self.head_dim * itemsize


class KVPool:
    def __init__(self, layout: KVLayout, num_pages: int, device: torch.device | str = "cpu") -> None:
        self.layout = layout
        self.num_pages = num_pages
        self.device = torch.device(device)
        # One physical page more than the allocator hands out: the scratch page, which nothing owns. Padding
        # rows of a CUDA-graph decode batch write their (discarded) KV there, never into a request's page.
        self.scratch_page = num_pages
        shape = (num_pages + 1, layout.page_size, layout.num_kv_heads, layout.head_dim)
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

    def flat_k(self, layer: int) -> torch.Tensor:
        """[(num_pages + 1) * page_size, kv_heads, head_dim] view: one row per token slot (scratch page last)."""
        return self.k[layer].view(-1, self.layout.num_kv_heads, self.layout.head_dim)

    def flat_v(self, layer: int) -> torch.Tensor:
        return self.v[layer].view(-1, self.layout.num_kv_heads, self.layout.head_dim)

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
