"""Real server processes for end-to-end tests: `pdserve prefill`, `pdserve decode`, `pdserve router`
(and optionally sglang-router), each a separate process on loopback."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from engine.ports import free_port

MODEL = "builtin:tiny-llama"


class Proc:
    def __init__(self, name: str, args: list[str], log_dir: Path) -> None:
        self.name = name
        self.args = args
        self.log = log_dir / f"{name}.log"
        self._fh = open(self.log, "a")  # noqa: SIM115 (kept open for the process's life)
        self.proc = self._start()

    def _start(self) -> subprocess.Popen:
        env = dict(os.environ, GLOG_minloglevel="2", NIXL_LOG_LEVEL="WARN")
        # its own session: a kill reaches the server's scheduler child too, as a pod restart would
        return subprocess.Popen(self.args, stdout=self._fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def kill(self) -> None:
        """SIGKILL the whole process group (front and scheduler), as a crashed pod."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def signal(self, signum: int) -> None:
        os.killpg(self.proc.pid, signum)

    def restart(self) -> None:
        """Kill it and start the same command line again (same ports): a restarted peer at the same address."""
        self.kill()
        self._fh.write(f"\n----- restarted at {time.time():.3f} -----\n")
        self._fh.flush()
        self.proc = self._start()

    def pids(self) -> list[int]:
        """The process and its descendants (a server is a front plus a scheduler process)."""
        out, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            try:
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                continue
            todo.extend(int(c) for c in children)
        return out

    def rss_bytes(self) -> int:
        """Resident memory of the process tree."""
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        return total

    def open_fds(self) -> int:
        """Open file descriptors of the process tree."""
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                total += len(os.listdir(f"/proc/{pid}/fd"))
        return total

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM to the leader only: the server stops its own children
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._fh.close()


class Stack:
    """prefill + decode (+ router) for one transfer backend."""

    def __init__(
        self,
        backend: str,
        extra: list[str] | None = None,
        prefill_extra: list[str] | None = None,
        decode_extra: list[str] | None = None,
        router_extra: list[str] | None = None,
        model: str = MODEL,
        prefills: int = 1,
    ) -> None:
        self.backend = backend
        self.log_dir = Path(tempfile.mkdtemp(prefix=f"pdserve-e2e-{backend}-"))
        # prefill i (0-based) is the process "prefill" (i = 0) or "prefill-{i + 1}", at prefill_ports[i]
        self.prefill_ports = [free_port() for _ in range(prefills)]
        self.bootstrap_ports = [free_port() for _ in range(prefills)]
        self.prefill_port, self.bootstrap_port = self.prefill_ports[0], self.bootstrap_ports[0]
        self.decode_port, self.router_port = free_port(), free_port()
        pd = [sys.executable, "-m", "pdserve", "--log-level", "warning"]
        common = ["--model", model, "--transfer-backend", backend, "--kv-cache-gb", "0.05", *(extra or [])]
        self.procs = [
            Proc("prefill" if i == 0 else f"prefill-{i + 1}",
                 [*pd, "prefill", *common, "--port", str(port), "--bootstrap-port", str(bport),
                  *(prefill_extra or [])], self.log_dir)
            for i, (port, bport) in enumerate(zip(self.prefill_ports, self.bootstrap_ports, strict=True))
        ]  # fmt: skip
        prefill_args = [a for url, bport in zip(self.prefill_urls, self.bootstrap_ports, strict=True)
                        for a in ("--prefill", url, str(bport))]  # fmt: skip
        self.procs += [
            Proc("decode", [*pd, "decode", *common, "--port", str(self.decode_port), *(decode_extra or [])],
                 self.log_dir),
            Proc("router", [*pd, "router", "--port", str(self.router_port), *prefill_args,
                            "--decode", self.decode_url, *(router_extra or [])], self.log_dir),
        ]  # fmt: skip
        try:
            self.wait_ready(f"{self.router_url}/readiness", 240)
        except Exception:
            self.stop()
            raise

    @property
    def prefill_url(self) -> str:
        return f"http://127.0.0.1:{self.prefill_port}"

    @property
    def prefill_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.prefill_ports]

    @property
    def decode_url(self) -> str:
        return f"http://127.0.0.1:{self.decode_port}"

    @property
    def router_url(self) -> str:
        return f"http://127.0.0.1:{self.router_port}"

    def wait_ready(self, url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.proc.poll() is not None:
                    raise RuntimeError(f"{p.name} exited with {p.proc.returncode}:\n{p.tail()}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(
            f"{url} not ready in {timeout}s:\n" + "\n".join(f"--- {p.name}\n{p.tail()}" for p in self.procs)
        )

    def start_sglang_router(self) -> str:
        port = free_port()
        args = [sys.executable, "-m", "sglang_router.launch_router", "--pd-disaggregation",
                "--prefill", self.prefill_url, str(self.bootstrap_port), "--decode", self.decode_url,
                "--host", "127.0.0.1", "--port", str(port),
                # its metrics exporter defaults to a fixed port: two of them on one machine would collide
                "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]  # fmt: skip
        proc = Proc("sglang-router", args, self.log_dir)
        self.procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.proc.poll() is not None:
                raise RuntimeError(f"sglang-router exited:\n{proc.tail()}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"sglang-router not healthy:\n{proc.tail()}")

    def proc(self, name: str) -> Proc:
        return next(p for p in self.procs if p.name == name)

    def kv_pages_used(self) -> dict[str, int]:
        out = {}
        for name, url in (("prefill", self.prefill_url), ("decode", self.decode_url)):
            info = httpx.get(f"{url}/server_info", timeout=5).json()
            out[name] = find_key(info, "kv_pages_used")
        return out

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()


def find_key(obj: object, key: str) -> int:
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        for v in obj.values():
            try:
                return find_key(v, key)
            except KeyError:
                pass
    raise KeyError(key)
