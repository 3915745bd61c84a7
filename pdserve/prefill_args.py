"""The flags only `pdserve prefill` takes: the layer-pipelined send (DESIGN §4), the prefix cache and context
parallelism (`--cp-size`, which `pdserve generate` takes too)."""

from __future__ import annotations

import argparse
import os

from transfer.planner import PipelineSettings


def env(name: str, default: str) -> str:
    """Every server flag has a PDSERVE_<NAME> environment twin (Kubernetes manifests set those)."""
    return os.environ.get(f"PDSERVE_{name}", default)


def opt_int(value: str) -> int | None:
    return int(value) if value else None


def opt_float(value: str) -> float | None:
    return float(value) if value else None


def add_prefill_args(p: argparse.ArgumentParser) -> None:
    add_pipeline_args(p)
    add_cp_arg(p)
    p.add_argument(
        "--disable-prefix-cache",
        action="store_true",
        default=env("DISABLE_PREFIX_CACHE", "0").lower() in ("1", "true", "yes", "on"),
        help="compute every prompt in full instead of reusing the KV of prefixes computed before "
        "(PDSERVE_DISABLE_PREFIX_CACHE)",
    )


def add_pipeline_args(p: argparse.ArgumentParser) -> None:
    d = PipelineSettings()
    g = p.add_argument_group("layer-pipelined prefill (DESIGN §4)")
    g.add_argument(
        "--pipeline",
        action=argparse.BooleanOptionalAction,
        default=env("PIPELINE", "1").lower() not in ("0", "false", "no", "off"),
        help="send each layer group's KV while the next group computes (PDSERVE_PIPELINE)",
    )
    g.add_argument(
        "--pipeline-min-tokens",
        type=int,
        default=int(env("PIPELINE_MIN_TOKENS", str(d.min_tokens))),
        help="average new tokens per request below which the whole forward runs",
    )
    g.add_argument("--pipeline-max-iters", type=int, default=int(env("PIPELINE_MAX_ITERS", str(d.max_iters))))
    g.add_argument("--pipeline-min-iters", type=int, default=int(env("PIPELINE_MIN_ITERS", str(d.min_iters))))
    g.add_argument(
        "--pipeline-sat-multiplier", type=float, default=float(env("PIPELINE_SAT_MULTIPLIER", str(d.sat_multiplier)))
    )
    g.add_argument(
        "--pipeline-group-size",
        type=int,
        default=opt_int(env("PIPELINE_GROUP_SIZE", "")),
        help="fixed layers per group (overrides the adaptive rule)",
    )


def pipeline_settings(args: argparse.Namespace) -> PipelineSettings:
    return PipelineSettings(
        enabled=args.pipeline,
        min_tokens=args.pipeline_min_tokens,
        max_iters=args.pipeline_max_iters,
        min_iters=args.pipeline_min_iters,
        sat_multiplier=args.pipeline_sat_multiplier,
        group_size=args.pipeline_group_size,
    )


def add_cp_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cp-size",
        type=int,
        default=int(env("CP_SIZE", "1")),
        help="context-parallel prefill ranks: one process each, each holding the whole model; a prompt batch "
        "whose every prompt has >= 2*N new tokens is split over them (zigzag), others run whole; not with "
        "--tp-size > 1 (PDSERVE_CP_SIZE)",
    )
