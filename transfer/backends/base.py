"""The transfer-engine interface: the only place Mooncake and NIXL differ.

Both sides register the same list of memory regions in the same order (each layer's K buffer, each
layer's V buffer, then the aux buffer), so a write is described by region index and item ranges; the
backend turns those into its own descriptors. The prefill side is always the initiator (push model):
it adds the decode side as a peer from the metadata decode sent at registration and writes into it.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch


class TransferError(RuntimeError):
    """An engine call failed; the message carries the engine's own words."""


@dataclass(frozen=True)
class MemoryRegion:
    """A registered buffer; item i lives at `base + i * item_bytes` (a KV layer buffer: item = one KV head of one
    page). `unit`: items that writes usually move together (a KV region: the heads of a page; 1 otherwise), a hint
    a backend may use to describe writes coarser (transfer/backends/nixl_dlist.py); copies are always in items."""

    base: int
    item_bytes: int
    num_items: int
    unit: int = 1

    @property
    def nbytes(self) -> int:
        return self.item_bytes * self.num_items


@dataclass(frozen=True)
class Copy:
    """Write `count` consecutive items of region `region` from local item `src` to remote item `dst`."""

    region: int
    src: int
    dst: int
    count: int


class WriteStatus(enum.Enum):
    """Where one backend write stands (`poll()`); not the control message `transfer.protocol.Status`."""

    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


@dataclass
class BackendSettings:
    host: str = "127.0.0.1"  # address peers reach this process on
    protocol: str = "tcp"  # Mooncake: tcp here, rdma on clusters
    device_names: str = ""  # Mooncake RDMA NICs, e.g. "mlx5_0,mlx5_1" ("" = auto)
    agent_name: str = ""  # NIXL agent name ("" = generated, unique per process)
    # Seconds after which the engine must give up on a write that makes no progress (a stopped peer): the
    # caller's Transferring deadline. Mooncake takes it through its environment variables; NIXL has none.
    write_timeout: float = 120.0
    extra: dict[str, Any] = field(default_factory=dict)


class TransferBackend(ABC):
    name: str = ""

    def __init__(self, settings: BackendSettings) -> None:
        self.settings = settings

    @abstractmethod
    def register(self, regions: list[MemoryRegion], device: torch.device) -> None:
        """Register this process's regions (once, before any peer or write)."""

    @abstractmethod
    def metadata(self) -> bytes:
        """What a peer needs to write into our registered memory (sent in the registration message)."""

    @abstractmethod
    def add_peer(self, peer: str, metadata: bytes, regions: list[MemoryRegion]) -> None:
        """Make `peer` writable: its backend metadata and its regions (same order as ours)."""

    @abstractmethod
    def remove_peer(self, peer: str) -> None: ...

    @abstractmethod
    def submit_write(self, peer: str, copies: list[Copy]) -> Any:
        """Start writing `copies` into `peer`; returns a handle for poll(). Raises TransferError."""

    @abstractmethod
    def poll(self, handle: Any) -> tuple[WriteStatus, str]:
        """(status, error message when FAILED). Never blocks for long."""

    def release(self, handle: Any) -> None:  # noqa: B027 (optional hook)
        """Free a finished handle's engine resources."""

    def cancel(self, handle: Any) -> bool:
        """Call off a pending write. True: it is resolved now (FAILED) and no byte of it will be read or sent
        any more, so its pages may be reused; False: the engine cannot stop it, wait for poll() to settle."""
        return False

    @abstractmethod
    def close(self) -> None: ...
