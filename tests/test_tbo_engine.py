"""Two-batch overlap in the engine, on CPU: at TP=2 (gloo, real processes) the overlapped forward of two
micro-batches gives the logits and KV of the plain forward for batches that take each split path (balanced,
two-chunk, one long sequence, a cached prefix, MIXED, DECODE), and `Engine.generate` with overlap on is token-exact
with transformers; the emulated collective latency holds each all-reduce back; bad settings are refused."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.sampling import SamplingParams
from tests.test_cp_engine import run_two_ranks

LAYERS = 3
# (new tokens, cached prefix, mixed): the split each takes at threshold 0.48
BATCHES = {
    "balanced": ([30, 20, 25, 26], [0, 0, 0, 0], False),
    "two-chunk": ([6, 120], [0, 0], False),
    "one-long": ([90], [0], False),
    "two-chunk-on-prefix": ([10, 70], [12, 5], False),
    "mixed": ([1, 1, 40, 1], [9, 14, 0, 20], True),
    "decode": ([1, 1, 1, 1, 1], [5, 9, 13, 2, 7], False),
}
GENERATE = [[3, 150], [40, 44, 38], [200]]  # prompt lengths of three generate() batches (one long prompt alone)
NEW_TOKENS = 10


def engine_config(path: str, tp: int, **kw) -> EngineConfig:
    return EngineConfig(model=path, device="cpu", page_size=4, num_pages=512, tp_size=tp, skip_warmup=True,
                        dist_timeout_s=20.0, chunked_prefill_size=64, **kw)  # fmt: skip


def prompts_of(lens: list[int], vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]


def run_batch(engine, name: str, tbo: bool) -> dict:
    """Logits and every layer's KV of one batch on fresh pages (poisoned first, so a wrong order cannot read a
    previous run's right values); cached prefixes are written by a plain forward first."""
    lens, prefixes, mixed = BATCHES[name]
    runner, pool = engine.runner, engine.pool
    seqs = prompts_of([p + n for p, n in zip(prefixes, lens, strict=True)], engine.model_config.vocab_size, 11)
    pages = [pool.allocator.allocate(pool.pages_for(len(s))) for s in seqs]
    for layer in range(LAYERS):
        for buf in (pool.k[layer], pool.v[layer]):
            buf[torch.tensor([p for ps in pages for p in ps])] = 1e3
    runner.tbo_threshold = None
    cached = [i for i, p in enumerate(prefixes) if p]
    if cached:
        runner.forward(runner.build_batch([seqs[i][: prefixes[i]] for i in cached], [0] * len(cached),
                                          [pages[i] for i in cached]))  # fmt: skip
    runner.tbo_threshold = 0.48 if tbo else None
    before = runner.tbo_steps
    batch = runner.build_batch([s[p:] for s, p in zip(seqs, prefixes, strict=True)], prefixes, pages, mixed=mixed)
    out = {"logits": runner.forward(batch), "overlapped": runner.tbo_steps - before}
    slots = torch.cat([batch.kv_slots(i) for i in range(len(seqs))])
    out["kv"] = [torch.stack([pool.gather_k(layer, slots), pool.gather_v(layer, slots)]) for layer in range(LAYERS)]
    for p in pages:
        pool.allocator.free(p)
    return out


def scenarios(engine) -> dict:
    out = {(name, tbo): run_batch(engine, name, tbo) for name, tbo in itertools.product(BATCHES, (False, True))}
    engine.runner.tbo_threshold = 0.48
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    start = (engine.runner.tbo_steps, engine.runner.two_chunk_steps)
    for i, lens in enumerate(GENERATE):
        out[("generate", i)] = [o.token_ids for o in engine.generate(prompts_of(lens, vocab, 100 + i), params)]
    out["counts"] = (engine.runner.tbo_steps - start[0], engine.runner.two_chunk_steps - start[1])
    return out


def _rank_main(rank: int, address: str, path: str, out_dir: str) -> None:
    from engine.distributed import init_tp_group
    from engine.engine import Engine

    torch.set_num_threads(1)
    group = init_tp_group(rank, 2, address, "cpu", timeout_s=20.0)
    engine = Engine(engine_config(path, 2, enable_two_batch_overlap=True), group)
    torch.save(scenarios(engine), Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def tbo_model(model_factory) -> str:
    return str(model_factory("llama", 45, num_hidden_layers=LAYERS))


def test_tp2_overlap_gives_the_plain_forward_and_exact_generation(tbo_model: str, tmp_path: Path):
    import transformers

    ranks = run_two_ranks(_rank_main, tbo_model, tmp_path, limit_s=240)
    for r in ranks:
        for name in BATCHES:
            plain, overlapped = r[(name, False)], r[(name, True)]
            assert (plain["overlapped"], overlapped["overlapped"]) == (0, 1), name
            scale = plain["logits"].abs().max().item()
            torch.testing.assert_close(overlapped["logits"], plain["logits"], atol=4e-6 * scale, rtol=1e-5)
            for a, b in zip(overlapped["kv"], plain["kv"], strict=True):
                torch.testing.assert_close(a, b, atol=4e-6 * b.abs().max().item(), rtol=1e-5)
        steps, two_chunk = r["counts"]
        assert steps > 0 and two_chunk > 0  # [3, 150] and the lone 200-token prompt cut a sequence
    ref = transformers.AutoModelForCausalLM.from_pretrained(tbo_model, dtype=torch.float32).eval()
    vocab = ref.config.vocab_size
    for i, lens in enumerate(GENERATE):
        for prompt, got in zip(prompts_of(lens, vocab, 100 + i), ranks[0][("generate", i)], strict=True):
            with torch.no_grad():
                gen = ref.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                   do_sample=False)  # fmt: skip
            assert got == gen[0, len(prompt) :].tolist(), (i, len(prompt))
        assert ranks[1][("generate", i)] == ranks[0][("generate", i)]


def test_overlap_on_one_rank_is_exact_and_counted(tbo_model: str):
    """TP=1 has nothing to overlap, but the split and the staged executor run all the same (the single-GPU case
    of the CUDA-graph plugin): greedy output equals the plain engine's."""
    from engine.engine import Engine

    plain = Engine(engine_config(tbo_model, 1))
    tbo = Engine(engine_config(tbo_model, 1, enable_two_batch_overlap=True, tbo_token_distribution_threshold=0.3))
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    for i, lens in enumerate(GENERATE):
        prompts = prompts_of(lens, plain.model_config.vocab_size, 100 + i)
        assert [o.token_ids for o in tbo.generate(prompts, params)] == [
            o.token_ids for o in plain.generate(prompts, params)
        ]
    assert tbo.runner.tbo_steps > 0 and tbo.runner.two_chunk_steps > 0
    assert plain.runner.tbo_steps == 0


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(tbo_token_distribution_threshold=0.6), r"threshold must be in \[0, 0.5\]"),
        (dict(tbo_token_distribution_threshold=-0.1), r"threshold must be in \[0, 0.5\]"),
        (dict(emulated_collective_latency_ms=-1.0), "must be >= 0"),
        (dict(enable_two_batch_overlap=True, cp_size=2), "does not run with context parallelism"),
    ],
)
def test_bad_overlap_settings_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**kw).validate()


def test_emulated_latency_holds_a_reduce_back():
    from engine.distributed import PendingReduce

    t0 = time.monotonic()
    PendingReduce(torch.zeros(1), None, time.monotonic() + 0.05).wait()
    assert time.monotonic() - t0 >= 0.05
