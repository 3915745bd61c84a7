"""One rank's context-parallel (CP) forward of an EXTEND batch: its zigzag share of every sequence.

Every rank of the CP group holds the whole model and runs the same batch (SPMD). For an eligible batch
(`engine.context_parallel.split_refusal`: pure EXTEND, every sequence ≥ 2·cp new tokens) rank r computes only
its rows of the zigzag plan: blocks r and 2·cp−1−r of every sequence. Those rows run through the model as a
*local batch* whose sequences are the pieces (every sequence's prev block, then every next block), each an
extend on the KV before it: prefix = kv_len − q_len, the sequence's own page table. Everything per token
(embedding, RoPE at the pieces' real positions, projections, MLP) then needs nothing new, and attention is the
backend's ordinary ragged extend over the local batch, reading keys from the pool.

What makes that right is the KV: at every layer `ContextParallelAttention.store_kv` all-gathers the group's new
K/V (each rank padded to the largest share, `ZigzagPlan.share_size`, never the average), puts the rows back in
natural order (`restore_index`) and writes the whole batch's KV into this rank's pool at the batch's slots.
So every rank's pool ends with the full KV of every sequence — what the KV transfer sends, split between the
ranks by heads (transfer/config.py `full_kv_heads`) — and every piece's queries see exactly the keys before
them, prefix included. No pad token exists here: our batches are ragged, so nothing is aligned and no
per-sequence length can pass its pages (research/tbo_cp.md §3.6).

Logits: a sequence's last token ends block 2·cp−1, which is rank 0's "next" block, so rank 0 holds every last
hidden state; it broadcasts them (one [B, hidden] collective) and every rank computes the same logits.
"""

from __future__ import annotations

import torch

from engine.attention.base import AttentionBackend
from engine.batch import ForwardBatch, ForwardMode
from engine.context_parallel import ZigzagPlan, zigzag_split
from engine.device import to_device
from engine.distributed import TPGroup


def local_batch(batch: ForwardBatch, plan: ZigzagPlan) -> ForwardBatch:
    """The batch of this rank's pieces: sequence j of it is piece j of the plan (prevs, then nexts).

    Ids, positions and slots are the parent's rows `plan.token_indices`, taken on the device (no host read of
    the parent's tensors); the host lists give each piece its query length, its prefix (the keys before its
    first query) and its sequence's page table."""
    rows = to_device(plan.token_indices, torch.int64, batch.device)
    q_lens = [*plan.q_lens_prev, *plan.q_lens_next]
    kv_lens = [*plan.kv_lens_prev, *plan.kv_lens_next]
    seqs = [s for s, _ in plan.local_blocks]
    last = plan.last_token_rows or ()  # rows of every sequence's last token: on rank 0 only
    return ForwardBatch(
        mode=ForwardMode.EXTEND,
        input_ids=batch.input_ids[rows],
        positions=batch.positions[rows],
        out_cache_loc=batch.out_cache_loc[rows],
        prefix_lens=[kv - q for kv, q in zip(kv_lens, q_lens, strict=True)],
        extend_lens=q_lens,
        page_tables=[batch.page_tables[s] for s in seqs],
        page_size=batch.page_size,
        last_token_indices=to_device(list(last), torch.int64, batch.device),
    )


class ContextParallelAttention(AttentionBackend):
    """The backend as the model sees it during a CP forward: `store_kv` gathers and stores the whole group's K/V,
    `attend` is the real backend's, over the local batch it was prepared with."""

    name = "context-parallel"

    def __init__(self, inner: AttentionBackend, group: TPGroup, plan: ZigzagPlan, parent: ForwardBatch) -> None:
        super().__init__(inner.pool, inner.num_heads, inner.sliding_window)
        self.inner = inner
        self.group = group
        self.plan = plan
        self.slots = parent.out_cache_loc  # natural order: the KV of every token of the batch goes here
        self.restore = to_device(plan.restore_index, torch.int64, parent.device)

    def prepare(self, batch: ForwardBatch) -> None:
        self.batch = batch
        self.inner.prepare(batch)

    def activate(self, batch: ForwardBatch) -> None:
        self.batch = batch
        self.inner.activate(batch)

    def store_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        # one collective per layer: K and V side by side, each rank's rows padded to the largest share
        mine = torch.cat([k, v], dim=-1)
        padded = mine.new_zeros((self.plan.share_size, *mine.shape[1:]))
        padded[: mine.shape[0]] = mine
        gathered = self.group.all_gather(padded, dim=0)  # [cp · share, kv_heads, 2 · head_dim], rank order
        k_all, v_all = gathered[self.restore].split(k.shape[-1], dim=-1)
        self.pool.store(layer, self.slots, k_all, v_all)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.inner.attend(layer, q, k, v)


class ContextParallelStep:
    """What a CP forward changes for one batch: the local batch, the attention that stands in for the backend,
    and how the last hidden states reach every rank."""

    def __init__(self, batch: ForwardBatch, inner: AttentionBackend, group: TPGroup) -> None:
        self.plan = zigzag_split(batch.prefix_lens, batch.extend_lens, group.size, group.rank)
        self.group = group
        self.batch = local_batch(batch, self.plan)
        self.attn = ContextParallelAttention(inner, group, self.plan, batch)

    def last_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, hidden] of every sequence's last token, on every rank (rank 0 computed them all)."""
        num_seqs = self.plan.num_seqs
        if self.group.rank == 0:
            rows = hidden[self.batch.last_token_indices].contiguous()
        else:
            rows = hidden.new_empty((num_seqs, hidden.shape[-1]))
        return self.group.broadcast_(rows, src=0)
