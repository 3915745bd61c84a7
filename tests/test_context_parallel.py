"""The zigzag metadata of context-parallel prefill (engine/context_parallel.py), against the worked examples
of ../shared/research/tbo_cp.md §3.5, a token-by-token reference over random batches, and the two padding bugs
of §3.6. Pure Python: no torch, no processes."""

from __future__ import annotations

import dataclasses
import random

import pytest

from engine.context_parallel import (
    block_lens,
    can_split,
    causal_work,
    contiguous_work,
    imbalance,
    split_refusal,
    zigzag_split,
    zigzag_work,
)


def plans(prefix, ext, cp, num_tokens=None):
    return [zigzag_split(prefix, ext, cp, r, num_tokens) for r in range(cp)]


def split_list(plan):
    """SGLang's `split_list`: every sequence's block sizes, in sequence order."""
    return [n for blk in plan.blocks for n in blk]


def zigzag_index(plan):
    """SGLang's `zigzag_index`: the positions in `split_list` of this rank's pieces, in local order."""
    return [s * 2 * plan.cp_size + b for s, b in plan.local_blocks]


def reverse_index(all_plans):
    """SGLang's block-level `cp_reverse_index`: for each block in natural order, its piece in the gathered order."""
    gathered = [piece for p in all_plans for piece in p.local_blocks]
    return [gathered.index((s, b)) for s in range(all_plans[0].num_seqs) for b in range(2 * all_plans[0].cp_size)]


def all_gather(all_plans):
    """What the all-gather of every rank's padded share yields when each row carries its flat token index;
    all-gather pad rows carry None."""
    out = []
    for p in all_plans:
        out += list(p.token_indices) + [None] * (p.share_size - len(p.token_indices))
    return out


# ---------------------------------------------------------------------------------------------------------------
# tbo_cp.md §3.5, examples A–D. Every expected number in EXAMPLES is copied from the doc, except where a comment
# says it is derived (the doc states it in other words, or for SGLang's behaviour where ours deliberately differs).

EXAMPLES = {
    # A. bs=1, L=16, cp=4: blocks of 2; rank r owns b_r and b_{7−r}; 4 tokens per rank; kv_prev/kv_next
    # 2/16, 4/14, 6/12, 8/10; cp_reverse_index [0,2,4,6,7,5,3,1].
    "A": dict(
        prefix=[0], ext=[16], cp=4, num_tokens=None,
        blocks=[[2] * 8],
        per_rank=[4, 4, 4, 4],
        ranks=[
            dict(zigzag=[0, 7], kv_prev=[2], kv_next=[16]),
            dict(zigzag=[1, 6], kv_prev=[4], kv_next=[14]),
            dict(zigzag=[2, 5], kv_prev=[6], kv_next=[12]),
            dict(zigzag=[3, 4], kv_prev=[8], kv_next=[10]),
        ],
        reverse=[0, 2, 4, 6, 7, 5, 3, 1],
    ),
    # B. bs=2, cp=2, extend [9,10], prefix [2,3] (seq_lens [11,13]), no pad.
    "B": dict(
        prefix=[2, 3], ext=[9, 10], cp=2, num_tokens=None,
        blocks=[[3, 2, 2, 2], [3, 3, 2, 2]],
        per_rank=[10, 9], max_rank_len=10,
        ranks=[
            dict(zigzag=[0, 4, 3, 7], q_prev=[3, 3], q_next=[2, 2], kv_prev=[5, 6], kv_next=[11, 13],
                 cu_prev=[0, 3, 6], cu_next=[0, 2, 4], tokens=[0, 1, 2, 9, 10, 11, 7, 8, 17, 18]),
            dict(zigzag=[1, 5, 2, 6], q_prev=[2, 3], q_next=[2, 2], kv_prev=[7, 9], kv_next=[9, 11],
                 tokens=[3, 4, 12, 13, 14, 5, 6, 15, 16]),
        ],
        reverse_split_len=[3, 3, 2, 2, 2, 3, 2, 2],
        reverse=[0, 4, 6, 2, 1, 5, 7, 3],
    ),
    # C. B padded to kv_len=20. The doc's numbers are SGLang's (pad folded into seq 1: blocks [3,3,3,2],
    # per_rank [10,10], rank0 kv_next [11,14], rank1 kv_next [9,12], q_next [2,3]) and are bug 2. Ours, by
    # design, are B's exactly (derived: the pad token belongs to nobody), checked again in the bug-2 test.
    "C": dict(
        prefix=[2, 3], ext=[9, 10], cp=2, num_tokens=20,
        blocks=[[3, 2, 2, 2], [3, 3, 2, 2]],
        per_rank=[10, 9], max_rank_len=10,
        ranks=[
            dict(zigzag=[0, 4, 3, 7], q_prev=[3, 3], q_next=[2, 2], kv_prev=[5, 6], kv_next=[11, 13],
                 tokens=[0, 1, 2, 9, 10, 11, 7, 8, 17, 18]),
            dict(zigzag=[1, 5, 2, 6], q_prev=[2, 3], q_next=[2, 2], kv_prev=[7, 9], kv_next=[9, 11],
                 tokens=[3, 4, 12, 13, 14, 5, 6, 15, 16]),
        ],
        reverse=[0, 4, 6, 2, 1, 5, 7, 3],
    ),
    # D. bs=2, cp=2, ext [5,5] (no prefix given; 0): blocks [2,1,1,1] each, per_rank [6,4], so the all-gather
    # pads to 6, not ceil(10/2) = 5.
    "D": dict(
        prefix=[0, 0], ext=[5, 5], cp=2, num_tokens=None,
        blocks=[[2, 1, 1, 1], [2, 1, 1, 1]],
        per_rank=[6, 4], max_rank_len=6,
        ranks=[],
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_worked_example(name):
    ex = EXAMPLES[name]
    ps = plans(ex["prefix"], ex["ext"], ex["cp"], ex["num_tokens"])
    for p in ps:
        assert [list(b) for b in p.blocks] == ex["blocks"]
        assert split_list(p) == [n for b in ex["blocks"] for n in b]
        assert list(p.rank_token_counts) == ex["per_rank"]
        assert p.share_size == ex.get("max_rank_len", max(ex["per_rank"]))
    for p, want in zip(ps, ex["ranks"], strict=False):
        assert zigzag_index(p) == want["zigzag"]
        assert list(p.kv_lens_prev) == want["kv_prev"] and list(p.kv_lens_next) == want["kv_next"]
        if "q_prev" in want:
            assert list(p.q_lens_prev) == want["q_prev"] and list(p.q_lens_next) == want["q_next"]
        if "cu_prev" in want:
            assert list(p.cu_seqlens_q_prev) == want["cu_prev"] and list(p.cu_seqlens_q_next) == want["cu_next"]
        if "tokens" in want:
            assert list(p.token_indices) == want["tokens"]
    if "reverse_split_len" in ex:
        assert [p.blocks[s][b] for p in ps for s, b in p.local_blocks] == ex["reverse_split_len"]
    if "reverse" in ex:
        assert reverse_index(ps) == ex["reverse"]
    # The doc's "gather restores 0..N−1" (verified for B), for every example.
    gathered = all_gather(ps)
    assert [gathered[i] for i in ps[0].restore_index] == list(range(sum(ex["ext"])))


def test_example_a_equal_work():
    # Doc: kv_prev + kv_next = 18 on every rank; a contiguous split gives 2, 4, ..., 16 per block.
    ps = plans([0], [16], 4)
    assert {p.kv_lens_prev[0] + p.kv_lens_next[0] for p in ps} == {18}
    assert len(set(zigzag_work([0], [16], 4))) == 1
    assert imbalance(contiguous_work([0], [16], 4)) > 3


def test_example_b_restore_index():
    # Derived from the doc's local token ids and max_rank_len 10: rank 0's rows 0..9, rank 1's rows 10..18
    # (row 19 is rank 1's all-gather pad).
    rows = {t: i for i, t in enumerate([0, 1, 2, 9, 10, 11, 7, 8, 17, 18])}
    rows |= {t: 10 + i for i, t in enumerate([3, 4, 12, 13, 14, 5, 6, 15, 16])}
    assert list(zigzag_split([2, 3], [9, 10], 2, 1).restore_index) == [rows[t] for t in range(19)]


def test_example_e_too_short():
    # Doc: cp=4, ext [100, 7]: 7 < 2·cp = 8 leaves an empty block, the batch falls back to non-CP prefill.
    assert block_lens(7, 8) == (1, 1, 1, 1, 1, 1, 1, 0)
    assert not can_split([100, 7], 4) and split_refusal([100, 7], 4) == "short_sequence"
    with pytest.raises(ValueError, match="short_sequence"):
        zigzag_split([0, 0], [100, 7], 4, 0)
    assert can_split([100, 8], 4)


def test_eligibility():
    assert split_refusal([64], 1) == "cp_off"
    assert split_refusal([], 2) == "empty"
    assert split_refusal([64, 64], 2, "mixed") == "mode" and split_refusal([64], 2, "decode") == "mode"
    assert can_split([4, 4], 2, "extend")

    class Mode:  # stands in for engine.batch.ForwardMode, compared by value
        def __init__(self, value):
            self.value = value

    assert can_split([4], 2, Mode("extend")) and not can_split([4], 2, Mode("mixed"))


# ---------------------------------------------------------------------------------------------------------------
# §3.6: the two bugs SGLang's reviewers found, on the inputs that triggered them.


def test_bug1_prefix_from_unpadded_lengths():
    # PR #23415: prefix 1, extend 3670, cp 4, the flat batch padded to 3672 (a multiple of 2·cp). SGLang derived
    # prefix = max(seq_len − padded kv_len, 0) = max(3671 − 3672, 0) = 0, so every query missed the cached token.
    prefix, ext, padded = [1], [3670], 3672
    ps = plans(prefix, ext, 4, num_tokens=padded)
    for p in ps:
        assert p.prefix_lens == (1,)
        assert list(p.pad_token_indices) == [3670, 3671]
        # Every query's causal reach includes the cached token: the first new token sits at position 1 and
        # each block's kv length is 1 + the new tokens up to its end.
        assert p.kv_lens_prev[0] == 1 + sum(p.blocks[0][: p.rank + 1])
        assert p.kv_lens_next[0] == 1 + sum(p.blocks[0][: 8 - p.rank])
    assert ps[0].positions[0] == 1 and ps[0].kv_lens_next == (3671,)
    # Padding changes nothing but the flat length.
    assert [dataclasses.replace(p, num_tokens=3670) for p in ps] == plans(prefix, ext, 4)


def test_bug2_kv_lengths_never_exceed_pages():
    # Example C: seq_lens [11, 13], flat batch padded to 20. SGLang folded the pad into seq 1 and gave rank 0
    # kv_next[1] = 14 > seq_lens.max() = 13: the kernel read column 13 of a 13-wide page table.
    prefix, ext, seq_lens = [2, 3], [9, 10], [11, 13]
    ps = plans(prefix, ext, 2, num_tokens=20)
    for p in ps:
        assert max(p.kv_lens_prev + p.kv_lens_next) <= max(seq_lens)
        assert all(kv <= s for kv, s in zip(p.kv_lens_next, seq_lens, strict=True))
        assert p.blocks[1] == (3, 3, 2, 2)  # not SGLang's padded [3,3,3,2]
        assert 19 not in p.token_indices and 19 not in p.restore_index
    assert ps[0].kv_lens_next == (11, 13) and ps[1].q_lens_next == (2, 2)
    # A lot of padding (a whole block's worth, per rank) still reaches no sequence.
    for p in plans(prefix, ext, 2, num_tokens=64):
        assert p.kv_lens_next == plans(prefix, ext, 2)[p.rank].kv_lens_next
        assert sum(p.rank_token_counts) == 19


def test_check_catches_a_bad_plan():
    p = zigzag_split([2, 3], [9, 10], 2, 0)
    for bad in (
        dict(kv_lens_next=(11, 14)),  # bug 2: beyond seq 1's pages
        dict(kv_lens_prev=(4, 6)),  # bug 1 shape: prefix lost, positions no longer match
        dict(share_size=9),  # padded to less than the largest share
        dict(token_indices=(*p.token_indices[:-1], 19)),  # a pad token on a rank
    ):
        with pytest.raises(AssertionError):
            dataclasses.replace(p, **bad).check()


# ---------------------------------------------------------------------------------------------------------------
# Random batches against a token-by-token reference.


def reference(prefix, ext, cp):
    """Per rank: the flat indices and positions it owns in local order, and its causal work, assigned one
    token at a time (block of token j = the block whose cumulative range holds j)."""
    num_blocks = 2 * cp
    owned = [[] for _ in range(cp)]  # (is_next, seq, flat index, position)
    start = 0
    for s, (p, e) in enumerate(zip(prefix, ext, strict=True)):
        bounds = [sum(block_lens(e, num_blocks)[: b + 1]) for b in range(num_blocks)]
        for j in range(e):
            b = next(i for i, end in enumerate(bounds) if j < end)
            rank, is_next = (b, 0) if b < cp else (num_blocks - 1 - b, 1)
            owned[rank].append((is_next, s, start + j, p + j))
        start += e
    for o in owned:
        o.sort()
    return (
        [[t for _, _, t, _ in o] for o in owned],
        [[pos for _, _, _, pos in o] for o in owned],
        [sum(pos + 1 for _, _, _, pos in o) for o in owned],
    )


def random_batch(rng):
    cp = rng.choice([2, 2, 3, 4, 4, 8])
    bs = rng.randint(1, 6)
    ext = [rng.choice([2 * cp, 2 * cp + 1, rng.randint(2 * cp, 300)]) for _ in range(bs)]
    prefix = [rng.choice([0, 0, 1, rng.randint(0, 500)]) for _ in range(bs)]
    pad = rng.choice([0, 0, 1, rng.randint(0, 4 * cp)])
    return prefix, ext, cp, sum(ext) + pad


@pytest.mark.parametrize("seed", range(4))
def test_random_batches(seed):
    rng = random.Random(seed)
    for _ in range(100):
        prefix, ext, cp, num_tokens = random_batch(rng)
        ps = plans(prefix, ext, cp, num_tokens)
        total, seq_lens = sum(ext), [p + e for p, e in zip(prefix, ext, strict=True)]
        want_tokens, want_positions, want_work = reference(prefix, ext, cp)

        # The ranks' rows are a permutation of the real tokens, in the reference's order; pad rows on no rank.
        assert sorted(t for p in ps for t in p.token_indices) == list(range(total))
        assert [list(p.token_indices) for p in ps] == want_tokens
        assert [list(p.positions) for p in ps] == want_positions
        # Shares: they sum to the real tokens, every rank agrees on them, the all-gather pads to the largest.
        assert all(p.rank_token_counts == ps[0].rank_token_counts for p in ps)
        assert sum(ps[0].rank_token_counts) == total
        assert ps[0].share_size == max(len(t) for t in want_tokens)
        # The restore index inverts the padded all-gather layout, never landing on a pad row.
        gathered = all_gather(ps)
        assert len(gathered) == ps[0].gathered_size
        assert all(p.restore_index == ps[0].restore_index for p in ps)
        assert [gathered[i] for i in ps[0].restore_index] == list(range(total))
        # Per-sequence lengths: never beyond the sequence's pages; prefixes as given; padding reaches no sequence.
        for p in ps:
            assert list(p.prefix_lens) == prefix and list(p.seq_lens) == seq_lens
            assert all(kv <= s for kv, s in zip(p.kv_lens_prev + p.kv_lens_next, seq_lens * 2, strict=True))
            assert list(p.pad_token_indices) == list(range(total, num_tokens))
        assert [sum(p.q_lens_prev[s] + p.q_lens_next[s] for p in ps) for s in range(len(ext))] == ext
        assert list(ps[0].kv_lens_next) == seq_lens
        assert [dataclasses.replace(p, num_tokens=total) for p in ps] == plans(prefix, ext, cp)
        # The last token of every sequence is on rank 0, at the rows it reports.
        starts = [sum(ext[: s + 1]) - 1 for s in range(len(ext))]
        assert [ps[0].token_indices[i] for i in ps[0].last_token_rows] == starts
        assert all(p.last_token_rows is None for p in ps[1:])
        # Causal work read off the metadata equals the token-by-token count.
        assert list(zigzag_work(prefix, ext, cp)) == want_work


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="num_tokens"):
        zigzag_split([0], [16], 2, 0, num_tokens=15)
    with pytest.raises(ValueError, match="rank"):
        zigzag_split([0], [16], 2, 2)
    with pytest.raises(ValueError, match="prefix_lens"):
        zigzag_split([0], [16, 16], 2, 0)
    with pytest.raises(ValueError, match="prefix_lens"):
        zigzag_split([-1], [16], 2, 0)


# ---------------------------------------------------------------------------------------------------------------
# Balance: the point of zigzag.


def test_causal_work_formula():
    # 3 queries ending at key 10 see 8, 9 and 10 keys.
    assert causal_work([3], [10]) == 27
    assert causal_work([1, 2], [5, 4]) == 5 + 3 + 4


@pytest.mark.parametrize("cp", [2, 4, 8])
@pytest.mark.parametrize(
    "prefix,ext",
    [([0], [4096]), ([0], [8191]), ([0] * 4, [8192, 5001, 3000, 4097]), ([2048, 0, 100, 0], [4096, 4093, 6000, 2050])],
)
def test_zigzag_balanced_contiguous_not(prefix, ext, cp):
    zig, cont = zigzag_work(prefix, ext, cp), contiguous_work(prefix, ext, cp)
    assert sum(zig) == sum(cont)  # the same attention, divided differently
    assert imbalance(zig) <= 1.05
    if not any(prefix):  # a long cached prefix evens out a contiguous split too; without one it is far off
        assert imbalance(cont) >= 2.5
