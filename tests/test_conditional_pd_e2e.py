"""Conditional disaggregation end to end: router + prefill + decode as real processes, both transfer backends.

The router counts prompt tokens with the model's tokenizer (`--tokenizer`, as `pdserve launch` passes it) and sends
requests of at most LIMIT tokens to the decode server alone, which prefills them in its own batch; longer ones take
the prefill server and a KV transfer. Either way greedy output equals transformers' `generate` on the same weights,
token for token, and the decision shows in the X-PD-Prefill header, the router's pdserve_pd_decision_total and the
prefill server's own request count (it never sees a local request). One stack per backend for every case.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from engine.builtin import resolve_model
from harness.observe import counter, settle
from harness.stack import MODEL, Stack
from tests.test_serving_e2e import PROMPTS, reference, sse_events  # noqa: F401 (fixture)

pytestmark = pytest.mark.timeout(300)

BACKENDS = ["mooncake", "nixl"]
LIMIT = 24  # tokens; tiny-llama's tokenizer adds no BOS to text, so a prompt's ids are its text's
SHORT = [PROMPTS[0], PROMPTS[1], PROMPTS[3]]  # 2, 21 and 8 tokens
LONG = PROMPTS[2]  # 57 tokens
SHORT_CHAT = [{"role": "user", "content": "Say hi."}]  # 19 tokens with the template
LONG_CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about foxes."}]  # 38


class Counts:
    """What the test sent each way, to compare with what the router and the prefill server counted."""

    def __init__(self) -> None:
        self.local = self.remote = 0


@pytest.fixture(scope="module", params=BACKENDS)
def stack(request: pytest.FixtureRequest) -> Iterator[tuple[Stack, Counts]]:
    tokenizer = str(resolve_model(MODEL))
    s = Stack(request.param, router_extra=["--tokenizer", tokenizer, "--local-prefill-max-tokens", str(LIMIT)])
    counts = Counts()
    try:
        info = httpx.get(f"{s.router_url}/readiness", timeout=10).json()["local_prefill"]
        assert info == {"active": True, "local_prefill_max_tokens": LIMIT, "tokenizer": tokenizer}
        yield s, counts
        # the decisions as counted by the router, and the prefill server saw only the remote requests
        router = httpx.get(f"{s.router_url}/metrics", timeout=10).text
        assert counter(router, "pdserve_pd_decision_total", 'path="local"') == counts.local
        assert counter(router, "pdserve_pd_decision_total", 'path="remote"') == counts.remote

        def prefill_requests() -> list[float]:
            prefill = httpx.get(f"{s.prefill_url}/metrics", timeout=10).text
            return [counter(prefill, "pdserve_requests_total", 'role="prefill"')]

        assert settle(prefill_requests, counts.remote) == [counts.remote]
        deadline = time.monotonic() + 10  # every page back once nothing is in flight, on both servers
        while (used := s.kv_pages_used()) != {"prefill": 0, "decode": 0} and time.monotonic() < deadline:
            time.sleep(0.3)
        assert used == {"prefill": 0, "decode": 0}, used
    finally:
        s.stop()


def post(stack: tuple[Stack, Counts], path: str, body: dict[str, Any], want: str) -> httpx.Response:
    s, counts = stack
    r = httpx.post(f"{s.router_url}{path}", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert r.headers["x-pd-prefill"] == want, body
    if want == "local":
        counts.local += 1
    else:
        counts.remote += 1
    return r


def test_generate_local_and_remote_match_transformers(stack, reference):  # noqa: F811
    generate, text_ids, _, _ = reference
    for prompt, want in [*((p, "local") for p in SHORT), (LONG, "remote")]:
        body = {"text": prompt, "sampling_params": {"max_new_tokens": 16, "temperature": 0}}
        out = post(stack, "/generate", body, want).json()
        assert out["output_ids"] == generate(text_ids(prompt), 16), prompt
    # the boundary in token ids: LIMIT tokens local, one more remote
    ids = text_ids((LONG + " ") * 2)
    for n, want in ((LIMIT, "local"), (LIMIT + 1, "remote")):
        body = {"input_ids": ids[:n], "sampling_params": {"max_new_tokens": 8, "temperature": 0}}
        assert post(stack, "/generate", body, want).json()["output_ids"] == generate(ids[:n], 8)
    # a batch goes local only when every prompt is short
    for batch, want in ((SHORT, "local"), ([SHORT[0], LONG], "remote")):
        body = {"text": batch, "sampling_params": {"max_new_tokens": 8, "temperature": 0}}
        outs = post(stack, "/generate", body, want).json()
        assert [o["output_ids"] for o in outs] == [generate(text_ids(p), 8) for p in batch]


@pytest.mark.parametrize("stream", [False, True])
def test_openai_dialects_stream_or_not(stack, reference, stream):  # noqa: F811
    generate, text_ids, chat_ids, decode = reference
    for prompt, want in ((SHORT[1], "local"), (LONG, "remote")):
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": stream}
        r = post(stack, "/v1/completions", body, want)
        text = (
            "".join(e["choices"][0]["text"] for e in sse_events(r.text)) if stream else r.json()["choices"][0]["text"]
        )
        assert text == decode(generate(text_ids(prompt), 12)), (prompt, stream)
    for messages, want in ((SHORT_CHAT, "local"), (LONG_CHAT, "remote")):
        body = {"model": MODEL, "messages": messages, "max_tokens": 12, "temperature": 0, "stream": stream}
        r = post(stack, "/v1/chat/completions", body, want)
        if stream:
            events = sse_events(r.text)
            text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))
        else:
            text = r.json()["choices"][0]["message"]["content"]
        assert text == decode(generate(chat_ids(messages), 12)), (messages, stream)


def test_local_and_remote_side_by_side(stack, reference):  # noqa: F811
    """Short prompts prefilled in the decode batch while remote ones arrive by transfer: each still exact."""
    generate, text_ids, _, _ = reference
    s, counts = stack
    prompts = [[*SHORT, LONG][i % 4] + " " * (i // 4) for i in range(12)]
    lengths = [6 + (i * 5) % 13 for i in range(12)]

    async def one(client: httpx.AsyncClient, prompt: str, n: int) -> tuple[str, list[int]]:
        body = {"text": prompt, "sampling_params": {"max_new_tokens": n, "temperature": 0}}
        r = await client.post(f"{s.router_url}/generate", json=body, timeout=300)
        assert r.status_code == 200, r.text
        return r.headers["x-pd-prefill"], r.json()["output_ids"]

    async def run() -> list[tuple[str, list[int]]]:
        async with httpx.AsyncClient() as client:
            return await asyncio.gather(*(one(client, p, n) for p, n in zip(prompts, lengths, strict=True)))

    for prompt, n, (path, out) in zip(prompts, lengths, asyncio.run(run()), strict=True):
        assert path == ("local" if len(text_ids(prompt)) <= LIMIT else "remote"), prompt
        assert out == generate(text_ids(prompt), n), prompt
        counts.local += path == "local"
        counts.remote += path == "remote"
    assert counts.local > 0 and counts.remote > 0
