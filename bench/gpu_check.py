"""The prepared device check (issue 11): one run on a GPU box tells whether the CUDA path is right and fast.

Prints one line per check (`PASS name: detail`, `FAIL name: detail` or `SKIP name: reason`), then the
checks' tables, then `gpu_check: N passed, M failed, K skipped`; exits 1 if any check failed, else 0. Where
there is no CUDA every check is `SKIP name: no CUDA` and it exits 0 (so CI runs it).

Each check runs in its own process with a time budget: a CUDA error poisons only that process's context, a
hang is killed at its budget, and the set-up each check changes (sync debug mode, graphs) cannot leak into the
next. A first step (`prepare`) generates the model and has FlashInfer compile its kernels once (minutes on a
fresh box; later processes load them from FlashInfer's cache). Progress goes to stderr as it happens.

    python3 bench/gpu_check.py [--only NAME[,NAME]] [--quick] [--budget SECONDS] [--in-process]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_checks.report import (
    SKIP,
    Check,
    Ctx,
    Result,
    execute,
    exit_status,
    progress,
    resolve,
    result_line,
    run_checks,
    run_child,
    summary,
)

N, S, T = "bench.gpu_checks.numerics", "bench.gpu_checks.speed", "bench.gpu_checks.kv_transfer"
CHECKS = (
    Check("backend_logits", f"{N}:backend_logits", 150, "FlashInfer vs torch logits: prefill, extend, decode"),
    Check("greedy_vs_hf", f"{N}:greedy_vs_hf", 150, "greedy tokens: FlashInfer = torch = transformers"),
    Check("cuda_graph_equals_eager", f"{N}:cuda_graph_equals_eager", 150, "graph decode = eager decode"),
    Check("tbo_cuda_graph_equals_eager", f"{N}:tbo_cuda_graph_equals_eager", 150, "TBO graph decode = eager"),
    Check("syncs_per_decode_step", f"{S}:syncs_per_decode_step", 120, "host-device syncs in one decode step"),
    Check("decode_throughput", f"{S}:decode_throughput", 180, "decode tokens/s: eager, graphs, transformers"),
    Check("pipeline_event_order", f"{T}:pipeline_event_order", 150, "layer pipeline with the GPU lagging"),
    Check("nixl_vram_loopback", f"{T}:nixl_vram_loopback", 90, "NIXL VRAM to VRAM, bytes exact"),
    Check("pipeline_ttft", f"{T}:pipeline_ttft", 240, "bench/pipeline.py on the GPU"),
)
# Not a check: builds the model and FlashInfer's kernels once, so the checks' budgets do not pay the compile.
PREPARE = Check("prepare", "bench.gpu_checks.common:prepare", 420, "model + FlashInfer kernels (JIT) + graphs")
NEEDS_NO_ENGINE = {"nixl_vram_loopback"}
DEFAULT_BUDGET_S = 480.0  # the whole run: one device call of ~8 minutes


def select(only: str | None) -> list[Check]:
    if not only:
        return list(CHECKS)
    names = [n.strip() for n in only.split(",") if n.strip()]
    known = {c.name: c for c in CHECKS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown check {', '.join(unknown)} in --only; the checks are: {', '.join(known)}")
    return [known[n] for n in names]


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def child_main(name: str, quick: bool, budget: float) -> int:
    """In a check's own process: run it, print its result behind the mark for the parent."""
    check = next((c for c in (*CHECKS, PREPARE) if c.name == name), None)
    if check is None:
        raise SystemExit(f"gpu_check: no check named {name!r}")
    ctx = Ctx(name, quick, time.monotonic() + budget)
    print(result_line(execute(name, resolve(check.target), ctx)), flush=True)
    return 0


def make_runner(quick: bool, in_process: bool):
    def in_this_process(check: Check, budget: float) -> Result:
        return execute(check.name, resolve(check.target), Ctx(check.name, quick, time.monotonic() + budget))

    def in_a_child(check: Check, budget: float) -> Result:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", check.name, "--child-budget", f"{budget:.0f}"]
        return run_child([*cmd, "--quick"] if quick else cmd, check.name, budget)

    return in_this_process if in_process else in_a_child


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated checks to run: " + ", ".join(c.name for c in CHECKS))
    ap.add_argument("--quick", action="store_true", help="smaller sizes (for a rerun)")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for the whole run")
    ap.add_argument("--in-process", action="store_true", help="run the checks in this process (debugging)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-budget", type=float, default=300.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child_main(args.child, args.quick, args.child_budget)
    try:
        checks = select(args.only)
    except ValueError as e:
        ap.error(str(e))

    if not cuda_available():
        results = [Result(c.name, SKIP, "no CUDA") for c in checks]
        for r in results:
            print(r.line(), flush=True)
        print(summary(results), flush=True)
        return 0

    deadline = time.monotonic() + args.budget
    run_one = make_runner(args.quick, args.in_process)
    if any(c.name not in NEEDS_NO_ENGINE for c in checks):
        progress("prepare", "generating the model if needed, compiling FlashInfer's kernels if not cached")
        prep = run_one(PREPARE, min(PREPARE.budget_s, deadline - time.monotonic()))
        # not a check: its line goes to stderr; a failure here shows again in the checks that need the engine
        progress("prepare", f"{prep.status} after {prep.seconds:.0f}s: {prep.detail}")
    results = run_checks(checks, run_one, deadline)
    for r in results:
        for table in r.tables:
            print(f"\n{table}", flush=True)
    print(f"\n{summary(results)}", flush=True)
    return exit_status(results)


if __name__ == "__main__":
    sys.exit(main())
