"""Engine behaviour beyond parity: prefix extend, batching, layer-range forward, stops, page accounting."""

from __future__ import annotations

import itertools

import pytest
import torch

from engine.batch import ForwardMode
from engine.config import EngineConfig
from engine.engine import Engine
from engine.sampling import SamplingParams


@pytest.fixture(scope="module")
def engine(model_factory) -> Engine:
    path = model_factory("llama", 11, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2)
    return Engine(EngineConfig(model=str(path), device="cpu", page_size=4, num_pages=512))


def random_ids(n: int, seed: int, vocab: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_extend_on_cached_prefix_equals_full_recompute(engine: Engine):
    ids = random_ids(37, 0, engine.model_config.vocab_size)
    alloc = engine.pool.allocator
    full_pages = alloc.allocate(engine.pool.pages_for(len(ids)))
    full = engine.runner.forward(engine.runner.build_batch([ids], [0], [full_pages]), all_tokens=True)

    pages = alloc.allocate(engine.pool.pages_for(len(ids)))
    # prefix of 13 tokens (not page aligned), then two extends on top of the cached pages
    for start, end in [(0, 13), (13, 30), (30, 37)]:
        batch = engine.runner.build_batch([ids[start:end]], [start], [pages])
        part = engine.runner.forward(batch, all_tokens=True)
        ref = full[start:end]
        assert (part - ref).abs().max() <= 1e-5 * ref.abs().max()
        assert torch.equal(part.argmax(-1), ref.argmax(-1))
    alloc.free(full_pages)
    alloc.free(pages)


def test_batch_equals_one_by_one(engine: Engine):
    vocab = engine.model_config.vocab_size
    prompts = [random_ids(n, 100 + n, vocab) for n in (3, 29, 11, 64, 1)]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    batched = engine.generate(prompts, params)
    for p, out in zip(prompts, batched, strict=True):
        (single,) = engine.generate([p], params)
        assert single.token_ids == out.token_ids
        assert single.logprobs == pytest.approx(out.logprobs, abs=1e-4)
    assert engine.pool.allocator.num_free == engine.pool.num_pages


@pytest.mark.parametrize(
    "splits",
    [[0, 6], [0, 1, 6], [0, 5, 6], [0, 1, 2, 3, 4, 5, 6], [0, 2, 3, 6], [0, 4, 6]],
    ids=lambda s: "-".join(map(str, s)),
)
@pytest.mark.parametrize("mode", ["extend", "decode"])
def test_layer_range_forward_equals_full(engine: Engine, splits: list[int], mode: str):
    vocab = engine.model_config.vocab_size
    prompts = [random_ids(n, n, vocab) for n in (9, 21, 4)]
    alloc = engine.pool.allocator
    logits = []
    pools = []
    for ranges in ([0, 6], splits):
        pages = [alloc.allocate(engine.pool.pages_for(len(p) + 1)) for p in prompts]
        batch = engine.runner.build_batch(prompts, [0] * 3, pages)
        if mode == "decode":
            engine.runner.forward(batch)
            batch = engine.runner.build_batch([[7], [8], [9]], [len(p) for p in prompts], pages)
            assert batch.mode == ForwardMode.DECODE
        fwd = engine.runner.start_forward(batch)
        for a, b in itertools.pairwise(ranges):
            fwd.run_layers(a, b)
        logits.append(fwd.logits(all_tokens=True))
        slots = torch.cat([batch.kv_slots(i) for i in range(3)])
        pools.append([engine.pool.gather_k(layer, slots) for layer in range(6)])
        for p in pages:
            alloc.free(p)
    assert torch.equal(logits[0], logits[1])
    for k_full, k_split in zip(*pools, strict=True):
        assert torch.equal(k_full, k_split)


def test_layer_ranges_must_be_consecutive_and_complete(engine: Engine):
    pages = engine.pool.allocator.allocate(2)
    fwd = engine.runner.start_forward(engine.runner.build_batch([[1, 2, 3]], [0], [pages]))
    fwd.run_layers(0, 2)
    with pytest.raises(ValueError, match="consecutive"):
        fwd.run_layers(3, 6)
    with pytest.raises(ValueError, match="all 6 layers"):
        fwd.logits()
    engine.pool.allocator.free(pages)


def test_stop_token_and_stop_string(engine: Engine):
    vocab = engine.model_config.vocab_size
    prompt = random_ids(10, 5, vocab)
    (free_run,) = engine.generate([prompt], SamplingParams(max_new_tokens=16, ignore_eos=True))
    assert free_run.finish_reason == "length" and len(free_run.token_ids) == 16

    stop_id = free_run.token_ids[5]
    first = free_run.token_ids.index(stop_id)
    (stopped,) = engine.generate([prompt], SamplingParams(max_new_tokens=16, stop_token_ids=[stop_id]))
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free_run.token_ids[: first + 1]

    text = free_run.text
    needle = text[len(text) // 2 : len(text) // 2 + 2]
    if needle.strip():
        (by_string,) = engine.generate([prompt], SamplingParams(max_new_tokens=16, stop=[needle]))
        assert by_string.finish_reason == "stop"
        assert by_string.text == text[: text.find(needle)]


def test_rejects_bad_requests_with_clear_errors(engine: Engine):
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], SamplingParams())
    with pytest.raises(ValueError, match="context length"):
        engine.add_request([1] * 500, SamplingParams(max_new_tokens=100))
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request([engine.model_config.vocab_size], SamplingParams())
    with pytest.raises(ValueError, match="temperature"):
        engine.add_request([1], SamplingParams(temperature=-1))
    assert not engine.has_work


def test_abort_frees_pages(engine: Engine):
    req = engine.add_request([1, 2, 3, 4, 5], SamplingParams(max_new_tokens=50))
    engine.step()
    assert engine.pool.allocator.num_free < engine.pool.num_pages
    engine.abort(req.rid)
    assert req.finish_reason is not None and req.finish_reason.value == "abort"
    assert engine.pool.allocator.num_free == engine.pool.num_pages
    assert not engine.has_work


def test_admission_never_overcommits(model_factory):
    path = model_factory("llama", 11, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2)
    small = Engine(EngineConfig(model=str(path), device="cpu", page_size=4, num_pages=10))
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    reqs = [small.add_request([1] * 12, params) for _ in range(3)]  # 5 pages each: two fit at once
    small.step()
    assert sum(r.status.value == "running" for r in reqs) == 2
    while small.has_work:
        small.step()
        assert small.pool.allocator.num_free >= 0
    assert all(len(r.output_ids) == 8 for r in reqs)
    assert small.pool.allocator.num_free == 10
    with pytest.raises(ValueError, match="pool holds"):
        small.add_request([1] * 40, SamplingParams(max_new_tokens=8))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_tracks_float32(model_factory, dtype: str):
    path = model_factory("qwen2", 4, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    ids = random_ids(16, 1, 512)
    logits = {}
    for dt in ("float32", dtype):
        eng = Engine(EngineConfig(model=str(path), device="cpu", dtype=dt, page_size=4, num_pages=16))
        assert eng.pool.k[0].dtype == getattr(torch, dt)
        pages = eng.pool.allocator.allocate(4)
        logits[dt] = eng.runner.forward(eng.runner.build_batch([ids], [0], [pages]), all_tokens=True)
    ref, half = logits["float32"], logits[dtype]
    assert torch.isfinite(half).all()
    assert (half - ref).abs().max() < 0.05 * ref.abs().max()
    assert (half.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_seeded_sampling_is_reproducible(engine: Engine):
    prompt = random_ids(8, 3, engine.model_config.vocab_size)
    params = SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.9, seed=1234, ignore_eos=True)
    a, b = engine.generate([prompt, prompt], [params, params])
    assert a.token_ids == b.token_ids
