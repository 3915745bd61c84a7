"""`pdserve generate`: prompts to completion on the colocated engine, on one rank or several (`--tp-size N`).

With N ranks this process is rank 0: it checks that the model splits over N ranks before anything starts,
spawns ranks 1..N-1 (engine.distributed.spawn_followers) with the same settings, prompts and sampling
parameters, and every rank runs `Engine.generate` identically (SPMD); rank 0 prints. A rank that fails makes
the whole command fail promptly, never hang: a follower that exits non-zero is seen by a watcher thread here
(even while this rank is still loading or blocked in a collective), a follower whose leader died exits by
itself, and a collective whose peer is gone raises (connection closed) or times out after --dist-timeout.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from multiprocessing.process import BaseProcess

from engine.config import EngineConfig
from engine.engine import GenerationOutput
from engine.sampling import SamplingParams

# After a follower fails, how long rank 0 may take to reach its own error (the same bad input fails every rank
# alike, and rank 0's message is the one to print) before the watcher ends the command.
_GRACE_S = 3.0

Result = tuple[list[list[int]], list[GenerationOutput]]


def run_generate(cfg: EngineConfig, texts: list[str], chat: bool, params: SamplingParams, tp: object = None) -> Result:
    """One rank's whole run: its engine, the prompts tokenized by the servers' rule, the outputs."""
    from engine.engine import Engine

    engine = Engine(cfg, tp)  # type: ignore[arg-type]
    # The servers' rule (tokenization.tokenizer): text gets the tokenizer's special tokens, chat its template's.
    tok, max_tokens = engine.tokenizer, engine.context_length - 1
    if chat:
        prompts = [tok.apply_chat_template([{"role": "user", "content": p}], max_tokens=max_tokens) for p in texts]
    else:
        prompts = [tok.encode_prompt(p, max_tokens=max_tokens) for p in texts]
    return prompts, engine.generate(prompts, params)


def check_split(cfg: EngineConfig) -> None:
    """Raise (TPLayoutError, a ValueError) unless the model splits over cfg.tp_size ranks: before any process
    starts. Generates a built-in model here, once, so the ranks do not race to."""
    from engine.builtin import resolve_model
    from engine.config import ModelConfig
    from engine.loader import check_model_tp

    model_dir = resolve_model(cfg.model)
    check_model_tp(ModelConfig.from_pretrained(model_dir), cfg.tp_size, cfg.model, cfg.dp_attention)


def _follower(
    rank: int, address: str, cfg: EngineConfig, texts: list[str], chat: bool, params: SamplingParams, level: str
) -> None:
    """Rank 1..N-1 (a spawned process): the same run as rank 0, nothing printed but errors."""
    from engine.distributed import init_tp_group

    logging.basicConfig(level=level.upper(), format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s")
    tp = init_tp_group(rank, cfg.world_size, address, cfg.device, cfg.dist_timeout_s)
    try:
        run_generate(cfg, texts, chat, params, tp)
        tp.leave()
    except (ValueError, RuntimeError) as e:
        print(f"pdserve generate: rank {rank}: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    finally:
        tp.close()


def _follower_state(p: BaseProcess, waited_s: float) -> str:
    if p.exitcode is None:
        return f"{p.name} was still running {waited_s:g} s after rank 0 finished (its stacks are above)"
    return f"{p.name} exited with code {p.exitcode}"


def run_tp(cfg: EngineConfig, texts: list[str], chat: bool, params: SamplingParams, level: str) -> Result:
    """Rank 0 of a `cfg.world_size`-rank run (TP or CP ranks); raises what rank 0 raises, or RuntimeError when a
    follower failed after rank 0 finished. A follower failing while rank 0 runs ends this process with status 1."""
    from engine.distributed import (
        FollowerWatch,
        dump_stacks,
        init_address,
        init_tp_group,
        spawn_followers,
        stop_followers,
    )

    address = init_address()
    procs = spawn_followers(_follower, (address, cfg, texts, chat, params, level), cfg.world_size)
    done = threading.Event()

    def on_failure(p: BaseProcess) -> None:
        if done.wait(_GRACE_S):  # rank 0 finished or raised by itself meanwhile: it reports
            return
        print(f"pdserve generate: error: {p.name} exited with code {p.exitcode}; stopping",
              file=sys.stderr, flush=True)  # fmt: skip
        stop_followers(procs)
        os._exit(1)

    watch = FollowerWatch(procs, on_failure)
    try:
        tp = init_tp_group(0, cfg.world_size, address, cfg.device, cfg.dist_timeout_s)
        try:
            result = run_generate(cfg, texts, chat, params, tp)
            try:
                tp.leave()
            except RuntimeError as e:  # a follower never reached the barrier: say where it is
                dump_stacks(procs)
                raise RuntimeError(f"the ranks did not finish together ({e}); the followers' stacks are above") from e
        finally:
            tp.close()
        for p in procs:  # they finish with rank 0 (the same work): wait, but never forever
            p.join(cfg.dist_timeout_s)
        failed = [p for p in procs if p.exitcode != 0]
        if failed:
            dump_stacks(failed)  # one still running says where it is stuck
            raise RuntimeError(", ".join(_follower_state(p, cfg.dist_timeout_s) for p in failed))
        return result
    finally:
        done.set()
        watch.stop()
        stop_followers(procs)
