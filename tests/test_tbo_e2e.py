"""Two-batch overlap through the whole disaggregated path: router → prefill (TP2) + decode (TP2), both with
`--enable-two-batch-overlap`, every rank its own process; greedy output token-exact with transformers and the
overlapped forwards counted on both servers (two-chunk splits on the prefill)."""

from __future__ import annotations

import httpx

from tests.test_pipeline_e2e import metric
from tests.test_serving_e2e import PROMPTS, reference  # noqa: F401 (fixture)
from tests.test_tp_e2e import tp_stack, wait_pages_free


def generated_ids(url: str, texts: list[str], new_tokens: int) -> list[list[int]]:
    """Greedy output ids of one `/generate` batch of `texts` at `url` (a router or a server), in order."""
    body = {"text": texts, "sampling_params": {"max_new_tokens": new_tokens, "temperature": 0}}
    r = httpx.post(f"{url}/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return [o["output_ids"] for o in r.json()]


LONG = "In a hole in the ground there lived a hobbit, and it was a hobbit-hole, which means comfort. " * 3


def test_tp2_overlap_through_prefill_and_decode_matches_transformers(reference):  # noqa: F811
    generate, text_ids, _, _ = reference
    flags = ["--enable-two-batch-overlap"]
    stack = tp_stack("mooncake", 2, 2, extra=flags, router_extra=["--local-prefill-max-tokens", "0"])
    try:
        # one batch of uneven prompts (split by sequences or two-chunk), then a long prompt alone (two-chunk)
        for texts in (PROMPTS, [LONG]):
            assert generated_ids(stack.router_url, texts, 8) == [generate(text_ids(t), 8) for t in texts]
        wait_pages_free(stack)
        for url, role in ((stack.prefill_url, "prefill"), (stack.decode_url, "decode")):
            text = httpx.get(f"{url}/metrics", timeout=10).text
            assert metric(text, "pdserve_tbo_steps_total", f'role="{role}"') > 0, role
        text = httpx.get(f"{stack.prefill_url}/metrics", timeout=10).text
        assert metric(text, "pdserve_tbo_two_chunk_steps_total", 'role="prefill"') > 0
    finally:
        stack.stop()
