"""DP attention in the runner: the step's agreement (one all-gather) and the IDLE forward.

`ModelRunner.agree(batch, has_work)` reports this rank's step (engine/dp_attention.py), gathers every rank's
report over the control group and returns the `DPStepPlan` every rank computes alike; the batch keeps it, and
`ModelRunner.start_forward` runs the batch whole or as two micro-batches by it, with every rank's row counts.
A rank with no batch while others have one runs `IdleForward`: no rows, no attention, but every layer's MLP gather
and reduce, and its slice of the MLP for the other ranks' rows, so the collectives match on every rank. A step
where no rank has a batch runs no forward anywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from engine.batch import ForwardBatch
from engine.dp_attention import DPStepPlan, DPTokens, RankStep, agree_step, idle_step, local_step
from engine.layer_cursor import LayerCursor
from engine.two_batch import TwoBatchPlan, plan_two_batch

if TYPE_CHECKING:
    from engine.model_runner import ModelRunner


class IdleForward(LayerCursor):
    """An IDLE rank's forward (or an empty micro-batch's): `LayerwiseForward`'s interface with zero rows."""

    cp = None
    cp_refusal: str | None = None
    batch: ForwardBatch | None = None  # no rows, nothing to sample
    rope = None

    def __init__(self, runner: ModelRunner, tokens: DPTokens) -> None:
        if tokens.local:
            raise ValueError(f"an idle forward has no rows, but this rank reported {tokens.local}")
        self.runner = runner
        self.tokens = tokens
        model = runner.model
        weight = model.embed_tokens.weight
        self.hidden = torch.empty(0, model.config.hidden_size, dtype=weight.dtype, device=weight.device)

    def attention(self) -> None:
        return None

    def run_layers(self, start: int, end: int) -> None:
        self._check_start(start)
        with torch.inference_mode():
            self.hidden = self.runner.model.run_layers(self.hidden, None, start, end, None, self.tokens)
        self.next_layer = end

    def logits(self, all_tokens: bool = False) -> torch.Tensor:
        raise ValueError("an idle forward has no rows to take logits of")


def report(runner: ModelRunner, batch: ForwardBatch | None, has_work: bool) -> tuple[RankStep, TwoBatchPlan | None]:
    """This rank's report (its tokens, mode and, with two-batch overlap on, its split's token counts) and that
    split, which the step then runs if it overlaps: the counts reported are the counts run."""
    if batch is None:
        return idle_step(has_work), None
    split = None
    if runner.tbo_threshold is not None:
        split = plan_two_batch(batch.mode.value, batch.prefix_lens, batch.extend_lens, runner.tbo_threshold)
    children = None if split is None else split.real_token_counts
    return local_step(batch.mode.value, batch.num_tokens, children, has_work), split


def agree(runner: ModelRunner, batch: ForwardBatch | None, has_work: bool) -> DPStepPlan:
    """The step's plan, the same on every rank (one all-gather of every rank's report); kept on `batch`."""
    group = runner.dp
    if group is None:
        raise ValueError("the runner has no DP attention group")
    step, split = report(runner, batch, has_work)
    rows = group.all_gather_ints(step.encode())
    plan = agree_step([RankStep.decode(r) for r in rows], group.rank, runner.tbo_threshold is not None, split)
    if batch is not None:
        batch.dp_plan = plan
    return plan
