"""The prefill server's entry point: `serving.launch.run_server` with the prefill scheduler.

`make_scheduler` runs in the spawned scheduler process (module level, so it pickles by reference); this
package owns the choice of scheduler so that `serving` never imports a server.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from serving.launch import ServerSettings, run_server

if TYPE_CHECKING:
    from engine.engine import Engine
    from prefill_server.scheduler import PrefillScheduler


def make_scheduler(engine: Engine, settings: ServerSettings, ipc_in: str, ipc_out: str) -> PrefillScheduler:
    # imported here, in the scheduler process: the front never loads the scheduler or the transfer engine
    from prefill_server.scheduler import PrefillScheduler

    return PrefillScheduler(
        engine,
        settings.transfer,
        ipc_in,
        ipc_out,
        settings.bootstrap_port,
        pipeline=settings.pipeline,
        prefix_cache=settings.prefix_cache,
    )


def run_prefill(settings: ServerSettings) -> int:
    """Run a prefill server until SIGTERM; returns the process exit status."""
    if settings.role != "prefill":
        raise ValueError(f"run_prefill needs role 'prefill', got {settings.role!r}")
    # A prefill server runs no decode batch (it samples each prompt's first token and hands the rest on), so
    # decode graphs would only cost start-up time and memory.
    settings = replace(settings, engine=replace(settings.engine, disable_cuda_graph=True))
    return run_server(settings, make_scheduler)
