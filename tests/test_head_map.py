"""The prefill-rank -> decode-rank head map for prefill TP != decode TP (transfer/head_map.py), by property."""

from __future__ import annotations

import pytest

from engine.parallel import TPLayoutError, kv_head_range
from transfer.head_map import HeadSlice, head_map, head_slices, tp_pair_problem


def sizes(h: int) -> list[int]:
    """Every TP size a model of h KV heads supports, up to 16: divisors of h and multiples of it."""
    return [tp for tp in range(1, 17) if (tp <= h and h % tp == 0) or (tp > h and tp % h == 0)]


CASES = [(h, p, d) for h in (1, 2, 3, 4, 8) for p in sizes(h) for d in sizes(h)]


@pytest.mark.parametrize(("h", "p", "d"), CASES)
def test_every_decode_head_is_written_once_by_a_prefill_rank_that_holds_it(h: int, p: int, d: int):
    m = head_map(h, p, d)
    writes_by_prefill = [0] * p
    for j in range(d):
        dst = kv_head_range(h, d, j)
        written: list[int] = []
        for i in range(p):
            src = kv_head_range(h, p, i)
            for s in m[(i, j)]:
                assert s.count >= 1
                assert s.src >= 0 and s.src + s.count <= src.count, (i, j, s)  # the source holds the heads
                assert s.dst >= 0 and s.dst + s.count <= dst.count, (i, j, s)
                heads = list(range(src.start + s.src, src.start + s.src + s.count))
                assert heads == list(range(dst.start + s.dst, dst.start + s.dst + s.count))  # the same model heads
                written += heads
                writes_by_prefill[i] += s.count
        assert sorted(written) == list(range(dst.start, dst.stop)), (j, written)  # each exactly once
    total = sum(kv_head_range(h, d, j).count for j in range(d))
    assert sum(writes_by_prefill) == total
    if p > h and d >= p:  # replicas share the load: no prefill rank idles while another writes twice its share
        assert max(writes_by_prefill) - min(writes_by_prefill) <= max(1, total // p)


@pytest.mark.parametrize(("h", "tp"), [(h, tp) for h in (1, 2, 4, 8) for tp in sizes(h)])
def test_same_tp_is_one_whole_slice_to_the_same_rank(h: int, tp: int):
    m = head_map(h, tp, tp)
    for i in range(tp):
        for j in range(tp):
            heads = kv_head_range(h, tp, i).count
            assert m[(i, j)] == ([HeadSlice(0, 0, heads)] if i == j else [])


def test_examples():
    # P2 -> D1 with 4 heads: each prefill rank fills half of the decode rank's heads
    assert head_slices(4, 2, 1, 0, 0) == [HeadSlice(0, 0, 2)] and head_slices(4, 2, 1, 1, 0) == [HeadSlice(0, 2, 2)]
    # P1 -> D2: the one prefill rank writes each decode rank its half
    assert head_slices(4, 1, 2, 0, 1) == [HeadSlice(2, 0, 2)]
    # H=1, P2 -> D2: both prefill ranks hold the head; decode rank j gets it from prefill rank j
    assert head_slices(1, 2, 2, 0, 0) == [HeadSlice(0, 0, 1)] and head_slices(1, 2, 2, 1, 0) == []
    assert head_slices(1, 2, 2, 1, 1) == [HeadSlice(0, 0, 1)]
    # H=2, P4 -> D1: heads 0 and 1 from one replica each
    assert head_slices(2, 4, 1, 0, 0) == [HeadSlice(0, 0, 1)] and head_slices(2, 4, 1, 2, 0) == [HeadSlice(0, 1, 1)]


def test_impossible_pairs_name_both_layouts():
    assert "decode TP3 does not divide the 4 KV heads" in tp_pair_problem(4, 2, 3)
    assert "prefill TP6 is more than the 4 KV heads" in tp_pair_problem(4, 6, 1)
    assert tp_pair_problem(4, 8, 2) == ""
    with pytest.raises(TPLayoutError, match=r"prefill TP2 x 4 KV heads vs decode TP3 x 4 KV heads"):
        head_slices(4, 2, 3, 0, 0)
    with pytest.raises(TPLayoutError, match="outside"):
        head_slices(4, 2, 2, 2, 0)
