"""`pdserve launch` as README's main command runs it: the whole stack comes up, serves, and goes away
cleanly on SIGTERM, leaving nothing in the temp directory (each server keeps its IPC sockets and metric
files in a `pdserve-<role>-*` directory there while it runs)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from harness.stack import free_port


def test_launch_serves_and_stops_cleanly():
    port = free_port()
    # a fresh temp dir of a short path (ipc:// socket paths must stay under ~107 bytes)
    tmpdir = Path(tempfile.mkdtemp(prefix="launch-tmp-"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pdserve", "launch", "--model", "builtin:tiny-llama", "--port", str(port),
         "--kv-cache-gb", "0.05", "--heartbeat-interval", "2", "--router-max-retries", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=dict(os.environ, TMPDIR=str(tmpdir)),
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until the stack is ready (or launch exits)
        assert f"ready: http://127.0.0.1:{port}/v1" in line, line
        running = sorted(p.name.rsplit("-", 1)[0] for p in tmpdir.iterdir() if p.name.startswith("pdserve-"))
        assert running == ["pdserve-decode", "pdserve-prefill"], running  # the servers did use this temp dir
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
        left = sorted(p.name for p in tmpdir.iterdir() if p.name.startswith("pdserve-"))
        assert left == [], f"a stopped stack left {left} in its temp dir"
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(tmpdir, ignore_errors=True)
