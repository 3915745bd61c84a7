"""Layer-pipelined prefill vs the whole-forward path: TTFT against the bound of DESIGN §4.

The prefill runs in this process with the real prefill code (`prefill_server.forward.prefill_and_send`,
the real transfer worker and engine); the decode side is a separate process receiving the KV over a real
engine on loopback. Loopback is far faster than CPU compute, so the transfer layer's link emulation paces
the writes to a bandwidth that gives the wanted T/C (T: transfer time of the request's KV, C: its forward
time, measured first). TTFT here is from the start of the forward until every write of the room, aux row
included, has landed on decode (the moment decode can emit the first token).

On a GPU (`--device cuda`) the prefill pool is in VRAM, the layer groups' events are real CUDA events the
transfer worker waits on, and the model runs in bfloat16 (FlashInfer has no float32 kernels).

    .venv/bin/python bench/pipeline.py [--backend mooncake] [--lengths 256,1024,4096] [--ratios 0.25,0.5,1,2]
    python3 bench/pipeline.py --device cuda --backend nixl
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.sampling import SamplingParams
from harness.peer_proc import PeerProc
from prefill_server.forward import prefill_and_send
from transfer.bootstrap import BootstrapServer
from transfer.config import TransferConfig
from transfer.planner import PipelineSettings
from transfer.prefill import PrefillTransferManager
from transfer.protocol import TransferState


def progress(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def engine_config(model: str, pages: int, device: str, dtype: str | None, attention_backend: str) -> EngineConfig:
    """The prefill engine: only prefill runs here, so no decode graphs are captured (start-up time)."""
    if device != "cpu" and dtype is None:
        dtype = "bfloat16"  # the built-in models are float32, which FlashInfer cannot run
    kw: dict = dict(model=model, device=device, dtype=dtype, attention_backend=attention_backend, num_pages=pages,
                    max_prefill_tokens=1 << 16)  # fmt: skip
    if "disable_cuda_graph" in {f.name for f in dataclasses.fields(EngineConfig)}:
        kw["disable_cuda_graph"] = True
    return EngineConfig(**kw)


class Bench:
    def __init__(self, model: str, backend: str, pages: int, device: str = "cpu", dtype: str | None = None,
                 attention_backend: str = "auto") -> None:  # fmt: skip
        self.engine = Engine(engine_config(model, pages, device, dtype, attention_backend))
        layout = self.engine.pool.layout
        # a peer that can hold its pool in VRAM takes `device` (the real decode side); on CPU nothing changes
        where = {"device": self.engine.device.type} if self.engine.device.type != "cpu" else {}
        self.boot = BootstrapServer("127.0.0.1", 0).start()
        self.addr = f"127.0.0.1:{self.boot.port}"
        self.mgr = PrefillTransferManager(TransferConfig(backend=backend), self.engine.pool, bootstrap_addr=self.addr)
        self.decode = PeerProc(
            role="decode", backend=backend, num_layers=layout.num_layers, page_size=layout.page_size,
            num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim, num_pages=pages,
            dtype=layout.dtype_name, **where,
        )  # fmt: skip
        self.room = 0
        self.bytes_per_token = self.engine.model_config.kv_bytes_per_token

    def prompts(self, length: int, count: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(length * 31 + count)
        return torch.randint(0, self.engine.model_config.vocab_size, (count, length), generator=g).tolist()

    def forward_seconds(self, prompts: list[list[int]]) -> float:
        """C: the forward alone (no transfer), median of 3."""
        times = []
        for _ in range(3):
            reqs = self._requests(prompts)
            t0 = time.perf_counter()
            prefill_and_send(self.engine, reqs, [None] * len(reqs), [0] * len(reqs), PipelineSettings())
            times.append(time.perf_counter() - t0)
            self._free(reqs)
        return statistics.median(times)

    def ttft(self, prompts: list[list[int]], settings: PipelineSettings, gbps: float) -> tuple[list[float], int]:
        """Seconds from the start of the forward until each request's KV and aux landed; and the group count."""
        self.mgr.cfg.emulated_link_gbps = gbps
        rooms, senders = [], []
        n_pages = self.engine.pool.pages_for(len(prompts[0]))
        for _ in prompts:
            self.room += 1
            self.decode.call("alloc", room=self.room, n=n_pages)
            self.decode.call("create", room=self.room, bootstrap_addr=self.addr, prompt_len=len(prompts[0]))
            rooms.append(self.room)
            senders.append(self.mgr.create_sender(self.room))
        for s in senders:
            while not s.ready:
                time.sleep(0.001)
        reqs = self._requests(prompts)
        t0 = time.perf_counter()
        _, groups = prefill_and_send(self.engine, reqs, senders, rooms, settings)
        done: dict[int, float] = {}
        while len(done) < len(senders):
            for i, s in enumerate(senders):
                if i not in done:
                    state = s.poll()
                    if state == TransferState.FAILED:
                        raise RuntimeError(s.error)
                    if state == TransferState.SUCCESS:
                        done[i] = time.perf_counter() - t0
            time.sleep(0.0005)
        for room, s in zip(rooms, senders, strict=True):
            s.release()
            self.decode.wait_state(room, {"SUCCESS"}, 30)
            self.decode.release(room)
        self._free(reqs)
        return [done[i] for i in range(len(senders))], len(groups)

    def _requests(self, prompts: list[list[int]]):
        reqs = []
        for p in prompts:
            req = self.engine.make_request(p, SamplingParams(max_new_tokens=1))
            req.pages = self.engine.pool.allocator.allocate(self.engine.pool.pages_for(len(p)))
            reqs.append(req)
        return reqs

    def _free(self, reqs) -> None:
        for r in reqs:
            self.engine.pool.allocator.free(r.pages)

    def close(self) -> None:
        self.decode.close()
        self.mgr.close()
        self.boot.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:bench-llama")
    ap.add_argument("--backend", default="mooncake", choices=["mooncake", "nixl"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"], help="where the prefill runs")
    ap.add_argument("--dtype", default=None, help="model dtype (default: the checkpoint's on CPU, bfloat16 on CUDA)")
    ap.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "flashinfer"])
    ap.add_argument("--lengths", default="256,1024,4096")
    ap.add_argument("--ratios", default="0.25,0.5,1,2", help="T/C values to emulate")
    ap.add_argument("--concurrency", type=int, default=8, help="requests in the batch of the 1K-token row")
    ap.add_argument("--repeats", type=int, default=2, help="median of this many runs per cell (order alternates)")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    ratios = [float(x) for x in args.ratios.split(",")]

    pages = max(max(lengths), 1024 * args.concurrency) // 16 + 64
    progress(f"starting ({args.model}, {args.backend}, {args.device}); decode runs in its own process")
    bench = Bench(args.model, args.backend, pages, args.device, args.dtype, args.attention_backend)
    eng = bench.engine
    where = f"{eng.device} ({eng.runner.attn.name}, {eng.pool.layout.dtype_name})"
    where = "CPU" if eng.device.type == "cpu" else where
    whole = PipelineSettings(enabled=False)
    piped = PipelineSettings()
    rows: list[tuple] = []
    results: dict[tuple[int, float, int], tuple[float, float]] = {}
    try:
        # the first write to a peer opens its session (handshake); keep that out of the measurements
        bench.ttft(bench.prompts(64, 1), whole, 100.0)
        cases = [(n, 1) for n in lengths] + ([(1024, args.concurrency)] if args.concurrency > 1 else [])
        for length, count in cases:
            prompts = bench.prompts(length, count)
            bench.forward_seconds(prompts)  # warm-up
            c = bench.forward_seconds(prompts)
            kv_bytes = count * length * bench.bytes_per_token
            progress(f"{length} tokens x {count}: C = {c * 1000:.0f} ms, KV {kv_bytes / 2**20:.1f} MiB")
            for ratio in ratios if count == 1 else [1.0]:
                t = ratio * c
                gbps = kv_bytes * 8 / (t * 1e9)
                w_runs, p_runs = [], []
                # short prompts are cheap and their ratio is the one that must sit at 1: average more runs
                for r in range(args.repeats if length > 512 else max(args.repeats, 8)):
                    # alternate which variant goes first, so warm state and drift favour neither
                    for variant in (whole, piped) if r % 2 == 0 else (piped, whole):
                        (w_runs if variant is whole else p_runs).append(bench.ttft(prompts, variant, gbps))
                w = statistics.median(statistics.mean(run[0]) for run in w_runs)
                p = statistics.median(statistics.mean(run[0]) for run in p_runs)
                n = p_runs[0][1]
                bound = max(c + t / n, c / n + t)
                eff = (w - p) / (w - bound) if n > 1 and w > bound else float("nan")
                rows.append((length, count, ratio, c, t, w, p, n, bound, eff))
                results[(length, ratio, count)] = (w, p)
                progress(f"  T/C {ratio}: whole {w * 1000:.0f} ms, pipelined {p * 1000:.0f} ms (N={n})")
    finally:
        bench.close()

    print(f"\nlayer-pipelined prefill, {args.model} on {where}, {args.backend} over loopback with link emulation")
    print(f"{'tokens':>6} {'reqs':>4} {'T/C':>5} {'C ms':>7} {'T ms':>7} {'whole ms':>9} {'piped ms':>9} "
          f"{'ratio':>6} {'N':>3} {'bound ms':>9} {'eff':>5}")  # fmt: skip
    for length, count, ratio, c, t, w, p, n, bound, eff in rows:
        eff_s = "  n/a" if eff != eff else f"{eff:5.2f}"
        print(f"{length:>6} {count:>4} {ratio:>5.2f} {c * 1e3:>7.0f} {t * 1e3:>7.0f} {w * 1e3:>9.0f} {p * 1e3:>9.0f} "
              f"{p / w:>6.2f} {n:>3} {bound * 1e3:>9.0f} {eff_s}")  # fmt: skip
    key_eff = next((r[9] for r in rows if r[0] == max(lengths) and r[1] == 1 and r[2] == 1.0), float("nan"))
    short = results.get((min(lengths), 1.0, 1))
    print(f"pipeline efficiency {key_eff:.2f}")
    print(f"short prompt ratio {short[1] / short[0]:.2f}" if short else "short prompt ratio n/a")


if __name__ == "__main__":
    main()
