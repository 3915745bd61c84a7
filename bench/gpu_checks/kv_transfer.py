"""KV over real transfer engines on the GPU: the layer pipeline's event ordering with the GPU lagging the host,
NIXL VRAM to VRAM, and bench/pipeline.py's TTFT table with real CUDA events.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

from bench.gpu_checks.common import ROOT, make_engine, random_prompts, require_cuda, vocab
from bench.gpu_checks.report import Ctx, Outcome, Skip, format_table
from engine.engine import Engine
from engine.kvcache import KVPool
from engine.sampling import SamplingParams
from harness.peer_proc import PeerProc
from prefill_server.forward import prefill_and_send
from transfer.bootstrap import BootstrapServer
from transfer.config import TransferConfig
from transfer.planner import PipelineSettings
from transfer.prefill import PrefillTransferManager
from transfer.protocol import TransferState

LAG_MS = 200.0  # the GPU starts the forward this long after the host queued it


def pick_backend() -> str:
    """NIXL where installed, else a GPU-capable Mooncake build, else the check cannot run."""
    if importlib.util.find_spec("nixl") is not None:
        return "nixl"
    if os.environ.get("PDSERVE_DEVICE_NO_MOONCAKE") == "1" or importlib.util.find_spec("mooncake") is None:
        raise Skip("nixl is not installed and mooncake is not installed (or not carried to this machine)")
    from transfer.backends.gpu_memory import gpu_memory_problem, probe_mooncake

    problem = gpu_memory_problem(probe_mooncake())
    if problem:
        raise Skip(f"nixl not installed, and the installed mooncake cannot move GPU memory: {problem}")
    return "mooncake"


def sleep_cycles(ms: float) -> int:
    """`torch.cuda._sleep` cycles that keep the current stream busy for about `ms` (clock measured here)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    probe = 20_000_000
    start.record()
    torch.cuda._sleep(probe)
    end.record()
    end.synchronize()
    return int(probe * ms / max(start.elapsed_time(end), 1e-3))


class WatchedSender:
    """A KVSender that notes, at each send, whether the event it is handed had completed yet: proof that the
    GPU really lagged (a send with a pending event is one an early read would have copied stale)."""

    def __init__(self, inner: Any, pending: list[bool]) -> None:
        self._inner, self._pending = inner, pending

    def send(self, start: int, end: int, pages: list[int], event: Any, last: bool = False) -> None:
        self._pending.append(not event.query())
        self._inner.send(start, end, pages, event, last=last)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def page_hashes(pool: KVPool, pages: list[int]) -> list[list[str]]:
    """sha1 of each (region, page), K of each layer then V of each layer: `transfer_peer.py`'s `hash` order."""
    out = []
    for t in (*pool.k, *pool.v):
        host = t[pages].contiguous().view(torch.uint8).cpu()
        out.append([hashlib.sha1(host[i].numpy().tobytes()).hexdigest() for i in range(len(pages))])
    return out


class EventOrderRun:
    """A prefill engine + manager here, a decode peer process; one lagged prefill per case."""

    def __init__(self, backend: str) -> None:
        self.engine: Engine = make_engine("flashinfer", pages=1024)
        layout = self.engine.pool.layout
        self.boot = BootstrapServer("127.0.0.1", 0).start()
        self.addr = f"127.0.0.1:{self.boot.port}"
        self.mgr = PrefillTransferManager(TransferConfig(backend=backend), self.engine.pool, bootstrap_addr=self.addr)
        # `device` is for a peer that can hold its pool in VRAM (the real decode side); an older peer ignores it
        self.decode = PeerProc(
            role="decode", backend=backend, num_layers=layout.num_layers, page_size=layout.page_size,
            num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim, num_pages=1024,
            dtype=layout.dtype_name, device="cuda",
        )  # fmt: skip
        self.room = 1000
        pool = self.engine.pool
        zero = torch.zeros((layout.num_kv_heads, layout.page_size, layout.head_dim), dtype=layout.dtype)  # a page (HND)
        self.zero_hash = hashlib.sha1(zero.view(torch.uint8).numpy().tobytes()).hexdigest()
        self.cycles = sleep_cycles(LAG_MS)
        self.pool = pool

    def case(self, lengths: list[int], seed: int) -> dict[str, Any]:
        engine, pool = self.engine, self.pool
        prompts = random_prompts(vocab(engine), lengths, seed)
        rooms = list(range(self.room, self.room + len(prompts)))
        self.room += len(prompts)
        dst = {}
        for room, p in zip(rooms, prompts, strict=True):
            dst[room] = self.decode.call("alloc", room=room, n=pool.pages_for(len(p)))["pages"]
            self.decode.call("scribble", pages=dst[room], seed=room)  # a page never written shows too
            self.decode.call("create", room=room, bootstrap_addr=self.addr, prompt_len=len(p))
        senders = [self.mgr.create_sender(room) for room in rooms]
        deadline = time.monotonic() + 60
        while not all(s.ready for s in senders):
            if time.monotonic() > deadline:
                raise TimeoutError("the decode peer's transfer info never arrived")
            time.sleep(0.005)
        reqs = [engine.make_request(p, SamplingParams(max_new_tokens=1)) for p in prompts]
        for req in reqs:
            req.pages = pool.allocator.allocate(pool.pages_for(len(req.prompt_ids))) or []
            if not req.pages:
                raise RuntimeError("the prefill KV pool is full")
        src = [p for r in reqs for p in r.pages]
        for t in (*pool.k, *pool.v):
            t[src] = 0  # what a read before the forward would find
        torch.cuda.synchronize()
        pending: list[bool] = []
        torch.cuda._sleep(self.cycles)  # the GPU lags from here: the forward below is queued behind it
        sample, groups = prefill_and_send(engine, reqs, [WatchedSender(s, pending) for s in senders], rooms,
                                          PipelineSettings())  # fmt: skip
        return self._check(reqs, senders, rooms, dst, sample, groups, pending)

    def _check(self, reqs: list, senders: list, rooms: list[int], dst: dict[int, list[int]], sample: Any,
               groups: list, pending: list[bool]) -> dict[str, Any]:  # fmt: skip
        deadline = time.monotonic() + 60
        while (states := [s.poll() for s in senders]) and not all(st == TransferState.SUCCESS for st in states):
            failed = [s.error for s, st in zip(senders, states, strict=True) if st == TransferState.FAILED]
            if failed or time.monotonic() > deadline:
                raise RuntimeError(f"prefill room did not succeed: {failed or states}")
            time.sleep(0.002)
        torch.cuda.synchronize()
        tokens, mismatched, stale, aux_bad = sample.token_ids.tolist(), 0, 0, []
        for i, (req, room) in enumerate(zip(reqs, rooms, strict=True)):
            out = self.decode.wait_state(room, {"SUCCESS", "FAILED"}, 30)
            if out["state"] != "SUCCESS":
                raise RuntimeError(f"decode room {room} ended {out['state']}: {out['error']}")
            if out["aux"][:3] != [room, len(req.prompt_ids), tokens[i]]:
                aux_bad.append(f"room {room}: aux {out['aux'][:3]}, expected {[room, len(req.prompt_ids), tokens[i]]}")
            ours = page_hashes(self.pool, req.pages)
            theirs = self.decode.call("hash", pages=dst[room])["hashes"]
            for mine, got in zip(ours, theirs, strict=True):
                for a, b in zip(mine, got, strict=True):
                    mismatched += a != b
                    stale += a != b and b == self.zero_hash
        for room, s in zip(rooms, senders, strict=True):
            s.release()
            self.decode.release(room)
        for req in reqs:
            self.pool.allocator.free(req.pages)
        pages = sum(len(r.pages) for r in reqs) * 2 * self.engine.pool.layout.num_layers
        return dict(groups=len(groups), sends=len(pending), pending=sum(pending), pages=pages,
                    mismatched=mismatched, stale=stale, aux_bad=aux_bad)  # fmt: skip

    def close(self) -> None:
        self.decode.close()
        self.mgr.close()
        self.boot.stop()


def pipeline_event_order(ctx: Ctx) -> Outcome:
    require_cuda()
    backend = pick_backend()
    run = EventOrderRun(backend)
    ctx.progress(f"{backend}; decode peer {run.decode.info.get('device', 'cpu (peer has no device option)')}; "
                 f"lag {LAG_MS:.0f} ms = {run.cycles} cycles")  # fmt: skip
    # two prompts of >= 1024 tokens: the pipelined path (N groups); one short prompt: the whole-forward path
    cases = [("pipelined", [1024] if ctx.quick else [2048, 2048]), ("whole forward", [300])]
    rows, bad = [], []
    try:
        for i, (label, lengths) in enumerate(cases):
            r = run.case(lengths, seed=70 + i)
            ctx.progress(f"{label}: {r}")
            problems = []
            if r["mismatched"] or r["aux_bad"]:
                problems.append(f"{r['mismatched']} of {r['pages']} pages differ ({r['stale']} stale zeros) "
                                f"{'; '.join(r['aux_bad'])}")  # fmt: skip
            if label == "pipelined" and r["groups"] < 2:
                problems.append(f"the prefill was not pipelined ({r['groups']} group)")
            if label == "pipelined" and not r["pending"]:
                problems.append("no send saw a pending event, so the check proved nothing: the GPU did not lag (or "
                                "a host sync in the prefill path waited the lag out)")  # fmt: skip
            bad += [f"{label}: {p}" for p in problems]
            sends = f"{r['pending']}/{r['sends']}"
            aux = "ok" if not r["aux_bad"] else "BAD"
            rows.append((label, "+".join(map(str, lengths)), r["groups"], sends, r["pages"], r["mismatched"],
                         r["stale"], aux, "FAIL" if problems else "ok"))  # fmt: skip
    finally:
        run.close()
    table = format_table(
        f"pipeline_event_order: {backend}, GPU {LAG_MS:.0f} ms behind the host; decode pages vs prefill pages, "
        "bit for bit (sha1 per layer K/V page)",
        ["path", "tokens", "groups", "sends pending", "pages", "differ", "stale", "aux", "ok"], rows,
    )  # fmt: skip
    if bad:
        return Outcome.of(False, "; ".join(bad), [table])
    piped = rows[0]
    return Outcome.of(True, f"{backend}: {piped[4]} pages bit-exact on decode after {piped[3]} group sends queued "
                      "while the GPU still slept; whole-forward path exact too", [table])  # fmt: skip


def _write(backend: Any, copies: list, timeout: float = 30.0) -> float:
    from transfer.backends import WriteStatus

    t0 = time.perf_counter()
    handle = backend.submit_write("dst", copies)
    while (status := backend.poll(handle))[0] == WriteStatus.PENDING:
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"NIXL write did not complete in {timeout}s")
    backend.release(handle)
    if status[0] != WriteStatus.DONE:
        raise RuntimeError(f"NIXL write failed: {status[1]}")
    return time.perf_counter() - t0


def nixl_vram_loopback(ctx: Ctx) -> Outcome:
    require_cuda()
    if importlib.util.find_spec("nixl") is None:
        raise Skip("nixl not installed")
    from transfer.backends import BackendSettings, Copy, MemoryRegion, create_backend

    item, n = 1 << 20, (64 if ctx.quick else 256)  # 1 MiB items
    src = torch.randint(0, 256, (n * item,), dtype=torch.uint8, device="cuda")
    dst = torch.zeros_like(src)
    torch.cuda.synchronize()  # the engine reads src outside torch's stream order
    a, b = create_backend("nixl", BackendSettings()), create_backend("nixl", BackendSettings())
    try:
        rb = [MemoryRegion(dst.data_ptr(), item, n)]
        a.register([MemoryRegion(src.data_ptr(), item, n)], src.device)
        b.register(rb, dst.device)
        a.add_peer("dst", b.metadata(), rb)
        _write(a, [Copy(0, 3, 7, 10)])  # offsets on both sides: items 3..12 land at 7..16
        partial_ok = torch.equal(dst[7 * item : 17 * item], src[3 * item : 13 * item]) and not dst[: 7 * item].any()
        times = [_write(a, [Copy(0, 0, 0, n)]) for _ in range(4)]
        whole_ok = torch.equal(src, dst)
    finally:
        a.close()
        b.close()
    gbps = n * item / statistics.median(times[1:]) / 1e9  # the first write includes connection set-up
    copy_s = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        copy_s.append(start.elapsed_time(end) / 1e3)
    hbm = n * item / min(copy_s) / 1e9
    table = format_table(
        "nixl_vram_loopback: two NIXL agents in one process, VRAM to VRAM (H200 HBM ~4.8 TB/s; a copy reads and "
        "writes, so ~2.4 TB/s of copied bytes is the bound; UCX loopback is expected far below it)",
        ["path", "MiB", "GB/s", "bytes exact"],
        [("NIXL write (median of 3 after the first)", n, f"{gbps:.1f}", whole_ok),
         ("NIXL write, offset items 3..12 -> 7..16", 10, "-", partial_ok),
         ("torch dst.copy_(src) on the device", n, f"{hbm:.1f}", "-")],
    )  # fmt: skip
    ok = whole_ok and partial_ok
    return Outcome.of(ok, f"{n} MiB {'bytes exact' if ok else 'NOT exact'} (offset copy "
                      f"{'exact' if partial_ok else 'WRONG'}), {gbps:.1f} GB/s vs device copy {hbm:.0f} GB/s",
                      [table])  # fmt: skip


def pipeline_ttft(ctx: Ctx) -> Outcome:
    require_cuda()
    backend = pick_backend()
    sizes = (["--lengths", "512,2048", "--ratios", "1", "--concurrency", "2", "--repeats", "1"] if ctx.quick else
             ["--lengths", "256,1024,4096", "--ratios", "0.5,1,2", "--concurrency", "4", "--repeats", "2"])  # fmt: skip
    cmd = [sys.executable, str(ROOT / "bench" / "pipeline.py"), "--device", "cuda", "--backend", backend, *sizes]
    ctx.progress(" ".join(cmd[1:]))
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=max(ctx.left() - 10, 30),
                              env=dict(os.environ, PYTHONUNBUFFERED="1"))  # fmt: skip
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return Outcome.of(False, f"bench/pipeline.py ran past {e.timeout:.0f}s", [out.strip()] if out.strip() else [])
    table = proc.stdout.strip()
    if proc.returncode != 0:
        return Outcome.of(False, f"bench/pipeline.py exited with {proc.returncode} (its stderr is above)",
                          [table] if table else [])  # fmt: skip
    eff = re.search(r"pipeline efficiency (\S+)", table)
    short = re.search(r"short prompt ratio (\S+)", table)
    return Outcome.of(True, f"{backend}: pipeline efficiency {eff.group(1) if eff else '?'}, short prompt ratio "
                      f"{short.group(1) if short else '?'} (pipelined/whole TTFT)", [table])  # fmt: skip
