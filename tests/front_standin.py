"""A stand-in scheduler and a real uvicorn front around it, for the front's tests.

The stand-in is a thread speaking serving.ipc over the front's real ZMQ sockets. It decides what to do
from the request's sampling seed:
  none  echo the prompt's token ids back, one per output (finish "length" or "stop")
  555   the echo, one token every 0.1 s (a request that runs a while, then completes)
  666   fail at once (error, status 503)
  777   one token every 0.1 s, forever (until aborted)
  888   one token, then fail (error mid-stream)
  999   never answer
"""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn
import zmq

from serving.front import FrontConfig, create_app
from serving.ipc import AbortRequest, GenerateRequest, Ready, RequestOutput, SchedulerStats, pack, unpack

MODEL = "tiny"
CONTEXT = 4096
BOOTSTRAP_PORT = 8998


# the real app: uvicorn + a stand-in scheduler over real ZMQ


class StandInScheduler(threading.Thread):
    def __init__(self, to_sched: str, from_sched: str, tokenizer: Any) -> None:
        super().__init__(daemon=True)
        self.tok = tokenizer
        self.ctx = zmq.Context()
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.connect(to_sched)
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.connect(from_sched)
        self.ready = threading.Event()
        self.send_stats = threading.Event()
        self.send_stats.set()
        self.halt = threading.Event()
        self.requests: dict[str, GenerateRequest] = {}
        self.aborts: list[str] = []
        self.active: dict[str, dict[str, Any]] = {}

    def out(self, msg: Any) -> None:
        self.push.send(pack(msg))

    def run(self) -> None:
        ready_sent, next_stats = False, 0.0
        while not self.halt.is_set():
            now = time.monotonic()
            if self.ready.is_set() and not ready_sent:
                self.out(Ready(info={"num_layers": 4, "page_size": 16}))
                ready_sent = True
            if ready_sent and self.send_stats.is_set() and now >= next_stats:
                self.out(SchedulerStats(running=2, queued=3, kv_pages_used=10, kv_pages_total=40))
                next_stats = now + 0.1
            if self.pull.poll(10):
                msg = unpack(self.pull.recv())
                if isinstance(msg, GenerateRequest):
                    self.requests[msg.rid] = msg
                    self.active[msg.rid] = {"req": msg, "pos": 0, "next": now}
                elif isinstance(msg, AbortRequest):
                    self.aborts.append(msg.rid)
                    if self.active.pop(msg.rid, None) is not None:
                        self.out(RequestOutput(rid=msg.rid, finished=True, finish_reason="abort"))
            for rid, st in list(self.active.items()):
                if time.monotonic() >= st["next"]:
                    self.step(rid, st)
        self.pull.close(0)
        self.push.close(0)
        self.ctx.term()

    def step(self, rid: str, st: dict[str, Any]) -> None:
        req: GenerateRequest = st["req"]
        seed, ids, pos = req.sampling.get("seed"), req.input_ids, st["pos"]
        common = {"rid": rid, "prompt_tokens": len(ids)}
        if seed == 999:
            return
        if seed == 666 or (seed == 888 and pos == 1):
            self.active.pop(rid)
            self.out(RequestOutput(**common, finished=True, finish_reason="abort", error="transfer failed", status=503))
            return
        tid = ids[pos % len(ids)]
        st["pos"] = pos = pos + 1
        if seed == 555:
            st["next"] = time.monotonic() + 0.1
        if seed in (777, 888):
            st["next"] = time.monotonic() + 0.1
            self.out(
                RequestOutput(
                    **common, token_ids=[tid], text=self.tok.decode([tid]), logprobs=[-0.5], completion_tokens=pos
                )
            )
            return
        limit = req.sampling["max_new_tokens"]
        done = pos >= min(limit, len(ids))
        self.out(
            RequestOutput(
                **common,
                token_ids=[tid],
                text=self.tok.decode([tid]),
                logprobs=[-0.25],
                completion_tokens=pos,
                finished=done,
                finish_reason=("length" if pos >= limit else "stop") if done else None,
            )
        )
        if done:
            self.active.pop(rid)


class Server:
    def __init__(self, request_timeout_s: float = 2.0, model_dir: str | Path | None = None, **cfg_kw: Any) -> None:
        from engine.builtin import resolve_model
        from tokenization.tokenizer import Tokenizer

        model_dir = model_dir or resolve_model("builtin:tiny-llama")
        # Short paths: ipc:// names are limited to ~100 bytes.
        self.tmp = Path(tempfile.mkdtemp(prefix="pdsv"))
        cfg = FrontConfig(
            role="decode",
            ipc_to_scheduler=f"ipc://{self.tmp}/to",
            ipc_from_scheduler=f"ipc://{self.tmp}/from",
            model_dir=str(model_dir),
            served_model_name=MODEL,
            context_length=CONTEXT,
            default_bootstrap_port=BOOTSTRAP_PORT,
            request_timeout_s=request_timeout_s,
            server_args={"transfer_backend": "mooncake"},
            health_generate_timeout_s=2.0,
            **cfg_kw,
        )
        self.app = create_app(cfg)
        self.tok = self.app.state.front.tokenizer
        assert isinstance(self.tok, Tokenizer)
        self.named: dict[str, list[str]] = {}  # client rid -> the internal rids the front gave prompts of that name
        self._log_registrations()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        self.sched = StandInScheduler(cfg.ipc_to_scheduler, cfg.ipc_from_scheduler, self.tok)
        self.sched.start()
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def _log_registrations(self) -> None:
        """Record which internal rid the front gave each named prompt: the stand-in scheduler only sees those."""
        client = self.app.state.front.scheduler
        register = client.register

        def logged(route: Any, rid: str, names: list[str]) -> None:
            for name in names:
                self.named.setdefault(name, []).append(rid)
            register(route, rid, names)

        client.register = logged

    def internal(self, client_rid: str) -> list[str]:
        """The internal rids of every prompt so far that the client called `client_rid` (oldest first)."""
        return list(self.named.get(client_rid, []))

    def wait_sent(self, client_rid: str, n: int = 1) -> list[str]:
        """Wait until `n` prompts named `client_rid` reached the stand-in scheduler; their internal rids."""
        wait_for(lambda: sum(r in self.sched.requests for r in self.internal(client_rid)) >= n)
        return [r for r in self.internal(client_rid) if r in self.sched.requests]

    def front_tables(self) -> dict[str, int]:
        """Sizes of the front's per-request tables (all 0 once nothing is in flight)."""
        client = self.app.state.front.scheduler
        return {"routes": len(client.routes), "names": len(client.names)}

    def make_ready(self) -> None:
        self.sched.ready.set()
        wait_for(lambda: self.client.get("/health").status_code == 200)

    def close(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(10)
        self.sched.halt.set()
        self.sched.join(5)
        shutil.rmtree(self.tmp, ignore_errors=True)


def wait_for(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def sse_events(resp: httpx.Response) -> list[Any]:
    events = []
    for line in resp.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events
