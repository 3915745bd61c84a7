"""Test-side handle on a `transfer_peer.py` process: JSON-line calls with deadlines, and polling helpers."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

PEER = Path(__file__).with_name("transfer_peer.py")


class PeerProc:
    def __init__(self, env: dict[str, str] | None = None, **cfg) -> None:
        self.cfg, self.env = cfg, env
        env = dict(os.environ, GLOG_minloglevel="2", NIXL_LOG_LEVEL="WARN", **(env or {}))
        # PDSERVE_PEER_LOG=DIR keeps each peer's stderr (engine logs) for debugging
        log_dir = os.environ.get("PDSERVE_PEER_LOG")
        stderr = open(f"{log_dir}/{cfg['role']}-{os.getpid()}-{id(self)}.log", "w") if log_dir else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, str(PEER), json.dumps(cfg)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env,
        )  # fmt: skip
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.info = self._reply(timeout=60)

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)

    def _reply(self, timeout: float) -> dict:
        try:
            reply = json.loads(self._lines.get(timeout=timeout))
        except queue.Empty:
            raise TimeoutError(f"peer did not answer in {timeout}s (exit code {self.proc.poll()})") from None
        if not reply.pop("ok"):
            raise RuntimeError(f"peer error: {reply['error']}\n{reply.get('trace', '')}")
        return reply

    def call(self, cmd: str, timeout: float = 30, **args) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.proc.stdin.flush()
        return self._reply(timeout)

    def wait_state(self, room: int, states: set[str], timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            out = self.call("poll", room=room)
            if out["state"] in states:
                return out
            if time.monotonic() > deadline:
                raise TimeoutError(f"room {room} stuck in {out['state']} (wanted {states}): {out}")
            time.sleep(0.02)

    def wait_safe(self, room: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.call("poll", room=room)["safe"]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"room {room} never became safe to free")
            time.sleep(0.02)

    def release(self, room: int, timeout: float = 10) -> None:
        self.wait_safe(room, timeout)
        assert self.call("release", room=room)["freed"]

    def assert_clean(self) -> None:
        s = self.call("status")
        assert s["free_pages"] == s["num_pages"], s
        assert s["free_aux"] == s["aux_rows"], s
        assert s["live_rooms"] == 0, s

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        """SIGSTOP: the process keeps its sockets (the kernel still accepts connections) but answers nothing."""
        self.proc.send_signal(signal.SIGSTOP)

    def cont(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def restarted(self) -> PeerProc:
        """kill -9, then the same peer again (same config: pin its ports to get the same address)."""
        self.kill()
        return PeerProc(env=self.env, **self.cfg)

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
