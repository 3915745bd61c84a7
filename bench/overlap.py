"""Two-batch overlap (TBO, issue 15): tokens/s with TBO off vs on at TP=2 (or TP/DP=2) on CPU, with and without an
emulated collective latency.

    .venv/bin/python bench/overlap.py [--model builtin:bench-llama] [--reps 3] [--latency-ms X] [--decode-steps 4]
                                      [--dp-attention]

`--dp-attention` runs the same table with DP attention (`--tp-size 2 --dp-size 2 --enable-dp-attention`): each rank
runs its own copy of each batch (two DP ranks with equal load); a layer's two collectives are then the MLP's gather
and all-reduce instead of the o_proj and down_proj all-reduces, so the ideal and bound columns (modelled on the TP
all-reduces) are left out and only the measured ratios are reported.

Two TP ranks (rank 0 here, rank 1 spawned; one torch thread each) run the same batches through
`ModelRunner.forward`, switching `runner.tbo_threshold` per forward: None (off), 0.48 (two-chunk allowed) or 0.0
(sequence-boundary split only). Workloads: prefill balanced (4 x 512 new tokens), prefill skewed ([100, 2000],
with two-chunk and with the sequence-boundary split) and decode (32 sequences on a 256-token prefix, a few steps).
Prefill tok/s = new tokens / forward wall time; decode tok/s = batch size / step time. Every variant runs at no
emulation and at an emulated all-reduce latency L (`TPGroup.emulated_latency_s`: each all-reduce completes no sooner
than L after its launch, sleeping) set near one micro-batch stage's compute: the plain balanced forward time /
(2 x layers x 2), measured in the run, unless `--latency-ms` is given. Variants are interleaved (the order rotates
each rep), and the medians of `--reps` reps are reported after one warm-up of each.

The ideal beside each measurement: with 2 all-reduces per layer, the plain forward costs about C' + 2·layers·L
(C': its compute, the plain forward without emulation less its real loopback all-reduces, measured here). Perfect
overlap hides, per stage, min(L, the other micro-batch's stage compute), taken as the smaller of the two micro-batch
stage computes a, b, also measured (each child batch's plain forward / (2·layers)): ideal on = C' + 2·layers·(L -
min(L, a, b)). Without emulation L is the real loopback all-reduce, which is all TBO can hide there: on 2 cores the
two ranks already keep both cores busy. A schedule bound, 2·layers·max(a + b, L + max(a, b)), shows what the split
itself costs.

Observed on the 2-core dev host with bench-llama (24 layers), --reps 3: 210 s in all (about 3.5 minutes).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import EngineConfig
from engine.distributed import init_address, init_tp_group, spawn_followers, stop_followers
from engine.engine import Engine
from engine.two_batch import plan_two_batch
from engine.two_batch_forward import child_batches

PAGE = 16
TWO_CHUNK = 0.48
# (key, workload, threshold): None = TBO off, 0.48 = two-chunk allowed, 0.0 = sequence-boundary split only
VARIANTS = [
    ("balanced/off", "balanced", None),
    ("balanced/on", "balanced", TWO_CHUNK),
    ("skewed/off", "skewed", None),
    ("skewed/two-chunk", "skewed", TWO_CHUNK),
    ("skewed/seq-split", "skewed", 0.0),
    ("decode/off", "decode", None),
    ("decode/on", "decode", TWO_CHUNK),
]
ON_VARIANTS = [k for k, _, thr in VARIANTS if thr is not None]
# the child micro-batches of each "on" variant, each run alone as a plain forward (no emulation): the ideal's a, b
CHILDREN = [(f"{k}:{c}", wl, thr, i) for k, wl, thr in VARIANTS if thr is not None for i, c in enumerate("AB")]


def progress(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


class Workloads:
    """One rank's batches, on pages allocated once (the same on both ranks: the same calls in the same order)."""

    def __init__(self, engine: Engine, args: argparse.Namespace) -> None:
        self.runner, self.pool, self.tp = engine.runner, engine.pool, engine.tp
        g = torch.Generator().manual_seed(0)
        vocab = engine.model_config.vocab_size

        def seqs(lens: list[int]) -> list[list[int]]:
            return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]

        self.steps = args.decode_steps
        self.prefill = {"balanced": seqs([args.balanced_len] * args.balanced_seqs), "skewed": seqs(args.skewed)}
        self.decode_prefix = seqs([args.decode_prefix] * args.decode_batch)
        self.pages = {name: [self._alloc(len(s)) for s in ss] for name, ss in self.prefill.items()}
        self.pages["decode"] = [self._alloc(args.decode_prefix + self.steps) for _ in self.decode_prefix]
        self.runner.tbo_threshold = None
        for i in range(0, args.decode_batch, 4):  # write the decode prefix's KV once, 4 sequences a forward
            part = slice(i, i + 4)
            n = len(self.decode_prefix[part])
            self.runner.forward(self.runner.build_batch(self.decode_prefix[part], [0] * n, self.pages["decode"][part]))

    def _alloc(self, n: int) -> list[int]:
        return self.pool.allocator.allocate(self.pool.pages_for(n))

    def tokens(self, workload: str) -> int:
        """New tokens per forward (prefill) or sequences per step (decode)."""
        return len(self.decode_prefix) if workload == "decode" else sum(map(len, self.prefill[workload]))

    def batches(self, workload: str) -> list:
        build = self.runner.build_batch
        if workload == "decode":
            n, p = len(self.decode_prefix), len(self.decode_prefix[0])
            return [build([[7 + k]] * n, [p + k] * n, self.pages["decode"]) for k in range(self.steps)]
        ss = self.prefill[workload]
        return [build(ss, [0] * len(ss), self.pages[workload])]

    def counts(self, workload: str, thr: float) -> tuple[int, int, int]:
        """Rows of the whole batch and of its micro-batches A and B (per step for decode)."""
        b = self.batches(workload)[0]
        a_plan, b_plan = plan_two_batch(b.mode.value, b.prefix_lens, b.extend_lens, thr).children
        return b.num_tokens, a_plan.num_rows, b_plan.num_rows

    def allreduce_s(self, rows: set[int], hidden: int, reps: int = 10) -> dict[int, float]:
        """Median seconds of one real (loopback gloo) all-reduce of [rows, hidden] fp32, no emulation."""
        out = {}
        for n in sorted(rows):
            t, times = torch.zeros(n, hidden), []
            for _ in range(reps):
                self.tp.barrier()
                t0 = time.perf_counter()
                self.tp.all_reduce_(t)
                times.append(time.perf_counter() - t0)
            out[n] = statistics.median(times)
        return out

    def run(self, workload: str, thr: float | None, child: int | None = None) -> float:
        """Seconds per forward (per step for decode); `child`: that micro-batch alone, as a plain forward."""
        runner = self.runner
        batches = self.batches(workload)
        if child is not None:
            plans = [plan_two_batch(b.mode.value, b.prefix_lens, b.extend_lens, thr) for b in batches]
            batches = [child_batches(b, p)[child] for b, p in zip(batches, plans, strict=True)]
            thr = None
        runner.tbo_threshold = thr
        steps, two_chunk = runner.tbo_steps, runner.two_chunk_steps
        self.tp.barrier()
        t0 = time.perf_counter()
        for b in batches:
            runner.forward(b)
        dt = (time.perf_counter() - t0) / len(batches)
        # each variant must have taken the path it is named for
        want_tbo = 0 if thr is None else len(batches)
        want_two = len(batches) if thr == TWO_CHUNK and workload == "skewed" else 0
        got = (runner.tbo_steps - steps, runner.two_chunk_steps - two_chunk)
        if got != (want_tbo, want_two):
            raise AssertionError(f"{workload} at threshold {thr}: (overlapped, two-chunk) forwards {got}")
        runner.tbo_threshold = None
        return dt


def measure(w: Workloads, variants: list[tuple], reps: int, label: str) -> dict[str, float]:
    """Median seconds of each variant over `reps` interleaved reps (the order rotates each rep)."""
    times: dict[str, list[float]] = {v[0]: [] for v in variants}
    for rep in range(reps):
        shift = rep % len(variants)
        for key, wl, thr, *child in variants[shift:] + variants[:shift]:
            times[key].append(w.run(wl, thr, *child))
            if w.tp.is_leader:
                progress(f"{label} rep {rep + 1}/{reps} {key}: {times[key][-1] * 1e3:.1f} ms")
    return {k: statistics.median(v) for k, v in times.items()}


def run_rank(rank: int, address: str, args: argparse.Namespace) -> dict | None:
    torch.set_num_threads(1)
    tp = init_tp_group(rank, 2, address, "cpu", 600.0)
    dp = dict(dp_size=2, enable_dp_attention=True) if args.dp_attention else {}
    cfg = EngineConfig(model=args.model, device="cpu", tp_size=2, page_size=PAGE, num_pages=args.pages,
                       skip_warmup=True, enable_two_batch_overlap=True, tbo_token_distribution_threshold=TWO_CHUNK,
                       dist_timeout_s=600.0, **dp)  # fmt: skip
    engine = Engine(cfg, tp)
    leader = tp.is_leader
    t_start = time.perf_counter()
    w = Workloads(engine, args)
    if leader:
        progress(f"{args.model}: {engine.runner.num_layers} layers; warm-up")
    measure(w, VARIANTS + CHILDREN, 1, "warm-up")
    plain = measure(w, VARIANTS + CHILDREN, args.reps, "no emulation")
    counts = {k: w.counts(wl, thr) for k, wl, thr in VARIANTS if thr is not None}
    allreduce = {} if args.dp_attention else w.allreduce_s({n for c in counts.values() for n in c},
                                                            engine.model_config.hidden_size)  # fmt: skip
    layers = engine.runner.num_layers
    latency = args.latency_ms / 1e3 if args.latency_ms is not None else plain["balanced/off"] / (4 * layers)
    latency = tp.broadcast_object(latency)  # every rank emulates the same latency
    if leader:
        progress(f"emulated all-reduce latency: {latency * 1e3:.2f} ms")
    tp.emulated_latency_s = latency
    emulated = measure(w, VARIANTS, args.reps, f"latency {latency * 1e3:.1f} ms")
    tp.emulated_latency_s = 0.0
    out = None
    if leader:
        tokens = {wl: w.tokens(wl) for wl in ("balanced", "skewed", "decode")}
        out = {"plain": plain, "emulated": emulated, "latency": latency, "layers": layers, "tokens": tokens,
               "counts": counts, "allreduce": allreduce, "wall_s": time.perf_counter() - t_start}  # fmt: skip
    tp.barrier()
    tp.close()
    return out


def follower(rank: int, address: str, args: argparse.Namespace) -> None:
    run_rank(rank, address, args)


def costs(r: dict, key: str, latency: float) -> tuple[float, float, float, float, float]:
    """(compute, a, b, le, lc) in seconds: the plain forward's compute C' = C - 2·layers·r(T), with r(n) the
    measured loopback all-reduce of n rows (the plain forward waits for it); the micro-batches' stage computes a, b
    (each child's plain forward less its own all-reduces, / 2·layers); the effective latency of the whole batch's
    and of the micro-batches' all-reduces: max(L, r), since the emulated latency runs from the launch, over the
    real transfer."""
    stages, ar = 2 * r["layers"], r["allreduce"]
    rows, rows_a, rows_b = r["counts"][key]
    compute = r["plain"][f"{key.split('/')[0]}/off"] - stages * ar[rows]
    a, b = ((r["plain"][f"{key}:{x}"] - stages * ar[n]) / stages for x, n in (("A", rows_a), ("B", rows_b)))
    return compute, a, b, max(latency, ar[rows]), max(latency, ar[rows_a], ar[rows_b])


def predicted_off(r: dict, key: str, latency: float) -> float:
    """The plain forward at `latency`: compute + 2·layers·L."""
    compute, _, _, le, _ = costs(r, key, latency)
    return compute + 2 * r["layers"] * le


def ideal_on(r: dict, key: str, latency: float) -> float:
    """Perfect overlap: each stage's latency less min(L, the other micro-batch's stage compute), counted with the
    smaller micro-batch: compute + 2·layers·(L - min(L, a, b))."""
    compute, a, b, _, lc = costs(r, key, latency)
    return compute + 2 * r["layers"] * (lc - min(lc, a, b))


def schedule_bound(r: dict, key: str, latency: float) -> float:
    """The overlapped forward with the micro-batches' own stage computes: one thread runs both (2·layers·(a + b))
    and each micro-batch waits L between its stages (2·layers·(L + max(a, b)))."""
    _, a, b, _, lc = costs(r, key, latency)
    return 2 * r["layers"] * max(a + b, lc + max(a, b))


def report(r: dict, args: argparse.Namespace) -> None:
    lat, layers, stages = r["latency"], r["layers"], 2 * r["layers"]
    names = {
        "balanced": f"prefill balanced {args.balanced_seqs} x {args.balanced_len}",
        "skewed": f"prefill skewed {args.skewed}",
        "decode": f"decode {args.decode_batch} seqs, {args.decode_prefix}-token prefix",
    }
    how = {"on": "", "two-chunk": ", two-chunk (0.48)", "seq-split": ", sequence-boundary split (0)"}
    if args.dp_attention:
        report_dp(r, args, names, how)
        return
    print(f"\nTP=2 on CPU, {args.model} ({layers} layers), 1 torch thread per rank, median of {args.reps} reps")
    why = "(--latency-ms)" if args.latency_ms is not None else "(= plain balanced forward / (2 x layers x 2))"
    print(f"emulated all-reduce latency L = {lat * 1e3:.2f} ms {why}")
    print("\n| workload | emulated latency | off tok/s | on tok/s | on/off | ideal on/off | two-chunk / seq-split |")
    print("|---|---|---|---|---|---|---|")
    ratios: dict[tuple, float] = {}
    for label, L, t in (("none", 0.0, r["plain"]), (f"{lat * 1e3:.1f} ms", lat, r["emulated"])):
        for key in ON_VARIANTS:
            wl, kind = key.split("/")
            n = r["tokens"][wl]
            off, on = t[f"{wl}/off"], t[key]
            ideal_off = predicted_off(r, key, L)
            ratios[(key, L)] = off / on
            ratios[(key, L, "ideal")] = ideal_off / ideal_on(r, key, L)
            extra = ""
            if kind == "two-chunk":
                tc = t["skewed/seq-split"] / on
                ideal_tc = ideal_on(r, "skewed/seq-split", L) / ideal_on(r, key, L)
                ratios[("tc", L)], ratios[("tc", L, "ideal")] = tc, ideal_tc
                extra = f"{tc:.2f}x (ideal {ideal_tc:.2f}x)"
            print(f"| {names[wl]}{how[kind]} | {label} | {n / off:,.0f} | {n / on:,.0f} | {off / on:.2f}x "
                  f"| {ideal_off / ideal_on(r, key, L):.2f}x | {extra} |")  # fmt: skip
    print("\nBounds, ms per forward (per step for decode). r(n): one real loopback all-reduce of n rows, measured; "
          "C' = C - 2·layers·r: the plain forward's compute; plain forward at L ≈ C' + 2·layers·max(L, r); ideal "
          "overlap hides min(L, smaller micro-batch stage) per stage; schedule bound 2·layers·max(a + b, L + "
          "max(a, b)), a, b the micro-batches' own measured stage computes (the split's cost)")  # fmt: skip
    for key in ON_VARIANTS:
        rows, wl = r["counts"][key], key.split("/")[0]
        nrows = "/".join(map(str, rows))
        rs = "/".join(f"{r['allreduce'][n] * 1e3:.2f}" for n in rows)
        for L, t in ((0.0, r["plain"]), (lat, r["emulated"])):
            compute, a, b, _, _ = costs(r, key, L)
            print(f"  {key} L={L * 1e3:.1f}: off {t[wl + '/off'] * 1e3:.0f} (predicted "
                  f"{predicted_off(r, key, L) * 1e3:.0f}); on {t[key] * 1e3:.0f} (ideal "
                  f"{ideal_on(r, key, L) * 1e3:.0f}, schedule bound {schedule_bound(r, key, L) * 1e3:.0f}); "
                  f"C' {compute * 1e3:.0f}, a {a * 1e3:.2f}, b {b * 1e3:.2f}, r(rows {nrows}) {rs}")  # fmt: skip
    print_goals(ratios, lat, args.skewed, ideal=True)
    plain = ", ".join(f"{k} {ratios[(k, 0.0)]:.2f}x (ideal {ratios[(k, 0.0, 'ideal')]:.2f}x)" for k in ON_VARIANTS)
    rows = r["counts"]["balanced/on"][0]
    one = r["allreduce"][rows]
    print(f"Without emulation: on/off {plain}; two-chunk / seq-split {ratios[('tc', 0.0)]:.2f}x. On this 2-core "
          "host the two ranks (one thread each) already use every core, so the only idle time TBO can fill is the "
          f"wait on the loopback all-reduces themselves: for the balanced batch {stages} x {one * 1e3:.1f} ms = "
          f"{one * stages * 1e3:.0f} ms of its {r['plain']['balanced/off'] * 1e3:.0f} ms forward. The gloo transfer "
          "that TBO runs under the other micro-batch's compute shares those two cores, and the split's own costs "
          "(smaller matmuls, twice the collectives, the cut sequence's cached-prefix attention) remain, so "
          "there is little to gain.")  # fmt: skip
    print(f"\nbenchmark wall time (after model load): {r['wall_s']:.0f} s")


def print_goals(ratios: dict, lat: float, skewed: list[int], ideal: bool) -> None:
    """The issue's two goals at the emulated latency `lat`, with the ideal ratio beside each where it is modelled."""
    goals = [("TBO >= 1.3x no-TBO on balanced prefill", "balanced/on", 1.3),
             (f"two-chunk >= 1.2x the sequence-boundary split on {skewed}", "tc", 1.2)]  # fmt: skip
    print()
    for what, key, goal in goals:
        got = ratios[(key, lat)]
        beside = f" (ideal {ratios[(key, lat, 'ideal')]:.2f}x)" if ideal else ""
        print(f"Goal: with emulation, {what}: {got:.2f}x{beside} — {'PASS' if got >= goal else 'MISS'}")


def report_dp(r: dict, args: argparse.Namespace, names: dict, how: dict) -> None:
    """The measured table of a DP-attention run (no ideal: the model above is of TP's all-reduces)."""
    lat = r["latency"]
    print(f"\nTP/DP=2 (DP attention) on CPU, {args.model} ({r['layers']} layers), each rank its own copy of each "
          f"batch, 1 torch thread per rank, median of {args.reps} reps")  # fmt: skip
    print(f"emulated collective latency L = {lat * 1e3:.2f} ms (MLP gather and all-reduce alike)")
    print("\n| workload | emulated latency | off tok/s per rank | on tok/s per rank | on/off | two-chunk / seq-split |")
    print("|---|---|---|---|---|---|")
    ratios = {}
    for label, L, t in (("none", 0.0, r["plain"]), (f"{lat * 1e3:.1f} ms", lat, r["emulated"])):
        for key in ON_VARIANTS:
            wl, kind = key.split("/")
            n, off, on = r["tokens"][wl], t[f"{wl}/off"], t[key]
            ratios[(key, L)] = off / on
            extra = ""
            if kind == "two-chunk":
                ratios[("tc", L)] = t["skewed/seq-split"] / on
                extra = f"{ratios[('tc', L)]:.2f}x"
            print(f"| {names[wl]}{how[kind]} | {label} | {n / off:,.0f} | {n / on:,.0f} | {off / on:.2f}x | {extra} |")
    print_goals(ratios, lat, args.skewed, ideal=False)
    plain = ", ".join(f"{k} {ratios[(k, 0.0)]:.2f}x" for k in ON_VARIANTS)
    print(f"Without emulation: on/off {plain}; two-chunk / seq-split {ratios[('tc', 0.0)]:.2f}x")
    print(f"\nbenchmark wall time (after model load): {r['wall_s']:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:bench-llama")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--latency-ms", type=float, default=None, help="emulated latency (default: measured stage)")
    ap.add_argument("--balanced-seqs", type=int, default=4)
    ap.add_argument("--balanced-len", type=int, default=512)
    ap.add_argument("--skewed", type=lambda s: [int(x) for x in s.split(",")], default=[100, 2000])
    ap.add_argument("--decode-batch", type=int, default=32)
    ap.add_argument("--decode-prefix", type=int, default=256)
    ap.add_argument("--decode-steps", type=int, default=4)
    ap.add_argument("--pages", type=int, default=1024)
    ap.add_argument("--dp-attention", action="store_true", help="TP/DP=2 with DP attention instead of TP=2")
    args = ap.parse_args()
    if args.latency_ms is not None and args.latency_ms < 0:
        ap.error("--latency-ms must be >= 0")
    t0 = time.perf_counter()
    address = init_address()
    procs = spawn_followers(follower, (address, args), 2)
    try:
        result = run_rank(0, address, args)
        for p in procs:
            p.join(60)
    finally:
        stop_followers(procs)
    assert result is not None
    report(result, args)
    print(f"total run time: {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
