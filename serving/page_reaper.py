"""Pages of failed or aborted requests, held until no KV write can still land in them, then freed.

A room that failed (timeout, abort, peer error) may still have writes in flight: the peer issued them
before it learnt of the failure, and they land in whatever pages the room named. Freeing those pages at
once would let the next request's KV be overwritten, so both schedulers hand such requests here; the
transfer handle's `safe_to_free()` says when the pages may go back. This is the one place that counts
a failed transfer, holds its pages and frees them, for the prefill and the decode scheduler alike.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from contracts.metrics import FailureReason, Metrics, Role, Stage, count_failure
from engine.kvcache import PageAllocator
from engine.request import FinishReason, Request

__all__ = ["PageReaper", "TransferHandle"]

log = logging.getLogger(__name__)


class TransferHandle(Protocol):
    """What the reaper needs of a room handle (`transfer.prefill.KVSender`, `transfer.decode.KVReceiver`)."""

    @property
    def error(self) -> str: ...

    @property
    def reason(self) -> FailureReason | None: ...

    def safe_to_free(self) -> bool: ...

    def release(self) -> None: ...


class PageReaper:
    """The zombies of one scheduler: failed or aborted requests whose pages are not yet safe to free."""

    def __init__(
        self,
        allocator: PageAllocator,
        metrics: Metrics,
        role: Role,
        release_pages: Callable[[Request], None] | None = None,
    ) -> None:
        self._allocator = allocator
        # How a safe request's pages go back: to the allocator, unless the scheduler shares pages (the prefill
        # server's prefix cache: a request's cached pages are unlocked, its own freed).
        self.release_pages = release_pages or self._free
        self._metrics = metrics
        self._role = role
        self._held: list[tuple[Request, TransferHandle | None]] = []
        self.quarantined = 0  # pages never given back: their handle could not say they were safe

    def __len__(self) -> int:
        return len(self._held)

    def failed(self, req: Request, handle: TransferHandle, stage: Stage) -> None:
        """`req`'s transfer failed while in `stage`: hold its pages and count the failure under the reason
        the transfer layer recorded with it."""
        self.hold(req, handle)
        reason = handle.reason
        assert reason is not None, "the transfer layer sets a room's reason together with FAILED"
        count_failure(self._metrics, self._role, stage, reason)

    def hold(self, req: Request, handle: TransferHandle | None) -> None:
        """Keep `req`'s pages until `handle` says no write can touch them (None: no transfer, free next reap)."""
        self._held.append((req, handle))

    def reap(self) -> None:
        """Free the pages (and release the room) of every held request that became safe."""
        for entry in list(self._held):
            req, handle = entry
            try:
                if handle is not None and not handle.safe_to_free():
                    continue
            except Exception:
                # A handle that cannot say (a bug in the transfer layer) would raise on every reap and stop
                # the scheduler's step; its pages stay out of the pool for good rather than risk a late write
                # into the next request's KV.
                log.exception(
                    "%s: cannot tell whether request %s's pages are safe; quarantined", self._role.value, req.rid
                )
                self._held.remove(entry)
                self.quarantined += len(req.pages)
                continue
            self._held.remove(entry)  # first: a failure below must not free these pages twice
            if handle is not None:
                self._release(req, handle)
            self.release_pages(req)
            req.finish_reason = FinishReason.ABORT

    def _free(self, req: Request) -> None:
        if req.pages:
            self._allocator.free(req.pages)
            req.pages = []

    def _release(self, req: Request, handle: TransferHandle) -> None:
        try:
            handle.release()
        except Exception:  # the pages are safe (it said so): free them even if forgetting the room failed
            log.exception("%s: releasing the room of request %s failed", self._role.value, req.rid)
