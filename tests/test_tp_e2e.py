"""Tensor parallelism through the whole disaggregated path: router → prefill (TP p) + decode (TP d), every rank
its own process (gloo on CPU), both transfer backends, greedy output token-exact with transformers through
the `openai` client; a rank that dies takes its server down and every request still ends.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from harness.stack import MODEL, Proc, Stack, find_key
from serving.launch import RANK_ENV
from tests.test_pipeline_e2e import metric
from tests.test_serving_e2e import PROMPTS, reference  # noqa: F401 (fixture)

BACKENDS = ["mooncake", "nixl"]
# (prefill TP, decode TP); (1, 1) is every other e2e test. tiny-llama has 2 KV heads: TP2 splits them.
LAYOUTS = [(2, 2), (2, 1), (1, 2)]
# short transfer deadlines: the fault test must see a dead peer well within its bound
FAST = ["--heartbeat-interval", "0.5", "--transfer-timeout", "20", "--dist-timeout", "20"]


def tp_stack(backend: str, p: int, d: int, extra: list[str] | None = None, **kw) -> Stack:
    return Stack(
        backend,
        extra=[*FAST, *(extra or [])],
        prefill_extra=["--tp-size", str(p), *kw.pop("prefill_extra", [])],
        decode_extra=["--tp-size", str(d), *kw.pop("decode_extra", [])],
        **kw,
    )


def wait_pages_free(stack: Stack, names: tuple[str, ...] = ("prefill", "decode"), timeout: float = 30) -> None:
    urls = {"prefill": stack.prefill_url, "decode": stack.decode_url}
    deadline = time.monotonic() + timeout
    while True:
        used = {n: find_key(httpx.get(f"{urls[n]}/server_info", timeout=5).json(), "kv_pages_used") for n in names}
        if not any(used.values()):
            return
        assert time.monotonic() < deadline, f"pages still held: {used}"
        time.sleep(0.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("p", "d"), LAYOUTS, ids=[f"P{p}-D{d}" for p, d in LAYOUTS])
def test_tp_generation_matches_transformers(backend, p, d, reference):  # noqa: F811
    generate, text_ids, chat_ids, decode = reference
    # P2-D2 runs the layer-pipelined prefill (every prompt eligible, groups of 2 of the 6 layers: each rank
    # sends each group after its event); the others the whole forward
    pipelined = (p, d) == (2, 2)
    flags = ["--pipeline-min-tokens", "1", "--pipeline-group-size", "2"] if pipelined else []
    stack = tp_stack(backend, p, d, prefill_extra=flags)
    try:
        for url, tp in ((stack.prefill_url, p), (stack.decode_url, d)):
            assert httpx.get(f"{url}/server_info", timeout=5).json()["tp_size"] == tp
            assert httpx.get(f"{url}/model_info", timeout=5).json()["tp_size"] == tp
        client = openai.OpenAI(base_url=f"{stack.router_url}/v1", api_key="none", max_retries=0)
        for prompt in PROMPTS[:3]:
            out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
            assert out.choices[0].text == decode(generate(text_ids(prompt), 12)), prompt
        messages = [{"role": "user", "content": "Say something."}]
        chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
        assert chat.choices[0].message.content == decode(generate(chat_ids(messages), 10))
        # several prompts in one batch through /generate
        body = {"text": PROMPTS, "sampling_params": {"max_new_tokens": 8, "temperature": 0}}
        r = httpx.post(f"{stack.router_url}/generate", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert [o["output_ids"] for o in r.json()] == [generate(text_ids(t), 8) for t in PROMPTS]
        wait_pages_free(stack)
        # every prefill rank wrote its own KV (P2: two ranks' counters; total = their sum)
        text = httpx.get(f"{stack.prefill_url}/metrics", timeout=10).text
        per_rank = [metric(text, "pdserve_kv_transfer_rank_bytes_total", f'role="prefill",tp_rank="{r}"')
                    for r in range(p)]  # fmt: skip
        assert all(b > 0 for b in per_rank), per_rank
        assert sum(per_rank) == metric(text, "pdserve_kv_transfer_bytes_total", 'role="prefill"')
        batches = {m: metric(text, "pdserve_prefill_batches_total", f'mode="{m}"') for m in ("pipelined", "whole")}
        assert (batches["pipelined"] > 0, batches["whole"] > 0) == (pipelined, not pipelined), batches
    finally:
        stack.stop()


@pytest.mark.parametrize(("backend", "p", "d"), [("mooncake", 2, 1), ("nixl", 1, 2)])
def test_tp_replicated_kv_heads(backend, p, d):
    """One KV head: at TP2 both ranks of a side hold it (replicated); the other side must still get it once."""
    import torch
    import transformers

    from engine.builtin import resolve_model

    model = "builtin:tiny-llama-mqa"
    path = resolve_model(model)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    stack = tp_stack(backend, p, d, model=model)
    try:
        for prompt in PROMPTS[:3]:
            ids = tok(prompt, add_special_tokens=False).input_ids
            with torch.no_grad():
                want = ref.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False)[0, len(ids) :].tolist()
            body = {"text": prompt, "sampling_params": {"max_new_tokens": 10, "temperature": 0}}
            r = httpx.post(f"{stack.router_url}/generate", json=body, timeout=120)
            assert r.status_code == 200, r.text
            assert r.json()["output_ids"] == want, prompt
        wait_pages_free(stack)
    finally:
        stack.stop()


def rank_pid(proc: Proc, rank: int) -> int:
    """The pid of the scheduler process of `rank` in a server's process tree."""
    for pid in proc.pids():
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"{RANK_ENV}={rank}".encode() in env:
            return pid
    raise AssertionError(f"no rank {rank} process under {proc.name}")


@pytest.mark.parametrize("side", ["prefill", "decode"])
def test_rank_killed_mid_transfer(side):
    """Kill rank 1 of one server while requests are in flight (slow emulated link): that server goes down
    whole, every request ends (an answer or an error, no hang), and the other server's pages all come back."""
    # 0.0005 Gbit/s: each prompt's KV (~100 KB) takes over a second on the wire, so the kill lands mid-transfer
    stack = tp_stack("mooncake", 2, 2, prefill_extra=["--emulated-link-gbps", "0.0005"])
    try:
        results: list[object] = []

        def one(i: int) -> None:
            body = {"text": f"{PROMPTS[2]} {i}", "sampling_params": {"max_new_tokens": 8, "temperature": 0}}
            try:
                results.append(httpx.post(f"{stack.router_url}/generate", json=body, timeout=90).status_code)
            except httpx.HTTPError as e:
                results.append(type(e).__name__)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.5)
        assert len(results) < 4, "every request ended before the kill: the test would prove nothing"
        victim = stack.proc(side)
        os.kill(rank_pid(victim, 1), 9)
        t0 = time.monotonic()
        for t in threads:
            t.join(timeout=90)
        assert not any(t.is_alive() for t in threads), "a request hung"
        assert len(results) == 4
        assert any(r != 200 for r in results), results  # the killed server's requests failed
        # the whole server went down: its front exits once any rank died
        victim.proc.wait(timeout=30)
        assert time.monotonic() - t0 < 60
        survivor = "decode" if side == "prefill" else "prefill"
        wait_pages_free(stack, (survivor,), timeout=60)
        # the router no longer sends work there: a new request is refused at once, naming the server
        body = {"text": "after", "sampling_params": {"max_new_tokens": 2}}
        r = httpx.post(f"{stack.router_url}/generate", json=body, timeout=30)
        assert r.status_code in (502, 503), r.text
    finally:
        stack.stop()
