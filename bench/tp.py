"""Tensor parallelism in the colocated engine: TP=N vs TP=1 prefill and decode tokens/s, and weights per rank.

Each TP size runs the same batch (equal-length random prompts, greedy, a fixed number of new tokens) through
`Engine.step`, so the sampled-token broadcast and every collective are in the timing. On CPU the cores are
split between the ranks (threads per rank = cores / TP) and TP=1 runs both with all cores and with one rank's
share, so the comparison is at equal compute: expect no speed-up there, only the collectives' cost (and
intra-op threading's own overhead on a busy machine); on GPUs each rank has its own device.

    .venv/bin/python bench/tp.py [--model builtin:bench-llama] [--tp 2] [--device cpu] [--batch 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import ours
from engine.config import EngineConfig
from engine.distributed import init_address, init_tp_group, spawn_followers, stop_followers
from engine.engine import Engine


def progress(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def run_rank(rank: int, address: str, args: argparse.Namespace, threads: int, out: str) -> None:
    """One rank (every rank when TP > 1, in lockstep): rank 0 writes the medians to `out`."""
    torch.set_num_threads(threads)
    cfg = EngineConfig(model=args.model, device=args.device, tp_size=args.tp_size, num_pages=args.pages,
                       page_size=16, skip_warmup=True, disable_cuda_graph=args.device == "cpu")  # fmt: skip
    tp = init_tp_group(rank, args.tp_size, address, args.device, 300.0) if args.tp_size > 1 else None
    engine = Engine(cfg, tp)
    g = torch.Generator().manual_seed(0)
    vocab = engine.model_config.vocab_size
    prompts = [torch.randint(0, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.batch)]
    ours(engine, prompts[:2], 4)  # warm-up
    runs = [ours(engine, prompts, args.new_tokens) for _ in range(args.repeat)]
    prefill = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    if rank == 0:
        torch.save({"prefill_s": prefill, "decode_step_s": decode, "weight_bytes": engine.weight_bytes}, out)
    engine.tp.close()


def measure(args: argparse.Namespace, tp_size: int, threads: int, tmp: Path) -> dict:
    args = argparse.Namespace(**{**vars(args), "tp_size": tp_size})
    out = str(tmp / f"tp{tp_size}-{threads}.pt")
    address = init_address()
    procs = spawn_followers(run_rank, (address, args, threads, out), tp_size) if tp_size > 1 else []
    try:
        run_rank(0, address, args, threads, out)
        for p in procs:
            p.join(300)
    finally:
        stop_followers(procs)
    return torch.load(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:bench-llama")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tp", type=int, default=2, help="the TP size compared with TP=1")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--pages", type=int, default=256)
    args = ap.parse_args()
    import tempfile

    cores = os.cpu_count() or 1
    share = max(1, cores // args.tp)
    runs = (
        [(1, cores), (1, share), (args.tp, share)]
        if args.device == "cpu" and share != cores
        else [(1, cores), (args.tp, share)]
    )
    with tempfile.TemporaryDirectory() as d:
        results = {}
        for size, threads in runs:
            progress(
                f"TP={size} ({threads} threads per rank) on {args.device}: batch {args.batch} x "
                f"{args.prompt_len} prompt tokens, {args.new_tokens} new tokens, median of {args.repeat}"
            )
            results[size, threads] = measure(args, size, threads, Path(d))
    print(
        f"\n{args.model} on {args.device} ({cores} CPU cores), batch {args.batch}, prompt {args.prompt_len}, "
        f"{args.new_tokens} new tokens, median of {args.repeat}"
    )
    print("| TP | threads per rank | prefill tok/s | decode tok/s | decode ms/step | weights per rank (MiB) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for (size, threads), r in results.items():
        prefill = args.batch * args.prompt_len / r["prefill_s"]
        decode = args.batch / r["decode_step_s"]
        print(
            f"| {size} | {threads} | {prefill:,.0f} | {decode:,.1f} | {1000 * r['decode_step_s']:.1f} | "
            f"{r['weight_bytes'] / 2**20:,.1f} |"
        )
    one, many = results[1, cores], results[args.tp, share]
    print(f"\nTP={args.tp} / TP=1 (all cores): prefill x{one['prefill_s'] / many['prefill_s']:.2f}, "
          f"decode x{one['decode_step_s'] / many['decode_step_s']:.2f}, "
          f"weights per rank x{many['weight_bytes'] / one['weight_bytes']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
