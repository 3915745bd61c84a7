"""NIXL descriptor lists for transfer/backends/nixl.py: one descriptor per item of every region, or per group of
`g` items where a whole write moves groups of `g` (the granularity).

A KV region's item is one KV head of one page (transfer/planner.py) and its `MemoryRegion.unit` the heads per
page; the aux region's unit is 1. NIXL posts one operation per descriptor, so moving a page of 8 heads as 8
descriptors costs 8 operations where one would do (measured on loopback: same-TP throughput fell by ~45% with
per-head descriptors). So a write is described at the coarsest granularity `g` that divides, for every copy into
a region whose unit is > 1 on either side, both sides' units and the copy's source, destination and count: same-TP
writes move whole pages (g = heads: one descriptor per page, as with page items), a head slice of a page moves as
one descriptor (g = the slice's heads), and only the aux region (unit 1) keeps its rows. Lists are prepared once
per granularity a peer is written with (at most the divisors of the heads per page).
"""

from __future__ import annotations

from math import gcd

import numpy as np

from transfer.backends.base import Copy, MemoryRegion


def coarse(region: MemoryRegion, g: int) -> bool:
    """Whether `region` is described in groups of `g` items at granularity `g`."""
    return g > 1 and region.unit % g == 0


def offsets(regions: list[MemoryRegion], g: int = 1) -> list[int]:
    """Index of each region's first descriptor at granularity `g`."""
    out, total = [], 0
    for r in regions:
        out.append(total)
        total += r.num_items // g if coarse(r, g) else r.num_items
    return out


def descriptor_rows(regions: list[MemoryRegion], dev_id: int, compressed: bool, g: int = 1) -> np.ndarray:
    """The descriptors of every region, in region order, as NIXL's Nx5 (compressed) or Nx3 array."""
    shapes = [(r.base, r.item_bytes * g, r.num_items // g) if coarse(r, g) else (r.base, r.item_bytes, r.num_items)
              for r in regions]  # fmt: skip
    if compressed:
        # Regions without items are left out; they add no descriptors, so the offsets stay right.
        rows = [(base, size, dev_id, size, n) for base, size, n in shapes if n > 0]
        return np.array(rows, dtype=np.uint64).reshape(-1, 5)
    arr = np.empty((sum(n for _, _, n in shapes), 3), dtype=np.uint64)
    for (base, size, n), off in zip(shapes, offsets(regions, g), strict=True):
        rows = arr[off : off + n]
        rows[:, 0] = np.uint64(base) + np.arange(n, dtype=np.uint64) * np.uint64(size)
        rows[:, 1] = size
        rows[:, 2] = dev_id
    return arr


def runs_to_indices(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenate ``range(s, s + c)`` for each run, vectorised (a write can be thousands of items)."""
    total = int(counts.sum())
    # Each item's index is its run's start plus its position within the run.
    run_begin = np.cumsum(counts) - counts
    return (np.repeat(starts - run_begin, counts) + np.arange(total, dtype=np.int64)).astype(np.int32)


def granularity(copies: list[Copy], local: list[MemoryRegion], remote: list[MemoryRegion]) -> int:
    """The coarsest g at which every copy of the write is whole descriptors on both sides (see the docstring)."""
    g = 0
    for c in copies:
        lu, ru = local[c.region].unit, remote[c.region].unit
        if lu > 1 or ru > 1:
            g = gcd(g, lu, ru, c.src, c.dst, c.count)
            if g == 1:
                break
    return max(g, 1)


def indices(copies: list[Copy], regions: list[MemoryRegion], starts: list[int], g: int, src: bool) -> np.ndarray:
    """Descriptor indices of the copies' source (`src`) or destination items at granularity `g`."""
    firsts, counts = [], []
    for c in copies:
        item = c.src if src else c.dst
        div = g if coarse(regions[c.region], g) else 1
        firsts.append(starts[c.region] + item // div)
        counts.append(c.count // div)
    return runs_to_indices(np.array(firsts, dtype=np.int64), np.array(counts, dtype=np.int64))
