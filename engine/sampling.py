"""Token sampling: per-request sampling parameters and a batched sampler.

The sampler turns one step's logits ``[B, V]`` into one token per row. Each row carries its own
:class:`SamplingParams` and, for seeded requests, its own ``torch.Generator``, so a seeded request
draws the same tokens no matter which other requests happen to share its batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from engine.device import read_to_host, to_device

__all__ = ["GREEDY_BELOW", "NON_FINITE_LOGITS", "SampleOutput", "Sampler", "SamplingParams", "make_generator"]

# torch.Generator.manual_seed accepts exactly this range; checking it in validate() turns a late
# RuntimeError inside the engine loop into a clear 400-style error at request admission.
_SEED_MIN = -(2**63)
_SEED_MAX = 2**64 - 1

# A temperature below this is greedy (vLLM's _SAMPLING_EPS). Below it the sampling distribution is argmax
# up to ties anyway, and a value such as 1e-300 is 0 in float32: dividing by it gave NaN probabilities,
# which made multinomial raise (or assert on CUDA) on every step of the request's batch.
GREEDY_BELOW = 1e-5
# Temperatures above this sample as if it were this (the distribution is uniform over the kept tokens long
# before): a larger one is inf in float32, and -inf / inf (a masked logit) is NaN.
_MAX_TEMPERATURE = 1e30
# top_p is used as at least this: a tiny top_p (1e-300 is 0 in float32) keeps the top token (and its
# ties), never an empty set. Any vocabulary under 10**6 tokens has a top probability >= 1e-6.
_TOP_P_FLOOR = 1e-6

NON_FINITE_LOGITS = "the model produced non-finite logits (NaN or inf) for this request"


def _is_int(value: object) -> bool:
    # bool is a subclass of int, but `"top_k": true` in a request is a client bug, not a 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(name: str, value: object) -> float:
    """`value` as a finite float, or ValueError naming `name`. Python's json accepts NaN, Infinity and
    integers of any length (float() of a 400-digit one overflows), so each is a client error here."""
    if not _is_real(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        f = float(value)  # type: ignore[arg-type]
    except OverflowError:
        raise ValueError(f"{name} must be a finite number, got an integer too large for a float") from None
    if not math.isfinite(f):
        raise ValueError(f"{name} must be a finite number, got {f}")
    return f


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 => greedy
    top_k: int = -1  # <= 0 => disabled
    top_p: float = 1.0  # 1.0 => disabled
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)  # stop strings: matched by the caller, only validated here
    ignore_eos: bool = False

    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending field if any parameter is out of range.

        Called once at request admission; the sampler itself does not re-validate on every step.
        """
        self._check_numbers()
        self._check_seed()
        self._check_stops()
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a boolean, got {self.ignore_eos!r}")

    def _check_numbers(self) -> None:
        if not _is_int(self.max_new_tokens):
            raise ValueError(f"max_new_tokens must be an integer, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

        # Any finite temperature >= 0 is accepted: below GREEDY_BELOW it is greedy, above _MAX_TEMPERATURE
        # it samples as that (see the constants), so no value reaches the sampler as 0, inf or NaN.
        if _finite("temperature", self.temperature) < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")

        if not _is_int(self.top_k):
            raise ValueError(f"top_k must be an integer, got {self.top_k!r}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disabled) or >= 1, got {self.top_k}")

        if not 0 < _finite("top_p", self.top_p) <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p}")

    def _check_seed(self) -> None:
        if self.seed is None:
            return
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or null, got {self.seed!r}")
        if not _SEED_MIN <= self.seed <= _SEED_MAX:
            raise ValueError(f"seed must be in [-2**63, 2**64 - 1], got {self.seed}")

    def _check_stops(self) -> None:
        if not isinstance(self.stop_token_ids, (list, tuple)):
            raise ValueError(f"stop_token_ids must be a list of integers, got {type(self.stop_token_ids).__name__}")
        for i, tok in enumerate(self.stop_token_ids):
            if not _is_int(tok):
                raise ValueError(f"stop_token_ids[{i}] must be an integer, got {tok!r}")
            if tok < 0:
                raise ValueError(f"stop_token_ids[{i}] must be >= 0, got {tok}")

        # A bare string is what OpenAI clients send for a single stop; the caller must normalise it to a
        # list first, otherwise we would silently treat each character as a stop string.
        if not isinstance(self.stop, (list, tuple)):
            raise ValueError(f"stop must be a list of strings, got {type(self.stop).__name__}")
        for i, s in enumerate(self.stop):
            if not isinstance(s, str):
                raise ValueError(f"stop[{i}] must be a string, got {s!r}")
            if not s:
                raise ValueError(f"stop[{i}] must be a non-empty string")

    @property
    def is_greedy(self) -> bool:
        # top_k == 1 leaves a single candidate, so sampling would be argmax anyway; treating it as
        # greedy keeps such rows on the cheap path and consumes no random numbers. `not >=` also sends
        # an unvalidated NaN down the greedy path rather than into the sampler.
        return not self.temperature >= GREEDY_BELOW or self.top_k == 1


@dataclass
class SampleOutput:
    """One step's sampled rows, on the host (read back from the device in one transfer)."""

    tokens: list[int]
    token_logprobs: list[float]  # log_softmax of the RAW logits at the chosen token
    # False where the row's logits were not usable (NaN, +inf, or all -inf); that row's token and logprob
    # are meaningless and its request must fail (NON_FINITE_LOGITS). None: all usable.
    finite: list[bool] | None = None

    @property
    def token_ids(self) -> torch.Tensor:
        return torch.tensor(self.tokens, dtype=torch.int64)

    @property
    def logprobs(self) -> torch.Tensor:
        return torch.tensor(self.token_logprobs, dtype=torch.float32)

    def ok(self) -> list[bool]:
        return [True] * len(self.tokens) if self.finite is None else list(self.finite)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """Create the per-request generator for ``seed`` (``None`` => use the default RNG).

    Must be created once per request, on the device the logits live on, and reused for every step:
    re-seeding each step would repeat the same random number at every position.
    """
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


class Sampler:
    """Batched sampler: greedy rows by argmax, the rest by temperature / top-k / top-p sampling."""

    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
    ) -> SampleOutput:
        if logits.dim() != 2:
            raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
        batch = logits.shape[0]
        if len(params) != batch or len(generators) != batch:
            raise ValueError(
                f"need one SamplingParams and one generator per row: logits has {batch} rows, "
                f"got {len(params)} params and {len(generators)} generators"
            )

        # float32 throughout: bf16/fp16 softmax and cumsum lose enough precision to shift the top-p
        # cut-off and to make reported logprobs differ from what other servers report.
        logits = logits.float()
        # A row whose max is not finite holds a NaN (max propagates it), a +inf, or nothing but -inf: no
        # distribution to sample from. Zero it so that nothing below can raise or assert on it (CUDA's
        # multinomial asserts on NaN, which would take down every request of the process); the caller
        # fails that row's request and the rest of the batch goes on.
        finite = torch.isfinite(logits.amax(dim=-1))
        logits = logits.masked_fill(~finite.unsqueeze(1), 0.0)
        # Logprobs are reported for the raw distribution (OpenAI/vLLM convention), not the
        # temperature-scaled / truncated one we actually sample from.
        raw_logprobs = torch.log_softmax(logits, dim=-1)

        # argmax over the whole batch is one kernel; for mixed batches we overwrite the sampled rows
        # afterwards, which is cheaper than gathering the greedy rows out first.
        token_ids = torch.argmax(logits, dim=-1)

        sampled_rows = [i for i, p in enumerate(params) if not p.is_greedy]
        if sampled_rows:
            token_ids = token_ids.clone()
            sampled_ids = self._sample(
                logits,
                sampled_rows,
                [params[i] for i in sampled_rows],
                [generators[i] for i in sampled_rows],
            )
            rows = to_device(sampled_rows, torch.long, logits.device)
            token_ids.index_copy_(0, rows, sampled_ids)

        chosen_logprobs = raw_logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
        # A chosen token always has a finite raw logprob (only a -inf logit has none, and it is never
        # chosen); checked anyway, since a non-finite logprob cannot even be written as JSON.
        finite &= torch.isfinite(chosen_logprobs)
        # The step's one device->host read: tokens, logprobs and the finite mask travel together (float64
        # holds every token id exactly). Each separate read would be another wait for the GPU.
        ids, logprobs, ok = read_to_host(torch.stack([token_ids.double(), chosen_logprobs.double(), finite.double()]))
        return SampleOutput(tokens=[int(t) for t in ids], token_logprobs=logprobs, finite=[f != 0 for f in ok])

    @staticmethod
    def _sample(
        logits: torch.Tensor,
        rows: list[int],
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
    ) -> torch.Tensor:
        """Sample one token for each of ``rows``; returns ``[len(rows)]`` int64 on the logits' device.

        Every step here is row-wise, so a row's result depends only on its own logits, params and
        generator, never on its batch neighbours. That is what makes seeded requests reproducible.
        """
        device = logits.device
        vocab = logits.shape[1]
        for g in generators:
            # A generator on the wrong device would make multinomial fail with an opaque error (or
            # silently use a different stream after a move), so reject it up front.
            if g is not None and g.device.type != device.type:
                raise ValueError(f"generator is on {g.device}, but logits are on {device}")

        index = to_device(rows, torch.long, device)
        x = logits.index_select(0, index)
        # Rows here have temperature >= GREEDY_BELOW (is_greedy), so T is never 0 in float32; the cap keeps
        # it finite. min() before float(): a huge Python int would overflow float().
        temps = to_device([float(min(p.temperature, _MAX_TEMPERATURE)) for p in params], torch.float32, device)
        # Subtract the row max before dividing: with a small temperature, logits / T can overflow to inf
        # (softmax -> NaN), whereas (logits - max) / T only underflows towards -inf, which is harmless.
        x = (x - x.max(dim=-1, keepdim=True).values) / temps.unsqueeze(1)

        # Top-k. We mask by value (keep every logit >= the k-th largest) rather than by sorted position:
        # the k-th largest *value* does not depend on how ties are ordered, so the kept set is the same
        # whatever kmax the neighbours force on torch.topk. Ties at the boundary are all kept (as in
        # HF/vLLM), which matters for bf16 logits where exact ties are common.
        # top_k >= vocab keeps everything, so it counts as disabled (and must not size the topk call).
        ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
        kmax = max(ks)
        if kmax > 0:
            top_vals = torch.topk(x, kmax, dim=-1, sorted=True).values
            # Disabled rows read column 0 (any valid index) and are overridden to -inf just below.
            k_idx = to_device([max(k - 1, 0) for k in ks], torch.long, device)
            kth = top_vals.gather(1, k_idx.unsqueeze(1))
            disabled = to_device([k == 0 for k in ks], torch.bool, device)
            kth = kth.masked_fill(disabled.unsqueeze(1), float("-inf"))
            x = x.masked_fill(x < kth, float("-inf"))

        # Softmax after top-k so top-p works on the renormalised top-k distribution (vLLM order).
        probs = torch.softmax(x, dim=-1)

        # Top-p: keep the smallest prefix of tokens (by descending prob) whose cumulative prob reaches
        # top_p. A token is in the prefix iff the mass strictly before it is still < top_p; the top token
        # always qualifies (mass before it is 0 and top_p > 0). As with top-k we then cut by value,
        # keeping everything >= the last kept prob, so tie order cannot change the kept set.
        if any(p.top_p < 1.0 for p in params):
            sorted_probs = torch.sort(probs, dim=-1, descending=True).values
            cum = torch.cumsum(sorted_probs, dim=-1)
            # Exclusive cumsum by shifting rather than cum - p: subtraction reintroduces rounding that can
            # flip a comparison right at the boundary. cumsum of non-negatives is non-decreasing, so the
            # kept positions form a prefix and their count locates the cut-off.
            mass_before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=-1)
            top_ps = to_device([float(max(min(p.top_p, 1.0), _TOP_P_FLOOR)) for p in params], torch.float32, device)
            # At least the top token, whatever rounding did: n_keep == 0 would gather at index -1 (an
            # error on CPU, a device assert on CUDA) and leave an empty nucleus.
            n_keep = (mass_before < top_ps.unsqueeze(1)).sum(dim=-1, keepdim=True).clamp_(min=1)
            threshold = sorted_probs.gather(1, n_keep - 1)
            # Rows with top_p == 1 keep everything: float rounding in cum could otherwise drop the tail.
            threshold = threshold.masked_fill((top_ps >= 1.0).unsqueeze(1), 0.0)
            # Exactly 0, so multinomial can never pick a token outside the nucleus.
            probs = probs.masked_fill(probs < threshold, 0.0)

        probs = probs / probs.sum(dim=-1, keepdim=True)

        # One multinomial per row because each row may have its own generator. Each draw sees the full,
        # vocab-ordered [V] row, so the random numbers consumed depend only on this row (multinomial with
        # one sample draws V exponentials internally). No .item(): keep it free of host syncs.
        draws = [torch.multinomial(probs[j], 1, generator=g) for j, g in enumerate(generators)]
        return torch.cat(draws)
