"""The aux buffer: one 64-byte row per in-flight room, carrying what decode needs besides the KV.

Prefill fills its own row and writes it into the row decode reserved, in the same way as KV pages; decode
checks room and prompt length before trusting the first token. Rows live on the KV device so one memory
registration covers both. 64 bytes because RDMA engines handle tiny writes poorly.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

from transfer.backends.base import MemoryRegion

ROW_BYTES = 64
ROW_DTYPE = np.dtype(
    {
        "names": ["room", "prompt_len", "first_token", "logprob"],
        "formats": ["<u8", "<u4", "<i4", "<f4"],
        "offsets": [0, 8, 12, 16],
        "itemsize": ROW_BYTES,
    }
)


@dataclass(frozen=True)
class AuxRow:
    room: int
    prompt_len: int
    first_token: int
    logprob: float


class AuxBuffer:
    def __init__(self, rows: int, device: torch.device | str = "cpu") -> None:
        self.rows = rows
        self.tensor = torch.zeros(rows, ROW_BYTES, dtype=torch.uint8, device=device)
        self._free = list(range(rows - 1, -1, -1))
        self._lock = threading.Lock()

    @property
    def region(self) -> MemoryRegion:
        return MemoryRegion(self.tensor.data_ptr(), ROW_BYTES, self.rows)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int | None:
        with self._lock:
            return self._free.pop() if self._free else None

    def free(self, row: int) -> None:
        self.tensor[row].zero_()  # a stale row must never pass decode's room check
        with self._lock:
            if row in self._free:
                raise ValueError(f"aux row {row} freed twice")
            self._free.append(row)

    def write(self, row: int, value: AuxRow) -> None:
        packed = np.zeros(1, dtype=ROW_DTYPE)
        packed[0] = (value.room, value.prompt_len, value.first_token, value.logprob)
        self.tensor[row].copy_(torch.from_numpy(packed.view(np.uint8)))

    def read(self, row: int) -> AuxRow:
        raw = self.tensor[row].cpu().numpy().view(ROW_DTYPE)[0]
        return AuxRow(int(raw["room"]), int(raw["prompt_len"]), int(raw["first_token"]), float(raw["logprob"]))
