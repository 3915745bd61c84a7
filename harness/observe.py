"""Watching a running stack from outside, for tests and benchmarks alike: how many streams overlapped, a metric's
value, and the decode server's own running count sampled while a workload runs."""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable

import httpx

from harness.stack import find_key


def most_at_once(streams: list[dict]) -> int:
    """The most streams that were producing tokens (first chunk seen, last not yet) at the same moment; each stream
    is a dict with the monotonic times of its `first` and `last` chunk."""
    events = sorted([(s["first"], 1) for s in streams] + [(s["last"], -1) for s in streams])
    best = now = 0
    for _, d in events:
        now += d
        best = max(best, now)
    return best


def scrape_metric(url: str, name: str) -> float:
    """The first sample of metric `name` (labelled or not) on the server at `url`; 0 when it has none."""
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


class RunningSampler(threading.Thread):
    """Samples a server's running count (its scheduler stats, refreshed every ~0.5 s) until `stop()`."""

    def __init__(self, url: str, every_s: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.url, self.every_s = url, every_s
        self.samples: list[int] = []
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.every_s):
            with contextlib.suppress(httpx.HTTPError, KeyError):
                self.samples.append(find_key(httpx.get(f"{self.url}/server_info", timeout=5).json(), "running"))

    def stop(self) -> list[int]:
        self._done.set()
        self.join()
        return self.samples


def settle(read: Callable[[], list[float]], want_total: float, limit_s: float = 15.0) -> list[float]:
    """`read()` once its values add up to `want_total`: a prefill counts its request a moment after the decode's answer
    (which the client got) may already be back, and the scheduler publishes its counters on its own beat."""
    deadline = time.monotonic() + limit_s
    while True:
        values = read()
        if sum(values) >= want_total or time.monotonic() > deadline:
            return values
        time.sleep(0.1)


def counter(text: str, name: str, *labels: str) -> float:
    """In Prometheus exposition `text`, the sum of the samples of `name` whose labels contain each of `labels`
    (0 when there is none)."""
    found = re.findall(rf"^{name}{{([^}}]*)}} (\S+)$", text, re.M)
    return sum(float(v) for lab, v in found if all(x in lab for x in labels))
