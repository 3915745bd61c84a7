"""Context-parallel prefill (issue 16): per-rank causal attention balance, zigzag vs contiguous split, and the
prefill time (TTFT) of long prompts at CP=2 vs CP=1.

Balance. For each batch (4K and 8K prompts, batch sizes 1 and 4, even and uneven lengths, one with cached
prefixes) and each CP size, every rank's causal attention work (the keys each of its queries attends to, summed)
is read off the zigzag metadata of `engine/context_parallel.py`, and computed the same way for a contiguous split
(each sequence's new tokens cut into cp consecutive chunks, rank r taking chunk r). The figure is max/min over the
ranks: 1.000 is perfectly even; the issue's goal is zigzag within 5% of even. "gather pad" is the all-gather rows
that carry no token (cp · largest share − tokens). Pure arithmetic: no model, no torch, runs anywhere (`--no-ttft`
prints this table alone).

TTFT. The time to first token of a prefill server is the prefill forward of the request's batch plus the KV transfer
to decode; this part measures the forward: the wall time of one prefill forward of the whole batch (all layers and
the last tokens' logits, driven through `engine.runner` directly, so the scheduler's chunked-prefill cap does not
cut the prompt; building the batch is not timed), of random prompts on fresh pages, on CPU, on `builtin:bench-llama`
(24 layers, hidden 512, context 8192: the "8K" prompt is 8000 tokens so it leaves room to generate). CP=1 runs in
one process with every core as torch threads; CP=2 runs two spawned ranks (torch.multiprocessing, spawn), each with
half the cores, on the same batches in lockstep (a barrier before and after each forward, so the time is the whole
group's), rank 0 reporting. Each case is timed after one warm-up forward of the same batch size (`--warmup-len`
tokens per sequence; 0: the case's own length), as the median of `--reps` forwards. Whether each CP=2 batch ran
context-parallel is read from its forward's `cp_refusal`. Default cases skip batch 4 × 8000 (one CP=1 forward of it
takes 5 minutes or more on a 2-core host, so with it the bench no longer fits ~10 minutes; add it with `--ttft-cases
1x4096 4x4096 1x8000 4x8000`). On a host with few cores CP=2 splits the same cores CP=1 uses, so expect little
speed-up; there the figure measures the split's cost (the K/V all-gathers, the pad rows) against intra-op
threading's, not the gain of a second accelerator.

    .venv/bin/python bench/cp.py [--cp 2 4] [--ttft-cases 1x4096 4x4096 1x8000] [--reps 1] [--no-ttft]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.context_parallel import contiguous_work, imbalance, zigzag_split, zigzag_work

PAGE_SIZE = 16
TTFT_CP = 2  # the CP size the TTFT part compares with CP=1
DEFAULT_CASES = ["1x4096", "4x4096", "1x8000"]  # batch x prompt tokens; 4x8000 is ~5 min per CP=1 forward here

# (label, cached prefix per sequence, new tokens per sequence)
BATCHES: list[tuple[str, list[int], list[int]]] = [
    ("4K bs1", [0], [4096]),
    ("4K bs1 odd", [0], [4093]),
    ("4K bs4", [0] * 4, [4096] * 4),
    ("4K bs4 uneven", [0] * 4, [4096, 3583, 2731, 1031]),
    ("8K bs1", [0], [8192]),
    ("8K bs1 odd", [0], [8191]),
    ("8K bs4", [0] * 4, [8192] * 4),
    ("8K bs4 uneven", [0] * 4, [8192, 7001, 5123, 2047]),
    ("8K bs4 uneven+prefix", [4096, 0, 1024, 0], [4096, 8191, 7168, 3001]),
]


def rows(cp_sizes: list[int]) -> list[tuple[str, str, int, str, str, int]]:
    out = []
    for label, prefix, ext in BATCHES:
        for cp in cp_sizes:
            zig, cont = zigzag_work(prefix, ext, cp), contiguous_work(prefix, ext, cp)
            plan = zigzag_split(prefix, ext, cp, 0)
            pad = plan.gathered_size - plan.num_real_tokens
            lens = "+".join(f"{p}:{e}" if p else str(e) for p, e in zip(prefix, ext, strict=True))
            out.append((label, lens, cp, f"{imbalance(zig):.4f}", f"{imbalance(cont):.3f}", pad))
    return out


def progress(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def parse_case(text: str) -> tuple[int, int]:
    """Parse a case: "4x8000" is batch 4 of 8000-token prompts."""
    try:
        bs, n = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a case is BATCHxTOKENS, e.g. 4x4096; got {text!r}") from None
    if bs < 1 or n < 1:
        raise argparse.ArgumentTypeError(f"batch and tokens must be >= 1, got {text!r}")
    return bs, n


def prefill_once(engine, bs: int, n: int, seed: int) -> tuple[float, str | None, bool]:
    """Wall seconds of one prefill forward of `bs` random `n`-token prompts on fresh pages (between two barriers
    of the engine's group, so every rank has finished), its `cp_refusal`, and whether it ran context-parallel."""
    import torch

    g = torch.Generator().manual_seed(seed)
    vocab = engine.model_config.vocab_size
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for _ in range(bs)]
    alloc, runner = engine.pool.allocator, engine.runner
    pages = [alloc.allocate(engine.pool.pages_for(n)) for _ in prompts]
    try:
        batch = runner.build_batch(prompts, [0] * bs, pages)
        engine.tp.barrier()
        start = time.perf_counter()
        fwd = runner.start_forward(batch)
        fwd.run_layers(0, runner.num_layers)
        fwd.logits()
        engine.tp.barrier()
        secs = time.perf_counter() - start
    finally:
        for p in pages:
            alloc.free(p)
    return secs, fwd.cp_refusal, fwd.cp is not None


def ttft_rank(rank: int, cp: int, address: str, args: argparse.Namespace, threads: int, out: str) -> None:
    """One rank of a CP=`cp` engine (every rank runs every case in lockstep); rank 0 writes the results to `out`."""
    import torch

    from engine.config import EngineConfig
    from engine.distributed import init_tp_group
    from engine.engine import Engine

    torch.set_num_threads(threads)
    most = max(bs * -(-n // PAGE_SIZE) for bs, n in args.ttft_cases)
    cfg = EngineConfig(model=args.model, device="cpu", page_size=PAGE_SIZE, num_pages=most + 8, cp_size=cp,
                       skip_warmup=True, disable_cuda_graph=True, dist_timeout_s=args.timeout)  # fmt: skip
    group = init_tp_group(rank, cp, address, "cpu", args.timeout) if cp > 1 else None
    engine = Engine(cfg, group)
    say = progress if rank == 0 else (lambda _msg: None)
    results = []
    for i, (bs, n) in enumerate(args.ttft_cases):
        if n >= engine.context_length:
            raise ValueError(f"{n}-token prompts leave no room in the context of {engine.context_length}")
        warm_n = min(args.warmup_len or n, n)
        secs, _, _ = prefill_once(engine, bs, warm_n, seed=1000 + i)
        say(f"CP={cp} {bs}x{n}: warm-up ({bs}x{warm_n}) {secs:.1f}s")
        times, refusals, split = [], set(), True
        for rep in range(args.reps):
            secs, refusal, ran_cp = prefill_once(engine, bs, n, seed=i)
            times.append(secs)
            refusals.add(refusal)
            split &= ran_cp
            say(f"CP={cp} {bs}x{n}: rep {rep + 1}/{args.reps} {secs:.2f}s (cp_refusal {refusal})")
        results.append({"bs": bs, "n": n, "times": times, "median": statistics.median(times),
                        "cp": split, "refusals": sorted(str(r) for r in refusals)})  # fmt: skip
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    engine.tp.close()


def ttft_measure(args: argparse.Namespace, cp: int, threads: int, tmp: Path) -> list[dict]:
    """Run every TTFT case on a CP=`cp` engine of `cp` spawned processes; rank 0's results."""
    import torch.multiprocessing as tmp_mp

    from engine.distributed import init_address

    out = tmp / f"cp{cp}.json"
    ctx = tmp_mp.start_processes(ttft_rank, (cp, init_address(), args, threads, str(out)), nprocs=cp,
                                 join=False, start_method="spawn")  # fmt: skip
    deadline = time.monotonic() + args.timeout * (2 + len(args.ttft_cases) * (1 + args.reps))
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the CP={cp} ranks did not finish in time")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join()
    return json.loads(out.read_text())


def ttft(args: argparse.Namespace) -> None:
    cores = os.cpu_count() or 1
    threads1, threads2 = cores, max(1, cores // TTFT_CP)
    with tempfile.TemporaryDirectory() as d:
        progress(f"TTFT: CP=1, one process, {threads1} threads; cases {args.ttft_cases}, reps {args.reps}")
        one = ttft_measure(args, 1, threads1, Path(d))
        progress(f"TTFT: CP={TTFT_CP}, {TTFT_CP} spawned ranks, {threads2} thread(s) each")
        two = ttft_measure(args, TTFT_CP, threads2, Path(d))
    print(f"\nPrefill forward of the whole batch (TTFT less the KV transfer), {args.model} on CPU, "
          f"median of {args.reps} after one warm-up forward")  # fmt: skip
    print(f"| batch | tokens | CP=1 s | CP={TTFT_CP} s | speed-up |")
    print("|---:|---:|---:|---:|---:|")
    for a, b in zip(one, two, strict=True):
        print(f"| {a['bs']} | {a['n']} | {a['median']:.2f} | {b['median']:.2f} | x{a['median'] / b['median']:.2f} |")
    ran = ", ".join(
        f"{b['bs']}x{b['n']} " + ("yes" if b["cp"] else f"NO (cp_refusal {'/'.join(b['refusals'])})") for b in two
    )
    print(f"\nCP={TTFT_CP} batches ran context-parallel (cp_refusal None): {ran}")
    print(f"Host: {cores} CPU cores. CP=1 ran {threads1} torch threads in one process, each CP={TTFT_CP} rank "
          f"{threads2}, so both use the whole machine: CP={TTFT_CP} splits the same cores, it adds none; little "
          "speed-up is expected here, the figure weighs the split's all-gathers and pad rows against intra-op "
          "threading. The cores are shared with other work, so the times are noisy.")  # fmt: skip
    skipped = [c for c in ["1x4096", "4x4096", "1x8000", "4x8000"] if parse_case(c) not in args.ttft_cases]
    if skipped:
        print(f"Not run: {', '.join(skipped)} (add with --ttft-cases).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cp", type=int, nargs="+", default=[2, 4], help="CP sizes of the balance table (2 4)")
    parser.add_argument("--no-ttft", action="store_true", help="the balance table only (no model, instant)")
    parser.add_argument("--model", default="builtin:bench-llama")
    parser.add_argument("--ttft-cases", type=parse_case, nargs="+", default=[parse_case(c) for c in DEFAULT_CASES],
                        help=f"BATCHxTOKENS cases of the TTFT table (default {' '.join(DEFAULT_CASES)})")  # fmt: skip
    parser.add_argument("--reps", type=int, default=1, help="timed forwards per case; the median is reported (1)")
    parser.add_argument("--warmup-len", type=int, default=512,
                        help="tokens per sequence of each case's warm-up forward (512; 0: the case's own)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds a rank may wait on its peer (900)")
    args = parser.parse_args()
    if args.reps < 1:
        parser.error("--reps must be >= 1")
    table = rows(args.cp)
    print("| batch | tokens (prefix:new) | cp | zigzag max/min | contiguous max/min | gather pad |")
    print("|---|---|---|---|---|---|")
    for r in table:
        print("| " + " | ".join(str(c) for c in r) + " |")
    worst = max(float(r[3]) for r in table)
    verdict = "within" if worst <= 1.05 else "NOT within"
    print(f"\nworst zigzag max/min: {worst:.4f} ({verdict} 5% of even)")
    sys.stdout.flush()
    if not args.no_ttft:
        ttft(args)


if __name__ == "__main__":
    main()
