"""Keeping the ranks of one tensor-parallel server in lockstep.

Every rank of a server runs the same scheduler (SPMD): one scheduling decision per step, identical on every
rank, because every rank sees the same inputs. Most inputs already are the same everywhere (the engine's
sampled tokens are rank 0's, broadcast by `Engine.sample`). Three are not, and this module agrees on them:

- **the front's messages** reach rank 0 only: `exchange_inbox` broadcasts each loop turn's batch of them;
- **transfer states**: each rank has its own transfer manager (its own KV memory, ZMQ endpoint and
  bootstrap entry), so a room may have succeeded on one rank and not yet on another, or failed on one only.
  `track` wraps a rank's `KVSender`/`KVReceiver` in an `AgreedHandle` whose `poll()`, `ready` and
  `safe_to_free()` answer what every rank agreed on at the last `refresh()` (once per step, before the
  scheduler looks at any room): the MIN over ranks of the state (FAILED < ... < SUCCESS, so a room fails
  everywhere as soon as it failed anywhere, and succeeds only once it succeeded everywhere), and pages are
  safe to free only when they are on every rank. A rank whose own room is still live when the room failed
  elsewhere aborts it, so its peers stop writing and its pages drain;
- **the aux row** (the first token) reaches decode rank 0 only: `refresh` broadcasts it with the rooms
  that just succeeded.

With one rank every call is a pass-through: `track` returns the handle itself and nothing is exchanged, so
the single-rank servers run exactly as before.
"""

from __future__ import annotations

import logging
from typing import Any

from contracts.metrics import FailureReason
from contracts.pd import dp_owner
from transfer.protocol import TransferState

log = logging.getLogger(__name__)

_FAILED_ELSEWHERE = "the KV transfer failed on another rank of this server"


class AgreedHandle:
    """A room handle whose state is the one every rank agreed on (see the module docstring)."""

    def __init__(self, local: Any, sync: RankSync) -> None:
        self.local = local
        self._sync = sync
        self._state = TransferState.BOOTSTRAPPING  # until the first refresh: live, not ready, on every rank
        self._safe = False
        self._aborted = False
        self._result: Any = None
        self._result_known = False

    @property
    def room(self) -> int:
        return self.local.room

    # -- agreed -----------------------------------------------------------------------------------------

    def poll(self) -> TransferState:
        return TransferState.FAILED if self._aborted else self._state

    @property
    def ready(self) -> bool:
        return self.poll() >= TransferState.WAITING_FOR_INPUT

    def safe_to_free(self) -> bool:
        return self._safe

    def result(self) -> Any:
        """Decode: the aux row rank 0 read, valid once poll() is SUCCESS."""
        if self._result is None:
            raise ValueError(f"room {self.room}: no aux row result (it has not succeeded on rank 0)")
        return self._result

    # -- this rank's ---------------------------------------------------------------------------------

    @property
    def error(self) -> str:
        return self.local.error or _FAILED_ELSEWHERE

    @property
    def reason(self) -> FailureReason | None:
        if self.poll() != TransferState.FAILED:
            return self.local.reason
        return self.local.reason or FailureReason.FAILED

    def abort(self, reason: str = "aborted") -> None:
        # the schedulers abort identically on every rank, so this needs no agreement
        self._aborted = True
        self.local.abort(reason)

    def release(self) -> None:
        self._sync.untrack(self)
        self.local.release()

    def __getattr__(self, name: str) -> Any:  # send, write_aux, finish: this rank's writes
        return getattr(self.local, name)


class RankSync:
    """The agreement points of one server's scheduler, over its tensor-parallel group (`engine.tp`)."""

    def __init__(self, tp: Any | None, data_parallel: bool = False) -> None:
        self.tp = tp  # engine.distributed.TPGroup; None: one rank
        self.rank: int = tp.rank if tp is not None else 0
        self.size: int = tp.size if tp is not None else 1
        # DP attention: each rank owns its own requests and rooms (contracts.pd.dp_owner), so rooms need no
        # agreement; the front's messages still reach every rank, and each takes the requests it owns
        self.data_parallel = data_parallel and self.size > 1
        self._live: list[AgreedHandle] = []  # creation order: the same on every rank

    @property
    def single(self) -> bool:
        return self.size == 1

    @property
    def leader(self) -> bool:
        return self.tp is None or self.tp.is_leader

    def exchange_inbox(self, messages: list[bytes]) -> list[bytes]:
        """Rank 0's messages from the front, on every rank (the others pass [])."""
        if self.single:
            return messages
        return self.tp.broadcast_object(messages if self.leader else None, src=0)

    def barrier(self) -> None:
        if not self.single:
            self.tp.barrier()

    def owns(self, room: int | None, rid: str) -> bool:
        """Whether this rank takes the request (every rank does, but under DP attention)."""
        return not self.data_parallel or dp_owner(room, rid, self.size) == self.rank

    def track(self, handle: Any) -> Any:
        """The handle the scheduler should hold for a room it just created (the same call on every rank, or under
        DP attention on the rank that owns it, which alone decides its fate)."""
        if self.single or self.data_parallel:
            return handle
        agreed = AgreedHandle(handle, self)
        self._live.append(agreed)
        return agreed

    def untrack(self, handle: AgreedHandle) -> None:
        if handle in self._live:
            self._live.remove(handle)

    def refresh(self) -> None:
        """Agree on every live room's state and page safety; broadcast rank 0's new aux results. Call once
        per step, on every rank, before the scheduler polls any room."""
        if self.single or self.data_parallel:
            return
        handles = list(self._live)
        mine: list[int] = []
        for h in handles:
            mine.extend(self._local_view(h))
        agreed = self.tp.agree_min(mine) if handles else []
        results: list[tuple[int, Any]] = []
        for i, h in enumerate(handles):
            state, safe = TransferState(agreed[2 * i]), bool(agreed[2 * i + 1])
            if state == TransferState.FAILED and mine[2 * i] != TransferState.FAILED and not h._aborted:
                h._aborted = True
                self._abort_quietly(h)
            h._state, h._safe = state, safe
            if state == TransferState.SUCCESS and not h._result_known and self.leader:
                results.append((i, self._result_quietly(h)))
        if any(h._state == TransferState.SUCCESS and not h._result_known for h in handles):
            results = self.tp.broadcast_object(results if self.leader else None, src=0)
            for i, row in results:
                handles[i]._result, handles[i]._result_known = row, True
            for h in handles:  # a receiver rank 0 could not read: its result() raises, on every rank
                if h._state == TransferState.SUCCESS:
                    h._result_known = True

    @staticmethod
    def _local_view(h: AgreedHandle) -> tuple[int, int]:
        """(this rank's state, 1 if its pages are safe to free here) — a handle that raises counts as failed
        and unsafe: the room fails everywhere and its pages stay held."""
        try:
            state = int(h.local.poll())
        except Exception:
            log.exception("room %d: polling this rank's transfer failed", h.room)
            return int(TransferState.FAILED), 0
        try:
            safe = 1 if h.local.safe_to_free() else 0
        except Exception:
            log.exception("room %d: this rank cannot tell whether its pages are safe", h.room)
            safe = 0
        return state, safe

    @staticmethod
    def _abort_quietly(h: AgreedHandle) -> None:
        try:
            h.local.abort(_FAILED_ELSEWHERE)
        except Exception:
            log.exception("room %d: aborting this rank's part failed", h.room)

    @staticmethod
    def _result_quietly(h: AgreedHandle) -> Any:
        try:
            return h.local.result()
        except Exception:
            log.exception("room %d: reading the aux result on rank 0 failed", h.room)
            return None
