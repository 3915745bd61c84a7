"""The `pdserve` command line. Each subcommand imports its server lazily, so `pdserve generate` does not
pay for the HTTP stack and the engine never imports the servers."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from contracts.http import DEFAULT_MAX_BODY_BYTES
from contracts.pd import DEFAULT_BOOTSTRAP_PORT
from engine.config import EngineConfig
from pdserve.forwarded import ROLES, FlagError, known_flags, split_forwarded
from pdserve.prefill_args import add_cp_arg, add_prefill_args, env, opt_float, pipeline_settings
from transfer.config import BACKENDS, Timeouts, TransferConfig
from transfer.planner import PipelineSettings


def add_engine_args(p: argparse.ArgumentParser) -> None:
    d = EngineConfig()
    p.add_argument("--model", default=d.model, help="local Hugging Face directory or builtin:NAME")
    p.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="override the checkpoint's dtype"
    )
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--attention-backend", default=d.attention_backend, choices=["auto", "torch", "flashinfer"])
    p.add_argument("--page-size", type=int, default=d.page_size, help="tokens per KV page")
    p.add_argument(
        "--kv-cache-gb",
        type=float,
        default=None,
        help="KV pool size (default: 0.5 on CPU, 85%% of free memory on CUDA)",
    )
    p.add_argument(
        "--kv-pages", type=int, default=None, help="KV pool size in pages (overrides --kv-cache-gb; small pools)"
    )
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size)
    p.add_argument("--max-prefill-tokens", type=int, default=d.max_prefill_tokens)
    p.add_argument("--context-length", type=int, default=None)
    p.add_argument(
        "--disable-cuda-graph", action="store_true", help="decode without CUDA graphs (they are captured on CUDA)"
    )
    p.add_argument(
        "--cuda-graph-max-bs", type=int, default=d.cuda_graph_max_bs, help="largest decode batch run from a graph"
    )
    p.add_argument("--skip-warmup", action="store_true", help="start without running each kind of forward once")
    g = p.add_argument_group("admission and batching (engine/scheduler.py)")
    g.add_argument(
        "--admission-policy",
        default=env("ADMISSION_POLICY", d.admission_policy),
        choices=["need", "worst_case"],
        help="need: admit by current need plus an estimate of further output, retract under pressure; "
        "worst_case: reserve prompt + max_new_tokens up front, never retract (PDSERVE_ADMISSION_POLICY)",
    )
    g.add_argument(
        "--init-headroom-ratio",
        type=float,
        default=float(env("INIT_HEADROOM_RATIO", str(d.init_headroom_ratio))),
        help="share of a request's remaining token budget it is expected to still take, until requests finished "
        "and taught the server better (PDSERVE_INIT_HEADROOM_RATIO)",
    )
    g.add_argument(
        "--min-headroom-ratio",
        type=float,
        default=float(env("MIN_HEADROOM_RATIO", str(d.min_headroom_ratio))),
        help="the learned estimate never goes below this; 0 admits on current need alone (PDSERVE_MIN_HEADROOM_RATIO)",
    )
    g.add_argument(
        "--mixed-chunk-size",
        type=int,
        default=int(env("MIXED_CHUNK_SIZE", str(d.mixed_chunk_size))),
        help="prefill tokens one MIXED batch carries beside the running decodes; 0: prefills pause decoding "
        "(PDSERVE_MIXED_CHUNK_SIZE)",
    )
    g.add_argument(
        "--chunked-prefill-size",
        type=int,
        default=int(env("CHUNKED_PREFILL_SIZE", str(d.chunked_prefill_size))),
        help="most prompt tokens one prefill forward computes: a longer prompt runs as several chunks, other "
        "prompts between them; a multiple of --page-size, 0 runs every prompt whole (PDSERVE_CHUNKED_PREFILL_SIZE)",
    )
    p.add_argument(
        "--tp-size",
        type=int,
        default=int(env("TP_SIZE", str(d.tp_size))),
        help="tensor-parallel ranks: one process and one GPU each (PDSERVE_TP_SIZE)",
    )
    p.add_argument(
        "--dp-size",
        type=int,
        default=int(env("DP_SIZE", str(d.dp_size))),
        help="DP attention: data-parallel attention ranks, each with its own requests, all heads and its own KV "
        "pool; needs --enable-dp-attention and --tp-size equal to it (the MLP stays tensor-parallel) "
        "(PDSERVE_DP_SIZE)",
    )
    p.add_argument(
        "--enable-dp-attention",
        action="store_true",
        default=env("ENABLE_DP_ATTENTION", "0").lower() in ("1", "true", "yes", "on"),
        help="run attention data-parallel over the --dp-size ranks; a rank without requests runs IDLE steps that "
        "take part in every collective (PDSERVE_ENABLE_DP_ATTENTION)",
    )
    p.add_argument(
        "--enable-two-batch-overlap",
        action="store_true",
        default=env("ENABLE_TWO_BATCH_OVERLAP", "0").lower() in ("1", "true", "yes", "on"),
        help="run each batch as two micro-batches whose layers interleave, so one's all-reduce is in flight while "
        "the other computes (pays with --tp-size > 1) (PDSERVE_ENABLE_TWO_BATCH_OVERLAP)",
    )
    p.add_argument(
        "--tbo-token-distribution-threshold",
        type=float,
        default=float(env("TBO_TOKEN_DISTRIBUTION_THRESHOLD", str(d.tbo_token_distribution_threshold))),
        help="two-batch overlap: when the best split at a sequence boundary leaves a side less than this share of "
        "the tokens, cut one sequence across both micro-batches instead (two-chunk); 0 never cuts, at most 0.5 "
        "(PDSERVE_TBO_TOKEN_DISTRIBUTION_THRESHOLD)",
    )
    p.add_argument(
        "--emulated-collective-latency-ms",
        type=float,
        default=float(env("EMULATED_COLLECTIVE_LATENCY_MS", "0")),
        help="benchmarking aid: every model all-reduce completes no sooner than this after its launch, as on a "
        "slower interconnect than loopback; 0 (default) is off (PDSERVE_EMULATED_COLLECTIVE_LATENCY_MS)",
    )
    p.add_argument(
        "--dist-timeout",
        type=float,
        default=float(env("DIST_TIMEOUT", str(d.dist_timeout_s))),
        help="seconds a rank waits for its peers in a collective before failing (PDSERVE_DIST_TIMEOUT)",
    )


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        attention_backend=args.attention_backend,
        page_size=args.page_size,
        kv_cache_gb=args.kv_cache_gb,
        num_pages=args.kv_pages,
        max_batch_size=args.max_batch_size,
        max_prefill_tokens=args.max_prefill_tokens,
        context_length=args.context_length,
        disable_cuda_graph=args.disable_cuda_graph,
        cuda_graph_max_bs=args.cuda_graph_max_bs,
        skip_warmup=args.skip_warmup,
        tp_size=args.tp_size,
        cp_size=getattr(args, "cp_size", 1),  # prefill and generate only
        dp_size=args.dp_size,
        enable_dp_attention=args.enable_dp_attention,
        dist_timeout_s=args.dist_timeout,
        enable_two_batch_overlap=args.enable_two_batch_overlap,
        tbo_token_distribution_threshold=args.tbo_token_distribution_threshold,
        emulated_collective_latency_ms=args.emulated_collective_latency_ms,
        admission_policy=args.admission_policy,
        init_headroom_ratio=args.init_headroom_ratio,
        min_headroom_ratio=args.min_headroom_ratio,
        mixed_chunk_size=args.mixed_chunk_size,
        chunked_prefill_size=args.chunked_prefill_size,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description="Disaggregated prefill/decode LLM serving")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text in one process (colocated prefill + decode)")
    add_engine_args(gen)
    add_cp_arg(gen)
    gen.add_argument("--prompt", required=True, action="append", help="prompt text; repeat for a batch")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string; repeatable")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument(
        "--json",
        action="store_true",
        help='print {"text": ..., "token_ids": [...], "prompt_token_ids": [...]} per prompt (token_ids: generated)',
    )
    gen.set_defaults(func=cmd_generate)

    for role, port in (("prefill", 30001), ("decode", 30002)):
        srv = sub.add_parser(role, help=f"run a {role} server (HTTP API + scheduler + KV transfer)")
        add_daemon_args(srv, role, port)
        srv.set_defaults(func=cmd_server, role=role)

    rt = sub.add_parser("router", help="run the OpenAI-compatible router in front of prefill and decode servers")
    from router.config import add_router_args

    add_router_args(rt)
    rt.set_defaults(func=cmd_router)

    # Flags launch does not define pass through to the daemons (pdserve/forwarded.py); no abbreviations, so a
    # daemon's flag is never taken for a launch flag it happens to start like.
    la = sub.add_parser(
        "launch",
        help="router + prefill + decode on this machine, until Ctrl-C (every daemon flag passes through; "
        "--prefill-X/--decode-X/--router-X for one daemon)",
        allow_abbrev=False,
    )
    add_engine_args(la)
    la.add_argument("--transfer-backend", default="mooncake", choices=list(BACKENDS))
    la.add_argument("--host", default="127.0.0.1", help="address the router listens on")
    la.add_argument("--port", type=int, default=30000, help="router port (servers get free ports)")
    la.add_argument(
        "--startup-timeout",
        type=float,
        default=900.0,
        help="seconds to wait for every server to be ready (a cold FlashInfer kernel cache compiles for minutes)",
    )
    add_body_limit_arg(la)
    la.set_defaults(func=cmd_launch)
    return parser


def add_server_args(p: argparse.ArgumentParser, role: str, port: int) -> None:
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address")
    p.add_argument("--port", type=int, default=port, help="HTTP port")
    p.add_argument("--served-model-name", default="", help="model name in the API (default: --model)")
    p.add_argument("--transfer-backend", default=env("TRANSFER_BACKEND", "mooncake"), choices=list(BACKENDS))
    p.add_argument(
        "--advertise-host",
        default=env("ADVERTISE_HOST", "127.0.0.1"),
        help="address peers reach this server's KV transfer and control sockets on (pod IP)",
    )
    p.add_argument("--mooncake-protocol", default=env("MOONCAKE_PROTOCOL", "tcp"), choices=["tcp", "rdma"])
    p.add_argument("--ib-device", default=env("IB_DEVICE", ""), help="RDMA NICs for Mooncake, e.g. mlx5_0,mlx5_1")
    p.add_argument(
        "--bootstrap-port",
        type=int,
        default=int(env("BOOTSTRAP_PORT", str(DEFAULT_BOOTSTRAP_PORT))),
        help="prefill: bootstrap server port; decode: default for requests that give none",
    )
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a silent request fails")
    add_body_limit_arg(p)
    t = Timeouts()
    p.add_argument("--bootstrap-timeout", type=float, default=float(env("BOOTSTRAP_TIMEOUT", str(t.bootstrap))))
    p.add_argument("--waiting-timeout", type=float, default=float(env("WAITING_TIMEOUT", str(t.waiting_for_input))))
    p.add_argument("--transfer-timeout", type=float, default=float(env("TRANSFER_TIMEOUT", str(t.transferring))))
    p.add_argument(
        "--heartbeat-interval", type=float, default=float(env("HEARTBEAT_INTERVAL", str(t.heartbeat_interval)))
    )
    p.add_argument(
        "--emulated-link-gbps",
        type=float,
        default=opt_float(env("EMULATED_LINK_GBPS", "")),
        help="benchmarking aid: pace KV writes to this bandwidth (off by default)",
    )
    if role == "prefill":
        add_prefill_args(p)


def add_daemon_args(p: argparse.ArgumentParser, role: str, port: int = 0) -> None:
    """Every flag of `pdserve <role>` (prefill, decode or router)."""
    if role == "router":
        from router.config import add_router_args

        add_router_args(p)
        return
    add_engine_args(p)
    add_server_args(p, role, port)


def add_body_limit_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=int(env("MAX_BODY_BYTES", str(DEFAULT_MAX_BODY_BYTES))),
        help="largest request body accepted, in bytes; larger ones get 413 (PDSERVE_MAX_BODY_BYTES)",
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from engine.sampling import SamplingParams
    from pdserve.generate import check_split, run_generate, run_tp

    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
    )
    try:
        params.validate()
        cfg = engine_config(args)
        cfg.validate()
        if cfg.world_size > 1:  # rank 0 here, ranks 1..N-1 spawned (pdserve/generate.py); the split checked first
            check_split(cfg)
            prompts, outputs = run_tp(cfg, args.prompt, args.chat, params, args.log_level)
        else:
            prompts, outputs = run_generate(cfg, args.prompt, args.chat, params)
    except (ValueError, RuntimeError) as e:
        print(f"pdserve generate: error: {e}", file=sys.stderr)
        return 2
    failed = 0
    for ids, out in zip(prompts, outputs, strict=True):
        if out.error is not None:  # that prompt failed (e.g. non-finite logits); the others still print
            failed += 1
            print(f"pdserve generate: error: {out.error}", file=sys.stderr)
        if args.json:
            print(json.dumps({"text": out.text, "token_ids": out.token_ids, "prompt_token_ids": ids,
                              **({"error": out.error} if out.error is not None else {})}))  # fmt: skip
        elif out.error is None:
            print(out.text)
    return 1 if failed else 0


def cmd_server(args: argparse.Namespace) -> int:
    from serving.launch import ServerSettings

    timeouts = Timeouts(
        bootstrap=args.bootstrap_timeout,
        waiting_for_input=args.waiting_timeout,
        transferring=args.transfer_timeout,
        heartbeat_interval=args.heartbeat_interval,
    )
    transfer = TransferConfig(
        backend=args.transfer_backend,
        host=args.advertise_host,
        mooncake_protocol=args.mooncake_protocol,
        device_names=args.ib_device,
        timeouts=timeouts,
        emulated_link_gbps=args.emulated_link_gbps,
    )
    pipeline = pipeline_settings(args) if args.role == "prefill" else PipelineSettings()
    try:
        if args.max_body_bytes < 1:
            raise ValueError(f"--max-body-bytes must be at least 1, got {args.max_body_bytes}")
        transfer.validate()
        pipeline.validate()
        cfg = engine_config(args)
        cfg.validate()
    except ValueError as e:
        print(f"pdserve {args.role}: error: {e}", file=sys.stderr)
        return 2
    settings = ServerSettings(
        role=args.role, engine=cfg, transfer=transfer, host=args.host, port=args.port,
        served_model_name=args.served_model_name, bootstrap_port=args.bootstrap_port,
        request_timeout_s=args.request_timeout, log_level=args.log_level, pipeline=pipeline,
        max_body_bytes=args.max_body_bytes,
        prefix_cache=not getattr(args, "disable_prefix_cache", False),
    )  # fmt: skip
    if args.role == "prefill":
        from prefill_server.server import run_prefill

        return run_prefill(settings)
    from decode_server.server import run_decode

    return run_decode(settings)


def cmd_router(args: argparse.Namespace) -> int:
    from router.app import run_router
    from router.config import RouterConfigError, router_config

    try:
        cfg = router_config(args)
    except ValueError as e:
        print(f"pdserve router: error: {e}", file=sys.stderr)
        return 2
    try:
        run_router(cfg)
    except RouterConfigError as e:  # raised before serving (a --tokenizer that cannot be loaded)
        print(f"pdserve router: error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    from pdserve.local import launch_local

    try:
        forwarded = forwarded_argv(args.forward)
    except FlagError as e:
        print(f"pdserve launch: error: {e}", file=sys.stderr)
        return 2
    return launch_local(args, engine_argv(args), forwarded)


def forwarded_argv(extra: list[str]) -> dict[str, list[str]]:
    """Launch's pass-through flags per daemon, each list checked by that daemon's own parser now (argparse exits
    with the daemon named in its usage line), so a bad value fails before anything starts."""
    parsers = {}
    for role in ROLES:
        parsers[role] = argparse.ArgumentParser(
            prog=f"pdserve launch (flags for pdserve {role})", usage="%(prog)s", allow_abbrev=False
        )
        add_daemon_args(parsers[role], role)
    out = split_forwarded(extra, {role: known_flags(p) for role, p in parsers.items()})
    for role, argv in out.items():
        parsers[role].parse_args(argv)
    return out


def engine_argv(args: argparse.Namespace) -> list[str]:
    """The engine flags of `args` again, to pass on to child processes."""
    out = ["--model", args.model, "--device", args.device, "--attention-backend", args.attention_backend,
           "--page-size", str(args.page_size), "--max-batch-size", str(args.max_batch_size),
           "--max-prefill-tokens", str(args.max_prefill_tokens),
           "--cuda-graph-max-bs", str(args.cuda_graph_max_bs), "--tp-size", str(args.tp_size),
           "--dp-size", str(args.dp_size),
           "--dist-timeout", str(args.dist_timeout), "--admission-policy", args.admission_policy,
           "--init-headroom-ratio", str(args.init_headroom_ratio),
           "--min-headroom-ratio", str(args.min_headroom_ratio),
           "--mixed-chunk-size", str(args.mixed_chunk_size),
           "--chunked-prefill-size", str(args.chunked_prefill_size),
           "--tbo-token-distribution-threshold", str(args.tbo_token_distribution_threshold),
           "--emulated-collective-latency-ms", str(args.emulated_collective_latency_ms)]  # fmt: skip
    out += [flag for flag, on in (("--disable-cuda-graph", args.disable_cuda_graph),
                                  ("--skip-warmup", args.skip_warmup),
                                  ("--enable-two-batch-overlap", args.enable_two_batch_overlap),
                                  ("--enable-dp-attention", args.enable_dp_attention)) if on]  # fmt: skip
    for flag, value in (("--dtype", args.dtype), ("--kv-cache-gb", args.kv_cache_gb),
                        ("--kv-pages", args.kv_pages), ("--context-length", args.context_length)):  # fmt: skip
        if value is not None:
            out += [flag, str(value)]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "launch":
        args.forward = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
