"""The DP-attention step agreement (engine/dp_attention.py), pure: tbo_cp.md §1.4's examples with its fixes (MIXED
agrees with EXTEND, IDLE ranks left out of the mode vote, all-idle runs nothing), the report codec, and the row
counts the MLP gathers."""

from __future__ import annotations

import random

import pytest

from engine.dp_attention import DPTokens, RankStep, agree_step, idle_step, local_step

E, M, D = "extend", "mixed", "decode"


def ext(n: int, can: bool = True) -> RankStep:
    return local_step(E, n, (n // 2, n - n // 2) if can else None, True)


@pytest.mark.parametrize(
    ("steps", "tbo", "run_tbo", "mode"),
    [
        # §1.4, DP=4: an idle rank does not block its peers' prefill overlap (it runs two empty children)
        ([ext(8), ext(8), idle_step(False), ext(8)], True, True, E),
        # prefill and decode disagree: no overlap anywhere
        ([local_step(D, 4, (2, 2), True), ext(8), local_step(D, 4, (2, 2), True)], True, False, None),
        # one rank cannot split: no overlap anywhere
        ([ext(8), ext(8), ext(8, can=False), ext(8)], True, False, E),
        # all idle: no overlap, and no forward at all
        ([idle_step(False)] * 4, True, False, None),
        # MIXED is EXTEND's family (SGLang compares raw modes and vetoes here)
        ([local_step(M, 9, (4, 5), True), ext(8)], True, True, E),
        # overlap off: never
        ([ext(8), ext(8)], False, False, E),
    ],
)
def test_agreement_follows_the_rules(steps, tbo, run_tbo, mode):
    for rank in range(len(steps)):
        plan = agree_step(steps, rank, tbo)
        assert (plan.run_tbo, plan.global_mode) == (run_tbo, mode)
        assert plan.idle_all == all(s.num_tokens == 0 for s in steps)
        assert plan.is_idle == (steps[rank].num_tokens == 0 and not plan.idle_all)


def test_children_carry_every_ranks_counts_and_idle_children_are_empty():
    steps = [ext(10), idle_step(True), local_step(M, 7, (3, 4), False)]
    plan = agree_step(steps, 1, True)
    assert plan.run_tbo and plan.is_idle and plan.any_work
    assert plan.tokens == DPTokens((10, 0, 7), 1)
    assert plan.child_tokens(0).counts == (5, 0, 3) and plan.child_tokens(1).counts == (5, 0, 4)
    with pytest.raises(ValueError, match="does not run two-batch overlap"):
        agree_step(steps, 0, False).child_tokens(0)


def test_reports_round_trip_and_bad_ones_are_refused():
    rnd = random.Random(3)
    for _ in range(200):
        n = rnd.randint(1, 500)
        a = rnd.randint(0, n)
        step = local_step(rnd.choice([E, M, D]), n, (a, n - a) if rnd.random() < 0.5 else None, rnd.random() < 0.5)
        assert RankStep.decode(step.encode()) == step
    with pytest.raises(ValueError, match="bad DP step report"):
        RankStep.decode([1, 9, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="do not partition"):
        local_step(E, 10, (3, 3), True)
    with pytest.raises(ValueError, match="at least one token"):
        local_step(E, 0, None, True)


def test_token_offsets_index_each_ranks_rows():
    t = DPTokens((3, 0, 5, 2), 2)
    assert (t.local, t.max, t.total, t.offset) == (5, 5, 10, 3)
    with pytest.raises(ValueError):
        DPTokens((1, 2), 2)
