"""Turning pages into descriptors: merge page runs contiguous on both sides, and expand layers to regions.

Region order, identical on both sides: K of layer 0..L-1, V of layer 0..L-1, then the aux buffer.

A KV region's item is one KV head of one page (the pool is HND: [pages + 1, heads, page_size, head_dim]), so
page p, local head h is item `p * heads + h`, and items have the same size on both sides whatever their TP sizes.
A run of n pages copied whole (same TP: every head on both sides) is one copy of n * heads items; a head slice
of a page (another TP size: transfer/head_map.py) is one copy per page.
"""

from __future__ import annotations

from dataclasses import dataclass

from transfer.backends.base import Copy
from transfer.head_map import HeadSlice


def merge_runs(src_pages: list[int], dst_pages: list[int]) -> list[tuple[int, int, int]]:
    """[(src_start, dst_start, count)] covering the page pairs, one run per stretch contiguous on both sides."""
    if len(src_pages) != len(dst_pages):
        raise ValueError(f"{len(src_pages)} source pages but {len(dst_pages)} destination pages")
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src_pages, dst_pages, strict=True):
        if runs:
            rs, rd, n = runs[-1]
            if s == rs + n and d == rd + n:
                runs[-1] = (rs, rd, n + 1)
                continue
        runs.append((s, d, 1))
    return runs


def k_region(layer: int) -> int:
    return layer


def v_region(layer: int, num_layers: int) -> int:
    return num_layers + layer


def aux_region(num_layers: int) -> int:
    return 2 * num_layers


def item_spans(
    runs: list[tuple[int, int, int]], slices: list[HeadSlice], src_heads: int, dst_heads: int
) -> list[tuple[int, int, int]]:
    """(src item, dst item, count) of each layer buffer for page runs and head slices.

    `src_heads`/`dst_heads`: the heads each side's pool holds (items per page). A slice covering every head of
    both sides copies each run whole (one span per run); any other slice is one span per page."""
    spans: list[tuple[int, int, int]] = []
    for sl in slices:
        if sl.count == src_heads == dst_heads:
            spans.extend((s * src_heads, d * dst_heads, n * src_heads) for s, d, n in runs)
            continue
        for s, d, n in runs:
            spans.extend(((s + k) * src_heads + sl.src, (d + k) * dst_heads + sl.dst, sl.count) for k in range(n))
    return spans


def layer_copies(start: int, end: int, num_layers: int, spans: list[tuple[int, int, int]]) -> list[Copy]:
    """Copies of layers [start, end) for the given item spans (`item_spans`): K and V of each layer."""
    copies = []
    for layer in range(start, end):
        for region in (k_region(layer), v_region(layer, num_layers)):
            copies.extend(Copy(region, s, d, n) for s, d, n in spans)
    return copies


def kv_copies(
    start: int,
    end: int,
    num_layers: int,
    src_pages: list[int],
    dst_pages: list[int],
    slices: list[HeadSlice],
    src_heads: int,
    dst_heads: int,
) -> list[Copy]:
    """Every copy of layers [start, end) from `src_pages` into `dst_pages` (pairwise) for these head slices."""
    if not slices:
        return []
    return layer_copies(
        start, end, num_layers, item_spans(merge_runs(src_pages, dst_pages), slices, src_heads, dst_heads)
    )


@dataclass
class PipelineSettings:
    """Layer-pipelined prefill (DESIGN §4): when a batch is split into layer groups, and into how many."""

    enabled: bool = True
    min_tokens: int = 1024  # average new tokens per request below which the whole forward runs
    max_iters: int = 10  # groups at min_tokens
    min_iters: int = 4  # groups at saturation (min_tokens * sat_multiplier and beyond)
    sat_multiplier: float = 3.0
    group_size: int | None = None  # fixed layers per group; overrides the adaptive rule

    def validate(self) -> None:
        if self.min_tokens < 1:
            raise ValueError(f"pipeline min_tokens must be >= 1, got {self.min_tokens}")
        if self.min_iters < 1:
            raise ValueError(f"pipeline min_iters must be >= 1, got {self.min_iters}")
        if self.min_iters > self.max_iters:
            raise ValueError(f"pipeline min_iters ({self.min_iters}) must not exceed max_iters ({self.max_iters})")
        if self.sat_multiplier <= 1:
            raise ValueError(f"pipeline sat_multiplier must be > 1, got {self.sat_multiplier}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"pipeline group_size must be >= 1, got {self.group_size}")


MIN_PIPELINE_LAYERS = 5  # models of 4 layers or fewer gain nothing from splitting


def num_groups(avg_new_tokens: float, s: PipelineSettings) -> int:
    """N from DESIGN §4: max_iters at min_tokens, falling linearly to min_iters at saturation."""
    sat = s.min_tokens * s.sat_multiplier
    t = min(max((avg_new_tokens - s.min_tokens) / (sat - s.min_tokens), 0.0), 1.0)
    return round(s.max_iters - t * (s.max_iters - s.min_iters))


def plan_layer_groups(num_layers: int, avg_new_tokens: float, s: PipelineSettings) -> list[tuple[int, int]]:
    """Consecutive [start, end) layer ranges covering every layer once; one range means the whole forward."""
    eligible = s.enabled and num_layers >= MIN_PIPELINE_LAYERS and avg_new_tokens >= s.min_tokens
    if not eligible:
        return [(0, num_layers)]
    size = s.group_size or max(1, num_layers // num_groups(avg_new_tokens, s))
    return [(a, min(a + size, num_layers)) for a in range(0, num_layers, size)]
