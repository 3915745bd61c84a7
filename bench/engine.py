"""Colocated engine vs Hugging Face transformers `generate` on the same built-in model.

Prints prefill and decode tokens/s for batch 1 and 16 and the ratio (pdserve / transformers).
Both sides run greedy with a fixed number of new tokens on equal-length random prompts (no padding).

    .venv/bin/python bench/engine.py [--model builtin:bench-llama] [--prompt-len 128] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.builtin import resolve_model
from engine.config import EngineConfig
from engine.device import resolve_device, synchronize
from engine.engine import Engine
from engine.sampling import SamplingParams


def progress(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def ours(engine: Engine, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds per step) for one batch."""
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    reqs = [engine.add_request(p, params) for p in prompts]
    synchronize(engine.device)
    t0 = time.perf_counter()
    engine.step()  # the whole batch is admitted and prefilled in one step
    synchronize(engine.device)
    t1 = time.perf_counter()
    steps = 0
    while engine.has_work:
        engine.step()
        steps += 1
    synchronize(engine.device)
    t2 = time.perf_counter()
    assert all(len(r.output_ids) == new_tokens for r in reqs)
    return t1 - t0, (t2 - t1) / max(steps, 1)


def theirs(model, prompts: list[list[int]], new_tokens: int, device: torch.device) -> tuple[float, float]:
    ids = torch.tensor(prompts, device=device)
    kw = dict(do_sample=False, min_new_tokens=new_tokens, pad_token_id=0)
    synchronize(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=1, **kw | {"min_new_tokens": 1})
    synchronize(device)
    t1 = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=new_tokens, **kw)
    synchronize(device)
    t2 = time.perf_counter()
    prefill = t1 - t0
    return prefill, max((t2 - t1) - prefill, 1e-9) / (new_tokens - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:bench-llama")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--repeats", type=int, default=3, help="median of this many runs per cell")
    args = ap.parse_args()

    import transformers

    device = resolve_device(args.device)
    path = resolve_model(args.model)
    progress(f"loading {args.model} on {device}")
    engine = Engine(EngineConfig(model=args.model, device=str(device), dtype=args.dtype, kv_cache_gb=1.0))
    ref = (
        transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=engine.model_config.dtype, attn_implementation="sdpa"
        )
        .to(device)
        .eval()
    )
    vocab = engine.model_config.vocab_size

    rows = []
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        g = torch.Generator().manual_seed(bs)
        prompts = torch.randint(0, vocab, (bs, args.prompt_len), generator=g).tolist()
        ours(engine, prompts, 4)  # warm-up
        theirs(ref, prompts, 4, device)
        o_runs, t_runs = [], []
        for r in range(args.repeats):
            progress(f"batch {bs}: run {r + 1}/{args.repeats}")
            o_runs.append(ours(engine, prompts, args.new_tokens))
            t_runs.append(theirs(ref, prompts, args.new_tokens, device))
        o_pf, o_dec = (statistics.median(x) for x in zip(*o_runs, strict=True))
        t_pf, t_dec = (statistics.median(x) for x in zip(*t_runs, strict=True))
        tokens = bs * args.prompt_len
        rows.append((bs, "prefill", tokens / o_pf, tokens / t_pf))
        rows.append((bs, "decode", bs / o_dec, bs / t_dec))

    cfg = engine.model_config
    print(
        f"\nmodel {args.model} ({cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.dtype}) on {device}; "
        f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, median of {args.repeats}"
    )
    print(f"{'batch':>5}  {'phase':<8} {'pdserve tok/s':>14} {'transformers tok/s':>19} {'ratio':>7}")
    for bs, phase, o, t in rows:
        print(f"{bs:>5}  {phase:<8} {o:>14.1f} {t:>19.1f} {o / t:>7.2f}")


if __name__ == "__main__":
    main()
