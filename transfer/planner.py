"""Turning pages into descriptors: merge page runs contiguous on both sides, and expand layers to regions.

Region order, identical on both sides: K of layer 0..L-1, V of layer 0..L-1, then the aux buffer.
"""

from __future__ import annotations

from transfer.backends.base import Copy


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


def layer_copies(start: int, end: int, num_layers: int, runs: list[tuple[int, int, int]]) -> list[Copy]:
    """Copies of layers [start, end) for the given page runs: K and V of each layer."""
    copies = []
    for layer in range(start, end):
        for region in (k_region(layer), v_region(layer, num_layers)):
            copies.extend(Copy(region, s, d, n) for s, d, n in runs)
    return copies
