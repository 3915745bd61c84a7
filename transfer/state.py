"""The per-room transfer state machine (DESIGN §3.4), shared by both sides.

States only move forward; FAILED is sticky; SUCCESS is declared once; every non-final state has a
deadline. A failure carries a typed `FailureReason`, set where it happens, so that nobody has to recover
it from the error text later. The object is thread-safe: the scheduler, the control-socket thread and
the transfer worker all touch it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from contracts.metrics import FailureReason
from transfer.config import Timeouts
from transfer.protocol import TransferState


class RoomState:
    def __init__(self, room: int, timeouts: Timeouts, clock: Callable[[], float] = time.monotonic) -> None:
        self.room = room
        self._timeouts = timeouts
        self._clock = clock
        self._lock = threading.Lock()
        self._state = TransferState.BOOTSTRAPPING
        self._since = clock()
        self.error = ""
        self.reason: FailureReason | None = None  # set with FAILED
        self.failed_in: TransferState | None = None  # the state the room was in when it failed

    @property
    def state(self) -> TransferState:
        return self._state

    @property
    def terminal(self) -> bool:
        return self._state in (TransferState.SUCCESS, TransferState.FAILED)

    def advance(self, new: TransferState) -> bool:
        """Move forward to `new`; False (and no change) for a backward, repeated or post-terminal move."""
        if new == TransferState.FAILED:
            raise ValueError("use fail() to fail a room")
        with self._lock:
            if self.terminal or new <= self._state:
                return False
            self._state = new
            self._since = self._clock()
            return True

    def fail(self, error: str, reason: FailureReason) -> bool:
        """Fail the room; False if it already ended (success or failure keep their first word)."""
        with self._lock:
            if self.terminal:
                return False
            self._set_failed(error, reason, self._clock())
            return True

    def deadline(self) -> float | None:
        limit = {
            TransferState.BOOTSTRAPPING: self._timeouts.bootstrap,
            TransferState.WAITING_FOR_INPUT: self._timeouts.waiting_for_input,
            TransferState.TRANSFERRING: self._timeouts.transferring,
        }.get(self._state)
        return None if limit is None else self._since + limit

    def check_timeout(self) -> bool:
        """Fail the room (TIMED_OUT) if its current state's deadline passed; True when this call failed it."""
        with self._lock:
            deadline = self.deadline()
            now = self._clock()
            if deadline is None or now < deadline:
                return False
            error = f"timed out in {self._state.name} after {now - self._since:.1f}s"
            self._set_failed(error, FailureReason.TIMED_OUT, now)
            return True

    def _set_failed(self, error: str, reason: FailureReason, now: float) -> None:
        """Lock held."""
        self.failed_in = self._state
        self._state = TransferState.FAILED
        self._since = now
        self.error = error
        self.reason = reason
