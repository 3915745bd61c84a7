"""serving/rank_sync.py as a pure unit: the agreement rules over a stand-in two-rank group (the real process
groups run in tests/test_tp_e2e.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from contracts.metrics import FailureReason
from serving.rank_sync import AgreedHandle, RankSync
from transfer.protocol import TransferState as S


class PeerGroup:
    """Rank `rank` of two; the other rank's contributions are scripted by the test."""

    def __init__(self, rank: int, peer_values: list[int] | None = None, broadcast: Any = None) -> None:
        self.rank, self.size = rank, 2
        self.peer_values = peer_values or []
        self.broadcasted: Any = broadcast
        self.calls: list[str] = []

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def agree_min(self, values: list[int]) -> list[int]:
        self.calls.append("agree_min")
        assert len(values) == len(self.peer_values)
        return [min(a, b) for a, b in zip(values, self.peer_values, strict=True)]

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        self.calls.append("broadcast")
        return obj if self.rank == src else self.broadcasted

    def barrier(self) -> None:
        self.calls.append("barrier")


@dataclass
class LocalRoom:
    room: int
    state: S = S.BOOTSTRAPPING
    safe: bool = False
    row: Any = None
    error: str = ""
    reason: FailureReason | None = None
    log: list[str] = field(default_factory=list)

    def poll(self) -> S:
        return self.state

    def safe_to_free(self) -> bool:
        return self.safe

    def abort(self, reason: str = "") -> None:
        self.log.append(f"abort:{reason}")
        if self.state not in (S.SUCCESS, S.FAILED):
            self.state, self.error, self.reason = S.FAILED, reason, FailureReason.ABORTED

    def release(self) -> None:
        self.log.append("release")

    def result(self) -> Any:
        if self.row is None:
            raise ValueError("no row")
        return self.row

    def send(self, *args: Any) -> str:
        return "sent"


def test_one_rank_is_a_pass_through() -> None:
    sync = RankSync(None)
    room = LocalRoom(1)
    assert sync.track(room) is room
    sync.refresh()  # no group: nothing to call
    assert sync.exchange_inbox([b"x"]) == [b"x"]


def test_state_is_the_minimum_and_a_failure_elsewhere_aborts_here() -> None:
    tp = PeerGroup(1, peer_values=[int(S.TRANSFERRING), 0, int(S.FAILED), 1])
    sync = RankSync(tp)
    a, b = LocalRoom(1, S.SUCCESS), LocalRoom(2, S.TRANSFERRING)
    ha, hb = sync.track(a), sync.track(b)
    assert isinstance(ha, AgreedHandle) and ha.poll() == S.BOOTSTRAPPING and not ha.ready  # before any refresh
    sync.refresh()
    assert ha.poll() == S.TRANSFERRING and ha.ready  # succeeded here, still writing on the other rank
    assert hb.poll() == S.FAILED  # failed on the other rank only
    assert b.state == S.FAILED and b.log and b.log[0].startswith("abort:")  # so its peers stop writing here
    assert hb.reason is FailureReason.ABORTED and "another rank" in hb.error
    assert not hb.safe_to_free()  # unsafe here (0) although safe there (1)
    assert ha.send(1, 2) == "sent"  # writes are this rank's own


def test_pages_are_safe_only_when_safe_on_every_rank() -> None:
    tp = PeerGroup(0, peer_values=[int(S.FAILED), 1])
    sync = RankSync(tp)
    room = LocalRoom(7, S.FAILED, safe=False, reason=FailureReason.TIMED_OUT, error="timed out")
    h = sync.track(room)
    sync.refresh()
    assert h.poll() == S.FAILED and not h.safe_to_free()
    room.safe = True
    sync.refresh()
    assert h.safe_to_free() and h.reason is FailureReason.TIMED_OUT
    h.release()
    assert room.log == ["release"]
    tp.calls.clear()
    sync.refresh()  # released: nothing left to agree on, no collective
    assert tp.calls == []


def test_rank0_aux_result_reaches_every_rank() -> None:
    row = ("first-token", 0.5)
    leader = RankSync(PeerGroup(0, peer_values=[int(S.SUCCESS), 1]))
    follower = RankSync(PeerGroup(1, peer_values=[int(S.SUCCESS), 1], broadcast=[(0, row)]))
    h0 = leader.track(LocalRoom(3, S.SUCCESS, safe=True, row=row))
    h1 = follower.track(LocalRoom(3, S.SUCCESS, safe=True))  # decode ranks != 0 never read the aux row
    leader.refresh()
    follower.refresh()
    assert h0.result() == row and h1.result() == row
    calls = follower.tp.calls
    follower.refresh()  # already known: no second broadcast
    assert calls.count("broadcast") == 1


def test_a_scheduler_abort_is_failed_at_once_without_waiting_for_agreement() -> None:
    sync = RankSync(PeerGroup(0, peer_values=[int(S.WAITING_FOR_INPUT), 0]))
    room = LocalRoom(4, S.WAITING_FOR_INPUT)
    h = sync.track(room)
    sync.refresh()
    h.abort("aborted by client")
    assert h.poll() == S.FAILED and room.state == S.FAILED
