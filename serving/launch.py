"""Start one server: the scheduler in a child process per tensor-parallel rank, the HTTP front in this one.

Each child joins the server's process group (tp > 1), loads its shard of the model and its transfer engine;
the front talks to rank 0 only and answers /health with 503 until rank 0 says it is ready. If any child dies,
the front stops the others and exits too, so a supervisor (or `pdserve launch`) sees it and no half server
keeps answering.

Which scheduler runs is passed in (`make_scheduler`, owned by each server package), so `serving` never
imports a server: imports run server → serving, never back.

Each run keeps its IPC sockets and metric files in a private `pdserve-<role>-*` temp directory, removed on
exit. On SIGTERM uvicorn shuts down gracefully and then re-raises the signal; with the default handler
that killed the process before any `finally`, leaving the directory behind. `run_server` therefore turns
SIGTERM into an exception, cleans up, and returns an exit status: 0 after a SIGTERM, 1 when the scheduler
died (the front then stops itself the same way).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from contracts.http import DEFAULT_MAX_BODY_BYTES
from contracts.pd import DEFAULT_BOOTSTRAP_PORT
from engine.config import EngineConfig, ModelConfig
from engine.ports import free_port
from transfer.config import TransferConfig
from transfer.planner import PipelineSettings

if TYPE_CHECKING:
    from engine.engine import Engine
    from serving.scheduler_loop import SchedulerLoop

log = logging.getLogger(__name__)

RANK_ENV = "PDSERVE_SCHEDULER_RANK"  # set in each scheduler process: its tensor-parallel rank


@dataclass
class ServerSettings:
    role: str  # "prefill" | "decode"
    engine: EngineConfig
    transfer: TransferConfig
    host: str = "127.0.0.1"
    port: int = 30000
    served_model_name: str = ""
    bootstrap_port: int = DEFAULT_BOOTSTRAP_PORT  # prefill: where its bootstrap server listens; decode: default
    request_timeout_s: float = 600.0
    log_level: str = "warning"
    pipeline: PipelineSettings = field(default_factory=PipelineSettings)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # larger request bodies get 413 before they are buffered
    prefix_cache: bool = True  # prefill: reuse the KV of prompt prefixes computed before
    extra: dict[str, Any] = field(default_factory=dict)


# Builds the scheduler in the child process: (engine, settings, ipc_to_scheduler, ipc_from_scheduler). It must
# be a module-level function: the child is spawned, so it is pickled by reference.
MakeScheduler = Callable[["Engine", ServerSettings, str, str], "SchedulerLoop"]


class _Terminated(BaseException):
    """SIGTERM arrived (BaseException: no `except Exception` on the way may swallow it)."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Terminated(signum)


def _exit_with_parent() -> None:
    """The scheduler must not outlive its front: if the front is killed (SIGKILL leaves it no `finally`),
    nothing else would stop this process and its KV pool."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


def _scheduler_main(
    settings: ServerSettings,
    make_scheduler: MakeScheduler,
    ipc_in: str,
    ipc_out: str,
    rank: int = 0,
    init_address: str = "",
) -> None:
    """One rank's scheduler process: its process group (TP or CP > 1), its engine (shard), its scheduler."""
    _exit_with_parent()
    logging.basicConfig(
        level=settings.log_level.upper(), format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s"
    )
    from engine.engine import Engine

    size = settings.engine.world_size
    tp = None
    if size > 1:
        from engine.distributed import init_tp_group

        tp = init_tp_group(rank, size, init_address, settings.engine, settings.engine.dist_timeout_s)
        settings = replace(settings, transfer=rank_transfer(settings, rank, size))
    make_scheduler(Engine(settings.engine, tp), settings, ipc_in, ipc_out).run()


def rank_transfer(settings: ServerSettings, rank: int, size: int) -> TransferConfig:
    """What rank `rank` of a `size`-rank server is to the transfer layer. TP: a writer of its share of the heads (CP
    ranks hold all of them, and still split the push). DP attention: every rank holds every head and its own
    requests; a prefill rank writes its rooms whole, and a decode rank is a one-rank decode with its own session."""
    engine, transfer = settings.engine, settings.transfer
    if engine.dp_attention and settings.role == "decode":
        return replace(transfer, tp_rank=0, tp_size=1)
    if engine.dp_attention:
        return replace(transfer, tp_rank=rank, tp_size=size, full_kv_heads=True, dp_size=size)
    return replace(transfer, tp_rank=rank, tp_size=size, full_kv_heads=engine.cp_size > 1)


def run_server(settings: ServerSettings, make_scheduler: MakeScheduler) -> int:
    """Serve until SIGTERM or the scheduler dies, then return the exit status; call from the main thread.
    Leaves no temp files."""
    crashed = threading.Event()
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        _serve(settings, make_scheduler, crashed)
    except _Terminated:
        log.info("%s server stopped", settings.role)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 1 if crashed.is_set() else 0


def _serve(settings: ServerSettings, make_scheduler: MakeScheduler, crashed: threading.Event) -> None:
    from engine.builtin import resolve_model

    model_dir = resolve_model(settings.engine.model)  # generate a built-in model once, before the child races
    run_dir = Path(tempfile.mkdtemp(prefix=f"pdserve-{settings.role}-"))
    children: list[mp.process.BaseProcess] = []
    stopping = threading.Event()
    try:
        metrics_dir = run_dir / "metrics"
        metrics_dir.mkdir()
        from contracts.metrics import setup_multiprocess

        setup_multiprocess(str(metrics_dir), clear=True)  # inherited by the child through the environment
        ipc_in, ipc_out = f"ipc://{run_dir}/to-scheduler", f"ipc://{run_dir}/from-scheduler"

        # One scheduler process per rank (TP or CP); rank 0 talks to the front. Any of them dying takes
        # the server down (the watchers), so a half server never answers /health.
        ctx = mp.get_context("spawn")
        tp_size = settings.engine.world_size
        init_address = f"tcp://127.0.0.1:{free_port()}" if tp_size > 1 else ""
        for rank in range(tp_size):
            child = ctx.Process(
                target=_scheduler_main,
                args=(settings, make_scheduler, ipc_in, ipc_out, rank, init_address),
                name=f"{settings.role}-scheduler" + (f"-rank{rank}" if tp_size > 1 else ""),
            )
            # spawned children inherit the environment: the rank in it names the process for operators and
            # tests (`/proc/<pid>/environ`) without parsing command lines
            os.environ[RANK_ENV] = str(rank)
            try:
                child.start()
            finally:
                os.environ.pop(RANK_ENV, None)
            children.append(child)
            watch = threading.Thread(target=_watch_child, args=(child, stopping, crashed, settings.role), daemon=True)
            watch.start()

        from serving.front import FrontConfig, run_front

        cfg = ModelConfig.from_pretrained(model_dir)
        context = min(settings.engine.context_length or cfg.max_position_embeddings, cfg.max_position_embeddings)
        front = FrontConfig(
            role=settings.role,
            ipc_to_scheduler=ipc_in,
            ipc_from_scheduler=ipc_out,
            model_dir=str(model_dir),
            served_model_name=settings.served_model_name or settings.engine.model,
            context_length=context,
            default_bootstrap_port=settings.bootstrap_port,
            request_timeout_s=settings.request_timeout_s,
            server_args=_server_args(settings),
            prometheus_multiproc_dir=str(metrics_dir),
            max_body_bytes=settings.max_body_bytes,
        )
        run_front(front, settings.host, settings.port)
    finally:
        # A second SIGTERM must not cut the cleanup short; it is bounded by the joins below.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stopping.set()
        for child in children:
            if child.is_alive():
                child.terminate()
        for child in children:
            child.join(timeout=10)
            if child.is_alive():
                child.kill()
                child.join(timeout=5)
        # after the child is gone: it writes metric files here until it exits
        shutil.rmtree(run_dir, ignore_errors=True)


def _watch_child(child: mp.process.BaseProcess, stopping: threading.Event, crashed: threading.Event, role: str) -> None:
    child.join()
    if not stopping.is_set():
        crashed.set()
        log.error("%s %s exited (code %s); shutting the server down", role, child.name, child.exitcode)
        os.kill(os.getpid(), signal.SIGTERM)


def _server_args(s: ServerSettings) -> dict[str, Any]:
    e, t = s.engine, s.transfer
    return {
        "role": s.role, "model": e.model, "host": s.host, "port": s.port, "bootstrap_port": s.bootstrap_port,
        "transfer_backend": t.backend, "advertise_host": t.host, "page_size": e.page_size,
        "max_batch_size": e.max_batch_size, "max_prefill_tokens": e.max_prefill_tokens, "device": e.device,
        "pipeline": vars(s.pipeline), "emulated_link_gbps": t.emulated_link_gbps, "started": time.time(),
        "max_body_bytes": s.max_body_bytes, "tp_size": e.tp_size, **s.extra,
    }  # fmt: skip
