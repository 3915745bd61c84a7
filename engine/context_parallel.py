"""Context-parallel (CP) prefill: the zigzag split of a batch's new tokens over the ranks of a CP group.

Pure metadata (no torch), so the split can be tested exhaustively on its own; the engine turns the tuples into
index tensors. Nothing here is wired into the engine yet (issue 16).

Layout. The batch's new tokens lie flat, sequence after sequence (sequence 0's extend tokens, then sequence
1's, ...), possibly followed by trailing pad tokens. Each sequence's new tokens are cut into S = 2·cp blocks
(divmod: the first `ext % S` blocks one token longer), and rank r owns block r ("prev") and block S−1−r
("next") of every sequence. Causal attention work grows with a query's position, so pairing a cheap block
with the equally expensive mirror block gives every rank the same work (up to the remainder tokens), where a
contiguous split would leave the last rank with most of it. A rank's local rows are
`[prev of seq 0, ..., prev of seq B−1, next of seq 0, ..., next of seq B−1]`: all prevs first, so attention
runs as two ragged extend calls split at `num_prev_tokens` (not at half the rows: blocks are uneven).

Padding, and the two bugs SGLang's reviewers found (research/tbo_cp.md §3.6), impossible by construction:
* Prefixes are an input (`prefix_lens`, unpadded, per sequence), never derived from the flat token count, so
  a padded count cannot make a cached prefix vanish (bug 1).
* Pad tokens belong to no sequence and to no rank: no rank computes them, they write no KV and the restored
  order covers only the real tokens (which come first in the flat batch). No per-sequence length ever
  includes them, so every KV length fits its sequence's pages (bug 2). CP needs no flat padding of its own:
  the all-gather is padded per rank share (`share_size`), which is what makes the collective's inputs equal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

# The one forward mode CP serves (engine.batch.ForwardMode.EXTEND's value; compared by value so this module
# needs no torch). MIXED batches carry decodes as length-1 extends, which can never be cut into 2·cp blocks,
# and DECODE has one token per sequence.
_EXTEND = "extend"


def split_refusal(extend_lens: Sequence[int], cp_size: int, mode: object = _EXTEND) -> str | None:
    """Why this batch cannot run context-parallel (a short label for a fallback metric), or None if it can.

    `mode` is an `engine.batch.ForwardMode` or its string value.
    """
    if cp_size < 2:
        return "cp_off"
    if getattr(mode, "value", mode) != _EXTEND:
        return "mode"
    if not extend_lens:
        return "empty"
    # Fewer than 2·cp new tokens leaves an empty block (tbo_cp.md example E); the whole batch falls back.
    if min(extend_lens) < 2 * cp_size:
        return "short_sequence"
    return None


def can_split(extend_lens: Sequence[int], cp_size: int, mode: object = _EXTEND) -> bool:
    """True when every sequence has at least 2·cp new tokens, cp > 1 and the batch is a pure EXTEND."""
    return split_refusal(extend_lens, cp_size, mode) is None


def block_lens(extend_len: int, num_blocks: int) -> tuple[int, ...]:
    """`extend_len` tokens cut into `num_blocks` blocks, the first `extend_len % num_blocks` one longer."""
    base, rem = divmod(extend_len, num_blocks)
    return tuple(base + 1 if i < rem else base for i in range(num_blocks))


def _rank_blocks(rank: int, cp_size: int, num_seqs: int) -> tuple[tuple[int, int], ...]:
    """(sequence, block) of each local piece of `rank`, in local order: every prev, then every next."""
    last = 2 * cp_size - 1
    return tuple((s, rank) for s in range(num_seqs)) + tuple((s, last - rank) for s in range(num_seqs))


def _require(ok: bool, what: str) -> None:
    # Not `assert`: the invariants guard memory safety of the attention kernel and must survive `python -O`.
    if not ok:
        raise AssertionError(f"zigzag invariant violated: {what}")


@dataclass(frozen=True)
class ZigzagPlan:
    """Everything one CP rank needs for one batch. Per-sequence tuples are indexed by sequence."""

    cp_size: int
    rank: int
    prefix_lens: tuple[int, ...]  # cached tokens before each sequence's new ones (unpadded, as given)
    extend_lens: tuple[int, ...]  # new tokens of each sequence (unpadded, as given)
    num_tokens: int  # flat batch length, trailing pad tokens included
    blocks: tuple[tuple[int, ...], ...]  # [seq][block]: token count of each of the 2·cp blocks
    local_blocks: tuple[tuple[int, int], ...]  # (seq, block) of each local piece, in local order
    token_indices: tuple[int, ...]  # this rank's rows of the flat batch (its Q/K/V rows), in local order
    positions: tuple[int, ...]  # position in its sequence (prefix included) of each local row, for RoPE
    q_lens_prev: tuple[int, ...]  # tokens of block `rank` of each sequence
    q_lens_next: tuple[int, ...]  # tokens of block 2·cp−1−rank of each sequence
    kv_lens_prev: tuple[int, ...]  # prefix + tokens up to the end of the prev block: keys the prev queries see
    kv_lens_next: tuple[int, ...]  # prefix + tokens up to the end of the next block
    rank_token_counts: tuple[int, ...]  # real rows of every rank
    share_size: int  # rows each rank contributes to the all-gather: the largest share, not the average
    restore_index: tuple[int, ...]  # natural real token i is row restore_index[i] of the gathered buffer

    @property
    def num_seqs(self) -> int:
        return len(self.extend_lens)

    @property
    def seq_lens(self) -> tuple[int, ...]:
        return tuple(p + e for p, e in zip(self.prefix_lens, self.extend_lens, strict=True))

    @property
    def num_real_tokens(self) -> int:
        return sum(self.extend_lens)

    @property
    def pad_token_indices(self) -> range:
        """Flat rows that are padding: owned by no rank and no sequence, never computed."""
        return range(self.num_real_tokens, self.num_tokens)

    @property
    def gathered_size(self) -> int:
        return self.cp_size * self.share_size

    @property
    def num_prev_tokens(self) -> int:
        """Local rows [0, this) are prev queries, the rest next queries."""
        return sum(self.q_lens_prev)

    @property
    def cu_seqlens_q_prev(self) -> tuple[int, ...]:
        return (0, *accumulate(self.q_lens_prev))

    @property
    def cu_seqlens_q_next(self) -> tuple[int, ...]:
        return (0, *accumulate(self.q_lens_next))

    @property
    def last_token_rows(self) -> tuple[int, ...] | None:
        """Local row of each sequence's last token where this rank holds them all (rank 0), else None.

        The last token of a sequence ends block 2·cp−1, rank 0's next block, so logits need rows of rank 0 only.
        """
        if self.rank != 0:
            return None
        return tuple(self.num_prev_tokens + c - 1 for c in accumulate(self.q_lens_next))

    def attention_work(self) -> int:
        """This rank's causal attention work: the keys each of its queries attends to, summed."""
        return causal_work(self.q_lens_prev, self.kv_lens_prev) + causal_work(self.q_lens_next, self.kv_lens_next)

    def check(self) -> None:
        """Raise AssertionError unless the tbo_cp.md §3.3 invariants (and the padding-safety ones) hold."""
        self._check_blocks()
        self._check_local()
        self._check_lengths()
        self._check_restore()

    def _check_blocks(self) -> None:
        num_blocks = 2 * self.cp_size
        _require(0 <= self.rank < self.cp_size, "rank in [0, cp)")
        _require(len(self.prefix_lens) == self.num_seqs == len(self.blocks) > 0, "one entry per sequence")
        _require(all(p >= 0 for p in self.prefix_lens), "prefixes non-negative")
        _require(self.num_tokens >= self.num_real_tokens, "flat batch holds every real token")
        for blk, ext in zip(self.blocks, self.extend_lens, strict=True):
            _require(len(blk) == num_blocks and sum(blk) == ext, "2·cp blocks summing to the sequence's tokens")
            _require(max(blk) - min(blk) <= 1 and min(blk) >= 1, "blocks non-empty and within one token")
        _require(sum(self.rank_token_counts) == self.num_real_tokens, "shares sum to the real tokens")
        _require(len(self.rank_token_counts) == self.cp_size, "one share per rank")
        _require(self.share_size == max(self.rank_token_counts), "all-gather padded to the largest share")

    def _check_local(self) -> None:
        _require(self.local_blocks == _rank_blocks(self.rank, self.cp_size, self.num_seqs), "zigzag ownership")
        _require(len(self.token_indices) == self.rank_token_counts[self.rank], "local rows = own share")
        _require(len(self.positions) == len(self.token_indices), "one position per local row")
        _require(all(i < self.num_real_tokens for i in self.token_indices), "no pad token on a rank")
        _require(self.num_prev_tokens + sum(self.q_lens_next) == len(self.token_indices), "prev + next = local")

    def _check_lengths(self) -> None:
        # Bottom-right causal alignment: a block's first query sits at kv_len − q_len, so that must be the
        # position of the block's first token; and no sequence may see keys beyond its own pages.
        row = 0
        for half_q, half_kv in ((self.q_lens_prev, self.kv_lens_prev), (self.q_lens_next, self.kv_lens_next)):
            for s, (q, kv) in enumerate(zip(half_q, half_kv, strict=True)):
                _require(q >= 1 and self.prefix_lens[s] + q <= kv <= self.seq_lens[s], "kv length within pages")
                _require(self.positions[row] == kv - q, "first query's position matches its kv length")
                row += q
        for s in range(self.num_seqs):
            _require(self.kv_lens_prev[s] < self.kv_lens_next[s], "prev block ends before next block")
        if self.rank == 0:
            _require(self.kv_lens_next == self.seq_lens, "rank 0's next block ends every sequence")

    def _check_restore(self) -> None:
        _require(len(self.restore_index) == self.num_real_tokens, "restore covers the real tokens")
        _require(len(set(self.restore_index)) == self.num_real_tokens, "restore rows distinct")
        # Every restored row is a real row of some rank's share, never an all-gather pad row.
        for row in self.restore_index:
            rank, offset = divmod(row, self.share_size)
            _require(rank < self.cp_size and offset < self.rank_token_counts[rank], "restore row is a real row")
        mine = self.restore_index
        start = self.rank * self.share_size
        _require(all(mine[t] == start + i for i, t in enumerate(self.token_indices)), "restore inverts my share")


def zigzag_split(
    prefix_lens: Sequence[int],
    extend_lens: Sequence[int],
    cp_size: int,
    rank: int,
    num_tokens: int | None = None,
) -> ZigzagPlan:
    """The zigzag plan of `rank` for a batch: sequence s has `prefix_lens[s]` cached and `extend_lens[s]` new tokens.

    `num_tokens` is the flat batch length when it carries trailing pad tokens (default: no padding); the pad
    only shows in `num_tokens` and `pad_token_indices`. Raises ValueError for a batch `can_split` refuses.
    """
    refusal = split_refusal(extend_lens, cp_size)
    if refusal is not None:
        raise ValueError(f"batch cannot run context-parallel ({refusal}): extend_lens={list(extend_lens)}")
    if len(prefix_lens) != len(extend_lens) or min(prefix_lens) < 0:
        raise ValueError("prefix_lens must give one non-negative length per sequence")
    if not 0 <= rank < cp_size:
        raise ValueError(f"rank {rank} not in [0, {cp_size})")
    total = sum(extend_lens)
    num_tokens = total if num_tokens is None else num_tokens
    if num_tokens < total:
        raise ValueError(f"num_tokens {num_tokens} is less than the {total} new tokens of the batch")

    num_seqs = len(extend_lens)
    blocks = tuple(block_lens(e, 2 * cp_size) for e in extend_lens)
    seq_starts = (0, *accumulate(extend_lens))
    # block_ends[s][i]: tokens of sequence s up to the end of block i (the causal reach of that block).
    block_ends = tuple(tuple(accumulate(blk)) for blk in blocks)

    def pieces(q: int) -> list[tuple[int, int, int]]:
        """(flat start, length, position of the first token) of each local piece of rank q."""
        out = []
        for s, b in _rank_blocks(q, cp_size, num_seqs):
            offset = block_ends[s][b] - blocks[s][b]
            out.append((seq_starts[s] + offset, blocks[s][b], prefix_lens[s] + offset))
        return out

    counts = tuple(sum(n for _, n, _ in pieces(q)) for q in range(cp_size))
    share = max(counts)
    restore = [0] * total
    for q in range(cp_size):
        row = q * share
        for start, n, _ in pieces(q):
            restore[start : start + n] = range(row, row + n)
            row += n

    mine = pieces(rank)
    last = 2 * cp_size - 1
    plan = ZigzagPlan(
        cp_size=cp_size,
        rank=rank,
        prefix_lens=tuple(prefix_lens),
        extend_lens=tuple(extend_lens),
        num_tokens=num_tokens,
        blocks=blocks,
        local_blocks=_rank_blocks(rank, cp_size, num_seqs),
        token_indices=tuple(i for start, n, _ in mine for i in range(start, start + n)),
        positions=tuple(p for _, n, first in mine for p in range(first, first + n)),
        q_lens_prev=tuple(blk[rank] for blk in blocks),
        q_lens_next=tuple(blk[last - rank] for blk in blocks),
        kv_lens_prev=tuple(p + ends[rank] for p, ends in zip(prefix_lens, block_ends, strict=True)),
        kv_lens_next=tuple(p + ends[last - rank] for p, ends in zip(prefix_lens, block_ends, strict=True)),
        rank_token_counts=counts,
        share_size=share,
        restore_index=tuple(restore),
    )
    plan.check()
    return plan


def causal_work(q_lens: Sequence[int], kv_lens: Sequence[int]) -> int:
    """Keys attended by causal queries: a chunk of q queries ending at kv keys sees kv−q+1, ..., kv of them."""
    return sum(q * kv - q * (q - 1) // 2 for q, kv in zip(q_lens, kv_lens, strict=True))


def zigzag_work(prefix_lens: Sequence[int], extend_lens: Sequence[int], cp_size: int) -> tuple[int, ...]:
    """Causal attention work of each rank under the zigzag split, read off each rank's plan."""
    return tuple(zigzag_split(prefix_lens, extend_lens, cp_size, rank).attention_work() for rank in range(cp_size))


def contiguous_work(prefix_lens: Sequence[int], extend_lens: Sequence[int], cp_size: int) -> tuple[int, ...]:
    """The same for the naive split it replaces: each sequence's new tokens cut into cp contiguous chunks
    (divmod, like the zigzag blocks), rank r taking chunk r of every sequence."""
    work = [0] * cp_size
    for prefix, ext in zip(prefix_lens, extend_lens, strict=True):
        end = prefix
        for rank, n in enumerate(block_lens(ext, cp_size)):
            end += n
            work[rank] += causal_work([n], [end])
    return tuple(work)


def imbalance(work: Sequence[int]) -> float:
    """max/min of per-rank work: 1.0 is perfectly even."""
    return max(work) / min(work)
