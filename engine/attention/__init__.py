"""Attention backends: torch SDPA everywhere, FlashInfer on CUDA where it can run the model (`select.py`)."""

from __future__ import annotations

import logging

from engine.attention.base import AttentionBackend
from engine.attention.select import BackendChoice, choose_backend
from engine.attention.torch_backend import TorchAttention
from engine.kvcache import KVPool

log = logging.getLogger(__name__)


def create_attention_backend(name: str, pool: KVPool, num_heads: int, sliding_window: int | None) -> AttentionBackend:
    """The backend `choose_backend` picks for this pool; one log line says which and why."""
    choice = choose_backend(name, pool.device, pool.layout.dtype, pool.layout.head_dim)
    log.info("attention backend: %s (%s)", choice.name, choice.reason)
    if choice.name == "torch":
        return TorchAttention(pool, num_heads, sliding_window)
    from engine.attention.flashinfer_backend import FlashInferAttention

    return FlashInferAttention(pool, num_heads, sliding_window)


__all__ = ["AttentionBackend", "BackendChoice", "TorchAttention", "choose_backend", "create_attention_backend"]
