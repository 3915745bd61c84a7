"""Runs forward passes of one model over its paged KV pool.

`start_forward(batch)` returns a `LayerwiseForward`: run layer ranges in order, then take logits. The
prefill server's layer-pipelined forward (prefill_server/forward.py) runs it one layer group at a time and
hands each finished group to the transfer layer; the whole-forward path is the same object run over all
layers at once, so the two paths cannot drift apart.
"""

from __future__ import annotations

import torch

from engine.attention import AttentionBackend, create_attention_backend
from engine.batch import ForwardBatch
from engine.kvcache import KVPool
from engine.models import LlamaFamilyModel


class LayerwiseForward:
    """One batch's forward, advanced one layer range at a time."""

    def __init__(self, runner: ModelRunner, batch: ForwardBatch) -> None:
        self.runner = runner
        self.batch = batch
        runner.attn.prepare(batch)
        with torch.inference_mode():
            self.hidden = runner.model.embed(batch.input_ids)
        self.next_layer = 0

    @property
    def done(self) -> bool:
        return self.next_layer == self.runner.num_layers

    def run_layers(self, start: int, end: int) -> None:
        if start != self.next_layer:
            raise ValueError(f"layer ranges must be consecutive: expected start {self.next_layer}, got {start}")
        # The backend's per-batch metadata is shared; another batch may have prepared it in between.
        if self.runner.attn.batch is not self.batch:
            self.runner.attn.prepare(self.batch)
        with torch.inference_mode():
            self.hidden = self.runner.model.run_layers(self.hidden, self.batch.positions, start, end, self.runner.attn)
        self.next_layer = end

    def logits(self, all_tokens: bool = False) -> torch.Tensor:
        """[B, V] float32 logits at each request's last token ([T, V] with all_tokens)."""
        if not self.done:
            raise ValueError(f"logits need all {self.runner.num_layers} layers; ran {self.next_layer}")
        rows = self.hidden if all_tokens else self.hidden[self.batch.last_token_indices]
        with torch.inference_mode():
            return self.runner.model.logits(rows)


class ModelRunner:
    def __init__(self, model: LlamaFamilyModel, pool: KVPool, attention_backend: str = "auto") -> None:
        self.model = model
        self.pool = pool
        self.config = model.config
        self.device = pool.device
        self.attn: AttentionBackend = create_attention_backend(
            attention_backend, pool, self.config.num_heads, self.config.sliding_window
        )

    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    def build_batch(
        self, new_tokens: list[list[int]], prefix_lens: list[int], page_tables: list[list[int]]
    ) -> ForwardBatch:
        return ForwardBatch.build(new_tokens, prefix_lens, page_tables, self.pool.page_size, self.device)

    def start_forward(self, batch: ForwardBatch) -> LayerwiseForward:
        return LayerwiseForward(self, batch)

    def forward(self, batch: ForwardBatch, all_tokens: bool = False) -> torch.Tensor:
        fwd = self.start_forward(batch)
        fwd.run_layers(0, self.num_layers)
        return fwd.logits(all_tokens)
