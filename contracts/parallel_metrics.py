"""The metrics of the parallel forward paths (context parallelism, two-batch overlap, DP attention): part of
`contracts.metrics.Metrics`, defined here so that one file stays readable. `contracts.metrics` builds them."""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter


def parallel_metrics(reg: Any) -> dict[str, Counter]:
    """The counters, by `Metrics` field name, registered with `reg` (None in multiprocess mode)."""
    return dict(
        cp_batches=Counter(
            "pdserve_cp_batches", "Prefill batches run context-parallel (--cp-size > 1).", ["role"], registry=reg
        ),
        cp_fallbacks=Counter(
            "pdserve_cp_fallbacks",
            "Prefill batches a context-parallel server ran whole on every rank, by reason: short_sequence (a prompt "
            "with under 2 x cp new tokens), mode (not a pure prefill).",
            ["role", "reason"],
            registry=reg,
        ),
        tbo_steps=Counter("pdserve_tbo_steps", "Forwards run as two overlapped micro-batches.", ["role"], registry=reg),
        tbo_two_chunk_steps=Counter(
            "pdserve_tbo_two_chunk_steps",
            "Two-batch-overlap forwards whose split cut one sequence across both micro-batches.",
            ["role"],
            registry=reg,
        ),
        dp_idle_steps=Counter(
            "pdserve_dp_idle_steps",
            "DP attention: steps a rank ran an IDLE forward (no requests of its own, its share of the others' MLP "
            "and every collective); counted by each rank.",
            ["role"],
            registry=reg,
        ),
    )
