"""The pieces bench/prefill.py is built from: a stack of real servers on builtin:bench-llama, a client that times
the first streamed token, the prefill scheduler's peak memory, the prefill's prompt-token counters."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx

from bench.serve import progress
from harness.observe import scrape_metric
from harness.sse import sse_data
from harness.stack import Proc, Stack

MODEL = "builtin:bench-llama"  # 24 layers, hidden 512, 2 KV heads of 64, float32: 24576 KV bytes per token
CONTEXT = 8192  # its max_position_embeddings; the servers clip --context-length to it
OUTPUT_TOKENS = 4  # per request, ignore_eos: the answer only has to start
T = TypeVar("T")


def token_ids(rng: random.Random, n: int) -> list[int]:
    """n random token ids (the servers take `prompt` as ids, so a prompt has exactly n tokens); 0-2 left out
    (bos, eos, pad of the built-in tokenizer)."""
    return [rng.randrange(3, 512) for _ in range(n)]


@dataclass
class Counters:
    """A prefill server's prompt tokens and those its prefix cache gave, summed over servers."""

    prompt: float = 0.0
    cached: float = 0.0
    chunks: float = 0.0

    def __sub__(self, other: Counters) -> Counters:
        return Counters(self.prompt - other.prompt, self.cached - other.cached, self.chunks - other.chunks)

    @property
    def hit_rate(self) -> float:
        return self.cached / self.prompt if self.prompt else math.nan


def counters(url: str) -> Counters:
    return Counters(
        scrape_metric(url, "pdserve_prompt_tokens_total"),
        scrape_metric(url, "pdserve_cached_prompt_tokens_total"),
        scrape_metric(url, "pdserve_prefill_chunks_total"),
    )


class Servers:
    """Router + `prefills` prefill servers + one decode server on bench-llama, fresh caches, ready to time.

    `--skip-warmup` on both servers (the CPU warm-up forwards cost ~20 s per stack and compile nothing on CPU); one
    short request per prefill server instead, before anything is timed (short: the memory a longer one's activations
    leave in the allocator would hide the next prompt's activations, see PeakRss)."""

    client: httpx.AsyncClient  # set by `run` for the work it runs

    def __init__(
        self,
        backend: str,
        link_gbps: float,
        prefill_extra: list[str] | None = None,
        router_extra: list[str] | None = None,
        prefills: int = 1,
    ) -> None:
        self.stack = Stack(
            backend,
            extra=["--kv-cache-gb", "0.5", "--skip-warmup"],  # 0.5 GiB: ~21.8K tokens of bench-llama KV
            prefill_extra=["--emulated-link-gbps", str(link_gbps), *(prefill_extra or [])],
            # everything through a prefill server: no short prompt prefilled on decode (conditional disaggregation)
            router_extra=["--local-prefill-max-tokens", "0", *(router_extra or [])],
            model=MODEL,
            prefills=prefills,
        )
        try:
            self._all_prefills_up()
            rng = random.Random(12345)
            warm = [token_ids(rng, 64) for _ in range(prefills)]
            self.run(lambda: self._warm_up(warm))
        except BaseException:
            self.stack.stop()
            raise

    async def _warm_up(self, prompts: list[list[int]]) -> None:
        for ids in prompts:
            await self.ttft(ids)

    def run(self, work: Callable[[], Awaitable[T]]) -> T:
        """Runs `work()` in a fresh event loop with a fresh HTTP client (`self.client`) for it."""

        async def go() -> T:
            async with httpx.AsyncClient(timeout=httpx.Timeout(900.0, connect=10.0), trust_env=False) as client:
                self.client = client
                return await work()

        return asyncio.run(go())

    def _all_prefills_up(self, limit_s: float = 180.0) -> None:
        """A router is ready with one prefill up: wait until it sees every one of them up."""
        deadline = time.monotonic() + limit_s
        while True:
            down = httpx.get(f"{self.stack.router_url}/readiness", timeout=10).json()["prefill"]["down"]
            if not down:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"prefill servers still down: {down}")
            time.sleep(0.3)

    async def ttft(self, ids: list[int]) -> float:
        """Seconds from sending a streamed /v1/completions through the router to its first token's event."""
        body = {"model": MODEL, "prompt": ids, "max_tokens": OUTPUT_TOKENS, "temperature": 0, "ignore_eos": True,
                "stream": True}  # fmt: skip
        t0 = time.perf_counter()
        first = None
        async with self.client.stream("POST", f"{self.stack.router_url}/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
            async for data in sse_data(resp):
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    raise RuntimeError(f"error event: {event['error']}")
                if first is None and event.get("choices"):
                    first = time.perf_counter()  # a token event, even one whose text is still held back
        if first is None:
            raise RuntimeError("stream ended without a token")
        return first - t0

    def counters(self) -> Counters:
        """Summed over the prefill servers; read once the counts settled (a prefill counts a prompt when its first
        row starts, before the client's answer, so a short settle suffices)."""
        time.sleep(0.5)
        total = Counters()
        for url in self.stack.prefill_urls:
            c = counters(url)
            total = Counters(total.prompt + c.prompt, total.cached + c.cached, total.chunks + c.chunks)
        return total

    def per_prefill_prompt_tokens(self) -> list[float]:
        return [counters(url).prompt for url in self.stack.prefill_urls]

    def scheduler(self) -> Proc:
        return self.stack.proc("prefill")

    def close(self) -> None:
        self.stack.stop()


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class PeakRss:
    """Peak resident memory of the prefill's scheduler process (the biggest descendant of the server's front) over
    a span, above its resident memory when this was made (the idle server). The kernel's high-water mark (VmHWM) is
    reset at each start by writing 5 to /proc/PID/clear_refs; where that is not allowed, VmRSS is sampled every
    2 ms instead. The pool is allocated (and zeroed) up front, so what grows is the forward's activations and
    scratch. The allocator keeps what a forward freed, so a later prompt reuses it unseen: measure prompts in
    ascending length, each against the idle level (a peak then is the most any prompt so far needed)."""

    def __init__(self, proc: Proc) -> None:
        children = proc.pids()[1:]
        self.pid = max(children, key=lambda p: _status_kb(p, "VmRSS"))
        self.base = _status_kb(self.pid, "VmRSS")
        self._sampled = 0
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self.method = "VmHWM"

    def start(self) -> None:
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        except OSError:
            self.method = "VmRSS sampled every 2 ms"
            self._sampled = _status_kb(self.pid, "VmRSS")
            self._done.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._done.wait(0.002):
            with contextlib.suppress(OSError, KeyError):
                self._sampled = max(self._sampled, _status_kb(self.pid, "VmRSS"))

    def stop(self) -> float:
        """The span's peak, MiB above the idle server's resident memory."""
        if self._thread is not None:
            self._done.set()
            self._thread.join()
            peak = self._sampled
        else:
            peak = _status_kb(self.pid, "VmHWM")
        return (peak - self.base) / 1024


def forward_costs(length: int, chunks: list[int], rounds: int) -> dict[int, float]:
    """Seconds to compute a `length`-token prompt in chunks of each size (0: whole) with the prefill's own forward
    (`runner.build_batch` / `start_forward` / `run_layers` / `logits` on the KV of the chunks before), in this
    process with no server running; sizes interleaved, every other round in reverse, the least time per size kept:
    the host's speed drifts by tens of percent over minutes, which separate server runs cannot tell from chunking."""
    from engine.config import EngineConfig
    from engine.engine import Engine
    from engine.kvcache import pages_for

    engine = Engine(EngineConfig(model=MODEL, device="cpu", skip_warmup=True, num_pages=pages_for(length, 16) + 1))
    runner = engine.runner
    ids = token_ids(random.Random(7), length)
    pages = engine.pool.allocator.allocate(pages_for(length, 16))
    best: dict[int, float] = {}
    for r in range(rounds):
        for chunk in chunks if r % 2 == 0 else chunks[::-1]:
            t0 = time.perf_counter()
            for start in range(0, length, chunk or length):
                n = min(chunk or length, length - start)
                fwd = runner.start_forward(runner.build_batch([ids[start : start + n]], [start], [pages]))
                fwd.run_layers(0, runner.num_layers)
                fwd.logits()
            best[chunk] = min(best.get(chunk, math.inf), time.perf_counter() - t0)
            progress(f"(a) forward of {length} tokens in chunks of {chunk or 'all'}: {time.perf_counter() - t0:.2f}s")
    return best
