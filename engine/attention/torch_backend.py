"""Attention with torch's scaled_dot_product_attention over the paged pool; runs on CPU and CUDA."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.attention.base import AttentionBackend
from engine.batch import ForwardBatch, ForwardMode
from engine.device import to_device


@dataclass
class _ExtendMeta:
    starts: list[int]  # offset of each request's tokens in the ragged dimension
    kv_slots: list[torch.Tensor | None]  # None: no prefix, attend to the fresh K/V directly
    masks: list[torch.Tensor | None]  # None: plain causal


@dataclass
class _DecodeMeta:
    slots: torch.Tensor  # [B, S] padded KV slots
    mask: torch.Tensor  # [B, 1, 1, S] True where a key may be attended


class TorchAttention(AttentionBackend):
    name = "torch"

    def prepare(self, batch: ForwardBatch) -> None:
        self.batch = batch
        if batch.mode == ForwardMode.DECODE:
            batch.attn_metadata = self._prepare_decode(batch)
        else:
            batch.attn_metadata = self._prepare_extend(batch)

    def activate(self, batch: ForwardBatch) -> None:
        if batch.attn_metadata is None:
            self.prepare(batch)
        else:  # everything it needs is on the batch
            self.batch = batch

    def prepare_graph(self, batch: ForwardBatch, graph_batch_size: int, slot: str = "") -> None:
        # Never captured for real (`supports_cuda_graph` is False: its decode metadata changes shape with the
        # longest sequence); this lets the graph runner's padding run on CPU with an eager stand-in graph.
        self.prepare(batch)

    def _prepare_extend(self, batch: ForwardBatch) -> _ExtendMeta:
        starts, slots, masks = [], [], []
        offset = 0
        for i, (prefix, n) in enumerate(zip(batch.prefix_lens, batch.extend_lens, strict=True)):
            starts.append(offset)
            offset += n
            slots.append(batch.kv_slots(i) if prefix else None)
            window_bites = self.sliding_window is not None and prefix + n > self.sliding_window
            if prefix or window_bites:
                q_pos = torch.arange(prefix, prefix + n, device=batch.device)[:, None]
                k_pos = torch.arange(prefix + n, device=batch.device)[None, :]
                masks.append(self._allowed(q_pos, k_pos))
            else:
                masks.append(None)
        return _ExtendMeta(starts, slots, masks)

    def _prepare_decode(self, batch: ForwardBatch) -> _DecodeMeta:
        # Built on the host from the batch's lists and copied once: no device value is read back.
        seq_lens = batch.seq_lens
        max_len = max(seq_lens)
        slots = torch.zeros(batch.batch_size, max_len, dtype=torch.int64)
        for i, n in enumerate(seq_lens):
            slots[i, :n] = torch.tensor(batch.kv_slot_list(i), dtype=torch.int64)
        lens = to_device(seq_lens, torch.int64, batch.device)
        k_pos = torch.arange(max_len, device=batch.device)[None, :]
        q_pos = (lens - 1)[:, None]
        mask = self._allowed(q_pos, k_pos) & (k_pos < lens[:, None])
        return _DecodeMeta(to_device(slots, torch.int64, batch.device), mask[:, None, None, :])

    def _allowed(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        allowed = k_pos <= q_pos
        if self.sliding_window is not None:
            allowed &= q_pos - k_pos < self.sliding_window
        return allowed

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        assert self.batch is not None
        meta = self.batch.attn_metadata
        if isinstance(meta, _DecodeMeta):
            return self._decode(layer, q, meta)
        return self._extend(layer, q, k, v, meta)

    def _extend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: _ExtendMeta) -> torch.Tensor:
        assert self.batch is not None
        out = torch.empty_like(q)
        for i, n in enumerate(self.batch.extend_lens):
            s = meta.starts[i]
            qi = q[s : s + n].transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
            if meta.kv_slots[i] is None:
                ki, vi = k[s : s + n], v[s : s + n]
            else:
                ki = self.pool.gather_k(layer, meta.kv_slots[i])
                vi = self.pool.gather_v(layer, meta.kv_slots[i])
            ki = ki.to(q.dtype).transpose(0, 1).unsqueeze(0)
            vi = vi.to(q.dtype).transpose(0, 1).unsqueeze(0)
            mask = meta.masks[i]
            o = F.scaled_dot_product_attention(
                qi, ki, vi, attn_mask=mask, is_causal=mask is None, scale=self.scale, enable_gqa=True
            )
            out[s : s + n] = o.squeeze(0).transpose(0, 1)
        return out

    def _decode(self, layer: int, q: torch.Tensor, meta: _DecodeMeta) -> torch.Tensor:
        k = self.pool.gather_k(layer, meta.slots).to(q.dtype).transpose(1, 2)  # [B, Hkv, S, D]
        v = self.pool.gather_v(layer, meta.slots).to(q.dtype).transpose(1, 2)
        o = F.scaled_dot_product_attention(
            q.unsqueeze(2), k, v, attn_mask=meta.mask, scale=self.scale, enable_gqa=True
        )  # [B, Hq, 1, D]
        return o.squeeze(2)
