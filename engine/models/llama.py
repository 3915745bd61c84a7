"""The Llama-family decoder (Llama, Qwen2, Mistral): GQA, RoPE, RMSNorm, SwiGLU.

The forward is split into `embed`, `run_layers(start, end)` and `logits` so the prefill server can
compute a batch one layer group at a time; running consecutive ranges is exactly the full forward.
Operation order follows the reference implementation so that float32 logits agree to rounding.

Under tensor parallelism (a `TPGroup` of size > 1) each rank builds its shard of the model: its query heads
and KV heads (`engine.parallel.kv_head_range`) in a column-parallel fused q/k/v, a row-parallel o_proj, its
slice of the MLP (column-parallel gate/up, row-parallel down) and of the vocabulary (embedding and LM head);
see `engine/models/parallel_layers.py`. The API is the same at any size: `logits` gives full-vocabulary
float32 logits on every rank.

Under DP attention (`dp_attention=True`, engine/dp_attention.py) attention, embedding and LM head are whole on every
rank (each rank runs its own requests) and only the MLP is sharded over the group, run on every rank's tokens:
the layer ranges then take the step's `DPTokens` (every rank's row count), and a rank with no rows (IDLE) still
runs every layer's MLP collectives and its share of the other ranks' MLP rows.
"""

from __future__ import annotations

from collections.abc import Callable, Generator

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention.base import AttentionBackend
from engine.config import ModelConfig
from engine.distributed import PendingReduce, TPGroup
from engine.dp_attention import DPTokens
from engine.models.parallel_layers import (
    RowParallelLinear,
    VocabParallelEmbedding,
    dp_gather_async,
    dp_own_rows,
    dp_real_rows,
    vocab_parallel_logits,
)
from engine.models.rope import RopeTables, RotaryEmbedding, apply_rope
from engine.parallel import kv_head_range


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, tp: TPGroup) -> None:
        super().__init__()
        self.layer = layer
        # this rank's heads: an even share of the query heads, and the KV heads they use
        self.num_heads = cfg.num_heads // tp.size
        self.num_kv_heads = kv_head_range(cfg.num_kv_heads, tp.size, tp.rank).count
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * cfg.head_dim
        self.kv_size = self.num_kv_heads * cfg.head_dim
        # q, k and v projections fused into one matmul (column-parallel: this rank's rows); split after.
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = RowParallelLinear(self.q_size, cfg.hidden_size, cfg.o_bias, tp)

    def forward(self, x: torch.Tensor, rope: RopeTables, attn: AttentionBackend) -> torch.Tensor:
        return self.o_proj(self._attend(x, rope, attn))

    def launch(self, x: torch.Tensor, rope: RopeTables, attn: AttentionBackend) -> PendingReduce:
        """`forward` up to the o_proj all-reduce, which is left in flight; `o_proj.finish(pending.wait())` ends it."""
        return self.o_proj.launch(self._attend(x, rope, attn))

    def _attend(self, x: torch.Tensor, rope: RopeTables, attn: AttentionBackend) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(rope, q, k)
        return attn.forward(self.layer, q, k, v).reshape(-1, self.q_size)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup) -> None:
        super().__init__()
        inter = cfg.intermediate_size // tp.size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * inter, bias=cfg.mlp_bias)
        self.down_proj = RowParallelLinear(inter, cfg.hidden_size, cfg.mlp_bias, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self._act(x))

    def launch(self, x: torch.Tensor) -> PendingReduce:
        """`forward` up to the down_proj all-reduce, left in flight."""
        return self.down_proj.launch(self._act(x))

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return F.silu(gate) * up

    # DP attention: gather every rank's rows, compute this rank's slice for all of them, reduce, keep own rows

    def gather(self, x: torch.Tensor, tokens: DPTokens) -> PendingReduce:
        return dp_gather_async(x, tokens, self.down_proj.tp)

    def launch_gathered(self, gathered: torch.Tensor, tokens: DPTokens) -> PendingReduce:
        return self.launch(dp_real_rows(gathered, tokens))

    def own_rows(self, reduced: torch.Tensor, tokens: DPTokens) -> torch.Tensor:
        return dp_own_rows(self.down_proj.finish(reduced), tokens)

    def forward_dp(self, x: torch.Tensor, tokens: DPTokens) -> torch.Tensor:
        return self.own_rows(self.launch_gathered(self.gather(x, tokens).wait(), tokens).wait(), tokens)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, attn_tp: TPGroup, mlp_tp: TPGroup) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer, attn_tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, mlp_tp)

    def forward(
        self, x: torch.Tensor, rope: RopeTables, attn: AttentionBackend, tokens: DPTokens | None = None
    ) -> torch.Tensor:
        if tokens is None:
            x = x + self.self_attn(self.input_layernorm(x), rope, attn)
            return x + self.mlp(self.post_attention_layernorm(x))
        if x.shape[0]:  # an IDLE rank has no rows to attend with, but its MLP collectives still run
            x = x + self.self_attn(self.input_layernorm(x), rope, attn)
        if tokens.total == 0:  # no rank has rows in this micro-batch: every rank skips the collectives alike
            return x
        return x + self.mlp.forward_dp(self.post_attention_layernorm(x), tokens)


class LlamaFamilyModel(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup | None = None, dp_attention: bool = False) -> None:
        super().__init__()
        self.config = cfg
        self.tp = tp if tp is not None else TPGroup.single("cpu")
        # the group attention, embedding and LM head are split over: none under DP attention (each rank whole)
        self.dp_attention = dp_attention and self.tp.size > 1
        self.attn_tp = TPGroup.single(self.tp.device) if self.dp_attention else self.tp
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, self.attn_tp)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, self.attn_tp, self.tp) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # the LM head's slices are the embedding's (tied: the embedding shard itself)
        rows = self.embed_tokens.weight.shape[0]
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, rows, bias=False)
        self.rope = RotaryEmbedding(cfg.rope, cfg.head_dim, cfg.max_position_embeddings)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_local_heads(self) -> int:
        """The query heads this rank computes (all of them with one rank)."""
        return self.config.num_heads // self.attn_tp.size

    @property
    def weight_bytes(self) -> int:
        """Bytes of this rank's parameters (its shard under tensor parallelism)."""
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def rope_tables(self, positions: torch.Tensor) -> RopeTables:
        """The rotary tables of a batch: gathered once per forward, reused by every layer."""
        return self.rope.tables(positions, self.embed_tokens.weight.dtype)

    def _check_range(self, start: int, end: int, tokens: DPTokens | None) -> None:
        if not 0 <= start <= end <= self.num_layers:
            raise ValueError(f"layer range [{start}, {end}) outside [0, {self.num_layers})")
        if (tokens is not None) != self.dp_attention:
            raise ValueError("DP attention layers need the step's DPTokens; other layers take none")

    def run_layers(
        self,
        hidden: torch.Tensor,
        rope: RopeTables | None,
        start: int,
        end: int,
        attn: AttentionBackend | None,
        tokens: DPTokens | None = None,
    ) -> torch.Tensor:
        """Layers [start, end). Under DP attention `tokens` is every rank's row count (an IDLE rank: no rows, no
        rope, no attention)."""
        self._check_range(start, end, tokens)
        for layer in self.layers[start:end]:
            hidden = layer(hidden, rope, attn, tokens)
        return hidden

    def layer_stages(
        self,
        hidden: torch.Tensor,
        rope: RopeTables | None,
        start: int,
        end: int,
        attn: Callable[[], AttentionBackend | None],
        tokens: DPTokens | None = None,
    ) -> Generator[None, None, torch.Tensor]:
        """`run_layers` as stages for two-batch overlap: it yields while a row-parallel all-reduce (o_proj, then
        down_proj) is in flight, so the other micro-batch's stage runs before this one waits for it; the
        generator's value is the hidden state after layer `end - 1`. `attn()` gives the backend, prepared for this
        micro-batch, just before each attention. The same operations in the same order as `run_layers`.

        Under DP attention attention has no collective; the stages yield while the MLP's gather, then its reduce,
        is in flight (`tokens`: this micro-batch's rows on every rank)."""
        self._check_range(start, end, tokens)
        if tokens is not None:
            return (yield from self._dp_layer_stages(self.layers[start:end], hidden, rope, attn, tokens))
        for layer in self.layers[start:end]:
            pending = layer.self_attn.launch(layer.input_layernorm(hidden), rope, attn())
            yield
            hidden = hidden + layer.self_attn.o_proj.finish(pending.wait())
            pending = layer.mlp.launch(layer.post_attention_layernorm(hidden))
            yield
            hidden = hidden + layer.mlp.down_proj.finish(pending.wait())
        return hidden

    @staticmethod
    def _dp_layer_stages(
        layers: nn.ModuleList, hidden: torch.Tensor, rope: RopeTables | None, attn: Callable, tokens: DPTokens
    ) -> Generator[None, None, torch.Tensor]:
        for layer in layers:
            if hidden.shape[0]:
                hidden = hidden + layer.self_attn(layer.input_layernorm(hidden), rope, attn())  # type: ignore[arg-type]
            if tokens.total == 0:
                continue
            pending = layer.mlp.gather(layer.post_attention_layernorm(hidden), tokens)
            yield
            pending = layer.mlp.launch_gathered(pending.wait(), tokens)
            yield
            hidden = hidden + layer.mlp.own_rows(pending.wait(), tokens)
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head, for the rows of `hidden` given (usually each request's last token)."""
        hidden = self.norm(hidden)
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return vocab_parallel_logits(hidden, weight, self.config.vocab_size, self.attn_tp)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        """Hidden states after the last layer (before the final norm)."""
        return self.run_layers(self.embed(input_ids), self.rope_tables(positions), 0, self.num_layers, attn)
