"""The router's only contact with metrics. Definitions live in `contracts.metrics` (one home for every metric name,
bucket list and label value); the router records them with role="router".

Recorded: TTFT (request arrival → first content-carrying chunk of D's stream; streams only), e2e latency (requests
answered in full with a 2xx), pdserve_requests_total{status} once per request, retries, and the number of requests
in flight (pdserve_running_requests).
"""

from __future__ import annotations

from contracts.metrics import get_metrics, status_label
from contracts.metrics import render as _render

ROLE = "router"


def request_started() -> None:
    get_metrics().running_requests.labels(role=ROLE).inc()


def request_finished(http_status: int, aborted: bool, e2e_s: float | None) -> None:
    """Exactly once per request that `request_started` counted; e2e_s only for a request answered in full."""
    m = get_metrics()
    m.running_requests.labels(role=ROLE).dec()
    m.requests.labels(role=ROLE, status=status_label(http_status, aborted)).inc()
    if e2e_s is not None:
        m.e2e_request_latency.labels(role=ROLE).observe(e2e_s)


def request_rejected(http_status: int, aborted: bool = False) -> None:
    """A request that ended before dispatch (auth, bad JSON, client gone while sending): counted, never in flight."""
    get_metrics().requests.labels(role=ROLE, status=status_label(http_status, aborted)).inc()


def observe_ttft(seconds: float) -> None:
    get_metrics().time_to_first_token.labels(role=ROLE).observe(seconds)


def count_retry() -> None:
    get_metrics().router_retries.inc()


def render() -> tuple[bytes, str]:
    """The Prometheus exposition of the router's metrics (its process's default registry)."""
    return _render()
