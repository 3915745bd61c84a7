"""The two-batch-overlap plugin of the CUDA-graph runner (engine/cuda_graph.py `GraphPlugin`): decode graphs captured
as two overlapped micro-batches (tbo_cp.md §1.6, with its replay-helper fix).

* Capture sizes are even (`even_sizes`): a bucket of `bs` padded rows always splits into `bs/2` + `bs/2`
  sequences (`two_batch.capture_split`), fixed per bucket at capture, and the children are slices of the bucket's
  static buffers (`child_batches` gives views), so a replay reads whatever the runner copied into those buffers.
* `counts` is the persistent `[a, b]` int32 tensor of the children's *real* (non-padded) token counts: written at
  capture with the bucket's split and again before every replay (`two_batch.replay_token_counts` for the real rows
  of that step: 5 real rows in a bucket of 8 give `[4, 1]`, 3 give `[3, 0]`, the B child all padding). Kernels that
  must skip padding rows (MoE dispatch, SGLang's `num_token_non_padded`) read it inside the graph; our dense models
  need no such skip, and the value is kept right for the ones that will.
* `can_replay(batch)`: a bucket replays its TBO graph only when two-batch overlap may run this step (the plugin is
  enabled); otherwise the runner runs the step eagerly.

What runs inside the graph is `OverlappedForward` on the padded batch's two children. Each child is planned, outside
the graph (before capture, and again before every replay from that step's page tables and lengths), into attention
graph buffers of its own (`prepare_graph(child, bs/2, slot)`: slots "a" and "b", the FlashInfer backend giving each
slot its own wrapper buffers and workspace), and inside the graph the executor only switches between them
(`activate`). On CPU the runner's eager stand-in (`EagerGraph`) re-runs the body at each replay with the children
planned for that replay, which tests every index here; the real capture runs in the device check (bench/gpu_check.py
`tbo_cuda_graph_equals_eager`) and has not run on a GPU yet.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from engine.batch import ForwardBatch
from engine.device import to_device
from engine.two_batch import DECODE, SplitPoint, TwoBatchPlan, build_children, capture_split, replay_token_counts
from engine.two_batch_forward import OverlappedForward, child_batches

if TYPE_CHECKING:
    from engine.model_runner import ModelRunner


class TwoBatchGraphPlugin:
    """Capture and replay hooks for two-batch-overlap decode graphs (module docstring)."""

    even_sizes = True

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.device = runner.device
        self.counts = torch.zeros(2, dtype=torch.int32, device=self.device)  # read by the captured graphs
        self.splits: dict[int, SplitPoint] = {}
        # per bucket: the padded batch of the capture or of the replay under way, its plan and its two children,
        # each planned into its own graph buffers (slots "a", "b") from that batch's host lists
        self._children: dict[int, tuple[ForwardBatch, TwoBatchPlan, tuple]] = {}
        # what each bucket was captured with: a captured graph keeps reading the device tensors it saw (the children's
        # last-token rows), so they must outlive every replay
        self._captured: dict[int, tuple[ForwardBatch, TwoBatchPlan, tuple]] = {}

    def capture_one_batch_size(self, graph_batch_size: int, batch: ForwardBatch) -> None:
        split = capture_split(graph_batch_size)
        self.splits[graph_batch_size] = split
        self._write((split.token_index, graph_batch_size - split.token_index))
        self._prepare_children(batch)
        self._captured[graph_batch_size] = self._children[graph_batch_size]

    def replay_prepare(self, batch: ForwardBatch, padded: ForwardBatch, graph_batch_size: int) -> None:
        if graph_batch_size not in self.splits:
            raise ValueError(f"no two-batch graph was captured for batch size {graph_batch_size}")
        self._write(replay_token_counts(graph_batch_size, batch.batch_size, DECODE))
        self._prepare_children(padded)
        self.runner.tbo_steps += 1

    def can_replay(self, batch: ForwardBatch) -> bool:
        """Only while two-batch overlap is on: the buckets hold TBO graphs only."""
        return self.runner.tbo_threshold is not None

    def body(self, padded: ForwardBatch) -> torch.Tensor:
        """What the bucket's graph computes: the padded batch as its two micro-batches, overlapped. At a replay the
        children are views of the same static buffers, with the replay's page tables and lengths."""
        padded, plan, children = self._children[padded.batch_size]
        fwd = OverlappedForward.prepared(self.runner, padded, plan, children)
        fwd.run_layers(0, self.runner.num_layers)
        return fwd.logits()

    def plan(self, padded: ForwardBatch) -> TwoBatchPlan:
        """The children of a padded bucket: its fixed split, over the padded batch's rows (one token each)."""
        bs = padded.batch_size
        if bs not in self.splits:
            raise ValueError(f"no two-batch graph was captured for batch size {bs}")
        return build_children(self.splits[bs], padded.prefix_lens, padded.extend_lens)

    def _prepare_children(self, padded: ForwardBatch) -> None:
        """Plan both children of the bucket into their graph slots (outside the graph: before capture or replay).
        Their rows are views of the bucket's static buffers; their last-token rows are 0..n-1 at every replay."""
        plan = self.plan(padded)
        children = child_batches(padded, plan)
        for slot, child in zip("ab", children, strict=True):
            assert child is not None, "an even bucket of one token per row splits into two non-empty halves"
            self.runner.attn.prepare_graph(child, child.batch_size, slot)
        self._children[padded.batch_size] = (padded, plan, children)

    def _write(self, counts: tuple[int, int]) -> None:
        # a non-blocking copy from pinned memory: the tensor's address never changes, only its value
        self.counts.copy_(to_device(list(counts), torch.int32, self.device), non_blocking=True)


__all__ = ["TwoBatchGraphPlugin"]
