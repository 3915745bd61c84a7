"""Which attention backend a model runs with: a pure rule, so every combination is tested on CPU.

FlashInfer has kernels only for half-precision activations (its JIT dtype maps hold float16 and bfloat16,
no float32) and for the head dims it instantiates; anything else would fail at the first forward, deep in
a request. `auto` therefore falls back to the torch backend, saying why; an explicit `flashinfer` that
cannot work is refused at start-up with the fix.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

BACKENDS = ("auto", "torch", "flashinfer")
FLASHINFER_DTYPES = (torch.float16, torch.bfloat16)
FLASHINFER_HEAD_DIMS = (64, 128, 256)


@dataclass(frozen=True)
class BackendChoice:
    name: str  # "torch" or "flashinfer"
    reason: str  # why, for the start-up log line


def flashinfer_installed() -> bool:
    return importlib.util.find_spec("flashinfer") is not None


def _flashinfer_unfit(device: torch.device, dtype: torch.dtype, head_dim: int, installed: bool) -> str | None:
    """Why FlashInfer cannot run this model here, with the fix; None when it can."""
    if device.type != "cuda":
        return f"FlashInfer needs a CUDA device, the model runs on {device}"
    if not installed:
        return "flashinfer is not installed (pip install 'pdserve[flashinfer]')"
    if dtype not in FLASHINFER_DTYPES:
        name = str(dtype).removeprefix("torch.")
        return f"FlashInfer has no {name} kernels; serve in bfloat16 or float16 (--dtype bfloat16)"
    if head_dim not in FLASHINFER_HEAD_DIMS:
        return f"FlashInfer supports head_dim {', '.join(map(str, FLASHINFER_HEAD_DIMS))}, the model has {head_dim}"
    return None


def choose_backend(
    requested: str, device: torch.device, dtype: torch.dtype, head_dim: int, installed: bool | None = None
) -> BackendChoice:
    """The backend for `requested` (auto, torch, flashinfer) on this device, dtype and head dim.

    Raises ValueError for an unknown name, or for `flashinfer` where it cannot run (the message says why and
    what to do). `installed` overrides the import check (tests).
    """
    if requested not in BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r}; use one of {', '.join(BACKENDS)}")
    if requested == "torch":
        return BackendChoice("torch", "requested with --attention-backend torch")
    unfit = _flashinfer_unfit(device, dtype, head_dim, flashinfer_installed() if installed is None else installed)
    if requested == "flashinfer":
        if unfit:
            raise ValueError(f"--attention-backend flashinfer cannot run this model: {unfit}; "
                             "or use --attention-backend torch")  # fmt: skip
        return BackendChoice("flashinfer", "requested with --attention-backend flashinfer")
    if unfit:
        return BackendChoice("torch", unfit)
    return BackendChoice("flashinfer", "CUDA, half precision and a supported head dim")
