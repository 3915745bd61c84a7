"""Tensor-parallel layout rules: which heads, rows and vocabulary entries each rank owns.

Pure functions, shared by the model (which shards its weights by them), the KV pool (which holds the
rank's KV heads) and the transfer layer (which maps a prefill rank's heads onto a decode rank's when the
two sides run different TP sizes). One home, so the three cannot disagree.

KV heads: with `tp <= H` (H = KV heads of the model) rank r holds heads [r·H/tp, (r+1)·H/tp); with
`tp > H` each head is replicated on tp/H consecutive ranks and rank r holds head r // (tp/H). Query heads
are always split evenly, and rank r's query heads use exactly its KV heads (grouped-query attention).
"""

from __future__ import annotations

from dataclasses import dataclass


class TPLayoutError(ValueError):
    """A model cannot be split over the requested number of ranks; the message names the fix."""


@dataclass(frozen=True)
class HeadRange:
    """The KV heads [start, start + count) of one rank, out of `total`."""

    start: int
    count: int
    total: int

    @property
    def stop(self) -> int:
        return self.start + self.count


def kv_split_problem(num_kv_heads: int, tp_size: int) -> str:
    """Why `tp_size` ranks cannot hold `num_kv_heads` KV heads evenly, completing "TP<n> ..." ("" when they can):
    the one rule behind `check_tp`, `kv_head_range` and the transfer layer's check of a prefill/decode pair."""
    if tp_size < 1:
        return f"must be >= 1, got {tp_size}"
    if tp_size <= num_kv_heads and num_kv_heads % tp_size:
        return f"does not divide the {num_kv_heads} KV heads"
    if tp_size > num_kv_heads and tp_size % num_kv_heads:
        return f"is more than the {num_kv_heads} KV heads but not a multiple of them"
    return ""


def check_tp(num_heads: int, num_kv_heads: int, tp_size: int, what: str = "the model") -> None:
    """Raise TPLayoutError unless `tp_size` ranks can split attention heads of `what` evenly."""
    if tp_size < 1:
        raise TPLayoutError(f"--tp-size must be >= 1, got {tp_size}")
    if num_heads % tp_size:
        raise TPLayoutError(
            f"--tp-size {tp_size} does not divide the {num_heads} attention heads of {what}; "
            f"use a TP size that divides {num_heads}"
        )
    problem = kv_split_problem(num_kv_heads, tp_size)
    if problem:
        raise TPLayoutError(
            f"--tp-size {tp_size} {problem} of {what}; use a divisor of {num_kv_heads} "
            "(or a multiple of it, which replicates KV heads)"
        )


def kv_head_range(num_kv_heads: int, tp_size: int, tp_rank: int) -> HeadRange:
    """The KV heads rank `tp_rank` of `tp_size` holds (see the module docstring)."""
    problem = kv_split_problem(num_kv_heads, tp_size)
    if problem:
        raise TPLayoutError(f"TP{tp_size} {problem}")
    if not 0 <= tp_rank < tp_size:
        raise TPLayoutError(f"tp_rank {tp_rank} outside [0, {tp_size})")
    if tp_size <= num_kv_heads:
        per = num_kv_heads // tp_size
        return HeadRange(tp_rank * per, per, num_kv_heads)
    return HeadRange(tp_rank // (tp_size // num_kv_heads), 1, num_kv_heads)


def even_range(total: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """(start, count) of rank `tp_rank`'s share of `total` rows split evenly (caller checked divisibility)."""
    per = total // tp_size
    return tp_rank * per, per


def padded_vocab(vocab_size: int, tp_size: int) -> int:
    """The vocabulary rounded up to a multiple of `tp_size` (each rank an equal slice; padding rows are zero
    in the embedding and never win in the logits: they are cut off after the gather)."""
    return -(-vocab_size // tp_size) * tp_size
