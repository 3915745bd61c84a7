"""What one forward pass computes: the batch layout shared by the model, attention backends and servers.

Tokens of all requests are concatenated (ragged, no padding): request i contributes `extend_lens[i]`
new tokens at positions `prefix_lens[i] ..< prefix_lens[i] + extend_lens[i]`, whose KV goes into the
slots `out_cache_loc` of its pages. A slot is `page * page_size + offset`.

Everything is computed on the host from Python lists and reaches the device in one non-blocking copy
(`engine.device.to_device`): building a batch never waits for the GPU, and the host lists stay on the batch
(`prefix_lens`, `extend_lens`, `page_tables`) for the attention backends' plans.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

import torch

from engine.device import to_device
from engine.kvcache import pages_for


class ForwardMode(enum.Enum):
    EXTEND = "extend"  # prefill, optionally on top of cached prefix pages
    DECODE = "decode"  # one new token per request
    # Prefill chunks together with running decodes, each decode a length-1 extend on its cached prefix: attention
    # runs it as one ragged extend batch (every backend takes the extend path for anything but DECODE).
    MIXED = "mixed"
    # An empty rank under DP attention runs no ForwardBatch but an IDLE forward (engine/dp_forward.py).


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
    # [B] int64: index into the ragged token dimension of each request's last token (where it samples)
    last_token_indices: torch.Tensor = field(default=None, repr=False)  # type: ignore[assignment]
    # Filled by the attention backend's prepare(); reused by every layer of this forward.
    attn_metadata: Any = field(default=None, repr=False)
    # DP attention (engine/dp_attention.py): the step's plan every rank agreed on, and every rank's rows of this
    # batch (of this micro-batch, for a child of two-batch overlap), which the MLP gathers
    dp_plan: Any = field(default=None, repr=False)
    dp: Any = field(default=None, repr=False)

    @property
    def batch_size(self) -> int:
        return len(self.extend_lens)

    @property
    def num_tokens(self) -> int:
        return sum(self.extend_lens)

    @property
    def seq_lens(self) -> list[int]:
        return [p + e for p, e in zip(self.prefix_lens, self.extend_lens, strict=True)]

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    @classmethod
    def build(
        cls,
        new_tokens: list[list[int]],
        prefix_lens: list[int],
        page_tables: list[list[int]],
        page_size: int,
        device: torch.device | str = "cpu",
        mixed: bool = False,
    ) -> ForwardBatch:
        """`mixed`: the scheduler put prefill chunks and decodes together (a label for metrics and plugins; the
        shape decides the kernels: all length 1 is a DECODE batch whatever the label)."""
        if not new_tokens or any(len(t) == 0 for t in new_tokens):
            raise ValueError("every request in a batch needs at least one new token")
        extend_lens = [len(t) for t in new_tokens]
        if all(n == 1 for n in extend_lens):
            mode = ForwardMode.DECODE
        else:
            mode = ForwardMode.MIXED if mixed else ForwardMode.EXTEND
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
        last = [end - 1 for end in accumulate(extend_lens)]
        n = len(flat)
        # one host buffer, one copy: ids, positions, slots and last-token indices travel together
        packed = to_device(flat + positions + slots + last, torch.int64, torch.device(device))
        input_ids, pos_t, loc, last_t = packed.split([n, n, n, len(last)])
        return cls(
            mode=mode,
            input_ids=input_ids,
            positions=pos_t,
            out_cache_loc=loc,
            prefix_lens=list(prefix_lens),
            extend_lens=extend_lens,
            page_tables=[list(p) for p in page_tables],
            page_size=page_size,
            last_token_indices=last_t,
        )

    def kv_slot_list(self, i: int) -> list[int]:
        """Slots of request i's whole sequence (prefix + new tokens), in position order, on the host."""
        n = self.prefix_lens[i] + self.extend_lens[i]
        ps = self.page_size
        pages = self.page_tables[i][: pages_for(n, ps)]
        return [p * ps + o for p in pages for o in range(ps)][:n]

    def kv_slots(self, i: int) -> torch.Tensor:
        """`kv_slot_list(i)` on the batch's device."""
        return to_device(self.kv_slot_list(i), torch.int64, self.device)
