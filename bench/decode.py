"""Decode memory: concurrent long-context chats without max_tokens, admission by need vs worst-case reservation.

One run starts the whole disaggregated path (router + prefill + decode processes, Mooncake on loopback) twice on
the same long-context model and bounded decode pool, once per admission policy, and sends the same workload to
each: `--chats` streamed chat requests at once, none with `max_tokens` (so each may run to the end of the context),
each ending on a stop string taken from its own greedy reply at a length drawn from `--min-len`..`--max-len`
tokens (found by the colocated engine, token-exact with the servers; a chat whose reply has no readable text to
stop on gets that length as max_tokens). A warm-up pass sends the same chats once first, teaching the need policy's
estimate what chats take, as a server in service would have learnt. Reported per policy: the most requests streaming at
once (client side) and the mean running count the decode server reported (/server_info, sampled), output tokens/s,
TTFT p50/p99, retractions. The physical bound on concurrency is the pool: pages / pages per chat actually used.

    .venv/bin/python bench/decode.py [--chats 64] [--pages 1024] [--min-len 40] [--max-len 160]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import EngineConfig
from engine.engine import Engine
from engine.sampling import SamplingParams
from harness.observe import RunningSampler, most_at_once, scrape_metric
from harness.sse import sse_data
from harness.stack import Stack

MODEL = "builtin:tiny-llama"  # 4096-token context
TOPICS = ["foxes", "rivers", "the moon", "old maps", "bread", "trains", "winter", "music", "ships", "gardens"]


def progress(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def chat(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Tell me story number {i} about {TOPICS[i % len(TOPICS)]}."}]


async def stream_chat(client: httpx.AsyncClient, url: str, messages: list[dict], stop: str | None, length: int) -> dict:
    body = {"model": MODEL, "messages": messages, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "stop": stop}  # fmt: skip
    if stop is None:
        body["max_tokens"] = length
    t0 = time.monotonic()
    first, tokens = None, 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=1200) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for data in sse_data(r):
            if data == "[DONE]":
                continue
            event = json.loads(data)
            if event.get("choices") and first is None:
                first = time.monotonic()
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return {"t0": t0, "first": first or time.monotonic(), "last": time.monotonic(), "tokens": tokens}


def stop_strings(chats: list[list[dict]], lengths: list[int]) -> list[str | None]:
    """Each chat's greedy reply at its drawn length, from the colocated engine (token-exact with the servers): ~10
    characters of readable text near its end become its stop string."""
    engine = Engine(EngineConfig(model=MODEL, device="cpu", skip_warmup=True))
    prompts = [engine.tokenizer.apply_chat_template(m) for m in chats]
    outs = engine.generate(prompts, [SamplingParams(max_new_tokens=n) for n in lengths])
    stops: list[str | None] = []
    for out in outs:
        text = out.text
        # as near the end as possible, whole characters only (a byte-level token may be half a character)
        tail = next((text[e - 10 : e] for e in range(len(text), 10, -1) if _readable(text[e - 10 : e])), None)
        stops.append(tail)
    return stops


def _readable(s: str) -> bool:
    return bool(s.strip()) and "\ufffd" not in s


def run_policy(policy: str, args: argparse.Namespace, lengths: list[int], stops: list[str | None]) -> dict:
    decode = ["--kv-pages", str(args.pages), "--max-batch-size", str(args.chats), "--admission-policy", policy]
    progress(f"{policy}: starting router + prefill + decode")
    stack = Stack("mooncake", decode_extra=decode, model=MODEL)
    try:
        chats = [chat(i) for i in range(args.chats)]

        async def run() -> list[dict]:
            async with httpx.AsyncClient(limits=httpx.Limits(max_connections=args.chats * 2)) as client:
                return await asyncio.gather(
                    *(
                        stream_chat(client, stack.router_url, m, s, n)
                        for m, s, n in zip(chats, stops, lengths, strict=True)
                    )
                )

        progress(f"{policy}: warm-up pass (the same chats: a server in service has seen such requests finish)")
        asyncio.run(run())
        sampler = RunningSampler(stack.decode_url)
        sampler.start()
        progress(f"{policy}: {args.chats} chats at once")
        t0 = time.monotonic()
        results = asyncio.run(run())
        wall = time.monotonic() - t0
        running = sampler.stop()
        ttft = [r["first"] - r["t0"] for r in results]
        busy = [s for s in running if s > 0]
        return {
            "most": most_at_once(results),
            "mean_running": statistics.fmean(busy) if busy else 0.0,
            "tok_s": sum(r["tokens"] for r in results) / wall,
            "ttft_p50": percentile(ttft, 0.5),
            "ttft_p99": percentile(ttft, 0.99),
            "retractions": scrape_metric(stack.decode_url, "pdserve_retractions_total"),
            "ratio": scrape_metric(stack.decode_url, "pdserve_headroom_ratio"),
            "tokens": sum(r["tokens"] for r in results),
            "stopped": sum(s is not None for s in stops),
        }
    finally:
        stack.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chats", type=int, default=64)
    p.add_argument("--pages", type=int, default=1024, help="decode KV pool, pages of 16 tokens")
    p.add_argument("--min-len", type=int, default=40)
    p.add_argument("--max-len", type=int, default=160)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    lengths = [rng.randint(args.min_len, args.max_len) for _ in range(args.chats)]
    chats = [chat(i) for i in range(args.chats)]
    progress("each chat's stop string, from its greedy reply in the colocated engine")
    stops = stop_strings(chats, lengths)
    rows = {policy: run_policy(policy, args, lengths, stops) for policy in ("worst_case", "need")}
    worst, need = rows["worst_case"], rows["need"]
    context, page = 4096, 16
    used_pages = (need["tokens"] / args.chats + 40) / page  # mean reply + ~40 prompt tokens
    print(f"\nDecode memory: {args.chats} chats without max_tokens at once, {MODEL} (context {context}), decode pool "
          f"{args.pages} pages x {page} tokens; replies {args.min_len}-{args.max_len} tokens "
          f"({need['stopped']}/{args.chats} end on a stop string)\n")  # fmt: skip
    print("| policy | most at once | mean running | output tok/s | TTFT p50 s | TTFT p99 s | retractions |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['most']} | {r['mean_running']:.1f} | {r['tok_s']:.0f} | {r['ttft_p50']:.2f} | "
              f"{r['ttft_p99']:.2f} | {r['retractions']:.0f} |")  # fmt: skip
    print(f"| need / worst_case | x{need['most'] / max(1, worst['most']):.1f} | "
          f"x{need['mean_running'] / max(0.1, worst['mean_running']):.1f} | x{need['tok_s'] / worst['tok_s']:.2f} | "
          f"x{need['ttft_p50'] / worst['ttft_p50']:.2f} | x{need['ttft_p99'] / worst['ttft_p99']:.2f} | |")  # fmt: skip
    print(f"\nbounds: worst case fits {args.pages // (context // page)} chats (a whole context each); the pool holds "
          f"~{args.pages / used_pages:.0f} chats of the lengths actually generated (batch cap {args.chats}); "
          f"need's learned estimate: {need['ratio']:.3f} of a chat's remaining budget (clipped at 4096)")  # fmt: skip


if __name__ == "__main__":
    main()
