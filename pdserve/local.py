"""`pdserve launch`: router + prefill + decode as child processes on this machine.

Waits until the router reports every server ready, prints the URL, and stops every child cleanly on
Ctrl-C or SIGTERM (or when any child dies).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time

import httpx

from engine.builtin import resolve_model
from engine.ports import free_port


def child_commands(
    args: argparse.Namespace,
    engine_argv: list[str],
    prefill_port: int,
    decode_port: int,
    bootstrap_port: int,
    forwarded: dict[str, list[str]] | None = None,
    tokenizer: str | None = None,
) -> dict[str, list[str]]:
    """The command line of each child: the engine flags to both servers, the body limit to all three, the model's
    directory to the router as --tokenizer (it counts prompt tokens for conditional disaggregation), and each
    daemon's pass-through flags (pdserve/forwarded.py) last, so a --tokenizer given to launch wins."""
    fwd = forwarded or {}
    tok = ["--tokenizer", tokenizer] if tokenizer is not None else []
    base = [sys.executable, "-m", "pdserve", "--log-level", args.log_level]
    limit = ["--max-body-bytes", str(args.max_body_bytes)]
    common = [*engine_argv, "--transfer-backend", args.transfer_backend, *limit]
    return {
        "prefill": [*base, "prefill", *common, "--port", str(prefill_port), "--bootstrap-port", str(bootstrap_port),
                    *fwd.get("prefill", [])],
        "decode": [*base, "decode", *common, "--port", str(decode_port), *fwd.get("decode", [])],
        "router": [
            *base, "router", "--host", args.host, "--port", str(args.port),
            "--prefill", f"http://127.0.0.1:{prefill_port}", str(bootstrap_port),
            "--decode", f"http://127.0.0.1:{decode_port}", *limit, *tok, *fwd.get("router", []),
        ],
    }  # fmt: skip


def launch_local(
    args: argparse.Namespace, engine_argv: list[str], forwarded: dict[str, list[str]] | None = None
) -> int:
    try:
        # a builtin model is generated here once, before the servers start (they then find it complete)
        model_dir = str(resolve_model(args.model))
    except ValueError as e:
        print(f"pdserve launch: error: --model: {e}", file=sys.stderr)
        return 2
    prefill_port, decode_port, bootstrap_port = free_port(), free_port(), free_port()
    commands = child_commands(args, engine_argv, prefill_port, decode_port, bootstrap_port, forwarded, model_dir)
    children: dict[str, subprocess.Popen] = {}
    stop = {"signal": None}

    def on_signal(signum: int, _frame: object) -> None:
        stop["signal"] = signum

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        for name, cmd in commands.items():
            children[name] = subprocess.Popen(cmd)
        url = f"http://{args.host}:{args.port}"
        print(f"[pdserve] starting prefill (:{prefill_port}), decode (:{decode_port}) and router (:{args.port}) "
              f"with {args.model} over {args.transfer_backend}...", file=sys.stderr, flush=True)  # fmt: skip
        deadline = time.monotonic() + args.startup_timeout
        ready = False
        while stop["signal"] is None and not _dead(children):
            if not ready:
                ready = _ready(url)
                if ready:
                    print(f"[pdserve] ready: {url}/v1 (OpenAI API; Ctrl-C stops everything)", flush=True)
                elif time.monotonic() > deadline:
                    print(f"[pdserve] not ready after {args.startup_timeout:.0f}s; stopping", file=sys.stderr)
                    return 1
            time.sleep(0.5)
        dead = _dead(children)
        if dead and stop["signal"] is None:
            print(f"[pdserve] {dead} exited unexpectedly (code {children[dead].returncode}); stopping",
                  file=sys.stderr)  # fmt: skip
            return 1
        return 0
    finally:
        _stop_all(children)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readiness", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _dead(children: dict[str, subprocess.Popen]) -> str | None:
    return next((name for name, p in children.items() if p.poll() is not None), None)


def _stop_all(children: dict[str, subprocess.Popen]) -> None:
    # router first, so no new request reaches a server that is going away
    for name in ("router", "decode", "prefill"):
        p = children.get(name)
        if p is not None and p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + 15
    for p in children.values():
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
