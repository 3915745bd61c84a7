"""The attention backend interface the model calls once per layer."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from engine.batch import ForwardBatch
from engine.kvcache import KVPool


class AttentionBackend(ABC):
    name = "base"
    # Whether decode can be captured in a CUDA graph: the backend's per-batch metadata then lives in fixed
    # buffers that `prepare_graph` refills before each replay (engine/cuda_graph.py).
    supports_cuda_graph = False

    def __init__(self, pool: KVPool, num_heads: int, sliding_window: int | None) -> None:
        self.pool = pool
        self.num_heads = num_heads
        self.num_kv_heads = pool.layout.num_kv_heads
        self.head_dim = pool.layout.head_dim
        self.scale = self.head_dim**-0.5
        self.sliding_window = sliding_window
        self.batch: ForwardBatch | None = None

    @abstractmethod
    def prepare(self, batch: ForwardBatch) -> None:
        """Build per-batch metadata once, from the batch's host lists (no device reads); every layer of the
        forward then reuses it."""

    def activate(self, batch: ForwardBatch) -> None:
        """Make `batch`, prepared before, the one the next layers run (two micro-batches take turns). By default
        it prepares again; a backend whose metadata lives on the batch just switches to it."""
        self.prepare(batch)

    def prepare_graph(self, batch: ForwardBatch, graph_batch_size: int, slot: str = "") -> None:
        """Like `prepare`, for a decode batch padded to `graph_batch_size` rows that runs inside that bucket's
        captured graph: the metadata must go into the buffers the graph was captured with. `slot` names another set
        of such buffers for the same size (the micro-batches of a two-batch-overlap graph, each its own, planned
        together and then switched between with `activate`)."""
        raise NotImplementedError(f"the {self.name} attention backend has no CUDA-graph mode")

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store the new tokens' K/V into the pool, then attend.

        q: [T, Hq, D]; k, v: [T, Hkv, D] (ragged over the batch). Returns [T, Hq, D].
        """
        self.store_kv(layer, k, v)
        return self.attend(layer, q, k, v)

    @abstractmethod
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of the batch's queries over its KV, which the pool already holds (`forward` stored it; the
        context-parallel forward stores the whole group's KV itself, engine/cp_forward.py). `k`/`v` are the
        batch's own new K/V, which a backend may read in place of the pool for a request with no prefix."""

    def store_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        assert self.batch is not None, "prepare() must run before forward()"
        self.pool.store(layer, self.batch.out_cache_loc, k, v)
