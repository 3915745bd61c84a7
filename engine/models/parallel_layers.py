"""Tensor-parallel building blocks (Megatron style) over a `TPGroup`.

- column-parallel linears (fused q/k/v, fused gate/up) need no module of their own: each rank holds its rows
  of the weight in a plain `nn.Linear` and its output stays sharded (its heads, its slice of the MLP);
- `RowParallelLinear` (o_proj, down_proj): each rank multiplies its slice of the input by its columns of the
  weight, the partial sums are all-reduced, and the bias (replicated) is added once, after the reduce;
- `VocabParallelEmbedding`: each rank holds a slice of the padded vocabulary (`engine.parallel.padded_vocab`);
  ids outside the slice give zeros and the all-reduce sums the one non-zero row; the same slices make the LM
  head (`vocab_parallel_logits`), whose per-rank logits are gathered and cut back to the real vocabulary.

- DP attention (`dp_gather_async`, `dp_real_rows`, `dp_own_rows`): attention is replicated and each rank runs its
  own tokens; the MLP stays tensor-parallel over every rank's tokens, gathered before it, reduced and split after.

With one rank every forward is exactly the plain layer's (`F.linear`, `F.embedding`): no collective, the same
kernels, bit-identical results.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.distributed import PendingReduce, TPGroup
from engine.dp_attention import DPTokens
from engine.parallel import padded_vocab


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_local @ W_local^T) + b; `weight` is [out_features, in_features / tp]."""

    def __init__(self, in_local: int, out_features: int, bias: bool, tp: TPGroup) -> None:
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(out_features, in_local))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.linear(x, self.weight, self.bias)
        return self.finish(self.launch(x).wait())

    def launch(self, x: torch.Tensor) -> PendingReduce:
        """This rank's partial product with its all-reduce launched (two-batch overlap waits for it later)."""
        return self.tp.all_reduce_async(F.linear(x, self.weight))

    def finish(self, reduced: torch.Tensor) -> torch.Tensor:
        """The layer's output from the reduced partial sums: the bias, added once."""
        return reduced if self.bias is None else reduced + self.bias


def vocab_shard(vocab_size: int, tp: TPGroup) -> tuple[int, int, int]:
    """(start, rows, real rows) of this rank's slice of the padded vocabulary: rows it holds, and how many of
    them are real tokens (the rest, at the end of the last slices, are zero padding)."""
    rows = padded_vocab(vocab_size, tp.size) // tp.size
    start = tp.rank * rows
    return start, rows, max(0, min(rows, vocab_size - start))


class VocabParallelEmbedding(nn.Module):
    """The token embedding, `weight` [padded vocab / tp, hidden]: this rank's slice of the vocabulary."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.start, rows, _ = vocab_shard(vocab_size, tp)
        self.weight = nn.Parameter(torch.empty(rows, hidden_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce_(out.masked_fill(outside.unsqueeze(-1), 0))


def vocab_parallel_logits(hidden: torch.Tensor, weight: torch.Tensor, vocab_size: int, tp: TPGroup) -> torch.Tensor:
    """Full-vocabulary float32 logits on every rank from this rank's LM-head slice `weight`."""
    if tp.size == 1:
        return F.linear(hidden, weight).float()
    gathered = tp.all_gather(F.linear(hidden, weight), dim=-1)
    return gathered[..., :vocab_size].float()


# -- DP attention: the tensor-parallel MLP over every rank's tokens (engine/dp_attention.py) --------------------


def dp_gather_async(x: torch.Tensor, tokens: DPTokens, tp: TPGroup) -> PendingReduce:
    """Launch the gather of every rank's rows for the MLP: this rank's `x` padded to the largest share (gloo and
    NCCL gather equal shapes), the parts concatenated in rank order once `.wait()` returns."""
    if x.shape[0] != tokens.local:
        raise ValueError(f"{x.shape[0]} rows, but this rank reported {tokens.local} tokens")
    pad = tokens.max - tokens.local
    if pad:
        x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
    return tp.all_gather_async(x)


def dp_real_rows(gathered: torch.Tensor, tokens: DPTokens) -> torch.Tensor:
    """The gathered rows without the padding: every rank's real rows, in rank order (the same on every rank)."""
    m = tokens.max
    if all(c == m for c in tokens.counts):
        return gathered
    return torch.cat([gathered[r * m : r * m + c] for r, c in enumerate(tokens.counts) if c])


def dp_own_rows(reduced: torch.Tensor, tokens: DPTokens) -> torch.Tensor:
    """This rank's rows of the reduced MLP output over every rank's real rows. The sum over all rows is an
    all-reduce, then a slice: a reduce-scatter built from what gloo has (its reduce_scatter is missing)."""
    return reduced[tokens.offset : tokens.offset + tokens.local]
