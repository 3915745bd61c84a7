"""Data-parallel attention (DP attention): what the ranks agree on before every forward. Pure (no torch).

Layout (`--dp-size N --enable-dp-attention --tp-size N`): N ranks in one group. Attention, the embedding and the LM
head are replicated: each rank holds every head and runs attention for its own requests over its own KV pool, with
its own scheduler queue. The MLP is tensor-parallel over the same N ranks: before it every rank gathers every rank's
tokens, computes its slice of the intermediate for all of them, and the partial sums are reduced and each rank keeps
its own rows (engine/models/parallel_layers.py: `DataParallelMLP`). So every layer of every forward is two
collectives on every rank, whatever the rank's own batch holds, and the ranks must run their forwards in lockstep.

Once per step each rank reports a `RankStep` (its token count, its forward mode, whether it can split for two-batch
overlap and into which token counts, whether it still has requests) and one all-gather gives every rank every
rank's report; `agree_step` turns them into the same `DPStepPlan` everywhere (tbo_cp.md §1.4, with its fixes):

* no rank has tokens: nobody runs a forward this step (`idle_all`);
* a rank without tokens runs an IDLE forward: zero rows, the same collectives as the others' forwards;
* modes are compared by split family (MIXED counts as EXTEND, so a MIXED rank does not veto its EXTEND peers), and
  IDLE ranks are left out of the comparison (an idle rank must not block its peers' overlap);
* two-batch overlap runs when it is on, every rank can split, and the non-idle ranks agree on the family; then each
  child runs with the children's token counts of every rank (an IDLE rank's children are both empty).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.two_batch import DECODE, EXTEND, IDLE, TwoBatchPlan, split_mode

_MODE_CODES = {IDLE: 0, EXTEND: 1, DECODE: 2}
_MODES_BY_CODE = {v: k for k, v in _MODE_CODES.items()}
ROW_LEN = 6  # ints per rank in the step's all-gather


@dataclass(frozen=True)
class DPTokens:
    """How many rows each rank contributes to one (micro-)batch's MLP, and which rank this is."""

    counts: tuple[int, ...]
    rank: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < len(self.counts) or min(self.counts) < 0:
            raise ValueError(f"bad DP token counts {self.counts} for rank {self.rank}")

    @property
    def local(self) -> int:
        return self.counts[self.rank]

    @property
    def max(self) -> int:
        """Rows every rank pads its share to for the all-gather (ranks gather equal shapes)."""
        return max(self.counts)

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def offset(self) -> int:
        """This rank's first row among all ranks' real rows, in rank order."""
        return sum(self.counts[: self.rank])


@dataclass(frozen=True)
class RankStep:
    """What one rank reports before a step."""

    num_tokens: int
    mode: str  # split family: EXTEND (MIXED included), DECODE or IDLE
    can_tbo: bool
    child_tokens: tuple[int, int]  # A's and B's tokens when it splits ((0, 0) otherwise)
    has_work: bool  # requests still waiting or running on this rank

    def encode(self) -> list[int]:
        return [self.num_tokens, _MODE_CODES[self.mode], int(self.can_tbo), *self.child_tokens, int(self.has_work)]

    @classmethod
    def decode(cls, row: Sequence[int]) -> RankStep:
        if len(row) != ROW_LEN or row[1] not in _MODES_BY_CODE:
            raise ValueError(f"bad DP step report {list(row)}")
        return cls(int(row[0]), _MODES_BY_CODE[row[1]], bool(row[2]), (int(row[3]), int(row[4])), bool(row[5]))


def idle_step(has_work: bool) -> RankStep:
    """The report of a rank with nothing to run this step: it can always take part in an overlapped step."""
    return RankStep(0, IDLE, True, (0, 0), has_work)


def local_step(mode: object, num_tokens: int, child_tokens: tuple[int, int] | None, has_work: bool) -> RankStep:
    """The report of a rank with a batch: `child_tokens` is its split when two-batch overlap is on, else None."""
    if num_tokens < 1:
        raise ValueError("a batch has at least one token; report an idle step instead")
    if child_tokens is not None and sum(child_tokens) != num_tokens:
        raise ValueError(f"children {child_tokens} do not partition {num_tokens} tokens")
    return RankStep(num_tokens, split_mode(mode), child_tokens is not None, child_tokens or (0, 0), has_work)


@dataclass(frozen=True)
class DPStepPlan:
    """What every rank agreed on for one step (identical on every rank but for `rank`)."""

    steps: tuple[RankStep, ...]
    rank: int
    run_tbo: bool
    global_mode: str | None  # the non-idle ranks' family when they agree, else None
    # this rank's own two-batch split (the one its report's child counts came from; None: no batch, or TBO off)
    split: TwoBatchPlan | None = field(default=None, compare=False)

    @property
    def idle_all(self) -> bool:
        """No rank has tokens: no forward runs anywhere this step."""
        return all(s.num_tokens == 0 for s in self.steps)

    @property
    def any_work(self) -> bool:
        """Some rank still had requests when the step began."""
        return any(s.has_work for s in self.steps)

    @property
    def is_idle(self) -> bool:
        """This rank runs an IDLE forward (no tokens) while another rank runs a batch."""
        return self.steps[self.rank].num_tokens == 0 and not self.idle_all

    @property
    def tokens(self) -> DPTokens:
        return DPTokens(tuple(s.num_tokens for s in self.steps), self.rank)

    def child_tokens(self, child: int) -> DPTokens:
        """Every rank's token count of micro-batch `child` (0: A, 1: B); only when the step runs overlapped."""
        if not self.run_tbo:
            raise ValueError("the step does not run two-batch overlap")
        return DPTokens(tuple(s.child_tokens[child] for s in self.steps), self.rank)


def agree_step(
    steps: Sequence[RankStep], rank: int, tbo_enabled: bool, split: TwoBatchPlan | None = None
) -> DPStepPlan:
    """Every rank's report → the step's plan (module docstring). `split`: this rank's split, kept on the plan."""
    if not steps or not 0 <= rank < len(steps):
        raise ValueError(f"rank {rank} outside the {len(steps)} reports")
    modes = {s.mode for s in steps if s.mode != IDLE}
    global_mode = modes.pop() if len(modes) == 1 else None
    run_tbo = tbo_enabled and global_mode is not None and all(s.can_tbo for s in steps)
    return DPStepPlan(tuple(steps), rank, run_tbo, global_mode, split)


__all__ = ["ROW_LEN", "DPStepPlan", "DPTokens", "RankStep", "agree_step", "idle_step", "local_step"]
