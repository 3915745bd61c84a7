"""Decode memory through the whole disaggregated path (router → prefill + decode processes, Mooncake):
admission by need lets many long-context chats run at once, and retraction under a small pool changes no output.

The transfer backend plays no part in decode admission, so one backend is enough here (both are covered by the
other end-to-end tests, and conditional disaggregation's).
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import torch
import transformers

from engine.builtin import resolve_model
from harness.observe import RunningSampler, counter, most_at_once, scrape_metric
from harness.sse import sse_data
from harness.stack import MODEL, Stack, find_key

CONTEXT = 4096  # tiny-llama's max_position_embeddings: a chat without max_tokens may run this long
PAGE = 16
TOPICS = ["foxes", "rivers", "the moon", "old maps", "bread", "trains", "winter", "music"]


@pytest.fixture(scope="module")
def hf():
    path = resolve_model(MODEL)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return tok, model


def chat(topic: str) -> list[dict]:
    return [{"role": "user", "content": f"Tell me a long story about {topic}."}]


def reference_with_stop(hf, messages: list[dict]) -> tuple[str, str | None]:
    """transformers' greedy reply (to its EOS, at most 90 tokens), and a stop string from its middle that first
    appears after 50 tokens (None when there is none): the server must return the reply cut there."""
    tok, model = hf
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=90, do_sample=False)[0, len(ids) :].tolist()
    text = tok.decode(out, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    if len(out) < 70:
        return text, None
    # Every reply must last long enough that all 32 are decoding together: at least 50 tokens before the stop
    floor = len(tok.decode(out[:50], skip_special_tokens=True, clean_up_tokenization_spaces=False))
    for k in range(60, 86):  # three whole tokens of readable text (a byte-level token may be half a character)
        stop = tok.decode(out[k : k + 3], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if stop.strip() and "\ufffd" not in stop and text.find(stop) >= floor:
            return text[: text.find(stop)], stop
    return text, None


async def stream_chat(client: httpx.AsyncClient, url: str, messages: list[dict], stop: str | None) -> dict:
    """One streamed chat without max_tokens: its text and when its first and last chunk came."""
    body = {"model": MODEL, "messages": messages, "temperature": 0, "stream": True, "stop": stop}
    text, first, finish = "", None, None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as r:
        assert r.status_code == 200, await r.aread()
        async for data in sse_data(r):
            if data == "[DONE]":
                continue
            for choice in json.loads(data).get("choices", []):
                first = first or time.monotonic()
                text += choice["delta"].get("content") or ""
                finish = choice.get("finish_reason") or finish
    return {"text": text, "first": first, "last": time.monotonic(), "finish": finish}


def metric(url: str, name: str) -> float:
    """A decode-server metric once the scheduler's next stats went out (it publishes them every 0.5 s)."""
    time.sleep(0.7)
    return scrape_metric(url, name)


def admissions(url: str) -> tuple[float, float]:
    """The decode server's admissions so far, and those that came within 1 s of the request's arrival."""
    time.sleep(0.7)  # the scheduler publishes its metrics every 0.5 s
    text = httpx.get(f"{url}/metrics", timeout=10).text
    name, labels = "pdserve_request_stage_seconds", ('role="decode"', 'stage="decode_admit"')
    return counter(text, f"{name}_count", *labels), counter(text, f"{name}_bucket", *labels, 'le="1.0"')


def wait_idle(stack: Stack) -> None:
    deadline = time.monotonic() + 15
    while (used := stack.kv_pages_used()) != {"prefill": 0, "decode": 0} and time.monotonic() < deadline:
        time.sleep(0.3)
    assert used == {"prefill": 0, "decode": 0}, used


def test_32_long_context_chats_run_at_once_and_match_transformers(hf):
    # 1024 pages of 16 tokens: reserving each chat's whole context (4096 tokens, 256 pages) would run 4 at a time
    pages = 1024
    assert pages // (CONTEXT // PAGE) == 4
    stack = Stack("mooncake", decode_extra=["--kv-pages", str(pages), "--max-batch-size", "64"])
    try:
        refs = {t: reference_with_stop(hf, chat(t)) for t in TOPICS}

        async def run(topics: list[str]) -> list[dict]:
            async with httpx.AsyncClient() as client:
                return await asyncio.gather(
                    *(stream_chat(client, stack.router_url, chat(t), refs[t][1]) for t in topics)
                )

        # A fresh server's estimate is conservative (0.7 of a 4096-token budget); finished chats teach it
        warm = asyncio.run(run(TOPICS))
        assert [r["text"] for r in warm] == [refs[t][0] for t in TOPICS]
        ratio = metric(stack.decode_url, "pdserve_headroom_ratio")
        assert 0 < ratio < 0.2, ratio
        topics = [TOPICS[i % len(TOPICS)] for i in range(32)]
        admits_before = admissions(stack.decode_url)
        sampler = RunningSampler(stack.decode_url, every_s=0.1)  # the decode scheduler's own count
        sampler.start()
        results = asyncio.run(run(topics))
        running = sampler.stop()
        for t, r in zip(topics, results, strict=True):
            assert r["text"] == refs[t][0], t
            assert r["finish"] == "stop"  # the stop string, or EOS before it
        # No chat waited for pages: each was admitted within a second of reaching the decode server (reserving whole
        # contexts would admit 4 and keep the rest waiting for whole chats to end, seconds each).
        admitted, within_1s = (a - b for a, b in zip(admissions(stack.decode_url), admits_before, strict=True))
        assert admitted == within_1s == 32, (admitted, within_1s)
        # So they ran together: as the clients saw it (streaming between first and last chunk) or as the server
        # counted. Not necessarily all 32: under load the prefill can hand over the last ones after the first ended.
        most = max(most_at_once(results), max(running))
        assert most >= 16, (most_at_once(results), max(running))  # four times what reserving contexts allows
        assert metric(stack.decode_url, "pdserve_retractions_total") == 0  # the estimate was right: no retraction
        wait_idle(stack)
    finally:
        stack.stop()


def test_forced_retraction_changes_no_output_and_frees_every_page(hf):
    # 24 pages of 16 tokens hold the eight prompts, not their 70 new tokens each; no headroom kept at admission
    decode = ["--kv-pages", "24", "--init-headroom-ratio", "0", "--min-headroom-ratio", "0", "--mixed-chunk-size", "32"]
    stack = Stack("mooncake", decode_extra=decode)
    tok, model = hf
    try:
        prompts = [f"Once upon a time, {t} were" for t in TOPICS]
        seeded = {"temperature": 0.8, "top_p": 0.95}

        def body(i: int) -> dict:
            # greedy ones end at EOS as transformers' do; seeded ones run their 70 tokens
            sp = {"max_new_tokens": 70, "temperature": 0}
            if i % 2:
                sp |= seeded | {"seed": 1000 + i, "ignore_eos": True}
            return {"text": prompts[i], "sampling_params": sp}

        async def run(indices: list[int]) -> list[list[int]]:
            async with httpx.AsyncClient() as client:
                rs = await asyncio.gather(
                    *(client.post(f"{stack.router_url}/generate", json=body(i), timeout=600) for i in indices)
                )
            for r in rs:
                assert r.status_code == 200, r.text
            return [r.json()["output_ids"] for r in rs]

        together = asyncio.run(run(list(range(8))))
        wait_idle(stack)
        retractions = metric(stack.decode_url, "pdserve_retractions_total")
        assert retractions > 0
        for i in range(0, 8, 2):  # greedy: transformers' tokens
            ids = tok(prompts[i], add_special_tokens=False).input_ids
            with torch.no_grad():
                want = model.generate(torch.tensor([ids]), max_new_tokens=70, do_sample=False)
            assert together[i] == want[0, len(ids) :].tolist(), i
        for i in range(1, 8, 2):  # seeded: the same tokens as alone (one at a time: the pool suffices)
            (alone,) = asyncio.run(run([i]))
            assert together[i] == alone, i
        assert metric(stack.decode_url, "pdserve_retractions_total") == retractions
        wait_idle(stack)
        info = httpx.get(f"{stack.decode_url}/server_info", timeout=5).json()
        assert find_key(info, "kv_pages_total") == 24
    finally:
        stack.stop()
