"""What a front is told by its launcher: its role, its two ZMQ addresses, its model and its limits.

A plain dataclass, so the launcher (and tests) describe a front without touching the app's internals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from contracts.http import DEFAULT_MAX_BODY_BYTES

__all__ = ["FrontConfig"]


@dataclass
class FrontConfig:
    role: Literal["prefill", "decode"]
    ipc_to_scheduler: str  # ipc://... the front binds a PUSH socket here
    ipc_from_scheduler: str  # ipc://... the front binds a PULL socket here
    model_dir: str  # tokenizer (and config.json) are read from here
    served_model_name: str
    context_length: int
    default_bootstrap_port: int | None = None  # used when a request's bootstrap_port is null
    request_timeout_s: float = 600.0  # abort + 504 when a request gets no output for this long
    server_args: dict[str, Any] = field(default_factory=dict)  # reported by /server_info
    health_generate_timeout_s: float = 30.0
    # /health answers 503 when the scheduler sent no stats for this long (None: never), so a crashed or
    # wedged scheduler takes the server out of the router's rotation. Off by default because a very long
    # forward on a slow machine can legitimately delay stats.
    stats_stale_after_s: float | None = None
    # When set, the front puts itself in Prometheus multiprocess mode with this directory (the same one
    # the scheduler uses), so /metrics merges both processes.
    prometheus_multiproc_dir: str | None = None
    # A larger request body gets 413 before it is buffered (--max-body-bytes; the router has the same limit).
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1:
            raise ValueError(f"FrontConfig.max_body_bytes must be at least 1, got {self.max_body_bytes}")
