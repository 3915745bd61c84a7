"""Context-parallel prefill in the engine, on CPU (gloo) with real processes: each rank's zigzag share of a batch
gives the logits and the KV of a single-rank forward (fresh prompts, prompts extending a cached prefix, uneven
lengths, layer ranges), batches CP cannot split run whole on every rank, and `pdserve generate --cp-size 2` is
token-exact with transformers."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from tests.test_tp_engine import run_cli

LAYERS = 4
# (new tokens per sequence, cached prefix per sequence): uneven lengths, none a multiple of 2·cp; the last
# batches hold a sequence under 2·cp = 4 new tokens, or are a decode step, so they must run whole
BATCHES = [
    ([9, 21, 5], [0, 0, 0]),
    ([37], [0]),
    ([6, 13], [11, 4]),  # on a cached prefix (of fresh pages written by a whole forward first)
    ([30, 3], [0, 0]),  # 3 < 4: fallback
]
RANGES = [[0, LAYERS], [0, 1, 3, LAYERS]]


def engine_config(path: str, cp_size: int) -> EngineConfig:
    return EngineConfig(model=path, device="cpu", page_size=4, num_pages=256, cp_size=cp_size, skip_warmup=True,
                        dist_timeout_s=10.0)  # fmt: skip


def run_batch(engine, lens: list[int], prefixes: list[int], ranges: list[int], seed: int) -> dict:
    """Logits at the last tokens and every layer's K and V of every token, for one batch on fresh pages; the
    prefixes are written first by an ordinary forward (on every rank alike)."""
    g = torch.Generator().manual_seed(seed)
    vocab = engine.model_config.vocab_size
    prompts = [torch.randint(0, vocab, (p + n,), generator=g).tolist() for p, n in zip(prefixes, lens, strict=True)]
    alloc = engine.pool.allocator
    pages = [alloc.allocate(engine.pool.pages_for(len(p))) for p in prompts]
    runner = engine.runner
    if any(prefixes):
        cached = [(i, p[:n]) for i, (p, n) in enumerate(zip(prompts, prefixes, strict=True)) if n]
        runner.forward(runner.build_batch([c for _, c in cached], [0] * len(cached), [pages[i] for i, _ in cached]))
    batch = runner.build_batch([p[n:] for p, n in zip(prompts, prefixes, strict=True)], prefixes, pages)
    fwd = runner.start_forward(batch)
    for a, b in itertools.pairwise(ranges):
        fwd.run_layers(a, b)
    out = {"logits": fwd.logits(), "refusal": fwd.cp_refusal, "cp": fwd.cp is not None}
    slots = torch.cat([batch.kv_slots(i) for i in range(len(prompts))])
    out["k"] = [engine.pool.gather_k(layer, slots).clone() for layer in range(LAYERS)]
    out["v"] = [engine.pool.gather_v(layer, slots).clone() for layer in range(LAYERS)]
    for p in pages:
        alloc.free(p)
    return out


def scenarios(engine) -> dict:
    out = {}
    for (i, (lens, prefixes)), ranges in itertools.product(enumerate(BATCHES), RANGES):
        out[(i, tuple(ranges))] = run_batch(engine, lens, prefixes, ranges, seed=i)
    return out


def _rank_main(rank: int, address: str, path: str, out_dir: str) -> None:
    from engine.distributed import init_tp_group
    from engine.engine import Engine

    torch.set_num_threads(1)
    group = init_tp_group(rank, 2, address, "cpu", timeout_s=10.0)
    engine = Engine(engine_config(path, 2), group)
    out = scenarios(engine)
    out["kv_heads"] = (engine.pool.layout.kv_head_start, engine.pool.layout.num_kv_heads)
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def cp_model(model_factory) -> str:
    return str(model_factory("llama", 43, num_hidden_layers=LAYERS))


def run_two_ranks(rank_main, path: str, out_dir: Path, limit_s: float) -> list[dict]:
    """Run `rank_main(rank, address, path, out_dir)` on two spawned ranks until both finished (within `limit_s`);
    what each saved to out_dir/rank<r>.pt."""
    import torch.multiprocessing as tmp

    from engine.distributed import init_address

    ctx = tmp.start_processes(rank_main, (init_address(), path, str(out_dir)), nprocs=2, join=False,
                              start_method="spawn")  # fmt: skip
    deadline = time.monotonic() + limit_s
    try:
        while not ctx.join(timeout=0.5):
            assert time.monotonic() < deadline, "the ranks did not finish in time"
    finally:
        for p in ctx.processes:
            p.kill()
            p.join()
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_cp2_shares_give_the_single_rank_logits_and_kv(cp_model: str, tmp_path: Path):
    from engine.engine import Engine

    ranks = run_two_ranks(_rank_main, cp_model, tmp_path, limit_s=180)
    assert [r["kv_heads"] for r in ranks] == [(0, 2), (0, 2)]  # every CP rank's pool holds every KV head
    single = scenarios(Engine(engine_config(cp_model, 1)))
    for key, ref in single.items():
        i = key[0]
        should_split = min(BATCHES[i][0]) >= 4
        for r in ranks:
            got = r[key]
            assert got["cp"] == should_split, key
            assert got["refusal"] == (None if should_split else "short_sequence"), key
            torch.testing.assert_close(got["logits"], ref["logits"], atol=2e-5, rtol=1e-4)
            for layer in range(LAYERS):  # the whole batch's KV in every rank's pool, not only its own share
                torch.testing.assert_close(got["k"][layer], ref["k"][layer], atol=2e-5, rtol=1e-4)
                torch.testing.assert_close(got["v"][layer], ref["v"][layer], atol=2e-5, rtol=1e-4)


def test_generate_cp2_matches_transformers(cp_model: str):
    """Uneven prompts in one batch, one of 3 tokens (under 2·cp: that batch runs whole), and 32-token chunks, so
    the later chunks of the long prompt extend their own cached prefix context-parallel."""
    import transformers

    prompts = ["Hi!", "The quick brown fox jumps over the lazy dog", "def main():\n    return 4 * 8 + len('x')\n" * 3]
    new = 12
    argv = [a for p in prompts for a in ("--prompt", p)]
    proc = run_cli("--model", cp_model, "--cp-size", "2", "--chunked-prefill-size", "32", "--page-size", "4",
                   "--skip-warmup", *argv, "--json", "--ignore-eos", "--max-new-tokens", str(new))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    outs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [len(o["prompt_token_ids"]) for o in outs][:1] == [3] and len(outs) == 3
    assert len(outs[2]["prompt_token_ids"]) > 64  # three chunks
    ref = transformers.AutoModelForCausalLM.from_pretrained(cp_model, dtype=torch.float32).eval()
    for out in outs:
        ids = torch.tensor([out["prompt_token_ids"]])
        with torch.no_grad():
            gen = ref.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        assert out["token_ids"] == gen[0, ids.shape[1] :].tolist()


def test_cp_with_tp_is_refused():
    proc = run_cli("--model", "builtin:tiny-llama", "--cp-size", "2", "--tp-size", "2", "--prompt", "x")
    assert proc.returncode == 2
    assert "context and tensor parallelism do not combine" in proc.stderr
