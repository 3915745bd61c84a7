"""Picking a free TCP port that nothing else on this machine will take before we bind it.

`bind(0)` hands out a port from the kernel's ephemeral range, which is also where every outgoing connection
gets its local port. A port picked that way and bound a moment later can meanwhile be taken by a connection
(gloo opens dozens while a process group forms; a transfer engine opens its own), and the bind then fails with
"Address already in use". So ports we pick and hand to another process are drawn from below the ephemeral
range, where the kernel never allocates on its own, and checked free by binding them.
"""

from __future__ import annotations

import random
import socket

_FALLBACK_EPHEMERAL_START = 32768
_LOW = 20000  # above the well-known and registered ports services usually take


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return _FALLBACK_EPHEMERAL_START


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now, outside the ephemeral range when there is room below it."""
    top = _ephemeral_start()
    rng = random.SystemRandom()
    if top - _LOW > 1000:
        for _ in range(200):
            port = rng.randrange(_LOW, top)
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:  # no room below the ephemeral range: let the kernel pick
        s.bind((host, 0))
        return s.getsockname()[1]
