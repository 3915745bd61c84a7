"""The aux buffer: one 64-byte row per in-flight room, carrying what decode needs besides the KV.

Prefill fills its own row and writes it into the row decode reserved, in the same way as KV pages; decode
checks room and prompt length before trusting the first token. Rows live on the KV device so one memory
registration covers both. 64 bytes because RDMA engines handle tiny writes poorly.

On CUDA neither side may make the host wait for the GPU here:
- prefill writes its row on the scheduler thread, right after sampling, from a pinned host staging row with a
  non-blocking copy on the current (compute) stream; the event recorded next covers it, and the transfer worker
  sends the row only once that event completed. A pageable `copy_` would synchronise the stream instead.
  Staging row i is rewritten only when device row i is allocated again, i.e. after its room drained, so the
  copy that read it has run;
- decode reads a row on its own side stream (which does not wait for the compute stream: the bytes were put
  there by the transfer engine, not by a kernel) into a pinned buffer, waiting for that tiny copy alone.
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
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.tensor = torch.zeros(rows, ROW_BYTES, dtype=torch.uint8, device=self.device)
        self._staging = torch.zeros(rows, ROW_BYTES, dtype=torch.uint8, pin_memory=cuda)  # write side
        self._readback = torch.zeros(ROW_BYTES, dtype=torch.uint8, pin_memory=cuda)  # read side
        self._read_stream = torch.cuda.Stream(self.device) if cuda else None
        self._read_lock = threading.Lock()  # one readback buffer
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

    def free(self, row: int, clear: bool = True) -> None:
        """Return `row`. `clear` zeroes it first, so a stale row never passes decode's room check; prefill,
        whose rows are only ever sent after being written whole, skips that kernel launch."""
        if clear:
            if self._read_stream is None:
                self.tensor[row].zero_()
            else:
                # On the side stream, waited for: queued on the compute stream, the zeroing could run after the
                # row was allocated again and the next room's RDMA write landed, and erase that write.
                with self._read_lock, torch.cuda.stream(self._read_stream):
                    self.tensor[row].zero_()
                    self._read_stream.synchronize()
        with self._lock:
            if row in self._free:
                raise ValueError(f"aux row {row} freed twice")
            self._free.append(row)

    def write(self, row: int, value: AuxRow) -> None:
        """Write `value` into `row`, ordered on the calling thread's current stream (non-blocking on CUDA)."""
        packed = np.zeros(1, dtype=ROW_DTYPE)
        packed[0] = (value.room, value.prompt_len, value.first_token, value.logprob)
        staging = self._staging[row]
        staging.copy_(torch.from_numpy(packed.view(np.uint8)))  # host to host
        self.tensor[row].copy_(staging, non_blocking=True)

    def read(self, row: int) -> AuxRow:
        """The row as it is in memory now; on CUDA it waits only for its own small copy."""
        with self._read_lock:
            if self._read_stream is None:
                raw_bytes = self.tensor[row].numpy().copy()
            else:
                with torch.cuda.stream(self._read_stream):
                    self._readback.copy_(self.tensor[row], non_blocking=True)
                self._read_stream.synchronize()
                raw_bytes = self._readback.numpy().copy()
        raw = raw_bytes.view(ROW_DTYPE)[0]
        return AuxRow(int(raw["room"]), int(raw["prompt_len"]), int(raw["first_token"]), float(raw["logprob"]))
