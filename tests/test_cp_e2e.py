"""Context-parallel prefill through the whole disaggregated path: router → prefill (`--cp-size 2`, two rank
processes on gloo) + decode, both transfer backends. Greedy output is token-exact with transformers for fresh
prompts, a prompt under 2·cp tokens (which runs whole), chunked prompts and prompts on a cached prefix; both
ranks push KV (each its share of the heads), and the bytes sent equal a CP=1 run's; a CP rank killed mid-prefill
ends every request and frees decode's pages."""

from __future__ import annotations

import os
import threading
import time

import httpx
import pytest

from harness.stack import Stack
from pdserve.cli import forwarded_argv
from tests.test_pipeline_e2e import metric
from tests.test_serving_e2e import reference  # noqa: F401 (fixture)
from tests.test_tp_e2e import FAST, rank_pid, wait_pages_free

SYSTEM = "You are a careful assistant. Answer in one short sentence, and never make anything up. "
PROMPTS = [
    "Hi",  # 2 tokens: under 2·cp, so its batch runs whole on both ranks
    "The quick brown fox jumps over the lazy dog.",
    SYSTEM + "What is a hobbit?",  # > 64 tokens: three chunks of 32, the later ones on their own cached prefix
    SYSTEM + "Where do hobbits live?",  # the shared system prompt's whole pages come from the prefix cache
]
CHUNKED = ["--chunked-prefill-size", "32"]


def cp_stack(backend: str, cp: int, extra: list[str] | None = None) -> Stack:
    # every prompt through the prefill server: the router would prefill short ones on decode itself
    return Stack(backend, extra=FAST, prefill_extra=["--cp-size", str(cp), *CHUNKED, *(extra or [])],
                 router_extra=["--local-prefill-max-tokens", "0"])  # fmt: skip


def run_prompts(stack: Stack, generate, text_ids) -> float:
    """Each prompt alone (so a short one falls back alone), then all of them as one batch; returns the KV bytes
    the prefill sent."""
    for prompt in PROMPTS:
        body = {"text": prompt, "sampling_params": {"max_new_tokens": 10, "temperature": 0}}
        r = httpx.post(f"{stack.router_url}/generate", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["output_ids"] == generate(text_ids(prompt), 10), prompt
    body = {"text": PROMPTS, "sampling_params": {"max_new_tokens": 6, "temperature": 0}}
    r = httpx.post(f"{stack.router_url}/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert [o["output_ids"] for o in r.json()] == [generate(text_ids(t), 6) for t in PROMPTS]
    wait_pages_free(stack)
    text = httpx.get(f"{stack.prefill_url}/metrics", timeout=10).text
    return metric(text, "pdserve_kv_transfer_bytes_total", 'role="prefill"')


@pytest.mark.parametrize("backend", ["mooncake", "nixl"])
def test_cp2_generation_matches_transformers(backend, reference):  # noqa: F811
    generate, text_ids, _, _ = reference
    # mooncake runs the layer-pipelined send (each rank sends each group's share after its event), nixl whole
    pipelined = backend == "mooncake"
    flags = ["--pipeline-min-tokens", "1", "--pipeline-group-size", "2"] if pipelined else []
    stack = cp_stack(backend, 2, flags)
    try:
        info = httpx.get(f"{stack.prefill_url}/server_info", timeout=5).json()
        assert (info["cp_size"], info["tp_size"]) == (2, 1)
        sent = run_prompts(stack, generate, text_ids)
        text = httpx.get(f"{stack.prefill_url}/metrics", timeout=10).text
        role = 'role="prefill"'
        assert metric(text, "pdserve_cp_batches_total", role) > 0
        assert metric(text, "pdserve_cp_fallbacks_total", 'reason="short_sequence",role="prefill"') > 0
        assert metric(text, "pdserve_cached_prompt_tokens_total", role) > 0
        # both ranks wrote KV (their shares of the two KV heads), and nothing twice
        per_rank = [metric(text, "pdserve_kv_transfer_rank_bytes_total", f'{role},tp_rank="{r}"') for r in range(2)]
        assert all(b > 0 for b in per_rank) and sum(per_rank) == sent, per_rank
        if pipelined:
            assert metric(text, "pdserve_prefill_batches_total", 'mode="pipelined"') > 0
    finally:
        stack.stop()
    if backend == "mooncake":  # the same requests at CP=1 send exactly as many bytes
        single = cp_stack(backend, 1, flags)
        try:
            assert run_prompts(single, generate, text_ids) == sent
        finally:
            single.stop()


def test_cp_rank_killed_mid_prefill_ends_every_request():
    """Kill CP rank 1 while long prompts are being prefilled and sent (slow emulated link): the prefill server goes
    down whole, every request ends (an answer or an error, no hang) and decode's pages all come back."""
    stack = cp_stack("mooncake", 2, ["--emulated-link-gbps", "0.0005"])
    try:
        results: list[object] = []

        def one(i: int) -> None:
            body = {"text": f"{SYSTEM} {i} " * 3, "sampling_params": {"max_new_tokens": 8, "temperature": 0}}
            try:
                results.append(httpx.post(f"{stack.router_url}/generate", json=body, timeout=90).status_code)
            except httpx.HTTPError as e:
                results.append(type(e).__name__)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.5)
        assert len(results) < 4, "every request ended before the kill: the test would prove nothing"
        victim = stack.proc("prefill")
        os.kill(rank_pid(victim, 1), 9)
        for t in threads:
            t.join(timeout=90)
        assert not any(t.is_alive() for t in threads), "a request hung"
        assert len(results) == 4 and any(r != 200 for r in results), results
        victim.proc.wait(timeout=30)  # the whole prefill server went down with its rank
        wait_pages_free(stack, ("decode",), timeout=60)
    finally:
        stack.stop()


def test_launch_passes_cp_size_to_prefill_only():
    assert forwarded_argv(["--cp-size", "2"]) == {"prefill": ["--cp-size", "2"], "decode": [], "router": []}
