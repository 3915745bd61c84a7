"""Start-up warm-up: run every kind of forward the server will run once, before it reports healthy.

FlashInfer compiles its kernels at first use (prefill and decode families, minutes on a cold cache), and
cuBLAS and the allocator set themselves up on first calls; done on the request path that is a stall of the
first requests, and where a compiler is missing, a failure inside a request. Warm-up moves all of it to
start-up, where a failure stops the server with the error instead. It uses pages from the free pool and
gives them back; the KV it writes is garbage nobody reads.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from engine.device import synchronize
from engine.model_runner import ModelRunner
from engine.sampling import Sampler, SamplingParams

_SHORT = 8
_LONG_CAP = 4096


def warm_up_plan(max_prefill_tokens: int, context_length: int, free_tokens: int, page_size: int) -> list[tuple]:
    """The forwards to run: (label, new tokens per request, prefix tokens, requests). Pure, for tests."""
    budget = max(1, min(max_prefill_tokens, context_length - 1, free_tokens // 2, _LONG_CAP))
    plan: list[tuple] = [("prefill, short", min(_SHORT, budget), 0, 1)]
    if budget > _SHORT:
        plan.append(("prefill, long", budget, 0, 1))
    if context_length > page_size + 4 and free_tokens >= 2 * (page_size + 4):
        plan.append(("extend on a cached prefix", 4, page_size, 1))
    plan.append(("decode", 1, 3, 2))
    return plan


def warm_up(
    runner: ModelRunner,
    max_prefill_tokens: int,
    context_length: int,
    progress: Callable[[str], None],
) -> float:
    """Run the warm-up plan; returns its seconds. Raises what the forward raises (the server must not start)."""
    pool = runner.pool
    ps = pool.page_size
    plan = warm_up_plan(max_prefill_tokens, context_length, pool.allocator.num_free * ps, ps)
    vocab = runner.config.vocab_size
    sampler = Sampler()
    t_all = time.perf_counter()
    for i, (label, new, prefix, reqs) in enumerate(plan, 1):
        t0 = time.perf_counter()
        progress(f"warm-up {i}/{len(plan)}: {label} ({reqs} x {new} tokens on a prefix of {prefix})")
        tables = [pool.allocator.allocate(pool.pages_for(prefix + new)) for _ in range(reqs)]
        try:
            if any(t is None for t in tables):
                progress(f"warm-up {i}/{len(plan)}: skipped, the pool has too few free pages")
                continue
            tokens = [[(7 * j + r) % vocab for j in range(new)] for r in range(reqs)]
            batch = runner.build_batch(tokens, [prefix] * reqs, tables)  # type: ignore[arg-type]
            logits = runner.forward(batch)
            # one greedy and one sampled row: both sampler paths initialise here too
            params = [SamplingParams(temperature=0.0 if r % 2 == 0 else 1.0) for r in range(reqs)]
            sampler(logits, params, [None] * reqs)
            synchronize(runner.device)
        finally:
            for t in tables:
                if t is not None:
                    pool.allocator.free(t)
        progress(f"warm-up {i}/{len(plan)}: done in {time.perf_counter() - t0:.1f}s")
    return time.perf_counter() - t_all
