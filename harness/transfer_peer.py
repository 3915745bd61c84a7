"""One side of a KV transfer in its own process, driven by JSON-line commands on stdin (for tests and
benchmarks). It behaves like a server would: pages are reserved per room and freed only when the
transfer layer says no write can still touch them.

    python harness/transfer_peer.py '{"role": "prefill", "backend": "mooncake", ...}'

`bootstrap_port` (prefill) and `zmq_port` pin the peer's ports, so a test can restart it on the same address.

Tensor parallelism without an engine: `num_kv_heads` is the model's KV heads, `tp_rank`/`tp_size` pick the rank's
share (`engine.parallel.kv_head_range`). Prefill rank 0 runs the bootstrap server; other prefill ranks register
at rank 0's (`bootstrap_addr`). A prefill fills its pool so that the bytes of (layer, K/V, page, model head) do not
depend on the TP layout, and `head_hash` digests each (region, page, head) with the model head it is: tests compare
what lands on each decode rank with a same-TP run, head by head.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.device import CompletedEvent
from engine.kvcache import KVPool
from engine.kvcache.pool import KVLayout
from engine.parallel import kv_head_range
from transfer.aux import AuxRow
from transfer.backends import WriteStatus
from transfer.bootstrap import BootstrapServer
from transfer.config import Timeouts, TransferConfig
from transfer.decode import DecodeTransferManager
from transfer.planner import kv_copies, merge_runs
from transfer.prefill import PrefillTransferManager
from transfer.protocol import TransferState


class ManualEvent:
    """A device event the test completes by hand: stands in for a CUDA event still pending on the stream."""

    def __init__(self) -> None:
        self._done = threading.Event()

    def query(self) -> bool:
        return self._done.is_set()

    def synchronize(self) -> None:
        self._done.wait()

    def complete(self) -> None:
        self._done.set()


class Peer:
    def __init__(self, cfg: dict) -> None:
        self.role = cfg["role"]
        tp_rank, tp_size, total = cfg.get("tp_rank", 0), cfg.get("tp_size", 1), cfg.get("num_kv_heads", 2)
        heads = kv_head_range(total, tp_size, tp_rank)
        layout = KVLayout(
            num_layers=cfg.get("num_layers", 4),
            page_size=cfg.get("page_size", 4),
            num_kv_heads=heads.count,
            head_dim=cfg.get("head_dim", 8),
            dtype=getattr(torch, cfg.get("dtype", "float32")),
            kv_head_start=heads.start,
            total_kv_heads=total,
        )
        self.pool = KVPool(layout, cfg.get("num_pages", 64), cfg.get("device", "cpu"))
        timeouts = Timeouts(**cfg.get("timeouts", {}))
        tcfg = TransferConfig(backend=cfg["backend"], timeouts=timeouts, aux_rows=cfg.get("aux_rows", 16),
                              zmq_port=cfg.get("zmq_port", 0), tp_rank=tp_rank, tp_size=tp_size)  # fmt: skip
        self.events: dict[str, ManualEvent] = {}
        self.pages: dict[int, list[int]] = {}
        self.handles: dict[int, object] = {}
        if self.role == "prefill":
            if cfg.get("bootstrap_addr"):  # a rank != 0: registers at rank 0's bootstrap server
                self.addr = cfg["bootstrap_addr"]
            else:
                self.bootstrap = BootstrapServer("127.0.0.1", cfg.get("bootstrap_port", 0)).start()
                self.addr = f"127.0.0.1:{self.bootstrap.port}"
            self.mgr = PrefillTransferManager(tcfg, self.pool, bootstrap_addr=self.addr)
            self.fill(cfg.get("seed", 0))
        else:
            self.addr = ""
            self.mgr = DecodeTransferManager(tcfg, self.pool)

    def fill(self, seed: int) -> None:
        """Random bytes that depend on (seed, region, model head) only: every TP layout holds the same per head."""
        start = self.pool.layout.kv_head_start
        for region, t in enumerate((*self.pool.k, *self.pool.v)):
            for h in range(t.shape[1]):
                g = torch.Generator().manual_seed(hash((seed, region, start + h)) % 2**62)
                t[:, h] = torch.randn(t[:, h].shape, generator=g).to(t.dtype).to(t.device)

    # -- commands -----------------------------------------------------------------------------------

    def cmd_info(self) -> dict:
        return {
            "bootstrap_addr": self.addr,
            "endpoint": self.mgr.endpoint,
            "pages": self.pool.num_pages,
            "instance": self.mgr.instance,
            "device": str(self.pool.device),
        }

    def cmd_alloc(self, room: int, n: int, pages: list[int] | None = None) -> dict:
        alloc = self.pool.allocator
        if pages is not None:  # take specific pages (tests want non-contiguous layouts)
            free = alloc.free_pages()
            assert set(pages) <= free, "requested pages are not free"
            taken = alloc.allocate(len(free))
            alloc.free([p for p in taken if p not in pages])
        else:
            pages = alloc.allocate(n)
        self.pages[room] = pages
        return {"pages": pages}

    def cmd_create(self, room: int, bootstrap_addr: str = "", prompt_len: int = 0) -> dict:
        if self.role == "prefill":
            self.handles[room] = self.mgr.create_sender(room)
        else:
            self.handles[room] = self.mgr.create_receiver(room, bootstrap_addr, self.pages[room], prompt_len)
        return {}

    def cmd_send(self, room: int, start: int, end: int, event: str = "") -> dict:
        ev = self.events.setdefault(event, ManualEvent()) if event else CompletedEvent()
        self.handles[room].send(start, end, self.pages[room], ev)
        return {}

    def cmd_finish(self, room: int, prompt_len: int, token: int, logprob: float, event: str = "") -> dict:
        ev = self.events.setdefault(event, ManualEvent()) if event else CompletedEvent()
        sender = self.handles[room]
        if sender.write_aux(AuxRow(room, prompt_len, token, logprob)):
            sender.finish(ev)
        return {}

    def cmd_complete(self, event: str) -> dict:
        self.events.setdefault(event, ManualEvent()).complete()
        return {}

    def cmd_poll(self, room: int) -> dict:
        h = self.handles[room]
        reason = h.reason.value if h.reason is not None else None
        out = {"state": h.poll().name, "error": h.error, "reason": reason, "safe": h.safe_to_free()}
        if self.role == "decode" and out["state"] == "SUCCESS":
            if self.mgr.cfg.tp_rank == 0:  # the aux row reaches decode rank 0 only
                row = h.result()
                out["aux"] = [row.room, row.prompt_len, row.first_token, row.logprob]
            # what the room's own aux row holds in memory (on ranks != 0: never written, zeros)
            row = self.mgr.aux.read(self.mgr._room(room).aux_row)
            out["aux_memory"] = [row.room, row.prompt_len, row.first_token, row.logprob]
        return out

    def cmd_abort(self, room: int) -> dict:
        self.handles[room].abort()
        return {}

    def cmd_release(self, room: int) -> dict:
        h = self.handles[room]
        if not h.safe_to_free():
            return {"freed": False}
        h.release()
        self.pool.allocator.free(self.pages.pop(room))
        del self.handles[room]
        return {"freed": True}

    def cmd_hash(self, pages: list[int]) -> dict:
        """Digest of each (region, page): K of each layer, then V of each layer."""
        out = []
        for t in (*self.pool.k, *self.pool.v):
            raw = [t[p].contiguous().view(torch.uint8).cpu().numpy().tobytes() for p in pages]
            out.append([hashlib.sha1(b).hexdigest() for b in raw])
        return {"hashes": out}

    def cmd_head_hash(self, pages: list[int]) -> dict:
        """Digest of each (region, page, local head), and the model head of local head 0 (`start`)."""
        out = []
        for t in (*self.pool.k, *self.pool.v):
            host = t[pages].contiguous().view(torch.uint8).cpu().numpy()
            out.append([[hashlib.sha1(host[i, h].tobytes()).hexdigest() for h in range(t.shape[1])]
                        for i in range(len(pages))])  # fmt: skip
        return {"hashes": out, "start": self.pool.layout.kv_head_start}

    def cmd_bytes_total(self) -> dict:
        return {"bytes": self.mgr.bytes_total}

    def cmd_scribble(self, pages: list[int], seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        for t in (*self.pool.k, *self.pool.v):
            t[pages] = torch.randn(t[pages].shape, generator=g).to(t.dtype).to(t.device)
        return {}

    def cmd_timed_transfer(self, room: int, groups: list[list[int]], prompt_len: int, timeout: float = 60) -> dict:
        """Prefill: send every group and the aux row, spin until SUCCESS; seconds from first send."""
        sender = self.handles[room]
        t0 = time.perf_counter()
        for i, (start, end) in enumerate(groups):
            last = i == len(groups) - 1
            if last:
                sender.write_aux(AuxRow(room, prompt_len, 1, 0.0))
            sender.send(start, end, self.pages[room], CompletedEvent(), last=last)
        while (state := sender.poll()) not in (TransferState.SUCCESS, TransferState.FAILED):
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError(f"room {room} stuck in {state.name}")
            time.sleep(0.0002)  # as a scheduler between steps would; a hot loop here starves the worker
        if state != TransferState.SUCCESS:
            raise RuntimeError(sender.error)
        return {"seconds": time.perf_counter() - t0}

    def cmd_raw_write(self, room: int, timeout: float = 60) -> dict:
        """Prefill: the room's KV bytes with the same (merged) descriptors, written by the engine itself in
        one batch: Mooncake's batch_transfer_sync_write, NIXL's single prepared transfer."""
        info = next(iter(self.mgr._room(room).infos.values()))
        src = self.pages[room]
        runs = merge_runs(src, info.dst_pages[: len(src)])
        peer, heads = self.mgr._peers[info.session], self.pool.layout.num_kv_heads
        copies = kv_copies(0, self.mgr.num_layers, self.mgr.num_layers, src, info.dst_pages[: len(src)], peer.slices,
                           heads, peer.heads)  # fmt: skip
        backend = self.mgr.backend
        t0 = time.perf_counter()
        if backend.name == "mooncake":
            peer = backend._peers[info.session]
            reqs = backend._translate(info.session, peer, copies)
            rc = backend._engine.batch_transfer_sync_write(
                peer.session_id, [r[0] for r in reqs], [r[1] for r in reqs], [r[2] for r in reqs]
            )
            ok = rc == 0
        else:
            handle = backend.submit_write(info.session, copies)
            while (status := backend.poll(handle)[0]) == WriteStatus.PENDING:
                if time.perf_counter() - t0 > timeout:
                    raise TimeoutError("raw write did not complete")
            backend.release(handle)
            ok = status == WriteStatus.DONE
        seconds = time.perf_counter() - t0
        if not ok:
            raise RuntimeError("raw write failed")
        return {"seconds": seconds, "descriptors": len(copies), "pages": len(self.pages[room]), "runs": len(runs)}

    def cmd_status(self) -> dict:
        return {
            "free_pages": self.pool.allocator.num_free,
            "num_pages": self.pool.num_pages,
            "free_aux": self.mgr.aux.num_free,
            "aux_rows": self.mgr.aux.rows,
            "live_rooms": self.mgr.live_rooms(),
        }


def main() -> None:
    # Replies go to the real stdout; fd 1 itself becomes stderr, so a native library printing to stdout (UCX logs
    # a refused reconnect there when a peer dies) cannot garble the JSON-line channel.
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    peer = Peer(json.loads(sys.argv[1]))
    print(json.dumps({"ok": True, **peer.cmd_info()}), file=replies, flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        try:
            reply = {"ok": True, **getattr(peer, f"cmd_{req.pop('cmd')}")(**req)}
        except Exception as e:
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
        print(json.dumps(reply), file=replies, flush=True)
    peer.mgr.close()


if __name__ == "__main__":
    main()
