"""Tensor parallelism in the engine, on CPU (gloo) with real processes: `pdserve generate --tp-size 2` token-exact
with transformers for each family, the layer-range forward at TP=2, the KV heads each rank's pool holds,
per-rank weight memory, impossible splits, and ranks that die, raise or hang."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.sampling import SamplingParams

PROMPTS = ["Hi", "The quick brown fox jumps over the lazy dog", "def main():\n    return 4 * 8 + len('x' * 3)\n" * 2]
NEW_TOKENS = 16
# (family, seed, overrides): qkv bias, o/down bias added once after the reduce, tied + padded vocabularies,
# a sliding window, replicated KV heads (tiny-llama-mqa: 1 KV head, 515 tokens)
MODELS = {
    "llama-bias-oddvocab": ("llama", 31, dict(attention_bias=True, mlp_bias=True, vocab_size=513)),
    "qwen2-tied-oddvocab": ("qwen2", 32, dict(tie_word_embeddings=True, vocab_size=517)),
    "mistral-window": ("mistral", 33, dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                                           sliding_window=12)),
    "tiny-llama-mqa": None,
}  # fmt: skip


def run_cli(*args: str, timeout: float = 240, log_level: str = "warning") -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pdserve", "--log-level", log_level, "generate", "--device", "cpu", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def model_path(name: str, model_factory) -> str:
    if MODELS[name] is None:
        from engine.builtin import resolve_model

        return str(resolve_model(f"builtin:{name}"))
    family, seed, overrides = MODELS[name]
    return str(model_factory(family, seed, **overrides))


@pytest.mark.parametrize("name", list(MODELS))
def test_generate_tp2_matches_transformers(name: str, model_factory):
    import transformers

    path = model_path(name, model_factory)
    prompts = [a for p in PROMPTS for a in ("--prompt", p)]
    # one model runs the start-up warm-up too (its forwards are collectives like any other)
    warm = ["--max-prefill-tokens", "64"] if name == "mistral-window" else ["--skip-warmup"]
    # one model runs in a pool too small for all three replies: both ranks retract the same request, in step
    retract = name == "llama-bias-oddvocab"
    small = ["--page-size", "4", "--kv-pages", "24", "--init-headroom-ratio", "0", "--min-headroom-ratio", "0"]
    proc = run_cli(*(small if retract else []), "--model", path, "--tp-size", "2", *prompts, "--json", "--ignore-eos",
                   "--max-new-tokens", str(NEW_TOKENS), *warm, log_level="info")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert ("KV pool full: retracted request" in proc.stderr) == retract, proc.stderr[-2000:]
    outs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(outs) == len(PROMPTS)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert len({len(o["prompt_token_ids"]) for o in outs}) == len(PROMPTS)  # different lengths, in order
    for out in outs:
        ids = torch.tensor([out["prompt_token_ids"]])
        with torch.no_grad():
            gen = ref.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        assert out["token_ids"] == gen[0, ids.shape[1] :].tolist(), name


# -- the engine at TP=2, driven by a test-side group of two spawned ranks ------------------------------------

LAYERS = 6
SPLITS = [[0, 6], [0, 1, 6], [0, 3, 4, 6], [0, 5, 6], list(range(7))]


def engine_config(path: str, tp_size: int) -> EngineConfig:
    return EngineConfig(model=path, device="cpu", page_size=4, num_pages=128, tp_size=tp_size, skip_warmup=True,
                        dist_timeout_s=5.0)  # fmt: skip


def batch_prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (9, 21, 4)]


def layer_range_forward(engine, prompts: list[list[int]], ranges: list[int], mode: str) -> tuple:
    """Logits of `prompts` (extend, or one decode token after them) run over the layer `ranges`, and each
    layer's K of the tokens written, from a fresh set of pages."""
    from engine.batch import ForwardMode

    alloc = engine.pool.allocator
    pages = [alloc.allocate(engine.pool.pages_for(len(p) + 1)) for p in prompts]
    batch = engine.runner.build_batch(prompts, [0] * len(prompts), pages)
    if mode == "decode":
        engine.runner.forward(batch)
        batch = engine.runner.build_batch([[7], [8], [9]], [len(p) for p in prompts], pages)
        assert batch.mode == ForwardMode.DECODE
    fwd = engine.runner.start_forward(batch)
    for a, b in itertools.pairwise(ranges):
        fwd.run_layers(a, b)
    logits = fwd.logits(all_tokens=True)
    slots = torch.cat([batch.kv_slots(i) for i in range(len(prompts))])
    pool = engine.pool  # token-major K of the slots, whatever the pool's page layout
    keys = [
        (pool.gather_k(i, slots) if hasattr(pool, "gather_k") else pool.flat_k(i)[slots]).clone() for i in range(LAYERS)
    ]
    for p in pages:
        alloc.free(p)
    return logits, keys


def _rank_main(rank: int, address: str, path: str, out_dir: str, scenario: str) -> None:
    """One rank of the test-side group; writes what it saw to out_dir/rank<r>.pt."""
    from engine.distributed import init_tp_group
    from engine.engine import Engine

    torch.set_num_threads(1)
    tp = init_tp_group(rank, 2, address, "cpu", timeout_s=5.0)
    engine = Engine(engine_config(path, 2), tp)
    out: dict = {"weight_bytes": engine.weight_bytes, "kv": (engine.pool.layout.kv_head_start,
                 engine.pool.layout.num_kv_heads, engine.pool.layout.total_kv_heads)}  # fmt: skip
    prompts = batch_prompts(engine.model_config.vocab_size)
    if scenario == "raise":
        if rank == 1:
            raise RuntimeError("rank 1 fails on purpose")
        t0 = time.monotonic()
        try:
            engine.generate(prompts, SamplingParams(max_new_tokens=8, ignore_eos=True))
        except Exception as e:
            out["error"], out["after_s"] = f"{type(e).__name__}: {e}", time.monotonic() - t0
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
        return
    for mode, ranges in itertools.product(("extend", "decode"), SPLITS):
        out[(mode, tuple(ranges))] = layer_range_forward(engine, prompts, ranges, mode)
    seeded = SamplingParams(max_new_tokens=8, ignore_eos=True, temperature=1.0, top_p=0.9, seed=1234)
    out["seeded"] = [o.token_ids for o in engine.generate(prompts, seeded)]
    out["unseeded"] = [o.token_ids for o in engine.generate(prompts, SamplingParams(max_new_tokens=8, temperature=1))]
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    # last: rank 1 hangs (alive, silent); rank 0's next collective must fail within the steady-state timeout
    if rank == 1:
        time.sleep(20)
        return
    t0 = time.monotonic()
    try:
        engine.generate(prompts[:1], SamplingParams(max_new_tokens=4, ignore_eos=True))
    except Exception as e:
        out["hang_error"], out["hang_after_s"] = f"{type(e).__name__}: {e}", time.monotonic() - t0
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    os._exit(0)  # leave rank 1 asleep; its own collective fails once it wakes


def run_group(path: str, out_dir: Path, scenario: str, limit_s: float = 180) -> list[dict]:
    """Run `_rank_main` on two spawned ranks until rank 0 exits; what each rank wrote (None: nothing)."""
    import torch.multiprocessing as tmp

    from engine.distributed import init_address

    ctx = tmp.start_processes(_rank_main, (init_address(), path, str(out_dir), scenario), nprocs=2, join=False,
                              start_method="spawn")  # fmt: skip
    deadline = time.monotonic() + limit_s
    try:
        while ctx.processes[0].is_alive():
            assert time.monotonic() < deadline, "rank 0 did not finish in time"
            time.sleep(0.2)
        assert ctx.processes[0].exitcode == 0, f"rank 0 exited with {ctx.processes[0].exitcode}"
    finally:
        for p in ctx.processes:
            p.kill()
            p.join()
    files = [out_dir / f"rank{r}.pt" for r in range(2)]
    return [torch.load(f, weights_only=False) if f.exists() else None for f in files]


@pytest.fixture(scope="module")
def tp_model(model_factory) -> str:
    overrides = dict(num_hidden_layers=LAYERS, hidden_size=128, intermediate_size=384, num_attention_heads=4,
                     num_key_value_heads=2)  # fmt: skip
    return str(model_factory("llama", 41, **overrides))


def test_tp2_layer_ranges_kv_heads_weights_sampling_and_a_hung_peer(tp_model: str, tmp_path: Path):
    from engine.engine import Engine

    ranks = run_group(tp_model, tmp_path, "ok")
    single = Engine(engine_config(tp_model, 1))
    prompts = batch_prompts(single.model_config.vocab_size)
    # per-rank weights: about half of one rank's (every matrix is split; only the norms are whole)
    for r in ranks:
        assert r["weight_bytes"] < 0.6 * single.weight_bytes
    # each pool holds its rank's KV heads of the model's 2
    assert [r["kv"] for r in ranks] == [(0, 1, 2), (1, 1, 2)]
    for mode in ("extend", "decode"):
        ref_logits, ref_keys = layer_range_forward(single, prompts, [0, LAYERS], mode)
        full = ranks[0][(mode, (0, LAYERS))]
        for r in ranks:
            for ranges in SPLITS:
                logits, keys = r[(mode, tuple(ranges))]
                assert torch.equal(logits, full[0]), (mode, ranges)  # any split is the whole TP=2 forward
                for k, k_full in zip(keys, full[1] if r is ranks[0] else r[(mode, (0, LAYERS))][1], strict=True):
                    assert torch.equal(k, k_full)
        # TP=2 agrees with one rank to rounding, and the same greedy tokens
        scale = ref_logits.abs().max()
        assert (full[0] - ref_logits).abs().max() <= 1e-5 * scale
        assert torch.equal(full[0].argmax(-1), ref_logits.argmax(-1))
        for rank, r in enumerate(ranks):  # rank r's pool holds KV head r of the single rank's pool
            for k, k_ref in zip(r[(mode, (0, LAYERS))][1], ref_keys, strict=True):
                torch.testing.assert_close(k, k_ref[:, rank : rank + 1], rtol=1e-5, atol=1e-5)
    # sampling: rank 0's tokens on every rank; seeded ones equal to one rank's
    assert ranks[0]["seeded"] == ranks[1]["seeded"] and ranks[0]["unseeded"] == ranks[1]["unseeded"]
    seeded = SamplingParams(max_new_tokens=8, ignore_eos=True, temperature=1.0, top_p=0.9, seed=1234)
    assert ranks[0]["seeded"] == [o.token_ids for o in single.generate(prompts, seeded)]
    # a peer that hangs: rank 0 fails within the steady-state timeout (5 s), not after start-up's 30 min
    assert "hang_error" in ranks[0] and ranks[0]["hang_after_s"] < 20, ranks[0].get("hang_error")


def test_a_rank_that_raises_fails_its_peer_promptly(tp_model: str, tmp_path: Path):
    (r0, _) = run_group(tp_model, tmp_path, "raise")
    assert "error" in r0 and r0["after_s"] < 20, r0
    assert "TPStepError" in r0["error"] or "RuntimeError" in r0["error"]


# -- impossible splits and dead ranks, through the CLI -------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, tp, words",
    [(dict(num_attention_heads=4, num_key_value_heads=2), 3, "does not divide the 4 attention heads"),
     (dict(num_attention_heads=4, num_key_value_heads=2), 8, "does not divide the 4 attention heads"),
     (dict(num_attention_heads=6, num_key_value_heads=3, hidden_size=96), 2, "does not divide the 3 KV heads"),
     (dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=162), 4, "intermediate_size 162")],
)  # fmt: skip
def test_impossible_split_is_a_clear_error_before_anything_starts(overrides, tp, words, model_factory, capsys):
    from pdserve.cli import main

    path = model_factory("llama", 51, **overrides)
    rc = main(["generate", "--model", str(path), "--device", "cpu", "--tp-size", str(tp), "--prompt", "x"])
    err = capsys.readouterr().err
    assert rc == 2 and words in err and f"--tp-size {tp}" in err, err


def test_impossible_split_through_the_cli_exits_2_at_once(model_factory):
    t0 = time.monotonic()
    proc = run_cli("--model", str(model_factory("llama", 52)), "--tp-size", "3", "--prompt", "x", timeout=60)
    assert proc.returncode == 2 and "does not divide the 4 attention heads" in proc.stderr, proc.stderr
    assert time.monotonic() - t0 < 60


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start_long_generate() -> tuple[subprocess.Popen, int]:
    """A TP=2 generate that runs for a while; returns it and its follower's pid once both ranks decode."""
    cmd = [sys.executable, "-m", "pdserve", "--log-level", "info", "generate", "--device", "cpu", "--model",
           "builtin:tiny-llama", "--tp-size", "2", "--dist-timeout", "10", "--skip-warmup", "--prompt", "x",
           "--max-new-tokens", "4000", "--ignore-eos"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    loaded = set()
    deadline = time.monotonic() + 120
    for line in proc.stderr:  # type: ignore[union-attr]
        if "engine.engine: loaded" in line:
            loaded.add("rank1" in line)
        if len(loaded) == 2 or time.monotonic() > deadline:
            break
    assert len(loaded) == 2, "the two ranks did not start"
    followers = [
        p for p in _children(proc.pid) if _alive(p) and b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()
    ]
    assert len(followers) == 1, followers
    time.sleep(1.0)  # well into decoding
    return proc, followers[0]


def test_killed_follower_fails_generate_promptly():
    proc, follower = _start_long_generate()
    try:
        os.kill(follower, signal.SIGKILL)
        t0 = time.monotonic()
        rc = proc.wait(timeout=60)
        assert rc != 0 and time.monotonic() - t0 < 30
    finally:
        proc.kill()
        proc.wait()


def test_killed_leader_takes_its_follower_down():
    proc, follower = _start_long_generate()
    try:
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 30
        while _alive(follower) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(follower), "the follower outlived its leader"
    finally:
        if _alive(follower):
            os.kill(follower, signal.SIGKILL)


def _stuck_in_a_named_place(rank: int, ready: str) -> None:
    Path(ready).write_text(str(rank))
    time.sleep(60)


def test_dump_stacks_shows_where_a_follower_is_stuck(tmp_path: Path, capfd: pytest.CaptureFixture[str]):
    """What `pdserve generate` prints when a follower is still running after rank 0 finished: its stacks."""
    from engine.distributed import dump_stacks, spawn_followers, stop_followers

    ready = tmp_path / "ready"
    procs = spawn_followers(_stuck_in_a_named_place, (str(ready),), 2)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert time.monotonic() < deadline and procs[0].is_alive(), "the follower did not start"
            time.sleep(0.05)
        dump_stacks(procs)
        assert procs[0].is_alive()  # asked, not stopped
        assert "_stuck_in_a_named_place" in capfd.readouterr().err
    finally:
        stop_followers(procs)
