"""KV bytes/s through the prefill sender path vs the raw engine writing the same bytes with the same
descriptors in one batch, for each backend; the same request between sides of different TP sizes (P2->D1,
P1->D2) against the same-TP path; and descriptor counts: page runs merged, and copies per transfer with the HND
pool (a head slice of a page is one copy) against per-token slicing of an NHD pool.

Layout (default): 32 layers, 8 KV heads, head dim 128, bfloat16, page size 16, a 4K-token request, i.e.
512 MiB of KV. Every rank is its own process on loopback (Mooncake tcp, NIXL UCX on DRAM). Decode's destination
pages are fragmented into random runs, as a busy pool's would be. Every path moves the same bytes: all heads of
all pages (P2->D1: each prefill rank its half of the heads; P1->D2: each decode rank gets its half).

    .venv/bin/python bench/transfer.py [--backends mooncake,nixl] [--tokens 4096] [--repeats 3]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.kvcache import pages_for
from engine.parallel import kv_head_range
from harness.peer_proc import PeerProc
from transfer.head_map import head_slices
from transfer.planner import kv_copies, merge_runs

HETERO = [(2, 1), (1, 2)]  # (prefill TP, decode TP)


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


def start_sides(backend: str, p: int, d: int, layout: dict) -> tuple[list[PeerProc], list[PeerProc]]:
    first = PeerProc(role="prefill", backend=backend, tp_rank=0, tp_size=p, **layout)
    addr = first.info["bootstrap_addr"]
    cfgs = [dict(role="prefill", tp_rank=i, tp_size=p, bootstrap_addr=addr) for i in range(1, p)]
    cfgs += [dict(role="decode", tp_rank=j, tp_size=d) for j in range(d)]
    with ThreadPoolExecutor(len(cfgs)) as pool:
        peers = list(pool.map(lambda cfg: PeerProc(backend=backend, **layout, **cfg), cfgs))
    return [first, *peers[: p - 1]], peers[p - 1 :]


def one_room(prefills: list[PeerProc], decodes: list[PeerProc], room: int, groups: list[list[int]], tokens: int,
             src: list[int], dst: list[int], raw: bool) -> tuple[float, dict | None]:  # fmt: skip
    """One request through every rank: seconds until every prefill rank succeeded (and the raw write's answer)."""
    for prefill in prefills:
        prefill.call("alloc", room=room, n=len(src), pages=src)
    for decode in decodes:
        decode.call("alloc", room=room, n=len(dst), pages=dst)
        decode.call("create", room=room, bootstrap_addr=prefills[0].info["bootstrap_addr"], prompt_len=tokens)
    for prefill in prefills:
        prefill.call("create", room=room)
    for prefill in prefills:
        prefill.wait_state(room, {"WAITING_FOR_INPUT"}, 30)
    with ThreadPoolExecutor(len(prefills)) as pool:  # the ranks run at once, as SPMD ranks do
        outs = list(pool.map(lambda p: p.call("timed_transfer", room=room, groups=groups, prompt_len=tokens,
                                              timeout=120), prefills))  # fmt: skip
    for decode in decodes:
        decode.wait_state(room, {"SUCCESS"}, 30)
    raw_out = prefills[0].call("raw_write", room=room, timeout=120) if raw else None
    for peer in (*prefills, *decodes):
        peer.release(room)
    return max(o["seconds"] for o in outs), raw_out


def layer_groups(layers: int, n: int) -> list[list[int]]:
    step = layers // n
    return [[g * step, layers if g == n - 1 else (g + 1) * step] for g in range(n)]


def copy_counts(args: argparse.Namespace, src: list[int], dst: list[int]) -> list[tuple[str, int, int, int]]:
    """(path, copies with the HND pool, items those copies move, copies slicing an NHD pool per token) per request,
    summed over the ranks, from the planner for the same pages."""
    rows = []
    runs = merge_runs(src, dst)
    h, layers, ps = args.kv_heads, args.layers, args.page_size
    for p, d in [(1, 1), *HETERO]:
        hnd = items = nhd = 0
        for i in range(p):
            for j in range(d):
                slices = head_slices(h, p, d, i, j)
                sh, dh = kv_head_range(h, p, i).count, kv_head_range(h, d, j).count
                copies = kv_copies(0, layers, layers, src, dst, slices, sh, dh)
                hnd += len(copies)
                items += sum(c.count for c in copies)
                for sl in slices:  # NHD [page, page_size, heads, dim]: a head slice is contiguous per token only
                    whole = sl.count == sh == dh
                    nhd += 2 * layers * (len(runs) if whole else len(src) * ps)
        rows.append((f"P{p}->D{d}", hnd, items, nhd))
    return rows


def run_backend(backend: str, args: argparse.Namespace, layout: dict, total_bytes: int, pages: int, pool: int,
                rng: random.Random) -> list[tuple[str, str, float | None, str]]:  # fmt: skip
    rows: list[tuple[str, str, float | None, str]] = []
    progress(f"{backend}: P1->D1 ({total_bytes / 2**20:.0f} MiB of KV per request)")
    prefills, decodes = start_sides(backend, 1, 1, layout)
    results: dict[str, list[float]] = {"P1->D1 sender, 1 group": [], "P1->D1 sender, 4 groups": [], "raw engine": []}
    try:
        for i in range(args.repeats + 1):  # the first round warms up connections
            for n in (1, 4):
                room = 10_000 * (i + 1) + n
                secs, raw = one_room(prefills, decodes, room, layer_groups(args.layers, n), args.tokens,
                                     list(range(pages)), fragmented_pages(pages, pool, rng), raw=n == 1)  # fmt: skip
                if i > 0:
                    results[f"P1->D1 sender, {n} group{'s' if n > 1 else ''}"].append(secs)
                    if raw is not None:
                        results["raw engine"].append(raw["seconds"])
    finally:
        for peer in (*prefills, *decodes):
            peer.close()
    same = statistics.median(results["P1->D1 sender, 1 group"])
    raw_s = statistics.median(results["raw engine"])
    for label, secs in results.items():
        s = statistics.median(secs)
        rows.append((backend, label, total_bytes / s / 2**30, f"{raw_s / s:.2f} raw, {same / s:.2f} same-TP"))
    for p, d in HETERO:
        progress(f"{backend}: P{p}->D{d}")
        prefills, decodes = start_sides(backend, p, d, layout)
        secs_list = []
        try:
            for i in range(args.repeats + 1):
                room = 50_000 + 1000 * p + 100 * d + i
                secs, _ = one_room(prefills, decodes, room, layer_groups(args.layers, 1), args.tokens,
                                   list(range(pages)), fragmented_pages(pages, pool, rng), raw=False)  # fmt: skip
                if i > 0:
                    secs_list.append(secs)
        finally:
            for peer in (*prefills, *decodes):
                peer.close()
        s = statistics.median(secs_list)
        rows.append((backend, f"P{p}->D{d} sender, 1 group", total_bytes / s / 2**30, f"{same / s:.2f} same-TP"))
    return rows


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
    rows = []
    for backend in args.backends.split(","):
        rows += run_backend(backend, args, layout, total_bytes, pages, pool, random.Random(0))

    print(
        f"\nKV transfer: {args.tokens} tokens, {args.layers} layers x {args.kv_heads} KV heads x head dim "
        f"{args.head_dim}, bf16, page {args.page_size} ({total_bytes / 2**20:.0f} MiB); median of {args.repeats}"
    )
    print(f"{'backend':<9} {'path':<28} {'GiB/s':>7}  ratio")
    for backend, label, gibs, ratio in rows:
        print(f"{backend:<9} {label:<28} {gibs:>7.2f}  {ratio}")
    for backend in args.backends.split(","):
        mine = {label: gibs for b, label, gibs, _ in rows if b == backend}
        same = mine["P1->D1 sender, 1 group"]
        hetero = ", ".join(f"P{p}->D{d} {mine[f'P{p}->D{d} sender, 1 group'] / same:.2f}" for p, d in HETERO)
        print(f"{backend} heterogeneous vs same-TP: {hetero} (goal >= 0.80)")

    src, dst = list(range(pages)), fragmented_pages(pages, pool, random.Random(1))
    runs = len(merge_runs(src, dst))
    print(f"\nCopies per request ({pages} pages, {runs} page runs after merging, summed over ranks)")
    print(f"{'path':<9} {'HND copies':>11} {'HND items':>10} {'NHD per-token copies':>21}")
    for path, hnd, items, nhd in copy_counts(args, src, dst):
        print(f"{path:<9} {hnd:>11} {items:>10} {nhd:>21}")
    print("(per page and layer buffer: P1->D1 one copy per page run in either layout; a head slice is one copy per "
          "page with HND, one per token with NHD)")  # fmt: skip


if __name__ == "__main__":
    main()
