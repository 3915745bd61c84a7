"""Building a NIXL agent (for transfer/backends/nixl.py), and turning NIXL's exceptions into TransferError.

Kept apart from the backend because it works around NIXL's Python API rather than moving bytes: the stock
`nixl_agent` gives no way to set its progress thread's idle delay, so `make_agent` swaps in a config class
that keeps ours while the agent is built.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from transfer.backends.base import TransferError

log = logging.getLogger(__name__)

UCX = "UCX"  # the one NIXL backend plugin pdserve uses
# How long NIXL's UCX progress thread sleeps in poll() when no UCX event wakes it. nixl_agent hard-codes 0,
# which makes that thread spin a whole core per agent even when idle (measured: 2 idle agents = 199% CPU;
# with 10 ms: 1-2%, and write latency unchanged, since completions and incoming TCP data wake it at once).
PROGRESS_DELAY_US = 10_000
_AGENT_CTOR_LOCK = threading.Lock()


def make_agent(name: str, progress_delay_us: int) -> Any:
    """A NIXL agent with the UCX backend whose progress thread sleeps `progress_delay_us` when idle (0: NIXL's
    own busy-polling default). Raises TransferError when NIXL is missing or refuses."""
    try:
        from nixl import _api
    except ImportError as e:
        raise TransferError(f"NIXL is not installed (pip install nixl): {e}") from e
    conf = _api.nixl_agent_config(backends=[UCX])
    bindings = _api.nixlBind
    stock = bindings.nixlAgentConfig
    try:

        class _Config(stock):  # type: ignore[misc, valid-type]
            # nixl_agent builds its C++ config itself and sets pthrDelay = 0; this keeps our value instead.
            def __setattr__(self, key: str, value: Any) -> None:
                super().__setattr__(key, progress_delay_us if key == "pthrDelay" else value)

    except TypeError as e:  # a NIXL whose config class cannot be subclassed: run with its busy-polling default
        log.warning("NIXL: cannot set the progress thread delay (%s); it will busy-poll", e)
        progress_delay_us = 0
    try:
        if progress_delay_us <= 0:
            return _api.nixl_agent(name, conf)
        # nixl_agent looks the config class up on the bindings module; swap it only while building ours.
        with _AGENT_CTOR_LOCK:
            bindings.nixlAgentConfig = _Config
            try:
                return _api.nixl_agent(name, conf)
            finally:
                bindings.nixlAgentConfig = stock
    except Exception as e:
        raise nixl_error("could not create the NIXL agent", e) from e


def nixl_error(what: str, exc: BaseException) -> TransferError:
    """`what` failed inside NIXL, as a TransferError."""
    # NIXL's exceptions only carry the status name (e.g. NIXL_ERR_REMOTE_DISCONNECT); keep the type too.
    return TransferError(f"{what}: {type(exc).__name__}: {exc}")
