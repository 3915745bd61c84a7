"""Two-batch overlap (TBO) on one rank: the two child batches of a `TwoBatchPlan`, and their forward.

Contract:

* `child_batches(batch, plan)` → `(A, B)`, each a `ForwardBatch` or None when that child has no tokens (a
  DECODE batch of one sequence, or an EXTEND batch of one sequence that is not cut, leaves A empty). The plan
  must be `engine.two_batch.plan_two_batch` of this batch's own lengths, unpadded (our batches carry no DP pad
  rows); anything else raises ValueError. Per-token tensors (`input_ids`, `positions`, `out_cache_loc`) are
  slices (views) of the parent's device tensors over the child's token range: nothing on the device is read
  back. The host lists come from the plan (rebased `prefix_lens` and `extend_lens`; the cut sequence's part in B
  has A's part as extra prefix) and the parent's page tables of the child's sequences. `last_token_indices`
  index the child's own rows (A's last row of a cut sequence is where A's part ends, not a sampling point).
  Mode: a DECODE parent gives DECODE children; an EXTEND/MIXED child keeps the parent's label, except that a
  child whose rows are all length 1 is DECODE, as `ForwardBatch.build` labels such a batch whatever it was
  asked for (the shape picks the kernels; the decode path is valid for any prefix, including none).
* `run_two_batch(runner, batch, plan)` → the logits of the unsplit forward: `[B, V]` at each parent sequence's
  last token, in parent order (`[T, V]` over every row with `all_tokens`), and the same KV written to the pool.
  A sequence's last token lies in exactly one child; for the cut sequence that is B, so A's partial row of it is
  never put through the LM head. Sampling stays with the caller, on the parent.

Why A then B at each layer is right: every token's hidden state at layer l+1 depends only on layer-l states
of its own sequence at positions ≤ its own (causal attention; every other op is per token). A child holds
whole sequences, except the cut sequence whose first part is A's last and whose rest is B's first. So the only
edge between the children is that B's part of the cut sequence attends, at layer l, to the K/V of A's part at
layer l, which it reads from the pool as cached prefix, like a chunked-prefill continuation. A's attention at
layer l stores that K/V before it attends, so running A's layer l before B's layer l, on one stream, satisfies
the dependency by program order (the "latent dependency" of tbo_cp.md §2.2); B must never run ahead of A in a
layer. Nothing flows from B to A. The overlapped executor (`OverlappedForward`) keeps this order stage by stage.
Running A's layers over the pool is otherwise the same computation as the parent's rows over the same positions,
so logits and KV equal the unsplit forward's up to float reassociation from the different row counts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from engine.batch import ForwardBatch, ForwardMode
from engine.device import to_device
from engine.dp_attention import DPStepPlan
from engine.dp_forward import IdleForward
from engine.layer_cursor import LayerCursor
from engine.two_batch import ChildPlan, TwoBatchPlan

if TYPE_CHECKING:
    from engine.model_runner import LayerwiseForward, ModelRunner


def _check_plan(batch: ForwardBatch, plan: TwoBatchPlan) -> None:
    """ValueError unless `plan` splits exactly this batch's sequences and tokens, without padding."""
    a, b = plan.children
    if plan.num_rows != batch.num_tokens or plan.num_tokens != batch.num_tokens:
        raise ValueError(f"plan for {plan.num_rows} rows, batch of {batch.num_tokens} tokens (no pad rows here)")
    if any(c.padded_len != c.num_rows for c in plan.children):
        raise ValueError("child padding (attention-TP) is not supported by the single-rank two-batch forward")
    extend = [*a.extend_lens, *b.extend_lens]
    prefix = [*a.prefix_lens, *b.prefix_lens]
    if plan.cut_seq is not None:  # glue the cut sequence back together: A's part + B's part, A's prefix
        s = plan.cut_seq
        extend[s] += extend.pop(s + 1)
        prefix.pop(s + 1)
    if extend != batch.extend_lens or prefix != batch.prefix_lens:
        raise ValueError(
            f"plan of extend {extend} / prefix {prefix} does not split this batch "
            f"(extend {batch.extend_lens} / prefix {batch.prefix_lens})"
        )


def _child_mode(parent: ForwardMode, extend_lens: tuple[int, ...]) -> ForwardMode:
    # As ForwardBatch.build: all rows of length 1 is a DECODE batch whatever the label.
    return ForwardMode.DECODE if all(n == 1 for n in extend_lens) else parent


def _child(batch: ForwardBatch, c: ChildPlan) -> ForwardBatch | None:
    if c.is_empty:
        return None
    if min(c.extend_lens) < 1:
        raise ValueError(f"child sequences need at least one token each, got extend lengths {c.extend_lens}")
    rows = slice(c.token_start, c.token_end)
    last = [start + n - 1 for start, n in zip(c.extend_start_loc, c.extend_lens, strict=True)]
    return ForwardBatch(
        mode=_child_mode(batch.mode, c.extend_lens),
        input_ids=batch.input_ids[rows],
        positions=batch.positions[rows],
        out_cache_loc=batch.out_cache_loc[rows],
        prefix_lens=list(c.prefix_lens),
        extend_lens=list(c.extend_lens),
        page_tables=[list(p) for p in batch.page_tables[c.seq_start : c.seq_end]],
        page_size=batch.page_size,
        last_token_indices=to_device(last, torch.int64, batch.device),  # host lists → one non-blocking copy
    )


def child_batches(batch: ForwardBatch, plan: TwoBatchPlan) -> tuple[ForwardBatch | None, ForwardBatch | None]:
    """The children A and B of `batch` cut by `plan` (see the module docstring); None for an empty child."""
    _check_plan(batch, plan)
    a, b = plan.children
    return _child(batch, a), _child(batch, b)


class OverlappedForward(LayerCursor):
    """A batch's forward as two micro-batches whose stages interleave (issue 15, item 3); the same interface as
    `LayerwiseForward` (`run_layers`, `logits`, `done`), so every caller runs it unchanged.

    Each child runs `LlamaFamilyModel.layer_stages`, which yields while a row-parallel all-reduce is in flight.
    The executor runs A's stage, then B's, then A's next: B's attention and MLP compute while A's reduce is on the
    wire and the other way round (delta 0, for prefill and decode alike). A's attention at layer l always runs
    before B's (the cut sequence's dependency, module docstring).

    Under DP attention (`dp_plan`, the step every rank agreed on) each child runs with every rank's rows of that
    child, and an empty child is an `IdleForward`: it still runs its stages' MLP collectives, in the same order
    as every other rank's A and B (an IDLE rank's two children are both empty: `OverlappedForward.idle`)."""

    cp = None  # never context-parallel (ModelRunner does not combine them)
    cp_refusal: str | None = None

    def __init__(
        self,
        runner: ModelRunner,
        batch: ForwardBatch | None,
        plan: TwoBatchPlan | None,
        forwards: list[LayerwiseForward | IdleForward | None],
    ) -> None:
        """`forwards`: A's and B's (None: an empty micro-batch outside DP attention). Built by `of`, `prepared`
        or `idle`."""
        self.runner = runner
        self.batch = batch  # None (and `plan` None): an IDLE rank's forward
        self.plan = plan
        self.forwards = forwards

    @classmethod
    def of(
        cls, runner: ModelRunner, batch: ForwardBatch, plan: TwoBatchPlan, dp_plan: DPStepPlan | None = None
    ) -> OverlappedForward:
        """`batch` cut by `plan`; under DP attention (`dp_plan`) each child runs with every rank's rows of it."""
        forwards: list[LayerwiseForward | IdleForward | None] = []
        for i, child in enumerate(child_batches(batch, plan)):
            tokens = None if dp_plan is None else dp_plan.child_tokens(i)
            if child is None:
                forwards.append(None if tokens is None else IdleForward(runner, tokens))
            else:
                child.dp = tokens
                forwards.append(runner.start_forward(child, split=False))  # type: ignore[arg-type]
        return cls(runner, batch, plan, forwards)

    @classmethod
    def prepared(
        cls, runner: ModelRunner, batch: ForwardBatch, plan: TwoBatchPlan, children: tuple
    ) -> OverlappedForward:
        """`batch`'s children built and planned by the caller (the CUDA-graph plugin, into their own graph buffers):
        they are switched to, not planned again."""
        forwards = [None if c is None else runner.start_forward(c, False, prepared=True) for c in children]
        return cls(runner, batch, plan, forwards)  # type: ignore[arg-type]

    @classmethod
    def idle(cls, runner: ModelRunner, dp_plan: DPStepPlan) -> OverlappedForward:
        """An IDLE rank's forward in an overlapped step: two empty micro-batches."""
        return cls(runner, None, None, [IdleForward(runner, dp_plan.child_tokens(i)) for i in (0, 1)])

    def run_layers(self, start: int, end: int) -> None:
        self._check_start(start)
        live = [f for f in self.forwards if f is not None]
        model = self.runner.model
        stages = [model.layer_stages(f.hidden, f.rope, start, end, f.attention, f.tokens) for f in live]
        running = list(range(len(live)))
        with torch.inference_mode():
            while running:
                for i in list(running):  # A's stage, then B's: program order keeps A's layer ahead of B's
                    try:
                        next(stages[i])
                    except StopIteration as finished:
                        live[i].hidden, live[i].next_layer = finished.value, end
                        running.remove(i)
        self.next_layer = end

    def logits(self, all_tokens: bool = False) -> torch.Tensor:
        """What `LayerwiseForward.logits` gives for the unsplit batch, in parent order."""
        self._check_done()
        if self.plan is None:
            raise ValueError("an idle forward has no rows to take logits of")
        fa, fb = (f if f is not None and f.batch is not None else None for f in self.forwards)
        live = [f for f in (fa, fb) if f is not None]
        with torch.inference_mode():
            if all_tokens:  # A's rows then B's: parent order, since A = [0, split) and B = [split, T)
                rows = torch.cat([f.hidden for f in live])
            else:
                parts = []
                if fa is not None:
                    # A's own sequences end in A; a cut sequence (A's last) ends in B
                    own = self.plan.children[0].batch_size - (0 if self.plan.cut_seq is None else 1)
                    parts.append(fa.hidden[fa.batch.last_token_indices[:own]])
                if fb is not None:
                    parts.append(fb.hidden[fb.batch.last_token_indices])
                rows = torch.cat(parts)
            return self.runner.model.logits(rows)


def run_two_batch(
    runner: ModelRunner, batch: ForwardBatch, plan: TwoBatchPlan, all_tokens: bool = False
) -> torch.Tensor:
    """The forward of `batch` as its two children, overlapped stage by stage. Returns what
    `runner.forward(batch, all_tokens)` returns, and writes the same KV."""
    if runner.cp is not None:
        raise ValueError("two-batch overlap does not run on a context-parallel runner")
    fwd = OverlappedForward.of(runner, batch, plan)
    fwd.run_layers(0, runner.num_layers)
    return fwd.logits(all_tokens)
