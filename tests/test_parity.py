"""Token-exact parity with Hugging Face transformers on random small configs of each family."""

from __future__ import annotations

import pytest
import torch
import transformers

from engine.config import EngineConfig
from engine.engine import Engine
from engine.sampling import SamplingParams

ROPE_LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
ROPE_LINEAR = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}

# (family, seed, config overrides): GQA ratios, head dims, rope scaling, tied embeddings, biases, windows
CONFIGS = [
    ("llama", 1, dict(num_attention_heads=4, num_key_value_heads=4)),
    (
        "llama",
        2,
        dict(
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=32,
            rope_parameters=ROPE_LLAMA3,
            tie_word_embeddings=True,
        ),
    ),
    (
        "llama",
        3,
        dict(
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=24,
            rope_parameters=ROPE_LINEAR,
            attention_bias=True,
            mlp_bias=True,
        ),
    ),
    ("qwen2", 4, dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    ("qwen2", 5, dict(num_attention_heads=6, num_key_value_heads=3, hidden_size=96, head_dim=16)),
    ("mistral", 6, dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16, sliding_window=None)),
    ("mistral", 7, dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=12)),
]
IDS = [f"{f}-{s}" for f, s, _ in CONFIGS]
PROMPT_LENS = [5, 23, 1, 40]


def prompts(vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


def hf_model(path) -> transformers.PreTrainedModel:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval()


@pytest.fixture(params=CONFIGS, ids=IDS)
def case(request, model_factory):
    family, seed, overrides = request.param
    path = model_factory(family, seed, **overrides)
    engine = Engine(EngineConfig(model=str(path), device="cpu", page_size=4, num_pages=256))
    return path, engine, prompts(engine.model_config.vocab_size, seed)


def test_logits_match_transformers(case):
    path, engine, batch = case
    ref = hf_model(path)
    pages = [engine.pool.allocator.allocate(engine.pool.pages_for(len(p))) for p in batch]
    fb = engine.runner.build_batch(batch, [0] * len(batch), pages)
    ours = engine.runner.forward(fb, all_tokens=True)
    start = 0
    for p in batch:
        with torch.no_grad():
            theirs = ref(torch.tensor([p])).logits[0].float()
        mine = ours[start : start + len(p)]
        start += len(p)
        scale = theirs.abs().max().item()
        assert (mine - theirs).abs().max().item() <= 1e-4 * scale


def test_greedy_generation_matches_transformers(case):
    path, engine, batch = case
    ref = hf_model(path)
    outs = engine.generate(batch, SamplingParams(max_new_tokens=32, ignore_eos=True))
    for p, out in zip(batch, outs, strict=True):
        with torch.no_grad():
            gen = ref.generate(torch.tensor([p]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
        assert out.token_ids == gen[0, len(p) :].tolist()
    assert engine.pool.allocator.num_free == engine.pool.num_pages
