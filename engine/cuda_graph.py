"""CUDA-graph decode: the decode forward captured once per batch-size bucket, replayed every step.

A decode step of a small model is a few hundred tiny kernels, and launching them from Python costs more
than running them; a captured graph launches them all at once. A graph replays fixed shapes and fixed
addresses, so:
- batches are padded up to the next captured size (`capture_sizes`, `bucket_for`); padding rows decode
  one dummy token whose KV goes to the pool's scratch page, which no request owns;
- token ids, positions and KV slots are copied into static buffers before each replay, and the attention
  backend refills the metadata buffers its graph was captured with (`AttentionBackend.prepare_graph`);
- the logits come back in the graph's own output buffer (read it before the next replay).

Preparation is delegated to a `GraphPlugin` with two hooks, capture-one-batch-size and replay-prepare, so
a later two-batch-overlap plugin can compute its split indices at capture and again at every replay without
touching this runner (the shape SGLang gave its TBO CUDA-graph refactor).
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch

from engine.batch import ForwardBatch, ForwardMode

if TYPE_CHECKING:
    from engine.model_runner import ModelRunner

log = logging.getLogger(__name__)


def capture_sizes(max_bs: int) -> list[int]:
    """The batch sizes to capture: 1, 2, 4, 8, then every 8 up to `max_bs` (always included)."""
    if max_bs < 1:
        raise ValueError(f"cuda_graph_max_bs must be >= 1, got {max_bs}")
    sizes = [s for s in (1, 2, 4) if s < max_bs] + list(range(8, max_bs, 8))
    return sorted({*sizes, max_bs})


def bucket_for(batch_size: int, sizes: list[int]) -> int | None:
    """The smallest captured size that holds `batch_size` rows; None when the batch is too large."""
    i = bisect_left(sizes, batch_size)
    return sizes[i] if i < len(sizes) else None


def even_sizes(sizes: list[int]) -> list[int]:
    """`sizes` rounded up to even numbers (two-batch-overlap graphs split each bucket in halves)."""
    return sorted({s + s % 2 for s in sizes})


class GraphPlugin(Protocol):
    """Extra per-batch-size state a captured forward needs (e.g. two-batch overlap's split indices,
    engine/two_batch_graph.py). `even_sizes`: capture only even batch sizes."""

    even_sizes: bool

    def capture_one_batch_size(self, graph_batch_size: int, batch: ForwardBatch) -> None:
        """Called before capturing the bucket, with its all-padding batch."""

    def replay_prepare(self, batch: ForwardBatch, padded: ForwardBatch, graph_batch_size: int) -> None:
        """Called before each replay, with the real batch and its padded form."""

    def can_replay(self, batch: ForwardBatch) -> bool:
        """Whether this step may replay the captured graphs (else it runs eagerly)."""

    def body(self, padded: ForwardBatch) -> torch.Tensor | None:
        """The forward to capture for a bucket, or None for the runner's own."""


class NoPlugin:
    even_sizes = False

    def can_replay(self, batch: ForwardBatch) -> bool:
        return True

    def body(self, padded: ForwardBatch) -> torch.Tensor | None:
        return None

    def capture_one_batch_size(self, graph_batch_size: int, batch: ForwardBatch) -> None:
        return None

    def replay_prepare(self, batch: ForwardBatch, padded: ForwardBatch, graph_batch_size: int) -> None:
        return None


class CapturedGraph(Protocol):
    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor: ...

    def replay(self) -> None: ...


class CudaGraph:
    """A `torch.cuda.CUDAGraph`: warmed up once on a side stream, then captured into a shared memory pool."""

    def __init__(self, pool: object) -> None:
        self._pool = pool
        self._graph = torch.cuda.CUDAGraph()

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()  # lazy initialisation (cuBLAS handles, kernel loading) must not happen inside the capture
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(self._graph, pool=self._pool):
            out = fn()
        return out

    def replay(self) -> None:
        self._graph.replay()


class EagerGraph:
    """Runs the captured function again at each replay: the runner's padding and buffer logic on CPU (tests)."""

    def __init__(self, pool: object = None) -> None:
        self._fn: Callable[[], torch.Tensor] | None = None
        self._out: torch.Tensor | None = None

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        self._fn = fn
        self._out = fn()
        return self._out

    def replay(self) -> None:
        assert self._fn is not None and self._out is not None
        self._out.copy_(self._fn())


class GraphRunner:
    """Captured decode forwards for `sizes`, replayed by `ModelRunner.forward` for decode batches that fit."""

    def __init__(
        self,
        runner: ModelRunner,
        sizes: list[int],
        plugin: GraphPlugin | None = None,
        graph_factory: Callable[[object], CapturedGraph] | None = None,
    ) -> None:
        self.runner = runner
        self.plugin = plugin or NoPlugin()
        self.batch_sizes = even_sizes(sizes) if self.plugin.even_sizes else sorted(sizes)
        self.replays = 0
        self._factory = graph_factory or CudaGraph
        self._mem_pool = torch.cuda.graph_pool_handle() if self._factory is CudaGraph else None
        max_bs, dev = self.batch_sizes[-1], runner.device
        self._ids = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self._pos = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self._loc = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self._scratch_slot = runner.pool.scratch_page * runner.pool.page_size
        self._graphs: dict[int, CapturedGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}

    @property
    def max_batch_size(self) -> int:
        return self.batch_sizes[-1]

    def capture_all(self, progress: Callable[[str], None] = log.info) -> None:
        # largest first: the smaller graphs then fit in the memory pool the largest one left behind
        for i, bs in enumerate(reversed(self.batch_sizes), 1):
            padded = self._padded(None, bs)
            self.plugin.capture_one_batch_size(bs, padded)
            self.runner.attn.prepare_graph(padded, bs)
            graph = self._factory(self._mem_pool)
            with torch.inference_mode():
                self._outputs[bs] = graph.capture(lambda b=padded: self._body(b))
            self._graphs[bs] = graph
            progress(f"captured decode graph {i}/{len(self.batch_sizes)} (batch size {bs})")

    def can_run(self, batch: ForwardBatch) -> bool:
        return (
            batch.mode == ForwardMode.DECODE
            and batch.batch_size <= self.max_batch_size
            and self.plugin.can_replay(batch)
        )

    def replay(self, batch: ForwardBatch) -> torch.Tensor:
        """[B, V] float32 logits of a decode batch (a view of the graph's output buffer)."""
        bs = bucket_for(batch.batch_size, self.batch_sizes)
        if bs is None or batch.mode != ForwardMode.DECODE:
            raise ValueError(f"no captured graph for a {batch.mode.value} batch of {batch.batch_size}")
        padded = self._padded(batch, bs)
        self.plugin.replay_prepare(batch, padded, bs)
        self.runner.attn.prepare_graph(padded, bs)
        with torch.inference_mode():
            self._graphs[bs].replay()
        self.replays += 1
        return self._outputs[bs][: batch.batch_size]

    def _padded(self, batch: ForwardBatch | None, bs: int) -> ForwardBatch:
        """`batch` (None: no real rows) padded to `bs` rows in the static buffers; device copies only."""
        n = 0 if batch is None else batch.batch_size
        if batch is not None:
            self._ids[:n].copy_(batch.input_ids, non_blocking=True)
            self._pos[:n].copy_(batch.positions, non_blocking=True)
            self._loc[:n].copy_(batch.out_cache_loc, non_blocking=True)
        if n < bs:
            self._ids[n:bs].zero_()
            self._pos[n:bs].zero_()
            self._loc[n:bs].fill_(self._scratch_slot)
        pad = bs - n
        scratch = self.runner.pool.scratch_page
        return ForwardBatch(
            mode=ForwardMode.DECODE,
            input_ids=self._ids[:bs],
            positions=self._pos[:bs],
            out_cache_loc=self._loc[:bs],
            prefix_lens=(batch.prefix_lens if batch else []) + [0] * pad,
            extend_lens=[1] * bs,
            page_tables=(batch.page_tables if batch else []) + [[scratch]] * pad,
            page_size=self.runner.pool.page_size,
        )

    def _body(self, batch: ForwardBatch) -> torch.Tensor:
        out = self.plugin.body(batch)
        if out is not None:
            return out
        # not a LayerwiseForward: its prepare() would plan the eager wrapper, not this bucket's graph buffers
        model = self.runner.model
        return model.logits(model.forward(batch.input_ids, batch.positions, self.runner.attn))
