"""Devices, streams and events behind one small abstraction.

The prefill server's layer-pipelined forward records an event after each layer group, and the transfer
worker (transfer/prefill_worker.py) waits on it before reading that group's pages. On CUDA that is a real
`torch.cuda.Event` recorded on the compute stream; on CPU the forward has finished when the call returns,
so the event is born complete. Code written against `DeviceEvent` is correct on both.
"""

from __future__ import annotations

from typing import Protocol

import torch


class DeviceEvent(Protocol):
    def query(self) -> bool:
        """True once all work recorded before the event has finished."""
        ...

    def synchronize(self) -> None:
        """Block the calling (host) thread until the event has completed."""
        ...


class CompletedEvent:
    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None


class CudaEvent:
    def __init__(self, stream: torch.cuda.Stream | None = None) -> None:
        self._event = torch.cuda.Event()
        self._event.record(stream)

    def query(self) -> bool:
        return self._event.query()

    def synchronize(self) -> None:
        self._event.synchronize()


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    if str(spec) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda requested but CUDA is not available; use --device cpu")
    return device


def record_event(device: torch.device) -> DeviceEvent:
    """An event marking everything queued so far on the current compute stream of `device`."""
    if device.type == "cuda":
        return CudaEvent(torch.cuda.current_stream(device))
    return CompletedEvent()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
