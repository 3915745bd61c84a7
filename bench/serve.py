"""Serving latency through three front doors on the same prefill + decode servers, in one run.

Starts real `pdserve prefill`, `pdserve decode` and `pdserve router` processes on loopback with builtin:tiny-llama
(and sglang-router in PD mode in front of the same servers), then drives streaming `/v1/completions` through:

  pdserve  the pdserve router
  sglang   PyPI's sglang-router (skipped with a note when it is missing or does not start)
  direct   no router: this client draws the bootstrap room and POSTs to prefill and decode itself

Closed loop: `concurrency` workers each send their next request when the previous one finishes. Greedy, ignore_eos,
so every request yields exactly --output-len tokens. Per request, client side: TTFT (send -> first SSE chunk carrying
text), inter-token latency (gaps between text chunks); per cell: TTFT/ITL p50/p99, output tokens/s and the router
process's CPU time per request (user + system, all its threads, over the timed runs: on a shared host that is CPU
taken from the servers, and it is far less noisy than latency). The router's added latency is its TTFT p50 minus
direct's at the same concurrency.

    .venv/bin/python bench/serve.py [--backend mooncake] [--concurrency 1,8,32] [--doors pdserve,sglang,direct]

Conditional disaggregation (short prompts prefilled on the decode server; bench/serve_local.py) instead of the doors:

    .venv/bin/python bench/serve.py --conditional [--concurrency 1,8,32]   TTFT p50/p99, on vs off
    .venv/bin/python bench/serve.py --local-sweep 16,64,256,1024           TTFT local vs remote by prompt length
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import itertools
import json
import math
import os
import random
import secrets
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from contracts.pd import ROOM_MAX
from engine.builtin import resolve_model
from harness.sse import sse_data
from harness.stack import MODEL, Stack
from tokenization.tokenizer import Tokenizer

DOORS = ("pdserve", "sglang", "direct")
# "local": a second pdserve router with conditional disaggregation on (bench/serve_local.py), never a --doors choice
DOOR_LABEL = {"pdserve": "pdserve router", "sglang": "sglang-router", "direct": "direct", "local": "pdserve local"}

# Prompts are slices of this text (repeated as needed), so prompt content is fixed across runs and doors.
SOURCE_TEXT = (
    "A disaggregated server splits a language model's work in two. The prefill server reads the whole prompt in "
    "one pass and writes the attention keys and values for every position into its cache; the decode server then "
    "receives those pages over the network and produces the answer one token at a time. Because the two phases "
    "stress different resources, prefill being bound by arithmetic and decode by memory bandwidth, running them on "
    "separate machines lets each be sized and batched for its own bottleneck. A router sits in front of both: for "
    "every request it picks a prefill and a decode server, draws a random bootstrap room that names the transfer, "
    "sends the same request to both at once, and relays the decode server's stream back to the client. The cost "
    "of that extra hop is what this benchmark measures, next to a client that plays router itself. "
)


def progress(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]); nan for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@dataclass
class Sample:
    ttft: float
    itls: list[float]
    e2e: float
    tokens: int


@dataclass
class Cell:
    """Everything measured for one (concurrency, door), pooled over rounds."""

    samples: list[Sample] = field(default_factory=list)
    wall: float = 0.0  # summed over rounds: each round's first send to its last answer
    round_ttft_p50: list[float] = field(default_factory=list)  # per round, to show how much rounds disagree
    errors: list[str] = field(default_factory=list)
    cpu_s: float | None = None  # the router process's CPU time (user + system, all threads) over the timed runs


PROC_NAME = {"pdserve": "router", "sglang": "sglang-router"}  # the door's process in the Stack


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and its descendants, all threads (Linux /proc); 0 where it cannot be read."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError, IndexError):
            continue
    return total


class Door:
    """One way into the servers. `request` streams one completion and returns what the client saw."""

    def __init__(self, name: str, stack: Stack, url: str | None, max_conn: int) -> None:
        self.name = name
        self.stack = stack
        # One client per upstream URL: a request holds a connection to each server it talks to for its whole life,
        # so a pool a little above the concurrency never makes a worker wait for a connection.
        # keepalive_expiry below uvicorn's 5 s keep-alive: reusing a connection the server is closing fails a request.
        limits = httpx.Limits(max_connections=max_conn, max_keepalive_connections=max_conn, keepalive_expiry=4.0)
        timeout = httpx.Timeout(300.0, connect=10.0)
        urls = [stack.prefill_url, stack.decode_url] if name == "direct" else [url]
        self.clients = {u: httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) for u in urls if u}
        self.url = url
        procs = [p for p in stack.procs if p.name == PROC_NAME.get(name)]
        self.pid = procs[0].proc.pid if procs else None

    def cpu(self) -> float | None:
        return cpu_seconds(self.pid) if self.pid is not None else None

    async def close(self) -> None:
        for c in self.clients.values():
            await c.aclose()

    async def request(self, body: dict) -> Sample:
        if self.name != "direct":
            assert self.url is not None
            return await self._stream(self.clients[self.url], self.url, body, time.perf_counter())
        # Play router: the same body plus bootstrap fields to both servers at once; decode's stream is the answer.
        body = dict(body, bootstrap_host="127.0.0.1", bootstrap_port=self.stack.bootstrap_port,
                    bootstrap_room=secrets.randbelow(ROOM_MAX + 1), rid=uuid.uuid4().hex)  # fmt: skip
        t0 = time.perf_counter()
        prefill = asyncio.create_task(self._drain(self.clients[self.stack.prefill_url], self.stack.prefill_url, body))
        decode = asyncio.create_task(self._stream(self.clients[self.stack.decode_url], self.stack.decode_url, body, t0))
        try:
            await asyncio.wait({prefill, decode}, return_when=asyncio.FIRST_COMPLETED)
            if prefill.done() and (exc := prefill.exception()) is not None:
                # decode would wait for KV that never comes (the router aborts it; a benchmark just gives up)
                raise exc
            sample = await decode
            await prefill  # long done: decode cannot produce a token before prefill's KV has arrived
            return sample
        finally:
            for task in (prefill, decode):
                task.cancel()

    @staticmethod
    async def _drain(client: httpx.AsyncClient, url: str, body: dict) -> None:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
            async for _ in resp.aiter_raw():
                pass
            if resp.status_code != 200:
                raise RuntimeError(f"prefill answered {resp.status_code}")

    @staticmethod
    async def _stream(client: httpx.AsyncClient, url: str, body: dict, t0: float) -> Sample:
        stamps: list[float] = []  # arrival of each chunk that carries text
        tokens, done = None, False
        async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                raise RuntimeError(f"{resp.status_code}: {resp.text[:200]}")
            async for payload in sse_data(resp):  # not aiter_lines: generated text may hold U+2028 raw
                now = time.perf_counter()
                if payload == "[DONE]":
                    done = True
                    break
                event = json.loads(payload)
                if "error" in event:
                    raise RuntimeError(f"error event: {event['error']}")
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                if any(c.get("text") for c in event.get("choices") or ()):
                    stamps.append(now)
        end = time.perf_counter()
        if not done or not stamps:
            raise RuntimeError(f"stream ended without {'[DONE]' if stamps else 'any text'}")
        itls = [b - a for a, b in itertools.pairwise(stamps)]
        return Sample(stamps[0] - t0, itls, end - t0, tokens if tokens is not None else -1)


def make_prompts(tok: Tokenizer, n: int, lo: int, hi: int, rng: random.Random) -> list[str]:
    """n prompts of lo..hi tokens: slices of SOURCE_TEXT at random offsets (so no two share a long prefix)."""
    ids = tok.encode(SOURCE_TEXT)
    ids = ids * (-(-(hi + len(ids)) // len(ids)))
    out = []
    for _ in range(n):
        length = rng.randint(lo, hi)
        start = rng.randrange(len(ids) - length)
        out.append(tok.decode(ids[start : start + length]))
    return out


async def run_closed_loop(
    door: Door, prompts: list[str], concurrency: int, output_len: int
) -> tuple[list[Sample | BaseException], float]:
    """Runs `prompts` through `door` with `concurrency` workers; returns (samples or exceptions, wall seconds)."""
    pending = iter(prompts)
    results: list[Sample | BaseException] = []

    async def worker() -> None:
        for prompt in pending:  # a shared iterator: each worker takes the next prompt when its last one is done
            body = {
                "model": MODEL, "prompt": prompt, "max_tokens": output_len, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True},
            }  # fmt: skip
            try:
                results.append(await door.request(body))
            except (httpx.HTTPError, RuntimeError, ValueError) as e:
                results.append(e)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results, time.perf_counter() - t0


async def bench(
    args: argparse.Namespace, stack: Stack, doors: dict[str, str | None], tok: Tokenizer
) -> dict[tuple[int, str], Cell]:
    levels = [int(c) for c in args.concurrency.split(",")]
    max_conn = max(levels) + 8
    opened = {name: Door(name, stack, url, max_conn) for name, url in doors.items()}
    cells: dict[tuple[int, str], Cell] = {}
    try:
        for conc in levels:
            total = args.requests or max(16, 4 * conc)
            rng = random.Random(conc)
            warm = make_prompts(tok, conc, args.min_prompt, args.max_prompt, rng)
            # Rounds with the door order rotated: drift on a noisy box (another process, thermal) lands on every
            # door alike instead of on whichever happened to run last. Every door gets the same prompts.
            names = list(opened)
            rounds = min(args.rounds or len(names), total)
            for r in range(rounds):
                n = total // rounds + (1 if r < total % rounds else 0)
                prompts = make_prompts(tok, n, args.min_prompt, args.max_prompt, rng)
                order = names[r % len(names) :] + names[: r % len(names)]
                for name in order:
                    # Warm-up right before each timed run, not once per level: it opens `conc` connections on every
                    # hop, and idle keep-alive connections expire after ~4-5 s (router and uvicorn), which the other
                    # doors' runs easily last. Short answers: only the connections and first-request paths matter.
                    res, _ = await run_closed_loop(opened[name], warm, conc, 4)
                    if errs := [x for x in res if isinstance(x, BaseException)]:
                        raise RuntimeError(f"{DOOR_LABEL[name]} failed during warm-up: {errs[0]!r}")
                    cpu0 = opened[name].cpu()
                    res, wall = await run_closed_loop(opened[name], prompts, conc, args.output_len)
                    cpu1 = opened[name].cpu()
                    cell = cells.setdefault((conc, name), Cell())
                    cell.wall += wall
                    if cpu0 is not None and cpu1 is not None:
                        cell.cpu_s = (cell.cpu_s or 0.0) + cpu1 - cpu0
                    for x in res:
                        if isinstance(x, BaseException):
                            cell.errors.append(f"{type(x).__name__}: {x}")
                        else:
                            cell.samples.append(x)
                    ok = [x for x in res if isinstance(x, Sample)]
                    cell.round_ttft_p50.append(percentile([s.ttft for s in ok], 50))
                    progress(
                        f"concurrency {conc} round {r + 1}/{rounds}: {DOOR_LABEL[name]} {len(ok)}/{n} ok in "
                        f"{wall:.1f}s, TTFT p50 {percentile([s.ttft for s in ok], 50) * 1e3:.1f} ms, "
                        f"e2e p50 {percentile([s.e2e for s in ok], 50) * 1e3:.0f} ms"
                    )
    finally:
        for door in opened.values():
            await door.close()
    return cells


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="mooncake", choices=["mooncake", "nixl"])
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests", type=int, default=None, help="per (concurrency, door); default max(16, 4*conc)")
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--min-prompt", type=int, default=None, help="prompt tokens, lower bound (100; --conditional: 8)")
    ap.add_argument("--max-prompt", type=int, default=None, help="prompt tokens, upper bound (300; --conditional: 32)")
    ap.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="split each cell's requests into this many rounds, rotating the door order; default: one per door, "
        "so each door runs first, middle and last once",
    )
    ap.add_argument("--doors", default=",".join(DOORS))
    ap.add_argument(
        "--conditional",
        action="store_true",
        help="conditional disaggregation rows instead of the doors: short prompts, TTFT with local prefill on vs off",
    )
    ap.add_argument(
        "--local-sweep",
        default="",
        metavar="LENGTHS",
        help="e.g. 16,64,256,1024: TTFT local vs remote for prompts of each length at each --local-sweep-concurrency",
    )
    ap.add_argument("--local-sweep-concurrency", default="1", help="--local-sweep: concurrency levels")
    ap.add_argument("--local-max-tokens", type=int, default=None, help="--conditional: the on-router's threshold")
    args = ap.parse_args()
    if not (args.conditional or args.local_sweep):
        args.min_prompt = 100 if args.min_prompt is None else args.min_prompt
        args.max_prompt = 300 if args.max_prompt is None else args.max_prompt
    args.wanted = args.doors.split(",")
    if unknown := set(args.wanted) - set(DOORS):
        ap.error(f"unknown door(s) {sorted(unknown)}; choose from {','.join(DOORS)}")
    return args


def open_doors(stack: Stack, wanted: list[str], notes: list[str]) -> dict[str, str | None]:
    """The URL of each wanted door (None for direct); a door that cannot be had is noted and left out."""
    doors: dict[str, str | None] = {}
    for name in wanted:
        if name == "pdserve":
            doors[name] = stack.router_url
        elif name == "direct":
            doors[name] = None
        elif importlib.util.find_spec("sglang_router") is None:
            notes.append("sglang-router: skipped, not installed (pip install sglang-router)")
        else:
            try:
                doors[name] = stack.start_sglang_router()
            except (RuntimeError, TimeoutError) as e:
                notes.append(f"sglang-router: skipped, did not start: {str(e).splitlines()[0]}")
    return doors


def print_table(args: argparse.Namespace, cells: dict[tuple[int, str], Cell], notes: list[str]) -> None:
    print(
        f"{'conc':>4}  {'front door':<15} {'n':>4} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12} "
        f"{'ITL p50 ms':>11} {'ITL p99 ms':>11} {'tok/s':>8} {'router CPU ms/req':>18}"
    )
    bad_tokens = no_usage = 0
    for (conc, name), cell in cells.items():
        ttfts = [s.ttft * 1e3 for s in cell.samples]
        itls = [g * 1e3 for s in cell.samples for g in s.itls]
        toks = sum(s.tokens if s.tokens >= 0 else args.output_len for s in cell.samples)
        bad_tokens += sum(1 for s in cell.samples if s.tokens not in (-1, args.output_len))
        no_usage += sum(1 for s in cell.samples if s.tokens == -1)
        cpu = cell.cpu_s * 1e3 / len(cell.samples) if cell.cpu_s is not None and cell.samples else math.nan
        print(
            f"{conc:>4}  {DOOR_LABEL[name]:<15} {len(cell.samples):>4} {percentile(ttfts, 50):>12.1f} "
            f"{percentile(ttfts, 99):>12.1f} {percentile(itls, 50):>11.2f} {percentile(itls, 99):>11.2f} "
            f"{toks / cell.wall if cell.wall else math.nan:>8.1f} {cpu:>18.2f}"
        )
    for n in notes:
        print(n)
    for (conc, name), cell in cells.items():
        if cell.errors:
            print(f"concurrency {conc}, {DOOR_LABEL[name]}: {len(cell.errors)} failed, first: {cell.errors[0]}")
    if bad_tokens:
        print(f"warning: {bad_tokens} requests did not report exactly {args.output_len} completion tokens")
    if no_usage:
        print(f"note: {no_usage} requests reported no usage; counted as {args.output_len} tokens each")


def print_added(cells: dict[tuple[int, str], Cell], wanted: list[str]) -> None:
    """Each router's TTFT p50 over direct's, and pdserve's over sglang-router's, per concurrency."""
    for conc in sorted({c for c, _ in cells}):
        p50 = {name: percentile([s.ttft for s in cells[conc, name].samples], 50) * 1e3
               for name in DOORS if (conc, name) in cells}  # fmt: skip
        if "pdserve" in p50 and "sglang" in p50:
            print(
                f"pdserve router / sglang-router TTFT p50 at concurrency {conc}: {p50['pdserve'] / p50['sglang']:.2f}x"
            )
        if "direct" not in p50:
            continue
        base, direct = p50["direct"], cells[conc, "direct"]
        parts = []
        for name in ("pdserve", "sglang"):
            if name in p50:
                # the same difference per round (each round runs every door back to back): its spread is the noise
                diffs = [
                    (a - b) * 1e3 for a, b in zip(cells[conc, name].round_ttft_p50, direct.round_ttft_p50, strict=True)
                ]
                parts.append(
                    f"{DOOR_LABEL[name].split()[0]} {p50[name] - base:+.1f} ms ({p50[name] / base:.2f}x; "
                    f"rounds {min(diffs):+.0f}..{max(diffs):+.0f} ms)"
                )
            elif name in wanted:
                parts.append(f"{DOOR_LABEL[name].split()[0]} n/a")
        if parts:
            print(f"router added TTFT p50 at concurrency {conc}: " + ", ".join(parts))


def main() -> None:
    args = parse_args()
    tok = Tokenizer.from_pretrained(resolve_model(MODEL))
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    progress(f"starting prefill, decode and router ({args.backend})")
    stack = Stack(args.backend)
    notes: list[str] = []
    if args.conditional or args.local_sweep:
        from bench.serve_local import run_conditional

        try:
            progress(f"servers ready in {time.perf_counter() - started:.0f}s (logs in {stack.log_dir})")
            run_conditional(args, stack, tok)
        finally:
            stack.stop()
        print(f"client and servers on {os.cpu_count()} CPUs; 1-min load average {load_before:.1f} before the run, "
              f"{os.getloadavg()[0]:.1f} after; {time.perf_counter() - started:.0f}s in all")  # fmt: skip
        return
    try:
        progress(f"servers ready in {time.perf_counter() - started:.0f}s (logs in {stack.log_dir})")
        doors = open_doors(stack, args.wanted, notes)
        for n in notes:
            progress(n)
        cells = asyncio.run(bench(args, stack, doors, tok))
    finally:
        stack.stop()
    elapsed = time.perf_counter() - started
    load_after = os.getloadavg()[0]

    print(
        f"\n{MODEL} over {args.backend}, streaming /v1/completions: prompts {args.min_prompt}-{args.max_prompt} "
        f"tokens, {args.output_len} output tokens (greedy, ignore_eos), closed loop, {args.rounds or len(doors)} "
        f"rounds per cell with the door order rotated; {elapsed:.0f}s in all"
    )
    # Client, servers and routers share this machine, so anything else running skews the numbers: say how busy it was.
    print(
        f"client and servers on {os.cpu_count()} CPUs; 1-min load average {load_before:.1f} before the run, "
        f"{load_after:.1f} after"
    )
    print_table(args, cells, notes)
    print_added(cells, args.wanted)


if __name__ == "__main__":
    main()
