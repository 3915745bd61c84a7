"""A prefill or decode daemon killed (SIGKILL) under load and started again on the same ports, both backends.

What must hold (issue 10): every request ends within its deadline with an answer or a clean error (no hang, no
reset at the client); service is back within a few seconds of the restarted server being ready; every answer
that succeeds is the exact greedy answer; every KV page is back once the load stops.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import httpx
import pytest

from harness.stack import Stack

BACKENDS = ["mooncake", "nixl"]
PROMPTS = ["Hello", "The quick brown fox jumps over the lazy dog.", "1 2 3 4 5", "In a hole in the ground"]
# Short transfer deadlines and heartbeats so a lost peer is noticed in about a second, not in minutes.
SERVER_FLAGS = ["--heartbeat-interval", "0.5", "--bootstrap-timeout", "15", "--waiting-timeout", "15",
                "--transfer-timeout", "15"]  # fmt: skip
ROUTER_FLAGS = ["--request-timeout", "30", "--health-check-interval", "0.5"]
CLIENT_TIMEOUT_S = 45  # longer than the router's deadline: a request that reaches it has hung
CONCURRENCY = 6


@dataclass
class Result:
    prompt: int
    status: int  # -1: the client saw a transport error (reset, timeout)
    text: str
    started: float
    took: float


def generate(client: httpx.Client, url: str, prompt: int) -> Result:
    body = {"text": PROMPTS[prompt], "sampling_params": {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}}
    t0 = time.monotonic()
    try:
        r = client.post(f"{url}/generate", json=body, timeout=CLIENT_TIMEOUT_S)
        status = r.status_code
        text = r.json()["text"] if status == 200 else r.text
    except httpx.HTTPError as e:
        status, text = -1, f"{type(e).__name__}: {e}"
    return Result(prompt, status, text, t0, time.monotonic() - t0)


class Load:
    """CONCURRENCY clients sending greedy requests back to back until stopped."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.results: list[Result] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(CONCURRENCY)]
        for t in self._threads:
            t.start()

    def _run(self, k: int) -> None:
        with httpx.Client() as client:
            i = k
            while not self._stop.is_set():
                self.results.append(generate(client, self.url, i % len(PROMPTS)))
                i += 1

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=CLIENT_TIMEOUT_S + 5)
        assert not any(t.is_alive() for t in self._threads), "a client is still waiting: a request hangs"


def wait_healthy(url: str, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return time.monotonic()
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not healthy after {timeout}s")


def wait_idle(stack: Stack, timeout: float = 20) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while (used := stack.kv_pages_used()) != {"prefill": 0, "decode": 0} and time.monotonic() < deadline:
        time.sleep(0.3)
    return used


# each backend with each victim once in CI; the other two pairings (~1.5 min each) in `make test-all`
SLOW = pytest.mark.slow
PAIRS = [("mooncake", "prefill"), ("nixl", "decode"), pytest.param("nixl", "prefill", marks=SLOW),
         pytest.param("mooncake", "decode", marks=SLOW)]  # fmt: skip


@pytest.mark.parametrize(("backend", "victim"), PAIRS)
def test_a_server_killed_and_restarted_under_load(backend: str, victim: str) -> None:
    stack = Stack(backend, extra=SERVER_FLAGS, router_extra=ROUTER_FLAGS)
    try:
        with httpx.Client() as client:
            expected = {i: generate(client, stack.router_url, i) for i in range(len(PROMPTS))}
        assert all(r.status == 200 for r in expected.values()), expected
        load = Load(stack.router_url)
        time.sleep(2.0)
        served_before = len(load.results)
        proc = stack.proc(victim)
        proc.restart()
        url = stack.prefill_url if victim == "prefill" else stack.decode_url
        ready = wait_healthy(url, 180)
        time.sleep(6.0)  # keep the load on past the restart
        load.stop()

        results = load.results
        assert served_before > 0, "no request completed before the kill"
        for r in results:
            assert r.status != -1, f"the client saw a transport error: {r.text}"
            assert r.took < CLIENT_TIMEOUT_S - 5, f"a request took {r.took:.1f}s"
            if r.status == 200:
                assert r.text == expected[r.prompt].text, "a successful answer differs from the greedy one"
            else:
                assert r.status in (500, 502, 503, 504), (r.status, r.text)
                assert "message" in r.text, r.text  # an OpenAI error body, not a bare failure
        failed = [r for r in results if r.status != 200]
        back = min((r.started + r.took for r in results if r.status == 200 and r.started > ready), default=None)
        slowest = max((r.took for r in failed), default=0.0)
        since_ready = back - ready if back is not None else float("nan")
        print(f"\n{backend} {victim} restart: {len(results)} requests, {len(failed)} failed "
              f"{sorted({r.status for r in failed})}, slowest failure {slowest:.1f}s; "
              f"first success {since_ready:.2f}s after the restarted server was ready")  # fmt: skip
        # back within a few seconds of being ready: whatever started after that succeeded
        late = [r for r in results if r.started > ready + 3.0]
        assert late, "no request started after the restarted server was ready"
        failed_late = [(r.status, r.text[:200]) for r in late if r.status != 200]
        assert not failed_late, failed_late
        assert wait_idle(stack) == {"prefill": 0, "decode": 0}, "KV pages still held after the load stopped"
    except BaseException:
        print("\n".join(f"--- {p.name}\n{p.tail(60)}" for p in stack.procs))
        raise
    finally:
        stack.stop()
