"""Context-parallel prefill: per-rank causal attention balance, zigzag vs contiguous split (issue 16).

For each batch (4K and 8K prompts, batch sizes 1 and 4, even and uneven lengths, one with cached prefixes)
and each CP size, every rank's causal attention work (the keys each of its queries attends to, summed) is read
off the zigzag metadata of `engine/context_parallel.py`, and computed the same way for a contiguous split (each
sequence's new tokens cut into cp consecutive chunks, rank r taking chunk r). The figure is max/min over the
ranks: 1.000 is perfectly even; the issue's goal is zigzag within 5% of even. "gather pad" is the all-gather
rows that carry no token (cp · largest share − tokens). Pure arithmetic: no model, no torch, runs anywhere.

Not built yet: the TTFT part of the issue's benchmark (prefill of 4K/8K prompts end to end, CP=2 vs CP=1),
which needs `--cp-size` in the engine.

    .venv/bin/python bench/cp.py [--cp 2 4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.context_parallel import contiguous_work, imbalance, zigzag_split, zigzag_work

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cp", type=int, nargs="+", default=[2, 4], help="CP sizes (default 2 4)")
    args = parser.parse_args()
    table = rows(args.cp)
    print("| batch | tokens (prefix:new) | cp | zigzag max/min | contiguous max/min | gather pad |")
    print("|---|---|---|---|---|---|")
    for r in table:
        print("| " + " | ".join(str(c) for c in r) + " |")
    worst = max(float(r[3]) for r in table)
    verdict = "within" if worst <= 1.05 else "NOT within"
    print(f"\nworst zigzag max/min: {worst:.4f} ({verdict} 5% of even)")


if __name__ == "__main__":
    main()
