"""The two-batch-overlap split rule and child-batch metadata (engine/two_batch.py), against every worked example
of ../shared/research/tbo_cp.md §1.2, §1.5, §1.6 and §2.3 (§1.2's match SGLang's
`test_compute_split_seq_and_token_index`), a brute-force reference over random batches, and the CUDA-graph
replay counts. Pure Python: no torch in the module under test, no processes."""

from __future__ import annotations

import ast
import dataclasses
import math
import random
from pathlib import Path

import pytest

from engine import two_batch as tb
from engine.two_batch import (
    DECODE,
    EXTEND,
    IDLE,
    MIXED,
    SplitPoint,
    balanced_split_index,
    build_children,
    capture_split,
    midpoint_seq_index,
    plan_two_batch,
    replay_token_counts,
    split_point,
    two_chunk_enabled,
)

# §1.2 (SGLang's unit test, t = 0.48): extend_lens -> (split_seq, split_token, two_chunk)
EXTEND_TABLE = [
    ([], 0, 0, False),
    ([42], 0, 21, True),
    ([42, 999], 1, 520, True),
    ([999, 42], 0, 520, True),
    ([498, 502], 1, 498, False),
    ([4096] * 4, 2, 8192, False),
    ([4095, 4096, 4096, 4096, 1], 2, 8191, False),
    ([1, 4095, 4096, 4096, 4096], 3, 8192, False),
    ([4097, 4096, 4096, 4095, 1], 2, 8193, False),
    ([1, 1, 1, 1, 99999], 4, 50001, True),
    ([99999, 1, 1, 1, 1], 0, 50001, True),
    ([1, 1, 1], 2, 2, False),  # two-chunk wanted, refused by the degeneracy guard
    ([1], 0, 0, False),  # guard again: child A is empty
    # §2.3 rows not already above
    ([100, 2000], 1, 1050, True),
    ([4000], 0, 2000, True),
    ([2000, 2000], 1, 2000, False),
    ([300, 100, 50, 20], 0, 235, True),
    ([5, 5, 5, 5, 5, 1000], 5, 512, True),
    # Not in the research: SGLang's guard lets this two-chunk with a 0-token piece of sequence 1 in A (§2.4's
    # "robust implementation should fall back"); we fall back to the (equally good) sequence boundary.
    ([3, 3, 1], 1, 3, False),
]

# §2.3: (extend, prefix) -> child A (extend, prefix, seq_lens), child B (extend, prefix, seq_lens)
CHILD_TABLE = [
    ([100, 2000], [0, 0], ([100, 950], [0, 0], [100, 950]), ([1050], [950], [2000])),
    ([4000], [0], ([2000], [0], [2000]), ([2000], [2000], [4000])),
    ([2000, 2000], [0, 0], ([2000], [0], [2000]), ([2000], [0], [2000])),
    ([100, 2000], [0, 500], ([100, 950], [0, 500], [100, 1450]), ([1050], [1450], [2500])),
    ([1, 1, 1, 1, 99999], [0] * 5, ([1, 1, 1, 1, 49997], [0] * 5, [1, 1, 1, 1, 49997]), ([50002], [49997], [99999])),
    (
        [99999, 1, 1, 1, 1],
        [0] * 5,
        ([50001], [0], [50001]),
        ([49998, 1, 1, 1, 1], [50001, 0, 0, 0, 0], [99999, 1, 1, 1, 1]),
    ),
    ([300, 100, 50, 20], [0] * 4, ([235], [0], [235]), ([65, 100, 50, 20], [235, 0, 0, 0], [300, 100, 50, 20])),
    ([5, 5, 5, 5, 5, 1000], [0] * 6, ([5, 5, 5, 5, 5, 487], [0] * 6, [5, 5, 5, 5, 5, 487]), ([513], [487], [1000])),
    ([498, 502], [0, 0], ([498], [0], [498]), ([502], [0], [502])),
]


@pytest.mark.parametrize(("lens", "seq", "tok", "two_chunk"), EXTEND_TABLE)
@pytest.mark.parametrize("mode", [EXTEND, MIXED])
def test_extend_table(mode, lens, seq, tok, two_chunk):
    assert split_point(mode, lens, len(lens)) == SplitPoint(seq, tok, two_chunk)
    assert two_chunk_enabled(lens) is two_chunk


@pytest.mark.parametrize(
    ("bs", "tps", "seq", "tok"),
    [(7, 1, 3, 3), (100, 1, 50, 50), (99, 1, 49, 49), (0, 1, 0, 0), (1, 1, 0, 0), (7, 4, 3, 12)],  # last: verify
)
def test_decode_table(bs, tps, seq, tok):
    assert split_point(DECODE, None, bs, tokens_per_seq=tps) == SplitPoint(seq, tok)
    assert split_point(DECODE, [tps] * bs, bs, tokens_per_seq=tps) == SplitPoint(seq, tok)


def test_idle_gives_empty_children_even_with_pad_rows():
    assert split_point(IDLE, None, 0) == split_point(IDLE, [], 0) == SplitPoint(0, 0)
    plan = plan_two_batch(IDLE, [], [], num_rows=4, pad_multiple=4)
    a, b = plan.children
    assert (a.batch_size, a.num_rows, b.batch_size, b.num_rows) == (0, 0, 0, 4)
    assert plan.real_token_counts == (0, 0) and a.is_empty and b.is_empty
    assert plan.merge_rows() == (0, 1, 2, 3)


def test_engine_forward_mode_enum_accepted():
    from engine.batch import ForwardMode

    lens = [100, 2000]
    assert (
        split_point(ForwardMode.MIXED, lens, 2) == split_point(ForwardMode.EXTEND, lens, 2) == SplitPoint(1, 1050, True)
    )
    assert split_point(ForwardMode.DECODE, None, 6) == SplitPoint(3, 3)
    assert tb.split_mode(ForwardMode.MIXED) == EXTEND


@pytest.mark.parametrize(("lens", "prefix", "want_a", "want_b"), CHILD_TABLE)
@pytest.mark.parametrize("mode", [EXTEND, MIXED])
def test_child_table(mode, lens, prefix, want_a, want_b):
    plan = plan_two_batch(mode, prefix, lens)
    for child, (ext, pre, seq_lens) in zip(plan.children, (want_a, want_b), strict=True):
        assert (list(child.extend_lens), list(child.prefix_lens), list(child.seq_lens)) == (ext, pre, seq_lens)
        assert child.extend_start_loc == tuple([0, *list(_cumsum(ext))[:-1]])


def test_issue_case_1_token_ranges():
    a, b = plan_two_batch(EXTEND, [0, 0], [100, 2000]).children
    assert (a.token_start, a.token_end, b.token_start, b.token_end) == (0, 1050, 1050, 2100)
    assert (a.seq_start, a.seq_end, b.seq_start, b.seq_end) == (0, 2, 1, 2)  # bs_A + bs_B = bs + 1


def test_padded_parent_example():
    # §1.5: lens [300, 200, 250, 260], attn_tp 4, parent padded to 1012: pad rows land in B.
    plan = plan_two_batch(EXTEND, [0] * 4, [300, 200, 250, 260], num_rows=1012, pad_multiple=4)
    a, b = plan.children
    assert plan.split == SplitPoint(2, 500)
    assert (a.seq_start, a.seq_end, a.token_start, a.token_end, a.padded_len) == (0, 2, 0, 500, 500)
    assert (b.seq_start, b.seq_end, b.token_start, b.token_end, b.padded_len) == (2, 4, 500, 1012, 512)
    assert plan.real_token_counts == (500, 510)
    assert b.extend_start_loc == (0, 250)  # rebased: SGLang's sliced values would be (500, 750)


def test_child_padding_rows_map_both_ways():
    plan = plan_two_batch(EXTEND, [0, 0], [3, 6], 0.0, pad_multiple=4)  # split (1, 3): A 3 rows -> 4, B 6 -> 8
    assert plan.child_rows() == (0, 1, 2, -1, 3, 4, 5, 6, 7, 8, -1, -1)
    assert plan.merge_rows() == (0, 1, 2, 4, 5, 6, 7, 8, 9)


@pytest.mark.parametrize(
    ("graph_bs", "tps", "n_real", "want"),
    [(8, 1, 5, (4, 1)), (8, 1, 3, (3, 0)), (8, 4, 20, (16, 4)), (8, 1, 8, (4, 4)), (8, 1, 0, (0, 0))],
)
def test_graph_replay_examples(graph_bs, tps, n_real, want):
    # §1.6: graph bs 8 with 5 / 3 real decodes; TARGET_VERIFY draft 4 with 5 real requests (20 tokens).
    assert replay_token_counts(graph_bs, n_real, DECODE, tps) == want


def test_graph_replay_idle_uses_decode_tokens_per_seq():
    # SGLang takes tokens-per-seq from the unmapped IDLE mode (0) and would divide by zero (§1.6).
    assert replay_token_counts(8, 0, IDLE) == (0, 0)
    assert capture_split(8) == SplitPoint(4, 4)
    with pytest.raises(ValueError):
        replay_token_counts(8, 1, IDLE)


@pytest.mark.parametrize(
    "call",
    [
        lambda: split_point(EXTEND, [1, 2], 2, threshold=0.51),
        lambda: split_point(EXTEND, [1, 2], 2, threshold=-0.1),
        lambda: split_point(EXTEND, [1, 2], 2, threshold=math.nan),
        lambda: split_point(EXTEND, None, 2),
        lambda: split_point(EXTEND, [1, 2], 3),
        lambda: split_point(EXTEND, [1, -2], 2),
        lambda: split_point("draft_extend", [1, 2], 2),
        lambda: split_point(IDLE, None, 1),
        lambda: split_point(DECODE, None, 4, tokens_per_seq=0),
        lambda: capture_split(7),
        lambda: capture_split(0),
        lambda: replay_token_counts(8, 9),
        lambda: replay_token_counts(8, -1),
        lambda: replay_token_counts(8, 4, EXTEND),
        lambda: build_children(SplitPoint(1, 4), [0, 0], [3, 6]),  # not a boundary
        lambda: build_children(SplitPoint(1, 3, True), [0, 0], [3, 6]),  # cuts nothing
        lambda: build_children(SplitPoint(1, 9, True), [0, 0], [3, 6]),  # past the sequence
        lambda: build_children(SplitPoint(1, 3), [0], [3, 6]),
        lambda: build_children(SplitPoint(1, 3), [0, 0], [3, 6], num_rows=8),
        lambda: plan_two_batch(DECODE, [0, 0], [1, 2]),
    ],
)
def test_invalid_input_rejected(call):
    with pytest.raises(ValueError):
        call()


def test_threshold_zero_disables_and_half_is_allowed():
    assert split_point(EXTEND, [100, 2000], 2, threshold=0.0) == SplitPoint(1, 100)
    assert split_point(EXTEND, [4000], 1, threshold=0.0) == SplitPoint(0, 0)
    assert split_point(EXTEND, [498, 502], 2, threshold=0.5) == SplitPoint(1, 500, True)


def test_check_catches_broken_plan():
    plan = plan_two_batch(EXTEND, [0, 0], [100, 2000])
    a, b = plan.children
    for broken in (
        dataclasses.replace(plan, children=(dataclasses.replace(a, token_end=1051), b)),
        dataclasses.replace(plan, children=(a, dataclasses.replace(b, prefix_lens=(900,)))),
        dataclasses.replace(plan, children=(a, dataclasses.replace(b, padded_len=1000))),
    ):
        with pytest.raises(AssertionError):
            broken.check()


def test_module_imports_no_torch():
    tree = ast.parse(Path(tb.__file__).read_text(encoding="utf-8"))
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {m for m in names if m.split(".")[0] in {"torch", "engine"}}


# ---- properties over random batches ---------------------------------------------------------------------------


def _cumsum(xs):
    total = 0
    for x in xs:
        total += x
        yield total


def _ref_split(lens, t):
    """The appendix formulas, with a brute-force balanced split (global minimum, later index on ties)."""
    total, n = sum(lens), len(lens)
    v = max(range(1, n), key=lambda i: (-abs(2 * sum(lens[:i]) - total), i), default=0)
    half = total // 2
    cut = next((i for i in range(n) if sum(lens[: i + 1]) > half), 0)
    left = sum(lens[:v])
    wanted = t > 0 and n > 0 and (left < total * t or left > total * (1 - t))
    two = wanted and cut + 1 <= half and half > sum(lens[:cut])
    return SplitPoint(cut, half, True) if two else SplitPoint(v, left)


def _ref_children(prefix, lens, tok, num_rows):
    """Token by token: which child each parent token lands in, grouped back into per-child sequences."""
    seqs = ({}, {})  # child -> {parent seq: [prefix, extend]}
    flat = [(s, k) for s, n in enumerate(lens) for k in range(n)]
    for i, (s, k) in enumerate(flat):
        entry = seqs[i >= tok].setdefault(s, [prefix[s] + k, 0])
        entry[1] += 1
    return seqs, [len(flat[:tok]), num_rows - tok]


def _random_lens(rng):
    bs = rng.choice([0, 1, 1, 2, 2, 3, 4, 5, 8])
    kind = rng.choice(["small", "mixed", "skewed", "equal"])
    if kind == "small":
        return [rng.randint(1, 4) for _ in range(bs)]
    if kind == "equal":
        return [rng.randint(1, 3000)] * bs
    if kind == "skewed":
        return [rng.randint(1, 50) if rng.random() < 0.7 else rng.randint(1000, 9000) for _ in range(bs)]
    # MIXED-like: a prefill chunk or two among length-1 decodes
    return [rng.randint(2, 4000) if rng.random() < 0.3 else 1 for _ in range(bs)]


def _random_case(rng):
    lens = _random_lens(rng)
    prefix = [rng.choice([0, 0, rng.randint(1, 3000)]) for _ in lens]
    t = rng.choice([0.0, 0.48, 0.48, 0.5, rng.uniform(0, 0.5)])
    num_rows = sum(lens) + rng.choice([0, 0, rng.randint(1, 7)])
    return lens, prefix, t, num_rows, rng.choice([1, 1, 2, 4])


@pytest.mark.parametrize("seed", range(8))
def test_random_batches_match_reference(seed):
    rng = random.Random(seed)
    for _ in range(300):
        lens, prefix, t, num_rows, mult = _random_case(rng)
        split = split_point(EXTEND, lens, len(lens), t)
        assert split == _ref_split(lens, t) == split_point(MIXED, lens, len(lens), t)
        assert balanced_split_index(lens) == _ref_split(lens, 0.0).seq_index
        assert midpoint_seq_index(lens) == next((i for i in range(len(lens)) if sum(lens[: i + 1]) > sum(lens) // 2), 0)
        plan = plan_two_batch(EXTEND, prefix, lens, t, num_rows, mult)
        assert plan == plan_two_batch(MIXED, prefix, lens, t, num_rows, mult)
        _check_against_reference(plan, prefix, lens, num_rows)
        _check_rows(plan, mult)
        _check_nonempty(plan, lens, t)


def _check_against_reference(plan, prefix, lens, num_rows):
    seqs, real_rows = _ref_children(prefix, lens, plan.split.token_index, num_rows)
    parent_positions = tuple(p + k for p, n in zip(prefix, lens, strict=True) for k in range(n))
    positions = ()
    for child, ref in zip(plan.children, seqs, strict=True):
        ref_seqs = sorted(s for s in ref if ref[s][1] > 0)
        assert list(range(child.seq_start, child.seq_end)) == ref_seqs
        assert [list(x) for x in zip(child.prefix_lens, child.extend_lens, strict=True)] == [ref[s] for s in ref_seqs]
        # Start locations are child-local: sequence j's rows are [start_j, start_j + ext_j), back to back from 0.
        ends = tuple(s + n for s, n in zip(child.extend_start_loc, child.extend_lens, strict=True))
        assert (0, *ends)[:-1] == child.extend_start_loc and ends[-1:] in ((), (child.num_real_tokens,))
        positions += child.positions
    assert positions == parent_positions
    assert [c.num_rows for c in plan.children] == real_rows
    cut = plan.cut_seq
    a, b = plan.children
    if cut is None:
        assert a.seq_end == b.seq_start
        return
    # The cut sequence: last in A, first in B, its parts cover it and B's extends A's.
    assert a.seq_end - 1 == b.seq_start == cut
    assert a.extend_lens[-1] + b.extend_lens[0] == lens[cut] and min(a.extend_lens[-1], b.extend_lens[0]) > 0
    assert a.prefix_lens[-1] == prefix[cut] and b.prefix_lens[0] == prefix[cut] + a.extend_lens[-1]
    assert b.seq_lens[0] == prefix[cut] + lens[cut]
    assert abs(a.num_real_tokens - b.num_real_tokens) <= 1  # the point of two-chunk


def _check_rows(plan, mult):
    rows = plan.child_rows()
    assert [r for r in rows if r >= 0] == list(range(plan.num_rows))  # children's ranges partition the parent
    assert all(c.padded_len % mult == 0 and c.num_rows <= c.padded_len < c.num_rows + mult for c in plan.children)
    merge = plan.merge_rows()
    assert [rows[m] for m in merge] == list(range(plan.num_rows))
    assert plan.real_token_counts == tb.real_token_counts(plan.split.token_index, plan.num_tokens)


def _check_nonempty(plan, lens, t):
    # Documented empties: B only when there is no sequence; A when at most one sequence and no two-chunk
    # (`[]`, `[1]`, or one sequence with two-chunk disabled by threshold 0).
    a, b = plan.children
    assert b.is_empty == (not lens)
    assert a.is_empty == (len(lens) <= 1 and not plan.split.two_chunk)
    if len(lens) == 1:
        assert a.is_empty == (lens[0] < 2 or t == 0)


@pytest.mark.parametrize("seed", range(4))
def test_random_decode_batches(seed):
    rng = random.Random(100 + seed)
    for _ in range(200):
        bs = rng.randint(0, 64)
        prefix = [rng.randint(1, 5000) for _ in range(bs)]
        mult = rng.choice([1, 2])
        plan = plan_two_batch(DECODE, prefix, [1] * bs, num_rows=bs + rng.randint(0, 3), pad_multiple=mult)
        a, b = plan.children
        assert (a.batch_size, b.batch_size) == (bs // 2, bs - bs // 2)
        assert a.prefix_lens + b.prefix_lens == tuple(prefix)
        assert (a.is_empty, b.is_empty) == (bs <= 1, bs == 0)
        _check_rows(plan, mult)


@pytest.mark.parametrize("tps", [1, 2, 4])
def test_graph_replay_counts_property(tps):
    rng = random.Random(tps)
    for graph_bs in range(2, 130, 2):
        split = capture_split(graph_bs, tps)
        slices = (split.token_index, graph_bs * tps - split.token_index)
        assert slices[0] > 0 and slices[1] > 0  # both captured children have rows
        for n_real in {0, 1, graph_bs * tps, rng.randint(0, graph_bs * tps)}:
            counts = replay_token_counts(graph_bs, n_real, DECODE, tps)
            assert sum(counts) == n_real
            assert counts[0] <= slices[0] and counts[1] <= slices[1]
            assert counts[1] == 0 or counts[0] == slices[0]  # real tokens come first: A fills before B
