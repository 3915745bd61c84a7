"""Which prefill rank writes which KV heads into which decode rank, when prefill TP p and decode TP d differ.

A pure function of (H, p, d), H the model's KV heads: every rank of either side holds the heads
`engine.parallel.kv_head_range` gives it (a range of H/tp heads when tp <= H, one head replicated on tp/H
consecutive ranks when tp > H). For each (prefill rank i, decode rank j) `head_slices` lists the head ranges i
copies into j, as (offset into i's heads, offset into j's heads, count): a range of heads of one page is one
contiguous item range on both sides (the pool is HND), so each slice of each page is one copy.

Every head a decode rank holds is written by exactly one prefill rank: its owner when prefill splits the heads;
when prefill replicates them (p > H), one of the tp/H replicas, picked as `head * rep + (decode_rank % rep)` so
that decode ranks spread over the replicas. A pair may have nothing to copy (an empty list).
"""

from __future__ import annotations

from typing import NamedTuple

from engine.parallel import TPLayoutError, kv_head_range, kv_split_problem


class HeadSlice(NamedTuple):
    src: int  # first head, as an offset into the prefill rank's heads
    dst: int  # first head, as an offset into the decode rank's heads
    count: int


def describe_tp(num_kv_heads: int, tp_size: int) -> str:
    """A side's layout in words, e.g. "TP2 x 4 KV heads" (what a refusal names for both sides)."""
    return f"TP{tp_size} x {num_kv_heads} KV heads"


def tp_pair_problem(num_kv_heads: int, prefill_tp: int, decode_tp: int) -> str:
    """Why a prefill of TP `prefill_tp` cannot fill a decode of TP `decode_tp` ("" when it can)."""
    if num_kv_heads < 1:
        return f"a model needs at least one KV head, got {num_kv_heads}"
    for side, tp in (("prefill", prefill_tp), ("decode", decode_tp)):
        problem = kv_split_problem(num_kv_heads, tp)
        if problem:
            return f"{side} TP{tp} {problem}"
    return ""


def writer(num_kv_heads: int, prefill_tp: int, head: int, decode_rank: int) -> int:
    """The prefill rank that writes model KV head `head` into decode rank `decode_rank`."""
    if prefill_tp <= num_kv_heads:
        return head // (num_kv_heads // prefill_tp)
    rep = prefill_tp // num_kv_heads
    return head * rep + decode_rank % rep


def head_slices(
    num_kv_heads: int, prefill_tp: int, decode_tp: int, prefill_rank: int, decode_rank: int
) -> list[HeadSlice]:
    """The head slices prefill rank `prefill_rank` copies into decode rank `decode_rank` (maybe none).

    Raises TPLayoutError when the pair of TP sizes cannot be served (`tp_pair_problem`) or a rank is out of range.
    """
    problem = tp_pair_problem(num_kv_heads, prefill_tp, decode_tp)
    if problem:
        raise TPLayoutError(
            f"prefill {describe_tp(num_kv_heads, prefill_tp)} vs decode {describe_tp(num_kv_heads, decode_tp)}: "
            f"{problem}"
        )
    src = kv_head_range(num_kv_heads, prefill_tp, prefill_rank)
    dst = kv_head_range(num_kv_heads, decode_tp, decode_rank)
    slices: list[HeadSlice] = []
    for head in range(dst.start, dst.stop):
        if writer(num_kv_heads, prefill_tp, head, decode_rank) != prefill_rank:
            continue
        s, d = head - src.start, head - dst.start
        last = slices[-1] if slices else None
        if last is not None and last.src + last.count == s and last.dst + last.count == d:
            slices[-1] = HeadSlice(last.src, last.dst, last.count + 1)
        else:
            slices.append(HeadSlice(s, d, 1))
    return slices


def head_map(num_kv_heads: int, prefill_tp: int, decode_tp: int) -> dict[tuple[int, int], list[HeadSlice]]:
    """`head_slices` for every (prefill rank, decode rank) pair."""
    return {
        (i, j): head_slices(num_kv_heads, prefill_tp, decode_tp, i, j)
        for i in range(prefill_tp)
        for j in range(decode_tp)
    }
