"""KV bytes/s through the prefill sender path vs the raw engine writing the same bytes with the same
descriptors in one batch, for each backend; and descriptor counts before and after merging page runs.

Layout (default): 32 layers, 8 KV heads, head dim 128, bfloat16, page size 16, a 4K-token request, i.e.
512 MiB of KV. Prefill and decode are separate processes on loopback (Mooncake tcp, NIXL UCX on DRAM).
Decode's destination pages are fragmented into random runs, as a busy pool's would be.

    .venv/bin/python bench/transfer.py [--backends mooncake,nixl] [--tokens 4096] [--repeats 3]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.kvcache import pages_for
from harness.peer_proc import PeerProc


def progress(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def fragmented_pages(n: int, pool: int, rng: random.Random) -> list[int]:
    """n distinct pages of a `pool`-page pool, as shuffled runs of 1..16 contiguous pages."""
    runs, start = [], 0
    while sum(len(r) for r in runs) < n:
        length = min(rng.randint(1, 16), n - sum(len(r) for r in runs))
        runs.append(list(range(start, start + length)))
        start += length + rng.randint(0, 3)  # holes between runs
    assert start <= pool, "pool too small for the requested fragmentation"
    rng.shuffle(runs)
    return [p for run in runs for p in run]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="mooncake,nixl")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    pages = pages_for(args.tokens, args.page_size)
    pool = pages * 2
    layout = dict(num_layers=args.layers, num_kv_heads=args.kv_heads, head_dim=args.head_dim,
                  page_size=args.page_size, dtype="bfloat16", num_pages=pool)  # fmt: skip
    total_bytes = pages * args.page_size * args.kv_heads * args.head_dim * 2 * 2 * args.layers
    rng = random.Random(0)
    rows, efficiencies = [], {}
    for backend in args.backends.split(","):
        progress(f"{backend}: starting prefill and decode ({total_bytes / 2**20:.0f} MiB of KV per request)")
        prefill = PeerProc(role="prefill", backend=backend, **layout)
        decode = PeerProc(role="decode", backend=backend, **layout)
        try:
            results: dict[str, list[float]] = {"sender, 1 group": [], "sender, 4 groups": [], "raw engine": []}
            counts = {}
            for i in range(args.repeats + 1):  # the first round warms up connections
                for label in ("sender, 1 group", "sender, 4 groups"):
                    room = 10_000 * (i + 1) + len(results[label])
                    src = list(range(pages))
                    dst = fragmented_pages(pages, pool, rng)
                    prefill.call("alloc", room=room, n=pages, pages=src)
                    decode.call("alloc", room=room, n=pages, pages=dst)
                    decode.call("create", room=room, bootstrap_addr=prefill.info["bootstrap_addr"],
                                prompt_len=args.tokens)  # fmt: skip
                    prefill.call("create", room=room)
                    prefill.wait_state(room, {"WAITING_FOR_INPUT"}, 30)
                    n = 1 if label.endswith("1 group") else 4
                    step = args.layers // n
                    groups = [[g * step, args.layers if g == n - 1 else (g + 1) * step] for g in range(n)]
                    out = prefill.call("timed_transfer", room=room, groups=groups, prompt_len=args.tokens, timeout=120)
                    decode.wait_state(room, {"SUCCESS"}, 30)
                    raw = prefill.call("raw_write", room=room, timeout=120) if n == 1 else None
                    if i > 0:
                        results[label].append(out["seconds"])
                        if raw is not None:
                            results["raw engine"].append(raw["seconds"])
                            counts = raw
                    prefill.release(room)
                    decode.release(room)
                progress(f"{backend}: round {i + 1}/{args.repeats + 1}")
            raw_s = statistics.median(results["raw engine"])
            for label, secs in results.items():
                s = statistics.median(secs)
                rows.append((backend, label, total_bytes / s / 2**30, raw_s / s))
            efficiencies[backend] = raw_s / statistics.median(results["sender, 1 group"])
            before = counts["pages"] * 2 * args.layers
            progress(f"{backend}: descriptors {before} per-page, {counts['descriptors']} after merging runs")
            rows.append((backend, f"descriptors: {before} per page -> {counts['descriptors']} merged", None, None))
        finally:
            prefill.close()
            decode.close()

    print(
        f"\nKV transfer: {args.tokens} tokens, {args.layers} layers x {args.kv_heads} KV heads x head dim "
        f"{args.head_dim}, bf16, page {args.page_size} ({total_bytes / 2**20:.0f} MiB); median of {args.repeats}"
    )
    print(f"{'backend':<9} {'path':<44} {'GiB/s':>7} {'vs raw':>7}")
    for backend, label, gibs, ratio in rows:
        if gibs is None:
            print(f"{backend:<9} {label}")
        else:
            print(f"{backend:<9} {label:<44} {gibs:>7.2f} {ratio:>7.2f}")
    for backend, eff in efficiencies.items():
        print(f"{backend} efficiency {eff:.2f}")


if __name__ == "__main__":
    main()
