"""Start one server: the scheduler in a child process, the HTTP front in this one.

The child loads the model and the transfer engine; the front answers /health with 503 until the child
says it is ready. If the child dies, the front exits too, so a supervisor (or `pdserve launch`) sees it.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config import EngineConfig, ModelConfig
from transfer.config import TransferConfig
from transfer.planner import PipelineSettings

log = logging.getLogger(__name__)


@dataclass
class ServerSettings:
    role: str  # "prefill" | "decode"
    engine: EngineConfig
    transfer: TransferConfig
    host: str = "127.0.0.1"
    port: int = 30000
    served_model_name: str = ""
    bootstrap_port: int = 8998  # prefill: where its bootstrap server listens; decode: default for requests
    request_timeout_s: float = 600.0
    log_level: str = "warning"
    pipeline: PipelineSettings = field(default_factory=PipelineSettings)
    extra: dict[str, Any] = field(default_factory=dict)


def _exit_with_parent() -> None:
    """The scheduler must not outlive its front: if the front is killed (SIGKILL leaves it no `finally`),
    nothing else would stop this process and its KV pool."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


def _scheduler_main(settings: ServerSettings, ipc_in: str, ipc_out: str) -> None:
    _exit_with_parent()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from engine.engine import Engine

    engine = Engine(settings.engine)
    if settings.role == "prefill":
        from prefill_server.scheduler import PrefillScheduler

        loop = PrefillScheduler(
            engine, settings.transfer, ipc_in, ipc_out, settings.bootstrap_port, pipeline=settings.pipeline
        )
    else:
        from decode_server.scheduler import DecodeScheduler

        loop = DecodeScheduler(engine, settings.transfer, ipc_in, ipc_out)
    loop.run()


def run_server(settings: ServerSettings) -> None:
    from engine.builtin import resolve_model

    model_dir = resolve_model(settings.engine.model)  # generate a built-in model once, before the child races
    run_dir = Path(tempfile.mkdtemp(prefix=f"pdserve-{settings.role}-"))
    metrics_dir = run_dir / "metrics"
    metrics_dir.mkdir()
    from contracts.metrics import setup_multiprocess

    setup_multiprocess(str(metrics_dir), clear=True)  # inherited by the child through the environment
    ipc_in, ipc_out = f"ipc://{run_dir}/to-scheduler", f"ipc://{run_dir}/from-scheduler"

    ctx = mp.get_context("spawn")
    child = ctx.Process(target=_scheduler_main, args=(settings, ipc_in, ipc_out), name=f"{settings.role}-scheduler")
    child.start()

    def watch() -> None:
        child.join()
        if not stopping.is_set():
            log.error("%s scheduler exited (code %s); shutting the server down", settings.role, child.exitcode)
            os.kill(os.getpid(), signal.SIGTERM)

    stopping = threading.Event()
    threading.Thread(target=watch, daemon=True).start()

    from serving.http_server import FrontConfig, run_front

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
    )
    try:
        run_front(front, settings.host, settings.port)
    finally:
        stopping.set()
        if child.is_alive():
            child.terminate()
            child.join(timeout=10)
            if child.is_alive():
                child.kill()
        shutil.rmtree(run_dir, ignore_errors=True)


def _server_args(s: ServerSettings) -> dict[str, Any]:
    e, t = s.engine, s.transfer
    return {
        "role": s.role, "model": e.model, "host": s.host, "port": s.port, "bootstrap_port": s.bootstrap_port,
        "transfer_backend": t.backend, "advertise_host": t.host, "page_size": e.page_size,
        "max_batch_size": e.max_batch_size, "max_prefill_tokens": e.max_prefill_tokens, "device": e.device,
        "pipeline": vars(s.pipeline), "emulated_link_gbps": t.emulated_link_gbps, "started": time.time(), **s.extra,
    }  # fmt: skip
