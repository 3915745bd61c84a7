"""Chunked prefill and the prefix cache end to end: token-exact with transformers through router + prefill + decode
(real processes, both transfer backends), the same KV bytes on decode as a whole-prompt prefill, and the metrics
counting what was reused."""

from __future__ import annotations

import hashlib
import re
import time

import httpx
import pytest
import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.kvcache.pool import KVLayout
from engine.sampling import SamplingParams
from harness.peer_proc import PeerProc
from harness.stack import Stack
from prefill_server.forward import PrefillRow, prefill_rows, send_cached_prefix
from tests.test_serving_e2e import reference  # noqa: F401 (fixture)
from transfer.bootstrap import BootstrapServer
from transfer.config import TransferConfig
from transfer.planner import PipelineSettings
from transfer.prefill import PrefillTransferManager
from transfer.protocol import TransferState

BACKENDS = ["mooncake", "nixl"]
CHUNK = 32  # two pages of tiny-llama's 16


def metric(text: str, name: str) -> float:
    m = re.search(rf'^{name}{{role="prefill"}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def page_hashes(engine: Engine, pages: list[int]) -> list[list[str]]:
    """What the decode peer's `hash` command gives, of this prefill's own pages: sha1 of each (region, page)."""

    def digest(t: torch.Tensor) -> str:
        return hashlib.sha1(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()

    return [[digest(t[p]) for p in pages] for t in (*engine.pool.k, *engine.pool.v)]


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_and_cached_prompts_match_transformers(backend, reference):  # noqa: F811
    """Prompts of 1, 2.5 and 4 chunks, layer-pipelined inside each chunk; then the same prompts again and one
    sharing the longest's first four pages, served from the cache. Every answer equals transformers'."""
    generate = reference[0]
    flags = ["--chunked-prefill-size", str(CHUNK), "--pipeline-min-tokens", "1", "--pipeline-group-size", "2"]
    stack = Stack(backend, prefill_extra=flags)
    prompts = [ids(CHUNK, 1), ids(CHUNK * 5 // 2, 2), ids(CHUNK * 4, 3)]
    shared = prompts[2][:64] + ids(20, 4)
    try:

        def check(prompt: list[int]) -> None:
            body = {"input_ids": prompt, "sampling_params": {"max_new_tokens": 8, "temperature": 0}}
            r = httpx.post(f"{stack.router_url}/generate", json=body, timeout=120)
            assert r.status_code == 200, r.text
            assert r.json()["output_ids"] == generate(prompt, 8), len(prompt)

        for p in prompts:
            check(p)
        before = httpx.get(f"{stack.prefill_url}/metrics", timeout=10).text
        assert metric(before, "pdserve_prefill_chunks_total") == 3 + 4  # 80 tokens: 32+32+16; 128: 4 x 32
        assert metric(before, "pdserve_cached_prompt_tokens_total") == 0
        for p in [*prompts, shared]:
            check(p)
        after = httpx.get(f"{stack.prefill_url}/metrics", timeout=10).text
        # each repeat reuses every whole page but the one holding its last token; `shared` its first four pages
        assert metric(after, "pdserve_cached_prompt_tokens_total") == 16 + 64 + 112 + 64
        assert metric(after, "pdserve_prompt_tokens_total") == 2 * sum(map(len, prompts)) + len(shared)
        assert metric(after, "pdserve_prefix_cache_pages") > 0
        info = httpx.get(f"{stack.prefill_url}/server_info", timeout=10).json()
        assert info["chunked_prefill_size"] == CHUNK and info["prefix_cache"] is True
    finally:
        stack.stop()


@pytest.mark.timeout(300)
def test_disable_prefix_cache_computes_every_prompt(reference):  # noqa: F811
    generate = reference[0]
    stack = Stack("mooncake", prefill_extra=["--disable-prefix-cache", "--chunked-prefill-size", "0"])
    prompt = ids(70, 9)
    try:
        for _ in range(2):
            body = {"input_ids": prompt, "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
            r = httpx.post(f"{stack.router_url}/generate", json=body, timeout=120)
            assert r.status_code == 200 and r.json()["output_ids"] == generate(prompt, 4), r.text
        text = httpx.get(f"{stack.prefill_url}/metrics", timeout=10).text
        assert metric(text, "pdserve_cached_prompt_tokens_total") == 0
        assert metric(text, "pdserve_prompt_tokens_total") == 2 * len(prompt)
        assert metric(text, "pdserve_prefill_chunks_total") == 0
        info = httpx.get(f"{stack.prefill_url}/server_info", timeout=10).json()
        assert info["prefix_cache"] is False and info["chunked_prefill_size"] == 0
    finally:
        stack.stop()


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_and_cached_prefills_land_the_same_bytes(backend, model_factory):
    """One 37-token prompt into three sets of decode pages: whole; in chunks of 16/16/5, layer-pipelined; and with
    its first 8 tokens' pages taken from the second run (sent ahead of the forward) and the rest computed. Each run's
    decode pages hold exactly the bytes of the prefill pages it computed, page for page; the three prefills agree
    to float32 rounding (a 5-row matmul may round its last row differently from a 37-row one on CPU, so the chunked
    run's bytes are compared with the whole run's to a tolerance, not bit for bit) and sample the same token."""
    path = model_factory("llama", 31, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2)
    engine = Engine(EngineConfig(model=str(path), device="cpu", page_size=4, num_pages=64))
    for buf in engine.pool.k + engine.pool.v:  # the warm-up's KV: the last page's unused slots must match too
        buf.zero_()
    layout: KVLayout = engine.pool.layout
    boot = BootstrapServer("127.0.0.1", 0).start()
    addr = f"127.0.0.1:{boot.port}"
    mgr = PrefillTransferManager(TransferConfig(backend=backend), engine.pool, bootstrap_addr=addr)
    decode = PeerProc(role="decode", backend=backend, num_layers=layout.num_layers, page_size=layout.page_size,
                      num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim, num_pages=64)  # fmt: skip
    whole, piped = PipelineSettings(enabled=False), PipelineSettings(min_tokens=1, group_size=2)
    prompt = torch.randint(0, 512, (37,), generator=torch.Generator().manual_seed(5)).tolist()
    n_pages = engine.pool.pages_for(len(prompt))
    runs, tokens = [], []
    try:
        prefix_pages: list[int] = []
        for room, chunks, settings in ((1, [37], whole), (2, [16, 16, 5], piped), (3, [8, 29], whole)):
            dst = decode.call("alloc", room=room, n=n_pages)["pages"]
            decode.call("create", room=room, bootstrap_addr=addr, prompt_len=len(prompt))
            sender = mgr.create_sender(room)
            decode.wait_state(room, {"WAITING_FOR_INPUT"}, 10)
            deadline = time.monotonic() + 10
            while not sender.ready and time.monotonic() < deadline:
                time.sleep(0.01)
            req = engine.make_request(prompt, SamplingParams(max_new_tokens=1))
            start = 0
            if room == 3:  # the "cached" prefix: run 2's first two pages, already computed
                req.pages = prefix_pages + engine.pool.allocator.allocate(n_pages - 2)
                start = chunks.pop(0)
            else:
                req.pages = engine.pool.allocator.allocate(n_pages)
                send_cached_prefix(engine, PrefillRow(req, sender, room, start, chunks[0]))
            for n in chunks:
                result = prefill_rows(engine, [PrefillRow(req, sender, room, start, n)], settings)
                start += n
            assert result.sample is not None
            tokens.append(result.sample.tokens)
            out = decode.wait_state(room, {"SUCCESS", "FAILED"}, 20)
            assert out["state"] == "SUCCESS", out
            assert sender.poll() == TransferState.SUCCESS
            assert decode.call("hash", pages=dst)["hashes"] == page_hashes(engine, req.pages), room
            runs.append(list(req.pages))
            sender.release()
            if room == 2:
                prefix_pages = req.pages[:2]
            decode.release(room)
        for buf in engine.pool.k + engine.pool.v:
            for pages in runs[1:]:
                torch.testing.assert_close(buf[pages], buf[runs[0]], rtol=0, atol=1e-5)
        assert tokens[0] == tokens[1] == tokens[2]
    finally:
        decode.close()
        mgr.close()
        boot.stop()
