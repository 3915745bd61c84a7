"""Tests for engine.sampling: greedy, seeded sampling, top-k / top-p truncation, logprobs, validation."""

from __future__ import annotations

import math

import pytest
import torch

from engine.sampling import SampleOutput, Sampler, SamplingParams, make_generator

VOCAB = 32


def _logits(batch: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab, generator=g) * 3


def _logits_from_probs(probs: list[float]) -> torch.Tensor:
    # log(p) as logits gives softmax == p exactly up to float rounding: lets tests state the nucleus.
    return torch.tensor(probs, dtype=torch.float64).log().float().unsqueeze(0)


def _draw_many(logits_row: torch.Tensor, params: SamplingParams, n: int, seed: int = 1234) -> torch.Tensor:
    """n draws from one row, all from a single generator (a batch of n copies sharing it)."""
    g = make_generator(seed)
    out = Sampler()(logits_row.expand(n, -1), [params] * n, [g] * n)
    return out.token_ids


# ---------------------------------------------------------------------------------------- greedy


def test_greedy_equals_argmax() -> None:
    logits = _logits(8)
    out = Sampler()(logits, [SamplingParams()] * 8, [None] * 8)
    assert isinstance(out, SampleOutput)
    assert out.token_ids.dtype == torch.int64 and out.token_ids.device.type == "cpu"
    assert out.logprobs.dtype == torch.float32 and out.logprobs.device.type == "cpu"
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))


def test_greedy_ties_pick_lowest_index() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, 5] = logits[0, 9] = 2.0
    out = Sampler()(logits, [SamplingParams()], [None])
    assert out.token_ids.tolist() == [5]


def test_greedy_accepts_half_precision() -> None:
    logits = _logits(4).to(torch.bfloat16)
    out = Sampler()(logits, [SamplingParams()] * 4, [None] * 4)
    assert torch.equal(out.token_ids, logits.float().argmax(dim=-1))
    assert out.logprobs.dtype == torch.float32


def test_greedy_consumes_no_randomness() -> None:
    # Greedy rows must not advance a generator that is handed to them.
    g = make_generator(7)
    assert g is not None
    state = g.get_state()
    Sampler()(_logits(1), [SamplingParams(temperature=0.0, seed=7)], [g])
    assert torch.equal(g.get_state(), state)


def test_mixed_batch_greedy_and_sampled() -> None:
    logits = _logits(6)
    params = [
        SamplingParams(),
        SamplingParams(temperature=1.0, seed=1),
        SamplingParams(temperature=0.0, top_k=5),
        SamplingParams(temperature=1.5, top_k=3, seed=2),
        SamplingParams(temperature=0.7, top_p=0.5),
        SamplingParams(temperature=2.0, top_k=1),  # top_k == 1 is greedy
    ]
    gens = [make_generator(p.seed) for p in params]
    out = Sampler()(logits, params, gens)
    argmax = logits.argmax(dim=-1)
    for row in (0, 2, 5):
        assert out.token_ids[row] == argmax[row]
    # Sampled row with top_k=3 must land in its top 3.
    assert out.token_ids[3].item() in logits[3].topk(3).indices.tolist()
    assert ((out.token_ids >= 0) & (out.token_ids < VOCAB)).all()

    # Seeded sampled rows in the mixed batch match the same rows sampled alone.
    for row in (1, 3):
        alone = Sampler()(logits[row : row + 1], [params[row]], [make_generator(params[row].seed)])
        assert alone.token_ids.item() == out.token_ids[row].item()


# ------------------------------------------------------------------------------- reproducibility


def _sequence(seed: int, neighbours: int, n_steps: int = 50, neighbour_seed: int | None = None) -> list[int]:
    """Draw n_steps tokens for a seeded row 0, with `neighbours` other sampled rows beside it."""
    sampler = Sampler()
    batch = 1 + neighbours
    params = [SamplingParams(temperature=1.0, seed=seed)]
    params += [SamplingParams(temperature=0.8, top_k=4, top_p=0.9, seed=neighbour_seed)] * neighbours
    gens = [make_generator(seed)] + [make_generator(neighbour_seed) for _ in range(neighbours)]
    tokens = []
    for step in range(n_steps):
        # Row 0's logits depend only on the step; neighbours' rows differ with batch size.
        row0 = _logits(1, seed=step)
        others = _logits(neighbours, seed=1000 + step + neighbours) if neighbours else row0[:0]
        out = sampler(torch.cat([row0, others]), params, gens)
        assert out.token_ids.shape == (batch,)
        tokens.append(out.token_ids[0].item())
    return tokens


def test_same_seed_same_sequence() -> None:
    assert _sequence(42, neighbours=0) == _sequence(42, neighbours=0)


def test_neighbours_do_not_change_seeded_row() -> None:
    base = _sequence(42, neighbours=0)
    assert _sequence(42, neighbours=3) == base
    assert _sequence(42, neighbours=5, neighbour_seed=99) == base


def test_different_seeds_differ() -> None:
    assert _sequence(1, neighbours=0) != _sequence(2, neighbours=0)


def test_make_generator() -> None:
    assert make_generator(None) is None
    g1, g2 = make_generator(5), make_generator(5)
    assert g1 is not None and g2 is not None
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))


# -------------------------------------------------------------------------------- top-k / top-p


def test_top_k_never_outside_k_largest() -> None:
    logits = _logits(1, seed=3)[0]
    k = 4
    allowed = set(logits.topk(k).indices.tolist())
    draws = _draw_many(logits, SamplingParams(temperature=2.0, top_k=k), 2000)
    seen = set(draws.tolist())
    assert seen <= allowed
    assert len(seen) == k  # high temperature over 2000 draws: every allowed token shows up


def test_top_p_never_outside_nucleus() -> None:
    # Sorted probs 0.4, 0.3, 0.15, ...: cumulative 0.4, 0.7, 0.85 -> top_p=0.8 keeps exactly 3 tokens.
    probs = [0.05, 0.3, 0.02, 0.4, 0.03, 0.15, 0.05]
    logits = _logits_from_probs(probs)[0]
    draws = _draw_many(logits, SamplingParams(temperature=1.0, top_p=0.8), 2000)
    counts = torch.bincount(draws, minlength=len(probs))
    assert set(draws.tolist()) == {1, 3, 5}
    # Renormalised within the nucleus: 0.4/0.85 ~= 0.47 for token 3, 0.15/0.85 ~= 0.18 for token 5.
    assert abs(counts[3].item() / 2000 - 0.4 / 0.85) < 0.05
    assert abs(counts[5].item() / 2000 - 0.15 / 0.85) < 0.05


def test_top_p_small_keeps_top_token() -> None:
    logits = _logits_from_probs([0.2, 0.5, 0.3])[0]
    draws = _draw_many(logits, SamplingParams(temperature=1.0, top_p=0.01), 200)
    assert set(draws.tolist()) == {1}


def test_top_k_then_top_p() -> None:
    # top_k=3 keeps {0.4, 0.3, 0.15} -> renormalised 0.47, 0.35, 0.18; top_p=0.75 then keeps two.
    probs = [0.05, 0.3, 0.02, 0.4, 0.03, 0.15, 0.05]
    logits = _logits_from_probs(probs)[0]
    draws = _draw_many(logits, SamplingParams(temperature=1.0, top_k=3, top_p=0.75), 1000)
    assert set(draws.tolist()) == {1, 3}


def test_top_k_one_equals_greedy() -> None:
    logits = _logits(16, seed=5)
    params = [SamplingParams(temperature=1.3, top_k=1, seed=i) for i in range(16)]
    out = Sampler()(logits, params, [make_generator(i) for i in range(16)])
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))


def test_top_k_larger_than_vocab_is_disabled() -> None:
    logits = _logits(1, vocab=8, seed=6)[0]
    draws = _draw_many(logits, SamplingParams(temperature=5.0, top_k=100), 2000)
    assert len(set(draws.tolist())) == 8


def test_tiny_temperature_does_not_overflow() -> None:
    logits = torch.tensor([[1000.0, 999.0, -1000.0, 0.0]])
    draws = _draw_many(logits[0], SamplingParams(temperature=1e-6), 50)
    assert set(draws.tolist()) == {0}


# -------------------------------------------------------------------------------------- logprobs


def test_logprobs_are_raw_log_softmax() -> None:
    logits = _logits(5, seed=8)
    params = [
        SamplingParams(),
        SamplingParams(temperature=0.5, seed=1),
        SamplingParams(temperature=1.7, top_k=3, seed=2),
        SamplingParams(temperature=1.0, top_p=0.3, seed=3),
        SamplingParams(temperature=3.0, top_k=2, top_p=0.5),
    ]
    out = Sampler()(logits, params, [make_generator(p.seed) for p in params])
    expected = torch.log_softmax(logits, dim=-1).gather(1, out.token_ids.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(out.logprobs, expected)
    # Greedy row: the logprob of the argmax under the raw (untempered) distribution.
    assert math.isclose(out.logprobs[0].item(), torch.log_softmax(logits[0], -1).max().item(), rel_tol=1e-6)


# ------------------------------------------------------------------------------------ validation


def test_is_greedy() -> None:
    assert SamplingParams().is_greedy
    assert SamplingParams(temperature=1.0, top_k=1).is_greedy
    assert not SamplingParams(temperature=1.0).is_greedy
    assert not SamplingParams(temperature=1.0, top_k=0).is_greedy


def test_validate_accepts_defaults_and_typical() -> None:
    SamplingParams().validate()
    SamplingParams(
        max_new_tokens=1, temperature=0.7, top_k=0, top_p=1.0, seed=0, stop_token_ids=[0, 2], stop=["\n"]
    ).validate()
    SamplingParams(top_k=-1, top_p=0.01, seed=2**64 - 1).validate()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": -1}, r"temperature must be >= 0 \(0 is greedy\), got -1"),
        ({"temperature": float("nan")}, r"temperature must be a finite number, got nan"),
        ({"temperature": float("inf")}, r"temperature must be a finite number, got inf"),
        ({"temperature": float("-inf")}, r"temperature must be a finite number, got -inf"),
        ({"temperature": 10**400}, r"temperature must be a finite number, got an integer too large"),
        ({"temperature": "0.5"}, r"temperature must be a number"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\] \(1 disables it\), got 0"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\] \(1 disables it\), got 1.5"),
        ({"top_p": -0.1}, r"top_p must be in"),
        ({"top_p": float("nan")}, r"top_p must be a finite number, got nan"),
        ({"top_p": float("inf")}, r"top_p must be a finite number, got inf"),
        ({"top_p": 10**400}, r"top_p must be a finite number, got an integer too large"),
        ({"max_new_tokens": 0}, r"max_new_tokens must be >= 1, got 0"),
        ({"max_new_tokens": 1.5}, r"max_new_tokens must be an integer"),
        ({"top_k": -2}, r"top_k must be -1 \(disabled\) or >= 1, got -2"),
        ({"top_k": True}, r"top_k must be an integer"),
        ({"stop": [""]}, r"stop\[0\] must be a non-empty string"),
        ({"stop": ["ok", ""]}, r"stop\[1\] must be a non-empty string"),
        ({"stop": "END"}, r"stop must be a list of strings"),
        ({"stop": [3]}, r"stop\[0\] must be a string"),
        ({"stop_token_ids": [5, -1]}, r"stop_token_ids\[1\] must be >= 0, got -1"),
        ({"seed": 2**64}, r"seed must be in"),
        ({"seed": "7"}, r"seed must be an integer"),
    ],
)
def test_validate_rejects(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs).validate()  # type: ignore[arg-type]


def test_sampler_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="one SamplingParams and one generator per row"):
        Sampler()(_logits(2), [SamplingParams()], [None, None])


# ------------------------------------------------------------- poison values and non-finite logits
# `temperature: 1e-300` and `top_p: 1e-300` are valid JSON but 0 in float32: they used to make the sampler
# raise (or assert on CUDA) on every step of their batch. They must behave as greedy / keep-the-top-token.


def test_poison_values_validate() -> None:
    for kwargs in (
        {"temperature": 1e-300},
        {"top_p": 1e-300},
        {"temperature": 1e300},
        {"temperature": 10**400 // 10**390},
    ):
        SamplingParams(**kwargs).validate()  # type: ignore[arg-type]


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-6, 9.99e-6])
def test_temperature_below_epsilon_is_greedy(temperature: float) -> None:
    p = SamplingParams(temperature=temperature, seed=3)
    assert p.is_greedy
    logits = _logits(4, seed=11)
    out = Sampler()(logits, [p] * 4, [make_generator(3) for _ in range(4)])
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))
    assert out.ok() == [True] * 4
    assert not SamplingParams(temperature=1e-5).is_greedy  # the epsilon itself samples (vLLM's rule)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("top_p", [1e-300, 5e-324, 1e-12, 1e-7])
def test_tiny_top_p_keeps_the_top_token(top_p: float, dtype: torch.dtype) -> None:
    logits = _logits(6, seed=12).to(dtype)
    params = [SamplingParams(temperature=1.0, top_p=top_p, seed=i) for i in range(6)]
    out = Sampler()(logits, params, [make_generator(i) for i in range(6)])
    assert torch.equal(out.token_ids, logits.float().argmax(dim=-1))
    assert out.ok() == [True] * 6


def test_tiny_top_p_keeps_ties_of_the_top_token() -> None:
    logits = torch.tensor([[2.0, 5.0, 5.0, 1.0]])
    draws = _draw_many(logits[0], SamplingParams(temperature=1.0, top_p=1e-300), 400)
    assert set(draws.tolist()) == {1, 2}


@pytest.mark.parametrize("temperature", [1e6, 1e30, 1e38, 1e39, 1e300, 10**400])
def test_huge_temperature_stays_finite(temperature: float) -> None:
    # 1e39 and above are inf in float32; a masked (-inf) logit divided by inf would be NaN
    logits = _logits(1, seed=13)
    logits[0, :4] = float("-inf")
    p = SamplingParams(temperature=temperature, top_k=20, top_p=0.9)
    draws = _draw_many(logits[0], p, 500)
    assert not set(draws.tolist()) & {0, 1, 2, 3}
    out = Sampler()(logits, [p], [make_generator(1)])
    assert out.ok() == [True] and math.isfinite(out.logprobs.item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("poison", ["nan", "one_nan", "inf", "all_-inf"])
def test_non_finite_row_fails_alone(poison: str, dtype: torch.dtype) -> None:
    logits = _logits(5, seed=14)
    bad_row = 2
    if poison == "nan":
        logits[bad_row] = float("nan")
    elif poison == "one_nan":
        logits[bad_row, 7] = float("nan")
    elif poison == "inf":
        logits[bad_row, 3] = float("inf")
    else:
        logits[bad_row] = float("-inf")
    logits[4, :10] = float("-inf")  # a row with masked tokens is fine
    logits = logits.to(dtype)
    params = [
        SamplingParams(),
        SamplingParams(temperature=0.8, seed=1),
        SamplingParams(temperature=0.9, top_k=5, top_p=0.7, seed=2),  # the bad row samples: must not raise
        SamplingParams(temperature=1.2, top_p=0.5, seed=3),
        SamplingParams(),
    ]
    out = Sampler()(logits, params, [make_generator(p.seed) for p in params])
    assert out.ok() == [True, True, False, True, True]
    good = [0, 1, 3, 4]
    assert torch.isfinite(out.logprobs[good]).all()
    ref = logits.float()
    assert out.token_ids[0] == ref[0].argmax() and out.token_ids[4] == ref[4].argmax()
    # the good sampled rows drew what they draw without the bad neighbour
    for row in (1, 3):
        alone = Sampler()(logits[row : row + 1], [params[row]], [make_generator(params[row].seed)])
        assert alone.token_ids.item() == out.token_ids[row].item()


def test_large_logits_do_not_overflow_logprobs() -> None:
    logits = torch.tensor([[3e38, -3e38, 0.0, 1e38], [-3e38, -3e38, -3e38, -3e38]])
    params = [SamplingParams(temperature=2.0, seed=1), SamplingParams(temperature=1e-2, top_p=0.5, seed=2)]
    out = Sampler()(logits, params, [make_generator(1), make_generator(2)])
    assert out.ok() == [True, True]
    assert out.token_ids[0].item() == 0 and torch.isfinite(out.logprobs).all()
