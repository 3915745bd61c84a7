"""The whole disaggregated path: router → prefill + decode, each a separate process, both backends.

Greedy output must equal transformers' `generate` on the same weights, token for token.
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
from harness.stack import MODEL, Stack

BACKENDS = ["mooncake", "nixl"]
PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog.",
    "In a hole in the ground there lived a hobbit. Not a nasty, dirty, wet hole, filled with the ends of worms",
    "1 2 3 4 5",
]


@pytest.fixture(scope="module", params=BACKENDS)
def stack(request):
    s = Stack(request.param)
    yield s
    try:
        # every page is back once nothing is in flight
        deadline = time.monotonic() + 10
        while (used := s.kv_pages_used()) != {"prefill": 0, "decode": 0} and time.monotonic() < deadline:
            time.sleep(0.5)
        assert used == {"prefill": 0, "decode": 0}, used
    finally:
        s.stop()


@pytest.fixture(scope="module")
def reference():
    path = resolve_model(MODEL)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def generate(prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False)
        return out[0, len(prompt_ids) :].tolist()

    def text_ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False).input_ids

    def chat_ids(messages: list[dict]) -> list[int]:
        return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)

    def decode(ids: list[int]) -> str:
        return tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    return generate, text_ids, chat_ids, decode


def sse_events(body: str) -> list[dict]:
    events = []
    for line in body.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            events.append(json.loads(line[len("data: ") :]))
    assert body.rstrip().endswith("data: [DONE]"), body[-200:]
    return events


def test_generate_matches_transformers(stack, reference):
    generate, text_ids, _, _ = reference
    for prompt in PROMPTS:
        body = {"text": prompt, "sampling_params": {"max_new_tokens": 24, "temperature": 0}}
        r = httpx.post(f"{stack.router_url}/generate", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["output_ids"] == generate(text_ids(prompt), 24), prompt


@pytest.mark.parametrize("stream", [False, True])
def test_completions_match_transformers(stack, reference, stream):
    generate, text_ids, _, decode = reference
    for prompt in PROMPTS[:3]:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 20, "temperature": 0, "stream": stream}
        r = httpx.post(f"{stack.router_url}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        if stream:
            text = "".join(e["choices"][0]["text"] for e in sse_events(r.text))
        else:
            out = r.json()
            text = out["choices"][0]["text"]
            assert out["usage"]["prompt_tokens"] == len(text_ids(prompt))
        assert text == decode(generate(text_ids(prompt), 20)), prompt


@pytest.mark.parametrize("stream", [False, True])
def test_chat_matches_transformers(stack, reference, stream):
    generate, _, chat_ids, decode = reference
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about foxes."}]
    body = {"model": MODEL, "messages": messages, "max_tokens": 20, "temperature": 0, "stream": stream}
    r = httpx.post(f"{stack.router_url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    if stream:
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in sse_events(r.text) if e.get("choices"))
    else:
        text = r.json()["choices"][0]["message"]["content"]
    assert text == decode(generate(chat_ids(messages), 20))


def test_sixteen_concurrent_requests_of_mixed_lengths(stack, reference):
    generate, text_ids, _, _ = reference
    prompts = [(PROMPTS[i % 4] + " ") * (1 + i % 5) for i in range(16)]
    lengths = [4 + (i * 7) % 29 for i in range(16)]

    async def one(client: httpx.AsyncClient, prompt: str, n: int) -> list[int]:
        body = {"text": prompt, "sampling_params": {"max_new_tokens": n, "temperature": 0}}
        r = await client.post(f"{stack.router_url}/generate", json=body, timeout=300)
        assert r.status_code == 200, r.text
        return r.json()["output_ids"]

    async def run() -> list[list[int]]:
        async with httpx.AsyncClient() as client:
            return await asyncio.gather(*(one(client, p, n) for p, n in zip(prompts, lengths, strict=True)))

    outputs = asyncio.run(run())
    for prompt, n, out in zip(prompts, lengths, outputs, strict=True):
        assert out == generate(text_ids(prompt), n)


def test_openai_client(stack, reference):
    openai = pytest.importorskip("openai")
    generate, _, chat_ids, decode = reference
    client = openai.OpenAI(base_url=f"{stack.router_url}/v1", api_key="unused")
    messages = [{"role": "user", "content": "Say something."}]
    want = decode(generate(chat_ids(messages), 16))
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    assert reply.choices[0].message.content == want
    chunks = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_sglang_router_in_front_of_pdserve(stack, reference):
    pytest.importorskip("sglang_router")
    generate, text_ids, _, decode = reference
    url = stack.start_sglang_router()
    for prompt in PROMPTS[:2]:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 16, "temperature": 0}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == decode(generate(text_ids(prompt), 16))
        r = httpx.post(
            f"{url}/generate",
            json={"text": prompt, "sampling_params": {"max_new_tokens": 16, "temperature": 0}},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        assert r.json()["output_ids"] == generate(text_ids(prompt), 16)


BAD_INPUTS = [
    ("/v1/completions", b"{not json", "json"),
    ("/v1/completions", {"model": MODEL}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": 42}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, "empty"),
    ("/v1/completions", {"model": MODEL, "prompt": "x " * 5000, "max_tokens": 8}, "context"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": -1}, "temperature"),
    ("/v1/completions", {"model": "gpt-17", "prompt": "hi"}, "model"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 3}, "n"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}, "messages"),
    ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": "lots"}}, "max_new_tokens"),
]


@pytest.mark.parametrize(("path", "body", "word"), BAD_INPUTS, ids=[f"{p}:{w}" for p, _, w in BAD_INPUTS])
def test_bad_input_gets_a_clear_4xx(stack, path, body, word):
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {
        "json": body}  # fmt: skip
    r = httpx.post(f"{stack.router_url}{path}", timeout=60, **kwargs)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    err = r.json()["error"]
    assert word in err["message"].lower(), err
    # the servers are still healthy
    for url in (stack.prefill_url, stack.decode_url):
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200


def test_client_disconnect_aborts_on_both_servers(stack):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 3000, "temperature": 0, "stream": True,
            "ignore_eos": True}  # fmt: skip
    with httpx.stream("POST", f"{stack.router_url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # one token arrived: the request is decoding; now walk away
    # 3000 tokens take far longer than this: only an abort frees the pages this fast
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        loads = [httpx.get(f"{u}/get_load", timeout=5).json()["load"] for u in (stack.prefill_url, stack.decode_url)]
        if loads == [0, 0] and stack.kv_pages_used() == {"prefill": 0, "decode": 0}:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"request still running after the client left: loads {loads}, {stack.kv_pages_used()}")


def test_server_endpoints(stack):
    for url in (stack.prefill_url, stack.decode_url):
        # a real tiny generation on the server alone, no bootstrap fields
        assert httpx.get(f"{url}/health_generate", timeout=60).status_code == 200
        assert httpx.get(f"{url}/v1/models", timeout=5).json()["data"][0]["id"] == MODEL
        # the scheduler's stats come every 0.5 s: the load seen just after health_generate may still count it
        deadline = time.monotonic() + 3
        while (load := httpx.get(f"{url}/get_load", timeout=5).json()) != {"load": 0} and time.monotonic() < deadline:
            time.sleep(0.1)
        assert load == {"load": 0}
        for path in ("/server_info", "/get_server_info", "/model_info", "/get_model_info"):
            assert httpx.get(f"{url}{path}", timeout=5).status_code == 200, path
    assert httpx.get(f"{stack.router_url}/health", timeout=5).status_code == 200
    text = httpx.get(f"{stack.router_url}/metrics", timeout=5).text
    assert "pdserve_time_to_first_token_seconds" in text
