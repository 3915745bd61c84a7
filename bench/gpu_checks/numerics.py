"""Numerical checks: FlashInfer against the torch backend and transformers, CUDA-graph decode against eager.

Tolerances are relative to the logits' own scale (max |logit|) and calibrated by bf16 itself: the torch
backend in float32 is the reference, and FlashInfer in bf16 must be about as close to it as the torch backend
in bf16 is (see `backend_logits`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.gpu_checks.common import (
    alloc,
    compare,
    first_diff,
    forward,
    free,
    generate,
    graph_runner,
    hf_generate,
    last_logits,
    load_hf,
    make_engine,
    random_prompts,
    require_cuda,
    top2_margin,
    vocab,
)
from bench.gpu_checks.report import Ctx, Outcome, format_table
from engine.engine import Engine

# FlashInfer's distance to the float32 reference may be up to twice the torch backend's own bf16 distance (two
# correct bf16 implementations round differently, not more), but never below 1% of the logit scale (a case
# where bf16 happens to lose little) nor above 10% (beyond that the model is too unstable in bf16 to tell).
# A wrong page, mask or position is an O(1) error at the logit scale, far outside these bounds.
TOL_FACTOR, TOL_FLOOR, TOL_CAP = 2.0, 0.01, 0.10
# A greedy token may differ between correct bf16 implementations only where the top two logits are within
# the bf16 disagreement measured above: 2% of the position's max |logit| (a few bf16 ulps of the top logit).
NEAR_TIE_REL = 0.02
# Graph decode runs the same kernels as eager; only FlashInfer's split-KV partition (fixed for a captured
# bucket) may change the summation order: a few bf16 ulps, far below 1% of the logit scale.
GRAPH_TOL = 0.01


@dataclass(frozen=True)
class Case:
    label: str
    kind: str  # "prefill", "extend", "decode" or "mixed"
    lengths: tuple[int, ...]  # prompt (prefill, decode) or cached-prefix (extend, mixed) lengths
    new: int = 0  # extend: new tokens on top of each prefix; mixed: on top of the first (the others decode)


def cases(quick: bool) -> list[Case]:
    long = 1000 if quick else 2000
    return [
        Case("prefill short", "prefill", (16,)),
        Case(f"prefill long ({long})", "prefill", (long,)),
        # 32 tokens = 2 whole pages; 23 ends inside a page (the last-page length FlashInfer is told)
        Case("extend 40 on cached prefix 32, 23", "extend", (32, 23), new=40),
        Case("decode batch of 8, mixed lengths", "decode", (1, 7, 16, 17, 33, 100, 255, 512)),
        # a MIXED batch (engine/scheduler.py): a prefill chunk on a cached prefix beside running decodes, one
        # ragged extend for FlashInfer's prefill wrapper with query lengths 40, 1, 1
        Case("mixed: extend 40 on prefix 23 + decodes on 16, 100", "mixed", (23, 16, 100), new=40),
    ]


def run_case(engine: Engine, case: Case, seed: int) -> torch.Tensor:
    """The case's logits on `engine`: every token's row for prefill/extend, the decode rows for decode."""
    prompts = random_prompts(vocab(engine), list(case.lengths), seed)
    n = len(prompts)
    extra = case.new if case.kind in ("extend", "mixed") else 1
    tables = [alloc(engine, len(p) + extra) for p in prompts]
    try:
        if case.kind == "prefill":
            return forward(engine, prompts, [0] * n, tables, all_tokens=True)
        forward(engine, prompts, [0] * n, tables)  # the cached prefix / the prompts, KV written by this backend
        lens = [len(p) for p in prompts]
        if case.kind == "extend":
            new = random_prompts(vocab(engine), [case.new] * n, seed + 1)
            return forward(engine, new, lens, tables, all_tokens=True)
        if case.kind == "mixed":
            chunk = random_prompts(vocab(engine), [case.new], seed + 1)
            decodes = [[t[0]] for t in random_prompts(vocab(engine), [1] * (n - 1), seed + 2)]
            return forward(engine, chunk + decodes, lens, tables, all_tokens=True)
        tokens = [[t[0]] for t in random_prompts(vocab(engine), [1] * n, seed + 2)]
        return forward(engine, tokens, lens, tables)
    finally:
        free(engine, tables)


def backend_logits(ctx: Ctx) -> Outcome:
    require_cuda()
    ctx.progress("engines: torch float32 (reference), torch bf16, FlashInfer bf16")
    engines = {
        "fp32": make_engine("torch", dtype="float32"),
        "torch": make_engine("torch"),
        "flashinfer": make_engine("flashinfer"),
    }
    rows, failed, worst = [], [], (0.0, 0.0)
    for i, case in enumerate(cases(ctx.quick)):
        got = {name: run_case(e, case, seed=100 + i) for name, e in engines.items()}
        fi_t, t_32, fi_32 = (
            compare(got["flashinfer"], got["torch"]),
            compare(got["torch"], got["fp32"]),
            compare(got["flashinfer"], got["fp32"]),
        )
        tol = min(max(TOL_FACTOR * t_32.rel, TOL_FLOOR), TOL_CAP)
        ok = fi_32.rel <= tol
        worst = max(worst, (fi_32.rel, tol))
        if not ok:
            failed.append(f"{case.label}: FlashInfer {fi_32.rel:.4f} of the logit scale from float32, over {tol:.4f}")
        rows.append((case.label, got["torch"].shape[0], f"{fi_t.max_abs:.4f}", f"{fi_t.rel:.4f}", f"{t_32.rel:.4f}",
                     f"{fi_32.rel:.4f}", f"{tol:.4f}", f"{fi_t.argmax_agree:.3f}", "ok" if ok else "FAIL"))  # fmt: skip
        ctx.progress(f"{case.label}: fi-vs-torch rel {fi_t.rel:.4f}, fi-vs-fp32 {fi_32.rel:.4f} (tol {tol:.4f})")
    headers = ["case", "rows", "fi-torch max|d|", "fi-torch rel", "torch-fp32", "fi-fp32", "tol", "argmax=", "ok"]
    title = "backend_logits: FlashInfer vs torch backend, bf16 (rel = max|diff| / max|logit|; reference: torch float32)"
    table = format_table(title, headers, rows)
    if failed:
        return Outcome.of(False, "; ".join(failed), [table])
    return Outcome.of(True, f"{len(rows)} cases; worst FlashInfer-vs-float32 {worst[0]:.4f} of the logit scale "
                      f"(tolerance there {worst[1]:.4f})", [table])  # fmt: skip


def _margin(name: str, engines: dict[str, Engine], hf_logits: list, prompt: list[int], toks: list[int], k: int,
            i: int) -> tuple[float, float]:  # fmt: skip
    """(margin, scale) the implementation `name` saw at generated position k of prompt i."""
    if name == "hf":
        return top2_margin(hf_logits[i][k][0])
    return top2_margin(last_logits(engines[name], prompt + toks[:k]))


def greedy_vs_hf(ctx: Ctx) -> Outcome:
    require_cuda()
    new, lengths = 32, [5, 48, 200, 700]
    engines = {"flashinfer": make_engine("flashinfer"), "torch": make_engine("torch")}
    prompts = random_prompts(vocab(engines["torch"]), lengths, seed=11)
    toks = {name: generate(e, prompts, new) for name, e in engines.items()}
    ctx.progress("transformers generate (bf16, sdpa) on the same weights")
    hf = load_hf()
    hf_logits = []
    toks["hf"] = []
    for p in prompts:
        t, lg = hf_generate(hf, [p], new, logits=True)
        toks["hf"].append(t[0])
        hf_logits.append(lg)
    rows, ties, bad = [], [], []
    for i, p in enumerate(prompts):
        row: list[object] = [i, len(p)]
        for a, b in (("flashinfer", "torch"), ("flashinfer", "hf"), ("torch", "hf")):
            k = first_diff(toks[a][i], toks[b][i])
            if k is None:
                row.append("=")
                continue
            # a near tie for either side explains the split; its tokens agree up to k, so both see the same context
            margins = [_margin(n, engines, hf_logits, p, toks[a][i], k, i) for n in (a, b)]
            m, scale = min(margins, key=lambda ms: ms[0] / max(ms[1], 1e-6))
            what = f"prompt {i} {a} vs {b}: first differs at pos {k}, top-2 margin {m:.4f} ({m / scale:.4f} of scale)"
            (ties if m < NEAR_TIE_REL * scale else bad).append(what)
            row.append(f"pos {k} (m {m:.3f})")
        rows.append(row)
    table = format_table(
        f"greedy_vs_hf: {new} greedy tokens per prompt; '=' identical, else first differing position and margin",
        ["prompt", "len", "fi = torch", "fi = hf", "torch = hf"], rows,
    )  # fmt: skip
    if bad:
        return Outcome.of(False, "; ".join(bad) + f" (near-tie epsilon {NEAR_TIE_REL} of scale)", [table])
    if ties:
        return Outcome.of(True, f"equal except near-ties: {'; '.join(ties)}", [table])
    return Outcome.of(True, f"{len(prompts)} prompts x {new} tokens identical: FlashInfer = torch = transformers",
                      [table])  # fmt: skip


def _decode_logits(engine: Engine, prompts: list[list[int]], tokens: list[int]) -> torch.Tensor:
    tables = [alloc(engine, len(p) + 1) for p in prompts]
    try:
        forward(engine, prompts, [0] * len(prompts), tables)
        return forward(engine, [[t] for t in tokens], [len(p) for p in prompts], tables)
    finally:
        free(engine, tables)


def cuda_graph_equals_eager(ctx: Ctx, tbo: bool = False) -> Outcome:
    require_cuda()
    new = 8 if ctx.quick else 16
    graphed, eager = make_engine("flashinfer", graphs=True, tbo=tbo), make_engine("flashinfer")
    name = "tbo_cuda_graph_equals_eager" if tbo else "cuda_graph_equals_eager"
    if tbo:  # every bucket even (split in halves), each child planned into its own graph buffers
        ctx.progress(f"TBO plugin: {type(graphs_plugin(graphed)).__name__}")
    graphs = graph_runner(graphed)
    buckets = sorted(graphs.batch_sizes)
    ctx.progress(f"captured buckets {buckets}")
    rows, bad = [], []
    for bs in [3, 8] if ctx.quick else [3, 8, 13]:
        bucket = next((b for b in buckets if b >= bs), None)
        prompts = random_prompts(vocab(eager), [(37 * j) % 300 + 1 for j in range(1, bs + 1)], seed=bs)
        before = graphs.replays
        got_g = generate(graphed, prompts, new)
        replays = graphs.replays - before
        got_e = generate(eager, prompts, new)
        diffs = [k for g, e in zip(got_g, got_e, strict=True) if (k := first_diff(g, e)) is not None]
        tokens = [t[0] for t in random_prompts(vocab(eager), [1] * bs, seed=bs + 50)]
        before = graphs.replays
        lg, le = _decode_logits(graphed, prompts, tokens), _decode_logits(eager, prompts, tokens)
        replayed = graphs.replays - before
        d = compare(lg, le)
        ok = not diffs and d.rel <= GRAPH_TOL and (bucket is None or (replays > 0 and replayed > 0))
        same = "yes" if not diffs else f"pos {min(diffs)}"
        if not ok:
            bad.append(f"batch {bs} (bucket {bucket}): tokens equal: {same}, logits rel {d.rel:.4f}, replays in "
                       f"generate {replays}, in the decode forward {replayed}")  # fmt: skip
        rows.append((bs, bucket if bucket is not None else "eager", replays, same, f"{d.max_abs:.5f}", f"{d.rel:.5f}",
                     "yes" if d.max_abs == 0 else "no", "ok" if ok else "FAIL"))  # fmt: skip
    table = format_table(
        f"{name}: FlashInfer bf16, {new} greedy tokens, then one decode forward compared",
        ["batch", "bucket", "replays", "tokens =", "max|d|", "rel", "bitwise", "ok"], rows,
    )  # fmt: skip
    if bad:
        return Outcome.of(False, "; ".join(bad), [table])
    return Outcome.of(True, f"batches {', '.join(str(r[0]) for r in rows)}: tokens identical, decode logits within "
                      f"{GRAPH_TOL} of scale; buckets {buckets}", [table])  # fmt: skip


def graphs_plugin(engine: Engine) -> object:
    plugin = graph_runner(engine).plugin
    if not getattr(plugin, "even_sizes", False):
        raise RuntimeError(f"two-batch overlap is on, but the graphs were captured with {type(plugin).__name__}")
    return plugin


def tbo_cuda_graph_equals_eager(ctx: Ctx) -> Outcome:
    """Decode graphs captured by the two-batch-overlap plugin (TP=1: each bucket split in halves, the micro-batches
    interleaved inside the graph) against eager decode without overlap."""
    return cuda_graph_equals_eager(ctx, tbo=True)
