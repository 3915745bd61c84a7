"""The decode server's entry point: `serving.launch.run_server` with the decode scheduler.

`make_scheduler` runs in the spawned scheduler process (module level, so it pickles by reference); this
package owns the choice of scheduler so that `serving` never imports a server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from serving.launch import ServerSettings, run_server

if TYPE_CHECKING:
    from decode_server.scheduler import DecodeScheduler
    from engine.engine import Engine


def make_scheduler(engine: Engine, settings: ServerSettings, ipc_in: str, ipc_out: str) -> DecodeScheduler:
    # imported here, in the scheduler process: the front never loads the scheduler or the transfer engine
    from decode_server.scheduler import DecodeScheduler

    return DecodeScheduler(engine, settings.transfer, ipc_in, ipc_out)


def run_decode(settings: ServerSettings) -> int:
    """Run a decode server until SIGTERM; returns the process exit status."""
    if settings.role != "decode":
        raise ValueError(f"run_decode needs role 'decode', got {settings.role!r}")
    return run_server(settings, make_scheduler)
