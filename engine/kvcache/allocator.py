"""Page allocator that prefers contiguous runs.

Contiguous pages matter beyond tidiness: the transfer layer merges page runs that are contiguous on both
sides into one RDMA descriptor, so fewer, longer runs mean fewer descriptors per request.
"""

from __future__ import annotations

import threading

import numpy as np


class PageAllocator:
    def __init__(self, num_pages: int) -> None:
        if num_pages <= 0:
            raise ValueError(f"num_pages must be positive, got {num_pages}")
        self.num_pages = num_pages
        self._free = np.ones(num_pages, dtype=bool)
        self._num_free = num_pages
        # Servers free pages from transfer threads as well as the scheduler thread.
        self._lock = threading.Lock()

    @property
    def num_free(self) -> int:
        return self._num_free

    def free_pages(self) -> set[int]:
        with self._lock:
            return set(np.flatnonzero(self._free).tolist())

    def allocate(self, n: int) -> list[int] | None:
        """n pages, as few runs as possible; None (and nothing taken) when fewer than n are free."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n == 0:
            return []
        with self._lock:
            if n > self._num_free:
                return None
            runs = self._free_runs()
            lengths = runs[:, 1] - runs[:, 0]
            fits = np.flatnonzero(lengths >= n)
            if fits.size:
                # best fit: the smallest run that holds the whole request keeps big runs for big requests
                start = int(runs[fits[np.argmin(lengths[fits])], 0])
                pages = list(range(start, start + n))
            else:
                pages = []
                for r in np.argsort(-lengths, kind="stable"):
                    take = min(int(lengths[r]), n - len(pages))
                    pages.extend(range(int(runs[r, 0]), int(runs[r, 0]) + take))
                    if len(pages) == n:
                        break
            self._free[pages] = False
            self._num_free -= n
            return pages

    def free(self, pages: list[int]) -> None:
        if not pages:
            return
        with self._lock:
            idx = np.asarray(pages, dtype=np.int64)
            if idx.min() < 0 or idx.max() >= self.num_pages:
                raise ValueError(f"page index out of range [0, {self.num_pages})")
            if self._free[idx].any() or len(set(pages)) != len(pages):
                raise ValueError("double free of KV pages")
            self._free[idx] = True
            self._num_free += len(pages)

    def _free_runs(self) -> np.ndarray:
        """[R, 2] array of [start, end) of free runs."""
        padded = np.concatenate(([False], self._free, [False])).astype(np.int8)
        edges = np.flatnonzero(np.diff(padded))
        return edges.reshape(-1, 2)
