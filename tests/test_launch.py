"""`pdserve launch` as README's main command runs it: the whole stack comes up, serves, and goes away
cleanly on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import httpx

from harness.stack import free_port


def test_launch_serves_and_stops_cleanly():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pdserve", "launch", "--model", "builtin:tiny-llama", "--port", str(port),
         "--kv-cache-gb", "0.05"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until the stack is ready (or launch exits)
        assert f"ready: http://127.0.0.1:{port}/v1" in line, line
        body = {"model": "builtin:tiny-llama", "prompt": "Hello", "max_tokens": 5, "temperature": 0}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5, r.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        time.sleep(0.5)
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
            raise AssertionError("the router is still answering after launch stopped")
        except httpx.ConnectError:
            pass
    finally:
        if proc.poll() is None:
            proc.kill()
