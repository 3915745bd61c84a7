"""DP attention through the whole disaggregated path: router → prefill (TP2, DP2) + decode (TP2, DP2), every rank its
own process, each rank serving the requests it owns (bootstrap room mod 2) and running IDLE steps while the other
rank has work; with two-batch overlap off and on, greedy output is token-exact with transformers, IDLE steps are
counted on both servers, every rank's pages come back, and /server_info reports the DP size."""

from __future__ import annotations

import httpx
import pytest

from tests.test_pipeline_e2e import metric
from tests.test_serving_e2e import PROMPTS, reference  # noqa: F401 (fixture)
from tests.test_tbo_e2e import generated_ids
from tests.test_tp_e2e import tp_stack, wait_pages_free

DP = ["--dp-size", "2", "--enable-dp-attention"]


@pytest.mark.parametrize("tbo", [False, True], ids=["plain", "tbo"])
def test_dp2_attention_through_prefill_and_decode_matches_transformers(tbo, reference):  # noqa: F811
    generate, text_ids, _, _ = reference
    flags = [*DP, *(["--enable-two-batch-overlap"] if tbo else [])]
    backend = "nixl" if tbo else "mooncake"
    stack = tp_stack(backend, 2, 2, extra=flags, router_extra=["--local-prefill-max-tokens", "0"])
    try:
        for url in (stack.prefill_url, stack.decode_url):
            info = httpx.get(f"{url}/server_info", timeout=5).json()
            assert (info["tp_size"], info["dp_size"]) == (2, 2)
        # a batch spread over both ranks of each server, then single prompts: one rank runs IDLE meanwhile
        for texts in (PROMPTS, PROMPTS[:1], PROMPTS[1:2]):
            assert generated_ids(stack.router_url, texts, 8) == [generate(text_ids(t), 8) for t in texts]
        # no bootstrap fields (the router's local-prefill path): the decode rank owning the rid prefills it itself
        assert generated_ids(stack.decode_url, PROMPTS, 8) == [generate(text_ids(t), 8) for t in PROMPTS]
        wait_pages_free(stack)
        for url, role in ((stack.prefill_url, "prefill"), (stack.decode_url, "decode")):
            text = httpx.get(f"{url}/metrics", timeout=10).text
            assert metric(text, "pdserve_dp_idle_steps_total", f'role="{role}"') > 0, role
            if tbo:
                assert metric(text, "pdserve_tbo_steps_total", f'role="{role}"') > 0, role

        # both prefill ranks own rooms and write their KV. A room's owner is room mod 2 and the router draws rooms at
        # random, so the six prompts so far may all have gone to one rank (1 in 32): send single prompts, each still
        # token-exact, until both ranks wrote (16 more leave a 2^-16 chance of a false failure)
        def rank_bytes() -> list[float]:
            text = httpx.get(f"{stack.prefill_url}/metrics", timeout=10).text
            name = "pdserve_kv_transfer_rank_bytes_total"
            return [metric(text, name, f'role="prefill",tp_rank="{r}"') for r in (0, 1)]

        for _ in range(16):
            if all(rank_bytes()):
                break
            assert generated_ids(stack.router_url, PROMPTS[:1], 8) == [generate(text_ids(PROMPTS[0]), 8)]
            wait_pages_free(stack)
        assert all(wrote := rank_bytes()), wrote  # read again: the last extra prompt counts too
    finally:
        stack.stop()


@pytest.mark.parametrize("side", ["prefill", "decode"])
def test_dp_attention_on_one_side_serves_a_tp_peer(side, reference):  # noqa: F811
    """DP attention on one server only: a DP prefill's owner rank writes a TP2 decode's two ranks their heads; a TP2
    prefill's two ranks write each DP decode rank (a one-rank decode) its heads of the room."""
    generate, text_ids, _, _ = reference
    stack = tp_stack("mooncake", 2, 2, router_extra=["--local-prefill-max-tokens", "0"], **{f"{side}_extra": DP})
    try:
        assert generated_ids(stack.router_url, PROMPTS, 6) == [generate(text_ids(t), 6) for t in PROMPTS]
        wait_pages_free(stack)
    finally:
        stack.stop()
