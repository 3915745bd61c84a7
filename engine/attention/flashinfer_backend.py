"""FlashInfer paged attention (CUDA only; optional dependency, written against flashinfer-python 0.7.4).

The pool's per-layer [pages, kv_heads, page_size, head_dim] buffers are FlashInfer's "HND" paged layout
(heads outermost within a page, so a head range of a page is contiguous for the KV transfer across TP sizes),
so the kernels read pages in place: both wrappers are built with kv_layout "HND" and run on the (K, V) tuple of
a layer. New tokens are stored by the pool itself (`KVPool.store`, shared with the torch backend), not by
FlashInfer's append kernel. The HND path is written against 0.7.4's documented API and is unverified until the
device check (bench/gpu_check.py) runs on a GPU. Plans are made once per batch from host inputs (page counts and
last-page lengths live on the host anyway; the page indices go to the device in one non-blocking copy),
so preparing a batch never waits for the GPU. Kernel families are fixed rather than left to FlashInfer's
`auto` (which can pick cuDNN or other paths with their own dependencies): prefill runs fa3 on Hopper and fa2
elsewhere; decode runs the fa2 tensor-core kernel, in a CUDA-graph wrapper per captured batch size.
"""

from __future__ import annotations

from itertools import accumulate
from typing import Any

import torch

from engine.attention.base import AttentionBackend
from engine.batch import ForwardBatch, ForwardMode
from engine.device import pinned, to_device
from engine.kvcache import KVPool, pages_for

_WORKSPACE_BYTES = 256 * 1024 * 1024
KV_LAYOUT = "HND"  # the pool's layout (engine/kvcache/pool.py): [pages, kv_heads, page_size, head_dim]


def prefill_kernel_family(device: torch.device, head_dim: int) -> str:
    """fa3 where its Hopper kernels exist (sm90, head dims 64/128/256), fa2 otherwise."""
    major, _ = torch.cuda.get_device_capability(device)
    return "fa3" if major == 9 and head_dim in (64, 128, 256) else "fa2"


class FlashInferAttention(AttentionBackend):
    name = "flashinfer"
    supports_cuda_graph = True

    def __init__(self, pool: KVPool, num_heads: int, sliding_window: int | None) -> None:
        super().__init__(pool, num_heads, sliding_window)
        import flashinfer

        self._flashinfer = flashinfer
        self._workspace = torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=pool.device)
        self.prefill_family = prefill_kernel_family(pool.device, self.head_dim)
        self._prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            self._workspace, KV_LAYOUT, backend=self.prefill_family
        )
        self._decode = self._decode_wrapper()
        # (captured batch size, slot) -> its CUDA-graph decode wrapper; slots ("a", "b": the micro-batches of a
        # two-batch-overlap graph) plan side by side, so each slot has its own workspace (FlashInfer keeps a plan's
        # scheduling data there)
        self._graph_decode: dict[tuple[int, str], Any] = {}
        self._slot_workspace: dict[str, torch.Tensor] = {}
        self._active: Any = None
        # Reference semantics: key j is visible from query i when i - j < window, i.e. window - 1 to the left.
        self._window_left = sliding_window - 1 if sliding_window else -1
        dtype = pool.layout.dtype
        self._common = dict(window_left=self._window_left, sm_scale=self.scale, q_data_type=dtype, kv_data_type=dtype)

    def _decode_wrapper(self, graph_batch_size: int | None = None, slot: str = "") -> Any:
        kwargs: dict[str, Any] = {}
        workspace = self._workspace
        if slot:
            workspace = self._slot_workspace.setdefault(slot, torch.empty_like(self._workspace))
        if graph_batch_size is not None:
            dev, i32 = self.pool.device, torch.int32
            # every row's pages are distinct except padding rows, which share the pool's scratch page
            max_indices = self.pool.num_pages + graph_batch_size
            kwargs = dict(
                use_cuda_graph=True,
                paged_kv_indptr_buffer=torch.zeros(graph_batch_size + 1, dtype=i32, device=dev),
                paged_kv_indices_buffer=torch.zeros(max_indices, dtype=i32, device=dev),
                paged_kv_last_page_len_buffer=torch.zeros(graph_batch_size, dtype=i32, device=dev),
            )
        return self._flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            workspace, KV_LAYOUT, use_tensor_cores=True, backend="fa2", **kwargs
        )

    def _paged_inputs(self, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """kv_indptr and last-page lengths on the (pinned) host, page indices on the device."""
        ps, dev = batch.page_size, self.pool.device
        counts = [pages_for(n, ps) for n in batch.seq_lens]
        indices = [p for table, n in zip(batch.page_tables, counts, strict=True) for p in table[:n]]
        kv_indptr = pinned([0, *accumulate(counts)], torch.int32, dev)
        last_page_len = pinned([(n - 1) % ps + 1 for n in batch.seq_lens], torch.int32, dev)
        # on the device already: FlashInfer's CUDA-graph plan copies host indices blocking
        return kv_indptr, to_device(indices, torch.int32, dev), last_page_len

    def _plan_decode(self, wrapper: Any, batch: ForwardBatch) -> None:
        kv_indptr, kv_indices, last_page_len = self._paged_inputs(batch)
        layout = (self.num_heads, self.num_kv_heads, self.head_dim, batch.page_size)
        wrapper.plan(kv_indptr, kv_indices, last_page_len, *layout, non_blocking=True, **self._common)

    def prepare(self, batch: ForwardBatch) -> None:
        self.batch = batch
        if batch.mode == ForwardMode.DECODE:
            self._plan_decode(self._decode, batch)
            self._active = self._decode
            return
        kv_indptr, kv_indices, last_page_len = self._paged_inputs(batch)
        qo_indptr = pinned([0, *accumulate(batch.extend_lens)], torch.int32, self.pool.device)
        # causal with paged KV aligns the last query with the last key, which is what extend needs
        self._prefill.plan(
            qo_indptr, kv_indptr, kv_indices, last_page_len,
            self.num_heads, self.num_kv_heads, self.head_dim, batch.page_size,
            causal=True, non_blocking=True, **self._common,
        )  # fmt: skip
        self._active = self._prefill

    def activate(self, batch: ForwardBatch) -> None:
        if batch.attn_metadata is None:
            self.prepare(batch)  # the eager wrappers hold one plan at a time: plan it again
        else:  # planned into its own graph wrapper (prepare_graph): switch to it
            self.batch, self._active = batch, batch.attn_metadata

    def prepare_graph(self, batch: ForwardBatch, graph_batch_size: int, slot: str = "") -> None:
        if batch.mode != ForwardMode.DECODE or batch.batch_size != graph_batch_size:
            raise ValueError(f"a CUDA-graph batch is a decode batch of exactly {graph_batch_size} rows")
        key = (graph_batch_size, slot)
        wrapper = self._graph_decode.get(key)
        if wrapper is None:
            wrapper = self._graph_decode[key] = self._decode_wrapper(graph_batch_size, slot)
        self.batch = batch
        self._plan_decode(wrapper, batch)
        self._active = batch.attn_metadata = wrapper

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cache = (self.pool.k[layer], self.pool.v[layer])  # each [pages + 1, kv_heads, page_size, head_dim]
        return self._active.run(q.to(self.pool.layout.dtype).contiguous(), cache)
