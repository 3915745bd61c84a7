"""bench/serve.py's conditional-disaggregation rows: TTFT with short requests prefilled on the decode server itself
("local", the router's --local-prefill-max-tokens with --tokenizer) against the same requests through a prefill server
and a KV transfer ("remote": the stack's own router, which has no tokenizer and so sends everything remote).

Both routers front the same prefill and decode servers and run in the same rounds with the door order rotated
(`bench.serve.bench`), so drift on a shared host lands on both alike; report the on/off ratios, not the milliseconds.
Besides the ratio of the pooled p50s, each row gives the median over rounds of the per-round p50 ratio: a round runs
both doors back to back, so a burst of load from elsewhere (a busy 2-core box) mostly cancels within it.

  --conditional         short prompts (default 8-32 tokens) at each --concurrency: TTFT p50/p99 on vs off
  --local-sweep 16,...  prompts of exactly each length at each --local-sweep-concurrency (1): TTFT local vs remote,
                        and the largest length where local still wins (how DEFAULT_LOCAL_PREFILL_MAX_TOKENS in
                        router/config.py was chosen)
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import re
import sys

import httpx

from bench.serve import DOOR_LABEL, Cell, bench, percentile, progress
from engine.builtin import resolve_model
from engine.ports import free_port
from harness.stack import MODEL, Proc, Stack
from router.config import DEFAULT_LOCAL_PREFILL_MAX_TOKENS
from tokenization.tokenizer import Tokenizer

__all__ = ["run_conditional", "start_local_router"]

OFF, ON = "pdserve", "local"  # the stack's router (every request remote) and the conditional one


def start_local_router(stack: Stack, max_tokens: int) -> str:
    """A second pdserve router on the stack's servers, prefilling prompts of <= max_tokens tokens on the decode
    server; its URL once ready."""
    port = free_port()
    args = [sys.executable, "-m", "pdserve", "--log-level", "warning", "router", "--port", str(port),
            "--prefill", stack.prefill_url, str(stack.bootstrap_port), "--decode", stack.decode_url,
            "--tokenizer", str(resolve_model(MODEL)), "--local-prefill-max-tokens", str(max_tokens)]  # fmt: skip
    stack.procs.append(Proc(f"router-local-{max_tokens}", args, stack.log_dir))
    url = f"http://127.0.0.1:{port}"
    stack.wait_ready(f"{url}/readiness", 120)
    return url


def decisions(url: str) -> dict[str, int]:
    """The router's pdserve_pd_decision_total by path."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out = {}
    for path in ("local", "remote"):
        m = re.search(rf'^pdserve_pd_decision_total{{path="{path}"}} (\S+)$', text, re.M)
        out[path] = int(float(m.group(1))) if m else 0
    return out


def _p(cell: Cell, q: float, itl: bool = False) -> float:
    values = [g for s in cell.samples for g in s.itls] if itl else [s.ttft for s in cell.samples]
    return percentile(values, q) * 1e3


def _ratio(on: float, off: float) -> str:
    return f"{on / off:.2f}" if off > 0 else "n/a"


def _paired(on: Cell, off: Cell) -> str:
    """Median (min..max) over rounds of the round's on/off TTFT p50 ratio."""
    ratios = sorted(a / b for a, b in zip(on.round_ttft_p50, off.round_ttft_p50, strict=True) if b > 0)
    if not ratios:
        return "n/a"
    return f"{percentile(ratios, 50):.2f} ({ratios[0]:.2f}..{ratios[-1]:.2f})"


def _errors(cells: dict[tuple[int, str], Cell]) -> None:
    for (conc, name), cell in cells.items():
        if cell.errors:
            print(f"concurrency {conc}, {DOOR_LABEL[name]}: {len(cell.errors)} failed, first: {cell.errors[0]}")


def _check_paths(url_on: str, url_off: str, before: tuple[dict[str, int], dict[str, int]]) -> str:
    """Says how the routers decided over the run: every 'on' request should be local, every 'off' one remote."""
    on, off = decisions(url_on), decisions(url_off)
    on = {k: v - before[0][k] for k, v in on.items()}
    off = {k: v - before[1][k] for k, v in off.items()}
    return (
        f"decisions over the run: on-router local {on['local']} / remote {on['remote']}, "
        f"off-router local {off['local']} / remote {off['remote']}"
    )


def short_rows(args: argparse.Namespace, stack: Stack, tok: Tokenizer) -> None:
    """TTFT p50/p99 at each concurrency for short prompts, conditional disaggregation on vs off."""
    limit = args.local_max_tokens or DEFAULT_LOCAL_PREFILL_MAX_TOKENS
    lo, hi = args.min_prompt or 8, args.max_prompt or 32
    if hi > limit:
        raise SystemExit(f"--max-prompt {hi} is over the on-router's limit {limit}: those requests would go remote")
    url_on = start_local_router(stack, limit)
    run = copy.copy(args)
    run.min_prompt, run.max_prompt = lo, hi
    run.rounds = args.rounds or 6
    before = (decisions(url_on), decisions(stack.router_url))
    cells: dict[tuple[int, str], Cell] = {}
    for conc in (int(c) for c in args.concurrency.split(",")):
        # per round at least two prompts per worker, so every worker stays busy through the round
        run.concurrency, run.requests = str(conc), args.requests or run.rounds * max(2 * conc, 8)
        cells.update(asyncio.run(bench(run, stack, {OFF: stack.router_url, ON: url_on}, tok)))
    print(
        f"\nconditional disaggregation, short prompts ({lo}-{hi} tokens, on-router limit {limit}), {args.output_len} "
        f"output tokens, streaming /v1/completions over {args.backend}; on = prefilled on the decode server, off = "
        "prefill server + KV transfer"
    )
    print(
        f"{'conc':>4} {'n':>4} {'TTFT p50 off':>13} {'on':>8} {'on/off':>7} {'per-round on/off':>18} "
        f"{'TTFT p99 off':>13} {'on':>8} {'on/off':>7} {'ITL p50 off':>12} {'on':>7}"
    )
    for conc in sorted({c for c, _ in cells}):
        off, on = cells[conc, OFF], cells[conc, ON]
        p50 = (_p(off, 50), _p(on, 50))
        p99 = (_p(off, 99), _p(on, 99))
        print(
            f"{conc:>4} {len(on.samples):>4} {p50[0]:>13.1f} {p50[1]:>8.1f} {_ratio(p50[1], p50[0]):>7} "
            f"{_paired(on, off):>18} {p99[0]:>13.1f} {p99[1]:>8.1f} {_ratio(p99[1], p99[0]):>7} "
            f"{_p(off, 50, True):>12.2f} {_p(on, 50, True):>7.2f}"
        )
    print(
        f"(TTFT and ITL in ms, client side, pooled over {run.rounds} rounds; per-round on/off: median (min..max) of "
        "each round's p50 ratio; goal: p50 on/off <= 0.7)"
    )
    print(_check_paths(url_on, stack.router_url, before))
    _errors(cells)


def sweep_rows(args: argparse.Namespace, stack: Stack, tok: Tokenizer) -> None:
    """Prompts of exactly each length at each --local-sweep-concurrency: TTFT local vs remote (and ITL: a prompt
    prefilled in the decode batch delays the other requests' next tokens), and the largest length local wins."""
    lengths = [int(x) for x in args.local_sweep.split(",")]
    # every length goes local through this one (twice the longest: a decoded slice may re-encode a token longer)
    url_on = start_local_router(stack, 2 * max(lengths))
    before = (decisions(url_on), decisions(stack.router_url))
    for conc in (int(c) for c in args.local_sweep_concurrency.split(",")):
        run = copy.copy(args)
        # concurrency 1: one request per door per round, so each local sample is paired with a remote one taken
        # right beside it; more: a few rounds of two prompts per worker
        run.concurrency, run.rounds = str(conc), args.rounds or (20 if conc == 1 else 6)
        run.requests = args.requests or run.rounds * (1 if conc == 1 else 2 * conc)
        rows = []
        for n in lengths:
            run.min_prompt = run.max_prompt = n
            progress(f"sweep: {n}-token prompts at concurrency {conc}")
            cells = asyncio.run(bench(run, stack, {OFF: stack.router_url, ON: url_on}, tok))
            rows.append((n, cells[conc, OFF], cells[conc, ON]))
            _errors(cells)
        print(
            f"\nTTFT local vs remote by prompt length, concurrency {conc}, {args.output_len} output tokens, streaming "
            f"/v1/completions over {args.backend} (ms, client side; {run.rounds} rounds)"
        )
        print(f"{'prompt tokens':>13} {'n':>4} {'remote p50':>11} {'local p50':>10} {'local/remote':>13} "
              f"{'per-round local/remote':>23} {'remote p99':>11} {'local p99':>10} {'ITL p50 remote':>15} "
              f"{'local':>6}  faster")  # fmt: skip
        wins = []
        for n, off, on in rows:
            r, loc = _p(off, 50), _p(on, 50)
            paired = sorted(a / b for a, b in zip(on.round_ttft_p50, off.round_ttft_p50, strict=True) if b > 0)
            faster = percentile(paired, 50) < 1 if paired else loc < r  # the per-round median: the robust one
            if faster:
                wins.append(n)
            print(
                f"{n:>13} {len(on.samples):>4} {r:>11.1f} {loc:>10.1f} {_ratio(loc, r):>13} {_paired(on, off):>23} "
                f"{_p(off, 99):>11.1f} {_p(on, 99):>10.1f} {_p(off, 50, True):>15.2f} {_p(on, 50, True):>6.2f}  "
                f"{'local' if faster else 'remote'}"
            )
        print(
            f"largest measured length where local wins at concurrency {conc}: {max(wins) if wins else 'none'} "
            f"(DEFAULT_LOCAL_PREFILL_MAX_TOKENS is {DEFAULT_LOCAL_PREFILL_MAX_TOKENS})"
        )
    print(_check_paths(url_on, stack.router_url, before))


def run_conditional(args: argparse.Namespace, stack: Stack, tok: Tokenizer) -> None:
    if args.conditional:
        short_rows(args, stack, tok)
    if args.local_sweep:
        sweep_rows(args, stack, tok)
