"""Layer-pipelined prefill end to end (DESIGN §4): greedy parity through the router with pipelining forced
on for short prompts, both backends; and the same KV bytes landing on decode as the whole-forward path."""

from __future__ import annotations

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
from prefill_server.forward import prefill_and_send
from tests.test_serving_e2e import PROMPTS, reference  # noqa: F401 (fixture)
from transfer.bootstrap import BootstrapServer
from transfer.config import Timeouts, TransferConfig
from transfer.planner import PipelineSettings
from transfer.prefill import PrefillTransferManager
from transfer.protocol import TransferState

BACKENDS = ["mooncake", "nixl"]


def metric(text: str, name: str, labels: str) -> float:
    m = re.search(rf"^{name}{{{labels}}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_pipelined_generation_matches_transformers(backend, reference):  # noqa: F811
    generate, text_ids, _, _ = reference
    # tiny-llama has 6 layers; min_tokens 1 makes every prompt eligible, group size 2 -> 3 groups
    stack = Stack(backend, prefill_extra=["--pipeline-min-tokens", "1", "--pipeline-group-size", "2"])
    try:
        for prompt in PROMPTS:
            body = {"text": prompt, "sampling_params": {"max_new_tokens": 16, "temperature": 0}}
            r = httpx.post(f"{stack.router_url}/generate", json=body, timeout=120)
            assert r.status_code == 200, r.text
            assert r.json()["output_ids"] == generate(text_ids(prompt), 16), prompt
        text = httpx.get(f"{stack.prefill_url}/metrics", timeout=10).text
        assert metric(text, "pdserve_prefill_batches_total", 'mode="pipelined"') >= len(PROMPTS)
        assert metric(text, "pdserve_prefill_batches_total", 'mode="whole"') == 0
    finally:
        stack.stop()


@pytest.mark.parametrize("backend", BACKENDS)
def test_pipelined_and_whole_paths_land_the_same_bytes(backend, model_factory):
    """One prompt prefilled twice by the real prefill code, whole then pipelined, into two sets of decode
    pages: every page of every layer must hash the same."""
    path = model_factory("llama", 31, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2)
    engine = Engine(EngineConfig(model=str(path), device="cpu", page_size=4, num_pages=64))
    layout: KVLayout = engine.pool.layout
    boot = BootstrapServer("127.0.0.1", 0).start()
    addr = f"127.0.0.1:{boot.port}"
    mgr = PrefillTransferManager(TransferConfig(backend=backend), engine.pool, bootstrap_addr=addr)
    decode = PeerProc(role="decode", backend=backend, num_layers=layout.num_layers, page_size=layout.page_size,
                      num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim, num_pages=64)  # fmt: skip
    try:
        prompt = torch.randint(0, 512, (37,), generator=torch.Generator().manual_seed(5)).tolist()
        n_pages = engine.pool.pages_for(len(prompt))
        hashes = []
        for room, settings in ((1, PipelineSettings(enabled=False)), (2, PipelineSettings(min_tokens=1, group_size=2))):
            dst = decode.call("alloc", room=room, n=n_pages)["pages"]
            decode.call("create", room=room, bootstrap_addr=addr, prompt_len=len(prompt))
            sender = mgr.create_sender(room)
            decode.wait_state(room, {"WAITING_FOR_INPUT"}, 10)
            while not sender.ready:
                pass
            req = engine.make_request(prompt, SamplingParams(max_new_tokens=1))
            req.pages = engine.pool.allocator.allocate(n_pages)
            _, groups = prefill_and_send(engine, [req], [sender], [room], settings)
            assert len(groups) == (1 if room == 1 else 3)
            out = decode.wait_state(room, {"SUCCESS", "FAILED"}, 20)
            assert out["state"] == "SUCCESS", out
            assert sender.poll() == TransferState.SUCCESS
            hashes.append(decode.call("hash", pages=dst)["hashes"])
            sender.release()
            engine.pool.allocator.free(req.pages)
            decode.release(room)
        assert hashes[0] == hashes[1]
    finally:
        decode.close()
        mgr.close()
        boot.stop()


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_dying_mid_pipeline_fails_cleanly(backend, model_factory):
    path = model_factory("llama", 31, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2)
    engine = Engine(EngineConfig(model=str(path), device="cpu", page_size=4, num_pages=64))
    layout: KVLayout = engine.pool.layout
    boot = BootstrapServer("127.0.0.1", 0).start()
    addr = f"127.0.0.1:{boot.port}"
    timeouts = Timeouts(transferring=5, abort_ack=5)
    mgr = PrefillTransferManager(TransferConfig(backend=backend, timeouts=timeouts), engine.pool, bootstrap_addr=addr)
    decode = PeerProc(role="decode", backend=backend, num_layers=layout.num_layers, page_size=layout.page_size,
                      num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim, num_pages=64)  # fmt: skip
    try:
        prompt = list(range(3, 43))
        n_pages = engine.pool.pages_for(len(prompt))
        decode.call("alloc", room=7, n=n_pages)
        decode.call("create", room=7, bootstrap_addr=addr, prompt_len=len(prompt))
        sender = mgr.create_sender(7)
        decode.wait_state(7, {"WAITING_FOR_INPUT"}, 10)
        deadline = time.monotonic() + 10
        while not sender.ready and time.monotonic() < deadline:
            time.sleep(0.01)

        # the decode process dies after the first layer group ran: later groups go to a dead peer
        model, calls = engine.runner.model, []
        real_run_layers = model.run_layers

        def run_layers(*args, **kwargs):
            calls.append(args[2:4])
            if len(calls) == 2:
                time.sleep(0.2)  # let group 1's write go out first
                decode.kill()
            return real_run_layers(*args, **kwargs)

        model.run_layers = run_layers
        req = engine.make_request(prompt, SamplingParams(max_new_tokens=1))
        req.pages = engine.pool.allocator.allocate(n_pages)
        _, groups = prefill_and_send(engine, [req], [sender], [7], PipelineSettings(min_tokens=1, group_size=2))
        assert len(groups) == 3 and len(calls) == 3

        deadline = time.monotonic() + 30
        while not (sender.poll() == TransferState.FAILED and sender.safe_to_free()):
            assert sender.poll() != TransferState.SUCCESS, "a dead decode cannot have received everything"
            assert time.monotonic() < deadline, f"stuck in {sender.poll().name}"
            time.sleep(0.05)
        sender.release()
        engine.pool.allocator.free(req.pages)
        assert engine.pool.allocator.num_free == engine.pool.num_pages
        assert mgr.live_rooms() == 0 and mgr.aux.num_free == mgr.aux.rows
    finally:
        decode.close()
        mgr.close()
        boot.stop()
