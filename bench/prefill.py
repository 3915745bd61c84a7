"""Chunked prefill and the prefix cache on real servers (issue 14), in one run, on builtin:bench-llama.

Each variant runs on fresh processes (router, prefill server(s), decode server; `bench/prefill_kit.py`), Mooncake
on loopback with the prefill's KV writes paced to `--link-gbps` (`--emulated-link-gbps`). Prompts are token ids
(exactly the lengths named), streamed /v1/completions through the router, 4 output tokens, ignore_eos; TTFT is the
client's time to the first token event.

  (a) chunked prefill, `--chunked-prefill-size` 0 (off) and each size of `--chunks`: the TTFT of each long prompt
      alone and the prefill scheduler's peak resident memory above the idle server's
      (activations: the pool is allocated up front; PeakRss in bench/prefill_kit.py); then the longest again
      (other tokens) with `--shorts` short prompts (64 tokens) sent evenly over 90% of its TTFT alone, and their
      TTFT. The bound for a short prompt is its TTFT on an idle server. A short prompt shares its forward with the
      long prompt's next chunk (prefill_server/batcher.py), so it waits for about one and a half chunk forwards.
      Then, with no server running, the longest prompt's bare forward per chunk size in this process, sizes
      interleaved: this host's speed drifts by tens of percent over minutes, more than chunking costs.
  (b) a shared system prompt (2048 + 100 unique tokens each), one request after another, prefix cache on vs
      `--disable-prefix-cache`: TTFT of the first (it computes the prefix) and p50 of the rest; the hit rate is
      cached / prompt tokens from the prefill's own counters. Bound: decode has no prefix cache, so every prompt's
      whole KV still crosses the link; a cached prompt's TTFT cannot beat that transfer.
  (c) two prefill servers, `--groups` system prompts x `--rounds` requests each, each round in a shuffled order,
      `--policy cache_aware` vs `round_robin`: hit rate over both prefills and TTFT p50. Ideal: (rounds - 1) /
      rounds of each prompt's cacheable share. Where every pool holds every system prompt, round robin's expected
      hit rate (each request's prefill a coin flip) is printed beside it: the ratio is bounded by the workload.
      `--c-kv-pages N` shrinks each prefill's pool (806 pages: about 6 of the 8 prompts, so only the two pools
      together hold them all, the case cache-aware routing is for).

bench-llama's context is 8192 tokens (max_position_embeddings; --context-length is clipped to it), so the issue's
16K prompt cannot run on it: the long prompts are 4096 and 8188 (8192 less the output tokens). The servers share
this host's cores, so they run with OMP_WAIT_POLICY=PASSIVE (`--omp-wait-policy`): with OpenMP's spinning default,
decodes running beside a chunked prefill made both 2-3x slower on 2 cores, which no separate-machine deployment
sees. About 15 minutes on a 2-core host; `--quick` about 5.

    .venv/bin/python bench/prefill.py [--quick] [--parts a,b,c] [--chunks 512,1024,2048,4096] [--link-gbps 1]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.prefill_kit import (
    CONTEXT,
    MODEL,
    OUTPUT_TOKENS,
    Counters,
    PeakRss,
    Servers,
    forward_costs,
    token_ids,
)
from bench.serve import percentile, progress
from engine.builtin import resolve_model
from engine.config import EngineConfig, ModelConfig

SHORT = 64
DEFAULT_CHUNK = EngineConfig().chunked_prefill_size


@dataclass
class ChunkRow:
    chunk: int
    ttft: dict[int, float] = field(default_factory=dict)  # long prompt length -> TTFT s
    mem: dict[int, float] = field(default_factory=dict)  # long prompt length -> MiB above the level before
    idle_short: float = math.nan  # a short prompt's TTFT p50 on the idle server
    shorts: list[float] = field(default_factory=list)  # TTFT of the shorts arriving during the longest
    long_with_shorts: float = math.nan
    chunks: float = 0.0  # prefill chunks (rows that were not a whole prompt) during the longest prompt alone
    forward: float = math.nan  # the longest prompt's forward in this process (forward_costs), s


async def one_by_one(srv: Servers, prompts: list[list[int]]) -> list[float]:
    return [await srv.ttft(p) for p in prompts]


async def shorts_during(srv: Servers, long: list[int], shorts: list[list[int]], span: float) -> tuple[float, list]:
    """Send `long`, then the short prompts evenly spread over the first `span` seconds (the long prompt's TTFT when
    it ran alone), each one on its own; TTFTs. A fixed count, not a rate: a slow variant is not also overloaded."""
    long_task = asyncio.create_task(srv.ttft(long))
    t0, tasks = time.perf_counter(), []
    for i, ids in enumerate(shorts):
        await asyncio.sleep(max(0.0, t0 + span * (i + 0.5) / len(shorts) - time.perf_counter()))
        tasks.append(asyncio.create_task(srv.ttft(ids)))
    return await long_task, list(await asyncio.gather(*tasks))


def run_chunk(args: argparse.Namespace, chunk: int) -> ChunkRow:
    row = ChunkRow(chunk)
    label = f"chunk {chunk or 'off'}"
    progress(f"(a) {label}: starting servers")
    srv = Servers(args.backend, args.link_gbps, prefill_extra=["--chunked-prefill-size", str(chunk)])
    try:
        mem = PeakRss(srv.scheduler())
        rng = random.Random(1)  # the same prompts for every variant
        idle = [token_ids(rng, SHORT) for _ in range(3)]  # distinct: a repeat would find its prefix cached
        row.idle_short = percentile(srv.run(functools.partial(one_by_one, srv, idle)), 50)
        for length in args.lengths:
            times, peaks = [], []
            for rep in range(args.reps):  # other tokens each time: a repeat would find its prefix cached
                ids = token_ids(random.Random(length * 100 + rep), length)
                before = srv.counters()
                mem.start()
                times.append(srv.run(functools.partial(srv.ttft, ids)))
                peaks.append(mem.stop())
                row.chunks = (srv.counters() - before).chunks  # the longest's, as it comes last
            # the least of the runs: interference on a shared host only ever slows a run down
            row.ttft[length], row.mem[length] = min(times), max(peaks)
            progress(f"(a) {label}: {length} tokens TTFT {' '.join(f'{t:.2f}' for t in times)}s, peak "
                     f"+{row.mem[length]:.0f} MiB ({mem.method})")  # fmt: skip
        longest = max(args.lengths)
        long_ids = token_ids(random.Random(longest * 100 + args.reps), longest)
        shorts = [token_ids(rng, SHORT) for _ in range(args.shorts)]
        row.long_with_shorts, row.shorts = srv.run(
            functools.partial(shorts_during, srv, long_ids, shorts, 0.9 * row.ttft[longest])
        )
        progress(f"(a) {label}: {len(row.shorts)} short prompts during {longest}: TTFT p50 "
                 f"{percentile(row.shorts, 50):.2f}s (idle {row.idle_short:.2f}s)")  # fmt: skip
    finally:
        srv.close()
    return row


@dataclass
class CacheRow:
    name: str
    ttfts: list[float]
    counts: Counters
    split: list[float] = field(default_factory=list)  # prompt tokens per prefill server

    @property
    def warm_p50(self) -> float:
        return percentile(self.ttfts[1:], 50)


def run_shared(args: argparse.Namespace, cache: bool) -> CacheRow:
    name = "cache on" if cache else "cache off"
    progress(f"(b) {name}: starting servers")
    srv = Servers(args.backend, args.link_gbps, prefill_extra=[] if cache else ["--disable-prefix-cache"])
    try:
        rng = random.Random(2)
        shared = token_ids(rng, args.shared)
        prompts = [shared + token_ids(rng, args.unique) for _ in range(args.requests)]
        before = srv.counters()
        ttfts = srv.run(functools.partial(one_by_one, srv, prompts))
        row = CacheRow(name, ttfts, srv.counters() - before)
    finally:
        srv.close()
    progress(f"(b) {name}: first {ttfts[0]:.2f}s, rest p50 {row.warm_p50:.2f}s, hit rate {row.counts.hit_rate:.1%}")
    return row


def routed_prompts(args: argparse.Namespace) -> list[list[int]]:
    """`rounds` rounds, each one request per system prompt in a shuffled order (the same for every policy)."""
    rng = random.Random(3)
    systems = [token_ids(rng, args.shared) for _ in range(args.groups)]
    out = []
    for _ in range(args.rounds):
        for g in rng.sample(range(args.groups), args.groups):
            out.append(systems[g] + token_ids(rng, args.unique))
    return out


def run_routed(args: argparse.Namespace, policy: str) -> CacheRow:
    progress(f"(c) {policy}: starting servers (two prefills)")
    pool = ["--kv-pages", str(args.c_kv_pages)] if args.c_kv_pages else []
    srv = Servers(args.backend, args.link_gbps, prefill_extra=pool, router_extra=["--policy", policy], prefills=2)
    try:
        before, split0 = srv.counters(), srv.per_prefill_prompt_tokens()
        ttfts = srv.run(functools.partial(one_by_one, srv, routed_prompts(args)))
        split = [a - b for a, b in zip(srv.per_prefill_prompt_tokens(), split0, strict=True)]
        row = CacheRow(policy, ttfts, srv.counters() - before, split)
    finally:
        srv.close()
    progress(f"(c) {policy}: hit rate {row.counts.hit_rate:.1%}, TTFT p50 {percentile(ttfts, 50):.2f}s")
    return row


# -- the report ----------------------------------------------------------------------------------------------


def transfer_s(args: argparse.Namespace, tokens: int) -> float:
    return tokens * args.kv_bytes * 8 / (args.link_gbps * 1e9)


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def print_chunks(args: argparse.Namespace, rows: list[ChunkRow]) -> ChunkRow | None:
    """The table; returns the chunk size the numbers support."""
    off = next((r for r in rows if r.chunk == 0), None)
    longest = max(args.lengths)
    print(f"\n(a) chunked prefill: long prompts alone, then {args.shorts} prompts of {SHORT} tokens arriving evenly "
          f"over 90% of a {longest}-token one's TTFT alone")  # fmt: skip
    head = "| chunk |" + "".join(f" {n} TTFT s | x off | peak MiB |" for n in args.lengths)
    print(head + f" {longest} forward s | x off | chunks | long with shorts s | short idle s | short during p50 s | "
          "p90 s | off / this |")  # fmt: skip
    print("|" + "---|" * (head.count("|") + 7))
    for r in rows:
        cells = ""
        for n in args.lengths:
            cells += f" {r.ttft[n]:.2f} | {ratio(r.ttft[n], off.ttft[n]) if off else math.nan:.2f} | {r.mem[n]:.0f} |"
        gain = ratio(percentile(off.shorts, 50), percentile(r.shorts, 50)) if off else math.nan
        fwd = f" {r.forward:.2f} | {ratio(r.forward, off.forward) if off else math.nan:.2f} |"
        print(f"| {r.chunk or 'off'} |{cells}{fwd} {r.chunks:.0f} | {r.long_with_shorts:.2f} | {r.idle_short:.2f} | "
              f"{percentile(r.shorts, 50):.2f} | {percentile(r.shorts, 90):.2f} | {gain:.1f}x |")  # fmt: skip
    links = ", ".join(f"KV of {n} tokens over the link {transfer_s(args, n):.2f}s" for n in args.lengths)
    print(f"bounds: {links}; a short prompt's own TTFT is the idle column. 'x off': what chunking costs the long "
          f"prompt, through the servers (each size on its own servers, minutes apart) and as its bare forward in this "
          f"process (sizes interleaved, least of {args.forward_rounds} rounds: the steadier number)")  # fmt: skip
    return pick_chunk(rows, off, longest)


def pick_chunk(rows: list[ChunkRow], off: ChunkRow | None, longest: int) -> ChunkRow | None:
    """The size the numbers support: among sizes whose long-prompt forward (the in-process one where measured, else
    the TTFT) stays within 15% of unchunked, the one with the lowest short-during-long p50; if none does, the one
    chunking costs least."""
    chunked = [r for r in rows if r.chunk]
    if off is None or not chunked:
        return None

    def cost(r: ChunkRow) -> float:
        return r.forward / off.forward if not math.isnan(off.forward) else r.ttft[longest] / off.ttft[longest]

    ok = [r for r in chunked if cost(r) <= 1.15]
    if ok:
        best = min(ok, key=lambda r: percentile(r.shorts, 50))
        why = "the lowest short-during-long p50 among sizes costing the long prompt's forward at most 15%"
    else:
        best = min(chunked, key=cost)
        why = "no size keeps the long prompt's forward within 15% of unchunked; this one costs it least"
    print(f"chunk size the numbers support: {best.chunk} ({why})")
    return best


def print_shared(args: argparse.Namespace, rows: list[CacheRow]) -> None:
    n = args.shared + args.unique
    print(f"\n(b) shared system prompt: {args.requests} requests of {args.shared} shared + {args.unique} unique "
          "tokens, one after another")  # fmt: skip
    print("| prefix cache | first TTFT s | rest TTFT p50 s | p90 s | hit rate | rest p50 / cache off |")
    print("|---|---|---|---|---|---|")
    off = next((r for r in rows if r.name == "cache off"), None)
    for r in rows:
        rel = ratio(r.warm_p50, off.warm_p50) if off else math.nan
        print(f"| {r.name} | {r.ttfts[0]:.2f} | {r.warm_p50:.2f} | {percentile(r.ttfts[1:], 90):.2f} | "
              f"{r.counts.hit_rate:.1%} | {rel:.2f} |")  # fmt: skip
    floor = transfer_s(args, n)
    ideal = (args.requests - 1) / args.requests * (args.shared // 16 * 16) / n
    print(
        f"bounds: the whole prompt's KV still crosses the link ({floor:.2f}s for {n} tokens: "
        f"{ratio(floor, off.warm_p50) if off else math.nan:.2f} of the uncached p50); ideal hit rate {ideal:.1%}"
    )


def print_routed(args: argparse.Namespace, rows: list[CacheRow]) -> None:
    n = args.shared + args.unique
    pool = f"{args.c_kv_pages} pages ({args.c_kv_pages * 16 / n:.1f} prompts)" if args.c_kv_pages else "0.5 GiB"
    print(f"\n(c) two prefill servers, {args.groups} system prompts x {args.rounds} requests, shuffled rounds, "
          f"one after another; each prefill's pool {pool}")  # fmt: skip
    print("| router policy | hit rate | TTFT p50 s | p90 s | prompt tokens per prefill |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.name} | {r.counts.hit_rate:.1%} | {percentile(r.ttfts, 50):.2f} | {percentile(r.ttfts, 90):.2f} | "
              f"{' / '.join(f'{s:.0f}' for s in r.split)} |")  # fmt: skip
    share = (args.shared // 16 * 16) / n
    ideal = (args.rounds - 1) / args.rounds * share
    # a prompt's request in round r + 1 finds it cached when its coin-flip prefill got one of the r before it
    coin = sum(1 - 0.5**r for r in range(1, args.rounds)) / args.rounds * share
    print(
        f"bounds: ideal hit rate {ideal:.1%} (every system prompt computed once); round robin with pools that "
        f"hold every prompt, prefills as coin flips: {coin:.1%} expected, {ratio(ideal, coin):.2f}x below ideal"
    )


def goal(name: str, value: float, target: float, higher: bool) -> str:
    met = value >= target if higher else value <= target
    verdict = "n/a" if math.isnan(value) else ("PASS" if met else "MISS")
    return f"| {name} | {value:.2f}x | {'>=' if higher else '<='} {target}x | {verdict} |"


def print_goals(a: list[ChunkRow], picked: ChunkRow | None, b: list[CacheRow], c: list[CacheRow]) -> None:
    print("\n| goal (issue 14) | measured | target | |\n|---|---|---|---|")
    by = {r.name: r for r in b + c}
    if "cache on" in by and "cache off" in by:
        print(goal("(b) cached-prefix TTFT p50 / uncached", ratio(by["cache on"].warm_p50, by["cache off"].warm_p50),
                   0.3, higher=False))  # fmt: skip
    off = next((r for r in a if r.chunk == 0), None)
    default = next((r for r in a if r.chunk == DEFAULT_CHUNK), None)
    shown = [(default, "the default"), *([(picked, "the supported")] if picked is not default else [])]
    for row, what in shown:
        if off and row:
            gain = ratio(percentile(off.shorts, 50), percentile(row.shorts, 50))
            print(goal(f"(a) short-during-long TTFT p50, off / chunk {row.chunk} ({what})", gain, 3.0, higher=True))
    if "cache_aware" in by and "round_robin" in by:
        hit = ratio(by["cache_aware"].counts.hit_rate, by["round_robin"].counts.hit_rate)
        print(goal("(c) hit rate, cache_aware / round_robin", hit, 1.8, higher=True))


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="mooncake", choices=["mooncake", "nixl"])
    ap.add_argument("--quick", action="store_true", help="a small version: 2048-token long prompt, chunk off/512, "
                    "512-token system prompts, fewer requests (~5 minutes)")  # fmt: skip
    ap.add_argument("--parts", default="a,b,c")
    ap.add_argument("--link-gbps", type=float, default=1.0,
                    help="emulated prefill->decode link: a 2K prompt's KV takes ~0.15 of its forward on a 2-core CPU "
                    "(GPU + RDMA territory)")  # fmt: skip
    ap.add_argument("--lengths", default=f"4096,{CONTEXT - OUTPUT_TOKENS}", help="long prompts, tokens")
    ap.add_argument("--chunks", default="512,1024,2048,4096", help="chunk sizes beside off")
    ap.add_argument("--reps", type=int, default=1, help="(a) runs of each long prompt alone; the least TTFT counts")
    ap.add_argument(
        "--forward-rounds",
        type=int,
        default=2,
        help="(a) rounds of the longest prompt's forward in this process per chunk size (0: skip)",
    )
    ap.add_argument("--shorts", type=int, default=8, help="short prompts during the longest prompt")
    ap.add_argument("--shared", type=int, default=2048, help="system prompt tokens, (b) and (c)")
    ap.add_argument("--unique", type=int, default=100)
    ap.add_argument("--requests", type=int, default=10, help="(b) requests per variant")
    ap.add_argument("--groups", type=int, default=8, help="(c) system prompts")
    ap.add_argument("--rounds", type=int, default=3, help="(c) requests per system prompt")
    ap.add_argument("--c-kv-pages", type=int, default=0, help="(c) each prefill's pool in pages (0: 0.5 GiB)")
    ap.add_argument("--omp-wait-policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE"],
                    help="OMP_WAIT_POLICY of the servers (ACTIVE: OpenMP's spinning default)")  # fmt: skip
    args = ap.parse_args()
    if args.quick:
        args.lengths, args.chunks, args.shorts, args.forward_rounds = "2048", "512", 6, 1
        args.shared, args.unique, args.requests, args.groups = 512, 32, 5, 4
    args.lengths = sorted(int(x) for x in args.lengths.split(","))  # ascending: see PeakRss
    args.chunks = [0] + [int(x) for x in args.chunks.split(",") if x]
    if max(args.lengths) + OUTPUT_TOKENS > CONTEXT:
        ap.error(f"{MODEL}'s context is {CONTEXT} tokens: a prompt can have at most {CONTEXT - OUTPUT_TOKENS}")
    args.kv_bytes = ModelConfig.from_pretrained(resolve_model(MODEL)).kv_bytes_per_token
    return args


def main() -> None:
    args = parse_args()
    # The servers share this host's cores; OpenMP threads that spin while they wait (the default) take the cores
    # from the other server's threads. Decodes running beside a chunked prefill then made both 2-3x slower.
    os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy
    parts = set(args.parts.split(","))
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    a = [run_chunk(args, c) for c in args.chunks] if "a" in parts else []
    if a and args.forward_rounds:
        progress(f"(a) the forward of {max(args.lengths)} tokens per chunk size, in this process")
        costs = forward_costs(max(args.lengths), args.chunks, args.forward_rounds)
        for row in a:
            row.forward = costs[row.chunk]
    b = [run_shared(args, cache) for cache in (True, False)] if "b" in parts else []
    c = [run_routed(args, p) for p in ("round_robin", "cache_aware")] if "c" in parts else []
    print(f"\nbench/prefill.py on {MODEL} (context {CONTEXT}, {args.kv_bytes} KV bytes/token), {args.backend} on "
          f"loopback paced to {args.link_gbps:g} Gbps; {OUTPUT_TOKENS} output tokens per request; OMP_WAIT_POLICY="
          f"{args.omp_wait_policy}; {os.cpu_count()} CPUs, 1-min load {load0:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after; {time.perf_counter() - t0:.0f}s in all")  # fmt: skip
    picked = print_chunks(args, a) if a else None
    if b:
        print_shared(args, b)
    if c:
        print_routed(args, c)
    print_goals(a, picked, b, c)


if __name__ == "__main__":
    main()
