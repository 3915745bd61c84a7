"""Two-batch overlap (TBO): where a batch is cut into two micro-batches, and each micro-batch's metadata.

Pure index logic (no torch, no process groups), so it is tested exhaustively on CPU; the engine turns the
tuples into tensors. Contract (research: ../shared/research/tbo_cp.md §1.2–1.6, §2.2–2.4):

* `split_point(mode, extend_lens, batch_size, threshold, tokens_per_seq)` → `SplitPoint(seq_index,
  token_index, two_chunk)`. Child A takes the parent's flat tokens `[0, token_index)`, child B the rest.
  - EXTEND and MIXED (identical, everywhere in this module): the whole-sequence split with the most even
    token sums; if that leaves a side below `threshold` of the tokens, the two-chunk split instead, which
    cuts sequence `seq_index` at the token midpoint `total // 2`, unless the degeneracy guard refuses it.
  - DECODE: `batch_size // 2` sequences to A, `tokens_per_seq` tokens each.
  - IDLE: no sequences, no tokens: both children empty (they still run every collective).
* `build_children(split, prefix_lens, extend_lens, ...)` → `TwoBatchPlan` with child A over sequences
  `[0, s)` (`[0, s]` when two-chunk) and B over `[s, bs)`. In a two-chunk split the cut sequence is last in A
  and first in B; B's part has A's part as extra prefix (its KV is written by A's attention at the same
  layer, so A must run each layer's attention before B). Per-child start locations are rebased to 0.
  Trailing pad tokens of the parent (DP padding) fall in B; children are padded to a multiple of
  `pad_multiple` rows (attention-TP reduce-scatter), and `child_rows` / `merge_rows` map rows both ways.
* `capture_split` / `replay_token_counts`: the CUDA-graph plugin's split of a padded (even) graph batch
  and the children's real token counts at replay.

Invalid input raises ValueError; a broken internal invariant raises AssertionError via `_require` (never
`assert`: these ranges index device buffers and must survive `python -O`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

# Forward modes by value (engine.batch.ForwardMode's values; IDLE is this module's name for an empty DP rank),
# so that this module needs no torch.
EXTEND, MIXED, DECODE, IDLE = "extend", "mixed", "decode", "idle"
DEFAULT_THRESHOLD = 0.48  # --tbo-token-distribution-threshold
_MODES = (EXTEND, MIXED, DECODE, IDLE)


def _require(ok: bool, what: str) -> None:
    # Not `assert`: the ranges below index device buffers; a wrong one must fail loudly even under `python -O`.
    if not ok:
        raise AssertionError(f"two-batch invariant violated: {what}")


def split_mode(mode: object) -> str:
    """The split family of a forward mode (an `engine.batch.ForwardMode` or its value): MIXED → "extend".

    MIXED decodes are length-1 extends, so a MIXED batch splits exactly like EXTEND. DP ranks should also
    compare this (not the raw mode) when agreeing on TBO, or a MIXED rank vetoes its EXTEND peers (§1.3).
    """
    value = getattr(mode, "value", mode)
    if value not in _MODES:
        raise ValueError(f"two-batch overlap does not split forward mode {value!r}")
    return EXTEND if value == MIXED else str(value)


def check_threshold(threshold: float) -> float:
    """The token-distribution threshold, validated: in [0, 0.5]; 0 disables two-chunk."""
    if not 0.0 <= threshold <= 0.5:  # also rejects NaN
        raise ValueError(f"tbo token distribution threshold must be in [0, 0.5], got {threshold}")
    return float(threshold)


def balanced_split_index(lens: Sequence[int]) -> int:
    """The sequence boundary `i` (A = `lens[:i]`) with the most even token sums; 0 for fewer than 2 sequences.

    Ties go to the later boundary. The imbalance |left − right| only falls then rises as `i` grows
    (lengths are non-negative), so the walk stops at the first rise. For ≥ 2 sequences the result is in
    [1, n−1]: each child gets at least one sequence.
    """
    total = sum(lens)
    best, best_diff, left = 0, math.inf, 0
    for i in range(1, len(lens)):
        left += lens[i - 1]
        diff = abs(2 * left - total)
        if diff > best_diff:
            break
        best, best_diff = i, diff
    return best


def midpoint_seq_index(lens: Sequence[int]) -> int:
    """The sequence holding token `sum(lens) // 2`: the first `i` with `sum(lens[:i+1]) > total // 2`.

    So `sum(lens[:i]) <= total // 2 < sum(lens[:i+1])`. 0 when no sequence qualifies (empty, all zeros).
    """
    half = sum(lens) // 2
    for i, cum in enumerate(accumulate(lens)):
        if cum > half:
            return i
    return 0


def two_chunk_enabled(lens: Sequence[int] | None, threshold: float = DEFAULT_THRESHOLD) -> bool:
    """Whether an extend batch with these lengths is cut inside a sequence (the two-chunk split).

    Wanted when the best whole-sequence split puts less than `threshold` (or more than 1 − threshold) of the
    tokens in A. Refused when A would hold more sequences than tokens (the degeneracy guard: `[1]`,
    `[1, 1, 1]`), and when A's part of the cut sequence would be empty: with an odd total SGLang's guard
    lets e.g. `[3, 3, 1]` through with a 0-token piece (§2.4); the whole-sequence split is as good there.
    """
    threshold = check_threshold(threshold)
    if not lens or threshold == 0.0:
        return False
    total = sum(lens)
    left = sum(lens[: balanced_split_index(lens)])
    if not (left < total * threshold or left > total * (1.0 - threshold)):
        return False
    cut = midpoint_seq_index(lens)
    if cut + 1 > total // 2:  # degeneracy guard
        return False
    return total // 2 - sum(lens[:cut]) > 0  # A's part of the cut sequence; B's is > 0 by construction


@dataclass(frozen=True)
class SplitPoint:
    """Where a batch is cut. A = tokens `[0, token_index)`, B = the rest.

    Sequences: A = `[0, seq_index)`, B = `[seq_index, bs)`; with `two_chunk`, sequence `seq_index` is cut at
    `token_index` and belongs to both (A = `[0, seq_index]`).
    """

    seq_index: int
    token_index: int
    two_chunk: bool = False


def split_point(
    mode: object,
    extend_lens: Sequence[int] | None,
    batch_size: int,
    threshold: float = DEFAULT_THRESHOLD,
    tokens_per_seq: int = 1,
) -> SplitPoint:
    """The TBO split of one rank's batch (see the module docstring). `extend_lens` is required for
    EXTEND/MIXED and ignored (but length-checked if given) for DECODE; `tokens_per_seq` is DECODE's."""
    family = split_mode(mode)
    threshold = check_threshold(threshold)
    if batch_size < 0:
        raise ValueError(f"batch size must be non-negative, got {batch_size}")
    if extend_lens is not None:
        if len(extend_lens) != batch_size:
            raise ValueError(f"{len(extend_lens)} extend lengths for a batch of {batch_size}")
        if any(n < 0 for n in extend_lens):
            raise ValueError("extend lengths must be non-negative")
    if family == IDLE:
        if batch_size or extend_lens:
            raise ValueError("an IDLE batch has no sequences")
        return SplitPoint(0, 0)
    if family == DECODE:
        if tokens_per_seq < 1:
            raise ValueError(f"decode needs at least one token per sequence, got {tokens_per_seq}")
        seq = batch_size // 2
        return SplitPoint(seq, seq * tokens_per_seq)
    if extend_lens is None:
        raise ValueError("an EXTEND/MIXED split needs the extend lengths")
    if two_chunk_enabled(extend_lens, threshold):
        return SplitPoint(midpoint_seq_index(extend_lens), sum(extend_lens) // 2, True)
    seq = balanced_split_index(extend_lens)
    return SplitPoint(seq, sum(extend_lens[:seq]))


def padded_len(num_tokens: int, multiple: int) -> int:
    """`num_tokens` rounded up to a multiple of `multiple` (0 stays 0)."""
    return -(-num_tokens // multiple) * multiple


@dataclass(frozen=True)
class ChildPlan:
    """One micro-batch, as a slice of its parent. Per-sequence tuples are child-local and rebased."""

    seq_start: int  # parent sequences [seq_start, seq_end)
    seq_end: int
    token_start: int  # parent flat rows [token_start, token_end), parent pad rows included (B only)
    token_end: int
    prefix_lens: tuple[int, ...]  # the cut sequence's B part: original prefix + A's part
    extend_lens: tuple[int, ...]  # the cut sequence: A's part (A) or the rest (B)
    padded_len: int  # rows the child runs with: its range rounded up to the padding multiple

    @property
    def batch_size(self) -> int:
        return self.seq_end - self.seq_start

    @property
    def num_rows(self) -> int:
        """Parent rows in this child's range (real and parent pad)."""
        return self.token_end - self.token_start

    @property
    def num_real_tokens(self) -> int:
        """Real (non-padded) tokens: what MoE/collectives must not treat as padding."""
        return sum(self.extend_lens)

    @property
    def seq_lens(self) -> tuple[int, ...]:
        """KV length each sequence has after this child's forward (A's cut sequence: prefix + A's part)."""
        return tuple(p + e for p, e in zip(self.prefix_lens, self.extend_lens, strict=True))

    @property
    def extend_start_loc(self) -> tuple[int, ...]:
        """Each sequence's first row within the child, starting at 0. SGLang slices the parent's values
        without rebasing, so its child B indexes past its own rows (§1.5); these are always child-local."""
        return (0, *accumulate(self.extend_lens))[:-1]

    @property
    def positions(self) -> tuple[int, ...]:
        """Position in its sequence of each real row (equal to the parent's positions over the same rows)."""
        return tuple(p + k for p, e in zip(self.prefix_lens, self.extend_lens, strict=True) for k in range(e))

    @property
    def is_empty(self) -> bool:
        return self.num_real_tokens == 0


@dataclass(frozen=True)
class TwoBatchPlan:
    split: SplitPoint
    num_tokens: int  # parent real tokens (sum of extend lengths)
    num_rows: int  # parent flat rows, trailing pad included
    children: tuple[ChildPlan, ChildPlan]

    @property
    def cut_seq(self) -> int | None:
        """The parent sequence present in both children (two-chunk), else None."""
        return self.split.seq_index if self.split.two_chunk else None

    @property
    def real_token_counts(self) -> tuple[int, int]:
        return (self.children[0].num_real_tokens, self.children[1].num_real_tokens)

    def child_rows(self) -> tuple[int, ...]:
        """For each row of [A padded | B padded], the parent row it takes (−1: a child pad row, zero it)."""
        rows: list[int] = []
        for c in self.children:
            rows += range(c.token_start, c.token_end)
            rows += [-1] * (c.padded_len - c.num_rows)
        return tuple(rows)

    def merge_rows(self) -> tuple[int, ...]:
        """For each parent row, its row in [A padded output | B padded output]: gathering these puts the
        children's outputs back in parent order and drops the children's padding."""
        a, b = self.children
        return tuple(range(a.num_rows)) + tuple(range(a.padded_len, a.padded_len + b.num_rows))

    def check(self) -> None:
        """Raise AssertionError unless the children exactly partition the parent and their metadata is sound."""
        a, b = self.children
        s, tok = self.split.seq_index, self.split.token_index
        _require(a.token_start == 0 and a.token_end == tok == b.token_start, "A = [0, tok), B starts at tok")
        _require(b.token_end == self.num_rows >= self.num_tokens >= tok, "B runs to the parent's padded end")
        _require(a.num_real_tokens == tok, "A's rows are all real")
        _require(a.num_real_tokens + b.num_real_tokens == self.num_tokens, "real tokens partitioned")
        _require(b.num_real_tokens <= b.num_rows, "B's real tokens fit its rows")
        _require(a.seq_start == 0 and b.seq_start == s, "A starts at sequence 0, B at the split")
        _require(
            a.seq_end == s + (1 if self.split.two_chunk else 0), "A ends at the split (one past it when two-chunk)"
        )
        for c in self.children:
            _require(len(c.prefix_lens) == len(c.extend_lens) == c.batch_size, "one entry per sequence")
            _require(min(c.prefix_lens + c.extend_lens, default=0) >= 0, "lengths non-negative")
            _require(c.num_rows <= c.padded_len, "padding only grows a child")
        if self.split.two_chunk:
            _require(a.extend_lens[-1] > 0 and b.extend_lens[0] > 0, "both parts of the cut sequence non-empty")
            _require(b.prefix_lens[0] == a.seq_lens[-1], "B's part extends A's part of the cut sequence")
        _require(len(self.child_rows()) == a.padded_len + b.padded_len, "child rows cover both children")
        _require(len(self.merge_rows()) == self.num_rows, "merge covers every parent row")


def build_children(
    split: SplitPoint,
    prefix_lens: Sequence[int],
    extend_lens: Sequence[int],
    num_rows: int | None = None,
    pad_multiple: int = 1,
) -> TwoBatchPlan:
    """The two children of a batch cut at `split` (from `split_point` on the same `extend_lens`).

    `num_rows`: the parent's flat rows when DP padding appended pad rows after the real tokens (default:
    none); they go to B. `pad_multiple`: each child is padded to a multiple of this many rows.
    Two-chunk comes from `split` alone, so index functions and builder agree for EXTEND and MIXED alike.
    """
    bs = len(extend_lens)
    total = sum(extend_lens)
    rows = total if num_rows is None else num_rows
    s, tok = split.seq_index, split.token_index
    if len(prefix_lens) != bs:
        raise ValueError(f"{len(prefix_lens)} prefix lengths for {bs} sequences")
    if min((*prefix_lens, *extend_lens), default=0) < 0:
        raise ValueError("lengths must be non-negative")
    if rows < total:
        raise ValueError(f"{rows} parent rows cannot hold {total} tokens")
    if pad_multiple < 1:
        raise ValueError(f"pad multiple must be positive, got {pad_multiple}")
    before = sum(extend_lens[:s])
    if split.two_chunk:
        if not (s < bs and before < tok < before + extend_lens[s]):
            raise ValueError(f"two-chunk split {split} does not cut sequence {s} of {list(extend_lens)}")
    elif not (s <= bs and tok == before):
        raise ValueError(f"split {split} is not a sequence boundary of {list(extend_lens)}")

    a_prefix, a_extend = list(prefix_lens[:s]), list(extend_lens[:s])
    b_prefix, b_extend = list(prefix_lens[s:]), list(extend_lens[s:])
    if split.two_chunk:
        # The cut sequence: its first `part` new tokens end A; B continues it with them as cached prefix.
        part = tok - before
        a_prefix.append(prefix_lens[s])
        a_extend.append(part)
        b_prefix[0] += part
        b_extend[0] -= part
    a = ChildPlan(0, len(a_extend), 0, tok, tuple(a_prefix), tuple(a_extend), padded_len(tok, pad_multiple))
    b = ChildPlan(s, bs, tok, rows, tuple(b_prefix), tuple(b_extend), padded_len(rows - tok, pad_multiple))
    plan = TwoBatchPlan(split, total, rows, (a, b))
    plan.check()
    return plan


def plan_two_batch(
    mode: object,
    prefix_lens: Sequence[int],
    extend_lens: Sequence[int],
    threshold: float = DEFAULT_THRESHOLD,
    num_rows: int | None = None,
    pad_multiple: int = 1,
) -> TwoBatchPlan:
    """`split_point` then `build_children` for a batch given by its per-sequence lengths. For DECODE, every
    extend length must be 1 (our decode batches carry one token per sequence)."""
    if split_mode(mode) == DECODE and any(n != 1 for n in extend_lens):
        raise ValueError("a DECODE batch has exactly one new token per sequence")
    split = split_point(mode, extend_lens, len(extend_lens), threshold)
    return build_children(split, prefix_lens, extend_lens, num_rows, pad_multiple)


def real_token_counts(split_token: int, num_real_tokens: int) -> tuple[int, int]:
    """The children's real tokens when the real ones come first: A gets up to `split_token`, B the rest."""
    return (min(split_token, num_real_tokens), max(0, num_real_tokens - split_token))


def capture_split(graph_batch_size: int, tokens_per_seq: int = 1) -> SplitPoint:
    """The split fixed for a captured decode graph batch size (which must be even and positive)."""
    if graph_batch_size < 2 or graph_batch_size % 2:
        raise ValueError(f"TBO graph batch sizes must be even and positive, got {graph_batch_size}")
    return split_point(DECODE, None, graph_batch_size, tokens_per_seq=tokens_per_seq)


def replay_token_counts(
    graph_batch_size: int, num_real_tokens: int, mode: object = DECODE, tokens_per_seq: int = 1
) -> tuple[int, int]:
    """At replay: the children's real token counts for `num_real_tokens` real tokens in a graph captured for
    `graph_batch_size` (padded) sequences, the value the graph's persistent `[a, b]` tensor must hold.

    An IDLE rank (DP attention) replays the decode graph with no real tokens. The split is the DECODE one,
    with DECODE's tokens per sequence: SGLang derives tokens-per-seq from the unmapped mode, 0 for IDLE, and
    would divide by zero (§1.6).
    """
    family = split_mode(mode)
    if family == EXTEND:
        raise ValueError("CUDA graphs replay DECODE (or IDLE) batches only")
    if family == IDLE and num_real_tokens:
        raise ValueError(f"an IDLE batch has no real tokens, got {num_real_tokens}")
    split = capture_split(graph_batch_size, tokens_per_seq)
    graph_tokens = graph_batch_size * tokens_per_seq
    if not 0 <= num_real_tokens <= graph_tokens:
        raise ValueError(f"{num_real_tokens} real tokens do not fit a graph of {graph_tokens} tokens")
    a, b = real_token_counts(split.token_index, num_real_tokens)
    # The graph's children are slices of its static buffers: a count beyond a slice would read/write past it.
    _require(a <= split.token_index and b <= graph_tokens - split.token_index, "real counts fit the slices")
    return (a, b)
