"""Devices, streams and events behind one small abstraction.

The prefill server's layer-pipelined forward records an event after each layer group, and the transfer
worker (transfer/prefill_worker.py) waits on it before reading that group's pages. On CUDA that is a real
`torch.cuda.Event` recorded on the compute stream; on CPU the forward has finished when the call returns,
so the event is born complete. Code written against `DeviceEvent` is correct on both.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
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
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device cuda requested but CUDA is not available; use --device cpu")
        if device.index is None:  # always indexed: threads bind to it (`bind_thread`), events compare it
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def record_event(device: torch.device) -> DeviceEvent:
    """An event marking everything queued so far on the current compute stream of `device`."""
    if device.type == "cuda":
        return CudaEvent(torch.cuda.current_stream(device))
    return CompletedEvent()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def to_device(values: Sequence | torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host values as a tensor on `device`, without making the host wait.

    `torch.tensor(xs, device=cuda)` copies from pageable memory and synchronises the stream; here the values
    are staged in pinned memory and copied non-blocking (the caching host allocator keeps the staging block
    alive until the copy ran). On CPU it is the host tensor itself.
    """
    host = values.to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def pinned(values: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host tensor, pinned where `device` is CUDA: for APIs that take host inputs and copy them themselves
    (FlashInfer's plan), so that their copy is asynchronous too."""
    host = torch.tensor(values, dtype=dtype)
    return host.pin_memory() if device.type == "cuda" else host


_reads = threading.local()


def read_to_host(t: torch.Tensor) -> list:
    """The one sanctioned device→host read of a step (it waits for the device): `t` as nested lists.

    Every read the engine makes inside a step goes through here, so that a probe (`engine.sync_probe`) can
    tell sanctioned reads from stray ones.
    """
    _reads.active = True
    try:
        return t.tolist()
    finally:
        _reads.active = False


def in_sanctioned_read() -> bool:
    return getattr(_reads, "active", False)


def bind_thread(device: torch.device) -> None:
    """Make `device` current for the calling thread: events, streams and copies of `cuda:N` need it in every
    thread that touches them (a new thread starts on device 0)."""
    if device.type == "cuda" and device.index is not None:  # an index-less "cuda" means device 0 anyway
        torch.cuda.set_device(device)
