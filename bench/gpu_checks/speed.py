"""Decode speed: host-device syncs inside one decode step, and decode tokens/s eager vs graphs vs transformers."""

from __future__ import annotations

import statistics
import time
import traceback
import warnings
from typing import Any

import torch

from bench.gpu_checks.common import (
    ROOT,
    generate,
    graph_runner,
    hf_generate,
    load_hf,
    make_engine,
    random_prompts,
    require_cuda,
    vocab,
)
from bench.gpu_checks.report import Ctx, Outcome, format_table
from engine.engine import Engine
from engine.sampling import SamplingParams

MAX_SYNCS = 1  # the one read of the sampled tokens


def _where(stack: list[traceback.FrameSummary]) -> str:
    """The innermost pdserve frame (not this check's), and the innermost frame at all when that is a library."""
    stack = [f for f in stack if not f.filename.endswith("warnings.py") and f.filename != __file__]
    ours = [f for f in stack if f.filename.startswith(str(ROOT)) and "/bench/" not in f.filename]
    top = stack[-1] if stack else None
    mine = ours[-1] if ours else None
    text = f"{mine.filename.removeprefix(str(ROOT) + '/')}:{mine.lineno} ({mine.name})" if mine else "no pdserve frame"
    if top is not None and top is not mine:
        text += f" via {'/'.join(top.filename.rsplit('/', 2)[-2:])}:{top.lineno}"
    return text


class SyncRecorder:
    """Every host-device sync torch sees while active (`torch.cuda.set_sync_debug_mode("warn")`), each with
    where it came from. The warning is raised synchronously in the thread that synced, so the Python stack
    at `showwarning` is the stack of the sync."""

    def __init__(self) -> None:
        self.syncs: list[str] = []
        self._cm: Any = None

    def _hook(self, message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None):
        if "synchroniz" in str(message):
            self.syncs.append(_where(traceback.extract_stack()))

    def __enter__(self) -> SyncRecorder:
        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("always")  # the default filter shows a location once; every sync counts
        warnings.showwarning = self._hook
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc: object) -> None:
        torch.cuda.set_sync_debug_mode("default")
        self._cm.__exit__(*exc)


def decode_step_syncs(engine: Engine, bs: int = 8) -> list[str]:
    """Where each sync inside one `engine.step()` of a running decode batch of `bs` came from."""
    prompts = random_prompts(vocab(engine), [20 + 13 * i for i in range(bs)], seed=5)
    reqs = [engine.add_request(p, SamplingParams(max_new_tokens=48, ignore_eos=True)) for p in prompts]
    try:
        for _ in range(20):
            if all(r.output_ids for r in reqs):
                break
            engine.step()
        for _ in range(2):  # warm: first replay, lazily grown buffers
            engine.step()
        if engine.scheduler.waiting or not all(r.output_ids for r in reqs):
            raise RuntimeError("the batch did not reach decode: requests still waiting for their prefill")
        before = [len(r.output_ids) for r in reqs]
        torch.cuda.synchronize()
        with SyncRecorder() as rec:
            engine.step()
        grew = [len(r.output_ids) - b for r, b in zip(reqs, before, strict=True)]
        if grew != [1] * bs:
            raise RuntimeError(f"the measured step was not one decode step of the batch (tokens added: {grew})")
        return rec.syncs
    finally:
        for r in reqs:
            engine.abort(r.rid)


def syncs_per_decode_step(ctx: Ctx) -> Outcome:
    require_cuda()
    variants = [("flashinfer eager", dict(graphs=False), True), ("flashinfer graphs", dict(graphs=True), True),
                ("torch eager (info)", dict(backend="torch"), False)]  # fmt: skip
    rows, bad = [], []
    for label, kw, counted in variants:
        engine = make_engine(**kw)
        syncs = decode_step_syncs(engine)
        ctx.progress(f"{label}: {len(syncs)} syncs")
        if counted and len(syncs) > MAX_SYNCS:
            bad.append(f"{label}: {len(syncs)} syncs ({'; '.join(syncs)})")
        rows.append((label, len(syncs), " | ".join(syncs) or "-"))
        del engine
        torch.cuda.empty_cache()
    table = format_table(
        f"syncs_per_decode_step: torch-visible host-device syncs in one engine.step() of a decode batch of 8 "
        f"(allowed {MAX_SYNCS}: the read of the sampled tokens)",
        ["engine", "syncs", "sources (innermost pdserve frame)"], rows,
    )  # fmt: skip
    if bad:
        return Outcome.of(False, "; ".join(bad), [table])
    return Outcome.of(True, f"eager {rows[0][1]}, graphs {rows[1][1]} sync(s) per decode step (torch backend: "
                      f"{rows[2][1]}, not counted)", [table])  # fmt: skip


def _timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def _decode_tps(run, batch: int, new: int, repeats: int) -> float:
    """Decode tokens/s: (T(new tokens) - T(1 token)) / (batch * (new - 1)), so the prefill cancels out."""
    run(batch, 2)  # warm-up of this shape
    full = statistics.median(_timed(lambda: run(batch, new)) for _ in range(repeats))
    one = statistics.median(_timed(lambda: run(batch, 1)) for _ in range(repeats))
    return batch * (new - 1) / max(full - one, 1e-9)


def decode_throughput(ctx: Ctx) -> Outcome:
    require_cuda()
    prompt_len, new = 128, (32 if ctx.quick else 128)
    batches, repeats = ([1, 8] if ctx.quick else [1, 8, 32]), (1 if ctx.quick else 2)
    results: dict[str, dict[int, float]] = {}
    for label, graphs in (("eager", False), ("graphs", True)):
        engine = make_engine("flashinfer", graphs=graphs, max_batch=64)
        before = graph_runner(engine).replays if graphs else 0

        def run(b: int, n: int, engine: Engine = engine) -> None:
            generate(engine, random_prompts(vocab(engine), [prompt_len] * b, seed=b), n)

        results[label] = {b: _decode_tps(run, b, new, repeats) for b in batches}
        if graphs and graph_runner(engine).replays == before:
            raise RuntimeError("the graphs engine never replayed a graph during decode")
        ctx.progress(f"{label}: " + ", ".join(f"bs {b}: {t:.0f} tok/s" for b, t in results[label].items()))
        del engine
        torch.cuda.empty_cache()
    hf = load_hf()
    v = hf.config.vocab_size
    results["hf"] = {b: _decode_tps(lambda b, n: hf_generate(hf, random_prompts(v, [prompt_len] * b, seed=b), n),
                                    b, new, repeats) for b in batches}  # fmt: skip
    ctx.progress("transformers: " + ", ".join(f"bs {b}: {t:.0f} tok/s" for b, t in results["hf"].items()))
    rows, slower = [], []
    for b in batches:
        e, g, h = results["eager"][b], results["graphs"][b], results["hf"][b]
        rows.append((b, f"{e:.0f}", f"{g:.0f}", f"{h:.0f}", f"{g / e:.2f}", f"{g / h:.2f}", f"{e / h:.2f}"))
        if g < 0.95 * e:
            slower.append(f"batch {b}: graphs {g:.0f} tok/s < eager {e:.0f}")
    table = format_table(
        f"decode_throughput: bench-llama bf16, greedy, {prompt_len}-token prompts, {new} new tokens; decode-only "
        "tokens/s = batch*(new-1) / (T(new) - T(1))",
        ["batch", "eager", "graphs", "transformers", "graphs/eager", "graphs/hf", "eager/hf"], rows,
    )  # fmt: skip
    ratio = {b: results["graphs"][b] / results["eager"][b] for b in batches}
    best = max(batches, key=ratio.__getitem__)
    detail = f"graphs/eager {ratio[batches[0]]:.2f}x at batch {batches[0]}, best {ratio[best]:.2f}x at batch {best}"
    if slower:
        return Outcome.of(False, "CUDA graphs do not speed decode up: " + "; ".join(slower), [table])
    return Outcome.of(True, detail, [table])
