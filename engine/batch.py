"""What one forward pass computes: the batch layout shared by the model, attention backends and servers.

Tokens of all requests are concatenated (ragged, no padding): request i contributes `extend_lens[i]`
new tokens at positions `prefix_lens[i] ..< prefix_lens[i] + extend_lens[i]`, whose KV goes into the
slots `out_cache_loc` of its pages. A slot is `page * page_size + offset`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.kvcache import pages_for


class ForwardMode(enum.Enum):
    EXTEND = "extend"  # prefill, optionally on top of cached prefix pages
    DECODE = "decode"  # one new token per request
    # MIXED (prefill + decode in one batch) and IDLE (an empty rank) are planned; see DESIGN §6.


@dataclass
class ForwardBatch:
    mode: ForwardMode
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    out_cache_loc: torch.Tensor  # [T] int64 KV slot of each new token
    prefix_lens: list[int]
    extend_lens: list[int]
    page_tables: list[list[int]]  # pages of each request, covering at least prefix + extend tokens
    page_size: int
    # Filled by the attention backend's prepare(); reused by every layer of this forward.
    attn_metadata: Any = field(default=None, repr=False)

    @property
    def batch_size(self) -> int:
        return len(self.extend_lens)

    @property
    def seq_lens(self) -> list[int]:
        return [p + e for p, e in zip(self.prefix_lens, self.extend_lens, strict=True)]

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    @property
    def last_token_indices(self) -> torch.Tensor:
        """Index into the ragged token dimension of each request's last token (where it samples)."""
        ends = torch.tensor(self.extend_lens, dtype=torch.int64).cumsum(0) - 1
        return ends.to(self.device)

    @classmethod
    def build(
        cls,
        new_tokens: list[list[int]],
        prefix_lens: list[int],
        page_tables: list[list[int]],
        page_size: int,
        device: torch.device | str = "cpu",
    ) -> ForwardBatch:
        if not new_tokens or any(len(t) == 0 for t in new_tokens):
            raise ValueError("every request in a batch needs at least one new token")
        extend_lens = [len(t) for t in new_tokens]
        mode = ForwardMode.DECODE if all(n == 1 for n in extend_lens) else ForwardMode.EXTEND
        positions: list[int] = []
        slots: list[int] = []
        for tokens, prefix, pages in zip(new_tokens, prefix_lens, page_tables, strict=True):
            end = prefix + len(tokens)
            if end > len(pages) * page_size:
                raise ValueError(f"request needs {end} KV slots but has {len(pages)} pages of {page_size}")
            pos = range(prefix, end)
            positions.extend(pos)
            slots.extend(pages[p // page_size] * page_size + p % page_size for p in pos)
        flat = [t for tokens in new_tokens for t in tokens]
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.int64, device=device)  # noqa: E731
        return cls(
            mode=mode,
            input_ids=as_tensor(flat),
            positions=as_tensor(positions),
            out_cache_loc=as_tensor(slots),
            prefix_lens=list(prefix_lens),
            extend_lens=extend_lens,
            page_tables=[list(p) for p in page_tables],
            page_size=page_size,
        )

    def kv_slots(self, i: int) -> torch.Tensor:
        """Slots of request i's whole sequence (prefix + new tokens), in position order."""
        n = self.prefix_lens[i] + self.extend_lens[i]
        pages = torch.tensor(self.page_tables[i][: pages_for(n, self.page_size)], dtype=torch.int64)
        offsets = torch.arange(self.page_size, dtype=torch.int64)
        return (pages[:, None] * self.page_size + offsets).flatten()[:n].to(self.device)
