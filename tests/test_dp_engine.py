"""DP attention in the engine, on CPU (gloo, real processes): at --tp-size 2 --dp-size 2 each rank runs its own batch
(attention whole, the MLP tensor-parallel over both ranks' tokens) and gets the logits and KV a single-rank engine
gets for that batch, with two-batch overlap off and on, for batches that take each path (balanced, two-chunk, one
long sequence, MIXED beside EXTEND, MIXED beside DECODE, decode) and with one rank IDLE while the other prefills;
`Engine.generate` spreads the prompts over the ranks and is token-exact with transformers; and a rank that skips
its IDLE forward makes its peer's collective fail within the timeout (the test that would hang without IDLE)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.sampling import SamplingParams
from tests.test_cp_engine import run_two_ranks
from tests.test_tbo_engine import prompts_of

LAYERS = 3
# (new tokens, cached prefix, mixed) per rank; None: the rank has no batch this step (IDLE)
PAIRS = {
    "balanced|two-chunk": (([30, 20, 25, 26], [0, 0, 0, 0], False), ([6, 120], [0, 0], False)),
    "one-long|idle": (([90], [0], False), None),
    "idle|prefix": (None, ([10, 70], [12, 5], False)),
    "mixed|extend": (([1, 1, 40, 1], [9, 14, 0, 20], True), ([33, 7], [0, 0], False)),
    "mixed|decode": (([1, 1, 40, 1], [9, 14, 0, 20], True), ([1, 1, 1], [5, 9, 13], False)),
    "decode|decode-one": (([1, 1, 1, 1, 1], [5, 9, 13, 2, 7], False), ([1], [6], False)),
}
# the pairs whose step runs overlapped when TBO is on (MIXED and EXTEND agree; MIXED and DECODE do not)
OVERLAPPED = {"balanced|two-chunk", "one-long|idle", "idle|prefix", "mixed|extend", "decode|decode-one"}
GENERATE = [[3, 150, 40], [60], [44, 38, 200, 5]]  # [60]: one prompt, so rank 1 is IDLE for the whole run
NEW_TOKENS = 8


def engine_config(path: str, n: int, **kw) -> EngineConfig:
    dp = dict(tp_size=2, dp_size=2, enable_dp_attention=True) if n == 2 else {}
    return EngineConfig(model=path, device="cpu", page_size=4, num_pages=512, skip_warmup=True, dist_timeout_s=20.0,
                        chunked_prefill_size=64, **dp, **kw)  # fmt: skip


def forward(engine, batch):
    """One step's forward of this rank's `batch` (None: IDLE): logits, or None."""
    runner = engine.runner
    if runner.dp is None or batch is not None:
        return None if batch is None else runner.forward(batch)
    runner.idle_step(False)  # IDLE when another rank has a batch (when none has, no rank runs a forward)
    return None


def run_batch(engine, spec, tbo: bool, seed: int) -> dict:
    """Logits and every layer's KV of this rank's batch on fresh (poisoned) pages; cached prefixes are written by a
    plain forward first, in a step of their own on every rank."""
    runner, pool = engine.runner, engine.pool
    runner.tbo_threshold = None
    lens, prefixes, mixed = spec if spec is not None else ([], [], False)
    seqs = prompts_of([p + n for p, n in zip(prefixes, lens, strict=True)], engine.model_config.vocab_size, seed)
    pages = [pool.allocator.allocate(pool.pages_for(len(s))) for s in seqs]
    for layer in range(LAYERS):
        for buf in (pool.k[layer], pool.v[layer]):
            if pages:
                buf[torch.tensor([p for ps in pages for p in ps])] = 1e3
    cached = [i for i, p in enumerate(prefixes) if p]
    prefix_batch = None
    if cached:
        prefix_batch = runner.build_batch([seqs[i][: prefixes[i]] for i in cached], [0] * len(cached),
                                          [pages[i] for i in cached])  # fmt: skip
    forward(engine, prefix_batch)
    runner.tbo_threshold = 0.48 if tbo else None
    before = (runner.tbo_steps, runner.idle_steps)
    batch = None
    if seqs:
        batch = runner.build_batch([s[p:] for s, p in zip(seqs, prefixes, strict=True)], prefixes, pages, mixed=mixed)
    out = {"logits": forward(engine, batch), "overlapped": runner.tbo_steps - before[0]}
    out["idle"] = runner.idle_steps - before[1]
    slots = [batch.kv_slots(i) for i in range(len(seqs))] if batch is not None else []
    out["kv"] = [torch.stack([pool.gather_k(layer, torch.cat(slots)), pool.gather_v(layer, torch.cat(slots))])
                 for layer in range(LAYERS)] if slots else []  # fmt: skip
    for p in pages:
        pool.allocator.free(p)
    return out


def scenarios(engine, rank: int) -> dict:
    out = {}
    for i, (name, pair) in enumerate(PAIRS.items()):
        for tbo in (False, True):
            out[(name, tbo)] = run_batch(engine, pair[rank], tbo, seed=10 * i + rank)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    vocab = engine.model_config.vocab_size
    for tbo in (False, True):
        engine.runner.tbo_threshold = 0.48 if tbo else None
        before = engine.runner.idle_steps
        for i, lens in enumerate(GENERATE):
            out[("generate", tbo, i)] = [o.token_ids for o in engine.generate(prompts_of(lens, vocab, 100 + i), params)]
        out[("idle_steps", tbo)] = engine.runner.idle_steps - before
    return out


def _rank_main(rank: int, address: str, path: str, out_dir: str) -> None:
    from engine.distributed import init_tp_group
    from engine.engine import Engine

    torch.set_num_threads(1)
    group = init_tp_group(rank, 2, address, "cpu", timeout_s=20.0)
    engine = Engine(engine_config(path, 2, enable_two_batch_overlap=True), group)
    out = scenarios(engine, rank)
    out["kv_heads"] = (engine.pool.layout.kv_head_start, engine.pool.layout.num_kv_heads)
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def dp_model(model_factory) -> str:
    return str(model_factory("llama", 47, num_hidden_layers=LAYERS))


def test_dp2_ranks_give_single_rank_logits_and_exact_generation(dp_model: str, tmp_path: Path):
    import transformers

    from engine.engine import Engine

    ranks = run_two_ranks(_rank_main, dp_model, tmp_path, limit_s=300)
    assert [r["kv_heads"] for r in ranks] == [(0, 2), (0, 2)]  # each rank's pool holds every KV head
    single = Engine(engine_config(dp_model, 1))
    for i, (name, pair) in enumerate(PAIRS.items()):
        for rank, r in enumerate(ranks):
            ref = run_batch(single, pair[rank], False, seed=10 * i + rank) if pair[rank] is not None else None
            for tbo in (False, True):
                got = r[(name, tbo)]
                assert got["overlapped"] == (tbo and name in OVERLAPPED), (name, rank, tbo)
                assert got["idle"] == (pair[rank] is None), (name, rank)
                if ref is None:
                    assert got["logits"] is None
                    continue
                scale = ref["logits"].abs().max().item()
                torch.testing.assert_close(got["logits"], ref["logits"], atol=4e-6 * scale, rtol=1e-5)
                for a, b in zip(got["kv"], ref["kv"], strict=True):
                    torch.testing.assert_close(a, b, atol=4e-6 * b.abs().max().item(), rtol=1e-5)
    ref = transformers.AutoModelForCausalLM.from_pretrained(dp_model, dtype=torch.float32).eval()
    vocab = ref.config.vocab_size
    for i, lens in enumerate(GENERATE):
        for j, prompt in enumerate(prompts_of(lens, vocab, 100 + i)):
            with torch.no_grad():
                gen = ref.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                   do_sample=False)  # fmt: skip
            for tbo in (False, True):
                for r in ranks:  # every rank returns every prompt's output, in prompt order
                    assert r[("generate", tbo, i)][j] == gen[0, len(prompt) :].tolist(), (i, j, tbo)
    for tbo in (False, True):  # rank 1 has no prompt in the one-prompt batch: it ran IDLE steps meanwhile
        assert ranks[1][("idle_steps", tbo)] >= NEW_TOKENS


def _skip_idle_main(rank: int, address: str, path: str, out_dir: str) -> None:
    """Rank 1 has no batch and (wrongly) skips its IDLE forward: rank 0's first MLP gather waits for a peer that
    never comes, and must fail within the collective timeout instead of hanging."""
    import time

    from engine.distributed import init_tp_group
    from engine.engine import Engine

    torch.set_num_threads(1)
    group = init_tp_group(rank, 2, address, "cpu", timeout_s=3.0)
    engine = Engine(engine_config(path, 2), group)
    runner = engine.runner
    out: dict = {}
    if rank == 0:
        batch = runner.build_batch([[5, 6, 7]], [0], [engine.pool.allocator.allocate(1)])
        t0 = time.monotonic()
        try:
            runner.forward(batch)
            out["error"] = None
        except Exception as e:
            out["error"] = f"{type(e).__name__}: {e}"
        out["seconds"] = time.monotonic() - t0
    else:
        plan = runner.agree(None, False)  # the step's agreement happens; the IDLE forward does not
        out["idle"] = plan.is_idle
        time.sleep(8)  # stay alive past rank 0's timeout: its failure is the timeout, not a closed connection
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    # rank 0's timed-out gather is still held by a gloo worker thread: interpreter teardown would abort on it
    # ("terminate called without an active exception", SIGABRT), which is not what this test is about
    os._exit(0)


def test_a_rank_skipping_its_idle_forward_fails_its_peer_within_the_timeout(dp_model: str, tmp_path: Path):
    ranks = run_two_ranks(_skip_idle_main, dp_model, tmp_path, limit_s=120)
    assert ranks[1]["idle"] is True
    assert ranks[0]["error"] is not None and 2.5 < ranks[0]["seconds"] < 30, ranks[0]


@pytest.mark.parametrize("tbo", [False, True], ids=["plain", "tbo"])
def test_generate_cli_dp2_matches_transformers(dp_model: str, tbo: bool):
    """`pdserve generate --tp-size 2 --dp-size 2 --enable-dp-attention` with several --prompt as one batch: prompts
    spread over the ranks (3 prompts: one rank has two, the other one and then runs IDLE), the long one chunked, the
    answers in prompt order, each token-exact with transformers."""
    import json

    import transformers

    from tests.test_tp_engine import run_cli

    prompts = ["Hi!", "The quick brown fox jumps over the lazy dog", "def main():\n    return 4 * 8 + len('x')\n" * 3]
    new = 10
    argv = [a for p in prompts for a in ("--prompt", p)]
    flags = ["--enable-two-batch-overlap"] if tbo else []
    proc = run_cli("--model", dp_model, "--tp-size", "2", "--dp-size", "2", "--enable-dp-attention", *flags,
                   "--chunked-prefill-size", "32", "--page-size", "4", "--skip-warmup", *argv, "--json",
                   "--ignore-eos", "--max-new-tokens", str(new))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    outs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(outs) == 3 and len(outs[2]["prompt_token_ids"]) > 64
    ref = transformers.AutoModelForCausalLM.from_pretrained(dp_model, dtype=torch.float32).eval()
    for out, text in zip(outs, prompts, strict=True):
        ids = torch.tensor([out["prompt_token_ids"]])
        with torch.no_grad():
            gen = ref.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        assert out["token_ids"] == gen[0, ids.shape[1] :].tolist(), text


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(dp_size=2, tp_size=2), "needs --enable-dp-attention"),
        (dict(enable_dp_attention=True), "needs --dp-size N"),
        (dict(dp_size=2, tp_size=4, enable_dp_attention=True), "give both the same N"),
        (dict(dp_size=2, tp_size=2, enable_dp_attention=True, cp_size=2), "context"),
    ],
)
def test_bad_dp_settings_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**kw).validate()
