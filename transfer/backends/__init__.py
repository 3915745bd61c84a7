"""Transfer engines behind one interface; selected by `--transfer-backend {mooncake,nixl}`."""

from __future__ import annotations

from transfer.backends.base import BackendSettings, Copy, MemoryRegion, TransferBackend, TransferError, WriteStatus


def create_backend(name: str, settings: BackendSettings) -> TransferBackend:
    # Imported lazily: each engine is a heavy native library, and a machine may have only one of them.
    if name == "mooncake":
        from transfer.backends.mooncake import MooncakeBackend

        return MooncakeBackend(settings)
    if name == "nixl":
        from transfer.backends.nixl import NixlBackend

        return NixlBackend(settings)
    raise ValueError(f"unknown transfer backend {name!r}; use mooncake or nixl")


__all__ = [
    "BackendSettings",
    "Copy",
    "MemoryRegion",
    "TransferBackend",
    "TransferError",
    "WriteStatus",
    "create_backend",
]
