"""Runs forward passes of one model over its paged KV pool.

`start_forward(batch)` returns a `LayerwiseForward`: run layer ranges in order, then take logits. The
prefill server's layer-pipelined forward (prefill_server/forward.py) runs it one layer group at a time and
hands each finished group to the transfer layer; the whole-forward path is the same object run over all
layers at once, so the two paths cannot drift apart. Decode batches replay a captured CUDA graph when
graphs are on (`engine/cuda_graph.py`); everything else runs eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from engine.attention import AttentionBackend, create_attention_backend
from engine.batch import ForwardBatch, ForwardMode
from engine.context_parallel import split_refusal
from engine.cp_forward import ContextParallelStep
from engine.cuda_graph import CapturedGraph, GraphRunner, capture_sizes
from engine.distributed import TPGroup
from engine.dp_attention import DPStepPlan
from engine.dp_forward import IdleForward, agree
from engine.kvcache import KVPool
from engine.layer_cursor import LayerCursor
from engine.models import LlamaFamilyModel
from engine.two_batch import TwoBatchPlan, plan_two_batch
from engine.two_batch_forward import OverlappedForward
from engine.two_batch_graph import TwoBatchGraphPlugin

log = logging.getLogger(__name__)

_TBO_MODES = (ForwardMode.EXTEND, ForwardMode.MIXED, ForwardMode.DECODE)


class LayerwiseForward(LayerCursor):
    """One batch's forward, advanced one layer range at a time.

    On a context-parallel runner an eligible batch runs as this rank's zigzag share (engine/cp_forward.py): the
    model sees the local batch and an attention that stores the whole group's KV; `cp_refusal` says why a batch
    ran whole instead (None when it ran context-parallel, or CP is off)."""

    def __init__(self, runner: ModelRunner, batch: ForwardBatch, prepared: bool = False) -> None:
        """`prepared`: the backend planned `batch` already (a micro-batch of a CUDA graph: `activate` switches to
        it; planning again inside a capture would plan the eager wrappers)."""
        self.runner = runner
        self.batch = batch
        self.cp: ContextParallelStep | None = None
        self.cp_refusal: str | None = None
        if runner.cp is not None:
            self.cp_refusal = split_refusal(batch.extend_lens, runner.cp.size, batch.mode)
            if self.cp_refusal is None:
                self.cp = ContextParallelStep(batch, runner.attn, runner.cp)
        # what the model's layers run on: this rank's share under CP, else the batch itself
        self.run_batch = self.cp.batch if self.cp is not None else batch
        self.tokens = batch.dp  # DP attention: every rank's rows of this batch (None otherwise)
        self.attn: AttentionBackend = self.cp.attn if self.cp is not None else runner.attn
        if prepared:
            self.attn.activate(self.run_batch)
        else:
            self.attn.prepare(self.run_batch)
        with torch.inference_mode():
            self.hidden = runner.model.embed(self.run_batch.input_ids)
            self.rope = runner.model.rope_tables(self.run_batch.positions)  # once per forward, not once per layer

    def run_layers(self, start: int, end: int) -> None:
        self._check_start(start)
        with torch.inference_mode():
            self.hidden = self.runner.model.run_layers(
                self.hidden, self.rope, start, end, self.attention(), self.tokens
            )
        self.next_layer = end

    def attention(self) -> AttentionBackend:
        """The backend, holding this forward's metadata: it is shared, and another batch (the other micro-batch of
        a two-batch overlap, a batch started meanwhile) may have prepared it since."""
        if self.runner.attn.batch is not self.run_batch:
            self.attn.activate(self.run_batch)
        return self.attn

    def logits(self, all_tokens: bool = False) -> torch.Tensor:
        """[B, V] float32 logits at each request's last token ([T, V] with all_tokens)."""
        self._check_done()
        with torch.inference_mode():
            if self.cp is not None:
                if all_tokens:
                    raise ValueError("a context-parallel forward gives logits at the last tokens only")
                return self.runner.model.logits(self.cp.last_hidden(self.hidden))
            rows = self.hidden if all_tokens else self.hidden[self.batch.last_token_indices]
            return self.runner.model.logits(rows)


class ModelRunner:
    def __init__(
        self,
        model: LlamaFamilyModel,
        pool: KVPool,
        attention_backend: str = "auto",
        cp: TPGroup | None = None,
        dp: TPGroup | None = None,
    ) -> None:
        """`cp`: the context-parallel group this rank computes prefills with (None: every batch runs whole).
        `dp`: the DP-attention group (engine/dp_forward.py): every forward is agreed with it first."""
        self.model = model
        self.pool = pool
        self.cp = cp if cp is not None and cp.size > 1 else None
        self.dp = dp if dp is not None and dp.size > 1 else None
        self.idle_steps = 0  # DP attention: IDLE forwards run (no rows here, others' MLP rows and collectives)
        # Two-batch overlap (engine/two_batch_forward.py): the token-distribution threshold when on, None when off
        self.tbo_threshold: float | None = None
        self.tbo_steps = 0  # forwards run as two overlapped micro-batches, and of those, with a two-chunk split
        self.two_chunk_steps = 0
        self.config = model.config
        self.device = pool.device
        self.attn: AttentionBackend = create_attention_backend(
            attention_backend, pool, model.num_local_heads, self.config.sliding_window
        )  # this rank's query heads (all of them with one rank); the pool holds its KV heads
        self.graphs: GraphRunner | None = None

    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    @property
    def attention_backend_name(self) -> str:
        return self.attn.name

    def build_batch(
        self, new_tokens: list[list[int]], prefix_lens: list[int], page_tables: list[list[int]], mixed: bool = False
    ) -> ForwardBatch:
        return ForwardBatch.build(new_tokens, prefix_lens, page_tables, self.pool.page_size, self.device, mixed)

    def start_forward(
        self, batch: ForwardBatch, split: bool = True, prepared: bool = False
    ) -> LayerwiseForward | OverlappedForward:
        """The batch's forward: as two overlapped micro-batches where two-batch overlap is on and the batch splits
        (`split=False`: never, the micro-batches' own forwards), else whole (context-parallel where eligible).
        Under DP attention the step's agreed plan decides (`agree` first; done here when the caller did not).
        `prepared` (with `split=False`): the backend planned the batch already (LayerwiseForward)."""
        if prepared:
            return LayerwiseForward(self, batch, prepared=True)
        if split and self.dp is not None:
            plan = batch.dp_plan if batch.dp_plan is not None else self.agree(batch, True)
            if plan.run_tbo:
                assert plan.split is not None, "a rank with a batch that agreed to overlap reported its split"
                return self._overlapped(batch, plan.split, plan)
            batch.dp = plan.tokens
            return LayerwiseForward(self, batch)
        if split and self.tbo_threshold is not None and self.cp is None and batch.mode in _TBO_MODES:
            plan = plan_two_batch(batch.mode.value, batch.prefix_lens, batch.extend_lens, self.tbo_threshold)
            if not any(c.is_empty for c in plan.children):  # one rank: an empty micro-batch overlaps nothing
                return self._overlapped(batch, plan)
        return LayerwiseForward(self, batch)

    def _overlapped(
        self, batch: ForwardBatch, plan: TwoBatchPlan, dp_plan: DPStepPlan | None = None
    ) -> OverlappedForward:
        self.tbo_steps += 1
        self.two_chunk_steps += plan.split.two_chunk
        return OverlappedForward.of(self, batch, plan, dp_plan)

    # -- DP attention ----------------------------------------------------------------------------------

    def agree(self, batch: ForwardBatch | None, has_work: bool) -> DPStepPlan:
        """This step's plan, agreed by every DP rank (one all-gather); every rank must call it once per step."""
        return agree(self, batch, has_work)

    def idle_step(self, has_work: bool) -> DPStepPlan:
        """A step in which this rank has no batch: agree, then run IDLE if another rank has one (no forward at all
        when none has). `has_work`: this rank still holds requests."""
        plan = self.agree(None, has_work)
        if plan.is_idle:
            self.run_idle(plan)
        return plan

    def run_idle(self, plan: DPStepPlan) -> None:
        """This rank's IDLE forward for a step where another rank has a batch: the same collectives, no rows."""
        if not plan.is_idle:
            raise ValueError("run_idle is for a step where this rank has no batch and another rank has one")
        self.idle_steps += 1
        if plan.run_tbo:
            self.tbo_steps += 1
            fwd: IdleForward | OverlappedForward = OverlappedForward.idle(self, plan)
        else:
            fwd = IdleForward(self, plan.tokens)
        fwd.run_layers(0, self.num_layers)

    def forward(self, batch: ForwardBatch, all_tokens: bool = False) -> torch.Tensor:
        if self.graphs is not None and not all_tokens and self.graphs.can_run(batch):
            return self.graphs.replay(batch)
        fwd = self.start_forward(batch)
        fwd.run_layers(0, self.num_layers)
        return fwd.logits(all_tokens)

    def capture_graphs(
        self,
        max_bs: int,
        progress: Callable[[str], None] = log.info,
        graph_factory: Callable[[object], CapturedGraph] | None = None,
    ) -> bool:
        """Capture decode graphs for batch sizes up to `max_bs`; False (and eager decode) where they cannot
        be used. `graph_factory` replaces the CUDA graph (tests run the runner's logic on CPU with an eager
        stand-in). A capture that fails leaves decode eager, with a warning: graphs are an optimisation."""
        if graph_factory is None:
            why = self._graphs_unusable()
            if why:
                progress(f"CUDA graphs off: {why}")
                return False
        plugin = TwoBatchGraphPlugin(self) if self.tbo_threshold is not None else None
        runner = GraphRunner(self, capture_sizes(max_bs), plugin, graph_factory=graph_factory)
        try:
            runner.capture_all(progress)
        except Exception as e:  # a kernel that cannot be captured must not stop the server
            log.warning("CUDA graph capture failed, decode runs eagerly: %s: %s", type(e).__name__, e)
            return False
        self.graphs = runner
        return True

    def _graphs_unusable(self) -> str | None:
        if self.device.type != "cuda":
            return f"the model runs on {self.device}"
        if self.dp is not None:
            return "DP attention runs its forwards eagerly (each step's row counts differ per rank)"
        if not self.attn.supports_cuda_graph:
            return f"the {self.attn.name} attention backend cannot be captured"
        return None
