"""Attention backends: torch SDPA everywhere, FlashInfer on CUDA when installed."""

from __future__ import annotations

import torch

from engine.attention.base import AttentionBackend
from engine.attention.torch_backend import TorchAttention
from engine.kvcache import KVPool


def create_attention_backend(name: str, pool: KVPool, num_heads: int, sliding_window: int | None) -> AttentionBackend:
    """`auto` picks FlashInfer on CUDA when it is importable, the torch backend otherwise."""
    if name not in ("auto", "torch", "flashinfer"):
        raise ValueError(f"unknown attention backend {name!r}; use auto, torch or flashinfer")
    if name == "torch" or (name == "auto" and pool.device.type != "cuda"):
        return TorchAttention(pool, num_heads, sliding_window)
    from engine.attention import flashinfer_backend

    if not flashinfer_backend.available():
        if name == "flashinfer":
            raise RuntimeError(
                "attention backend flashinfer requested but flashinfer is not installed "
                "(pip install 'pdserve[flashinfer]')"
            )
        return TorchAttention(pool, num_heads, sliding_window)
    if pool.device.type != "cuda":
        raise RuntimeError("the flashinfer attention backend needs a CUDA device")
    return flashinfer_backend.FlashInferAttention(pool, num_heads, sliding_window)


__all__ = ["AttentionBackend", "TorchAttention", "create_attention_backend", "torch"]
