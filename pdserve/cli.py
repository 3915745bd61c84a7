"""The `pdserve` command line. Each subcommand imports its server lazily, so `pdserve generate` does not
pay for the HTTP stack and the engine never imports the servers."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from engine.config import EngineConfig


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
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size)
    p.add_argument("--max-prefill-tokens", type=int, default=d.max_prefill_tokens)
    p.add_argument("--context-length", type=int, default=None)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        attention_backend=args.attention_backend,
        page_size=args.page_size,
        kv_cache_gb=args.kv_cache_gb,
        max_batch_size=args.max_batch_size,
        max_prefill_tokens=args.max_prefill_tokens,
        context_length=args.context_length,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description="Disaggregated prefill/decode LLM serving")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text in one process (colocated prefill + decode)")
    add_engine_args(gen)
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
        "--json", action="store_true", help='print {"text": ..., "token_ids": [...]} (generated tokens only) per prompt'
    )
    gen.set_defaults(func=cmd_generate)
    return parser


def cmd_generate(args: argparse.Namespace) -> int:
    from engine.engine import Engine
    from engine.sampling import SamplingParams

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
        engine = Engine(engine_config(args))
        if args.chat:
            prompts = [engine.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in args.prompt]
        else:
            prompts = [engine.tokenizer.encode(p) for p in args.prompt]
        outputs = engine.generate(prompts, params)
    except (ValueError, RuntimeError) as e:
        print(f"pdserve generate: error: {e}", file=sys.stderr)
        return 2
    for out in outputs:
        if args.json:
            print(json.dumps({"text": out.text, "token_ids": out.token_ids}))
        else:
            print(out.text)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
