"""FlashInfer paged attention (CUDA only; optional dependency).

The pool's per-layer [num_pages, page_size, kv_heads, head_dim] buffers are FlashInfer's "NHD" paged layout,
so the kernels read pages in place. Plans are made once per batch and reused by every layer.
"""

from __future__ import annotations

import importlib.util

import torch

from engine.attention.base import AttentionBackend
from engine.batch import ForwardBatch, ForwardMode
from engine.kvcache import KVPool, pages_for

_WORKSPACE_BYTES = 256 * 1024 * 1024


def available() -> bool:
    return importlib.util.find_spec("flashinfer") is not None


class FlashInferAttention(AttentionBackend):
    def __init__(self, pool: KVPool, num_heads: int, sliding_window: int | None) -> None:
        super().__init__(pool, num_heads, sliding_window)
        import flashinfer

        self._workspace = torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=pool.device)
        self._prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self._workspace, "NHD")
        self._decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(self._workspace, "NHD")
        # Reference semantics: key j is visible from query i when i - j < window, i.e. window - 1 to the left.
        self._window_left = sliding_window - 1 if sliding_window else -1

    def prepare(self, batch: ForwardBatch) -> None:
        self.batch = batch
        ps = batch.page_size
        pages_per_req = [pages_for(n, ps) for n in batch.seq_lens]
        indices = [p for table, n in zip(batch.page_tables, pages_per_req, strict=True) for p in table[:n]]
        i32 = dict(dtype=torch.int32, device=self.pool.device)
        kv_indptr = torch.tensor([0, *torch.tensor(pages_per_req).cumsum(0).tolist()], **i32)
        kv_indices = torch.tensor(indices, **i32)
        last_page_len = torch.tensor([(n - 1) % ps + 1 for n in batch.seq_lens], **i32)
        dtype, kv_dtype = self.pool.layout.dtype, self.pool.layout.dtype
        common = dict(window_left=self._window_left, sm_scale=self.scale, q_data_type=dtype, kv_data_type=kv_dtype)
        if batch.mode == ForwardMode.DECODE:
            self._decode.plan(
                kv_indptr,
                kv_indices,
                last_page_len,
                self.num_heads,
                self.num_kv_heads,
                self.head_dim,
                ps,
                **common,
            )
        else:
            qo_indptr = torch.tensor([0, *torch.tensor(batch.extend_lens).cumsum(0).tolist()], **i32)
            # causal with paged KV aligns the last query with the last key, which is what extend needs
            self._prefill.plan(
                qo_indptr,
                kv_indptr,
                kv_indices,
                last_page_len,
                self.num_heads,
                self.num_kv_heads,
                self.head_dim,
                ps,
                causal=True,
                **common,
            )

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.store_kv(layer, k, v)
        assert self.batch is not None
        cache = (self.pool.k[layer], self.pool.v[layer])
        q = q.to(self.pool.layout.dtype).contiguous()
        wrapper = self._decode if self.batch.mode == ForwardMode.DECODE else self._prefill
        return wrapper.run(q, cache)
