"""The router's only contact with metrics. Definitions live in `contracts.metrics` (one home for every metric name,
bucket list and label value); the router records them with role="router".

Recorded: TTFT (request arrival → first content-carrying chunk of D's stream; streams only), e2e latency (requests
answered in full with a 2xx), pdserve_requests_total{status} once per request, retries, and the number of requests
in flight (pdserve_running_requests), each server's health as the router sees it (pdserve_router_upstream_healthy), and
where each dispatched request was prefilled (pdserve_pd_decision_total{path}: remote or local, once per request), and
how the cache-aware policy chose each prefill (pdserve_router_cache_aware_total{decision}, once per prefill pick).
"""

from __future__ import annotations

from typing import Any

from contracts.metrics import CacheRoute, PrefillPath, Role, get_metrics, status_label
from contracts.metrics import render as _render

ROLE = Role.ROUTER.value  # the label value (str() of the enum member would be "Role.ROUTER")


# Labelled children, looked up once: `labels()` takes a lock and builds a key on every call, several times a request.
# Keyed by the metric object too, so a metrics registry built anew (tests do) is never served stale children.
_children: dict[tuple[int, tuple[tuple[str, str], ...]], tuple[Any, Any]] = {}


def _labelled(metric: Any, **labels: str) -> Any:
    key = (id(metric), tuple(sorted(labels.items())))
    hit = _children.get(key)
    if hit is None or hit[0] is not metric:
        hit = _children[key] = (metric, metric.labels(**labels))
    return hit[1]


def _child(metric: Any, status: str | None = None) -> Any:
    return _labelled(metric, role=ROLE) if status is None else _labelled(metric, role=ROLE, status=status)


def request_started() -> None:
    _child(get_metrics().running_requests).inc()


def request_finished(http_status: int, aborted: bool, e2e_s: float | None) -> None:
    """Exactly once per request that `request_started` counted; e2e_s only for a request answered in full."""
    m = get_metrics()
    _child(m.running_requests).dec()
    _child(m.requests, status_label(http_status, aborted)).inc()
    if e2e_s is not None:
        _child(m.e2e_request_latency).observe(e2e_s)


def request_rejected(http_status: int, aborted: bool = False) -> None:
    """A request that ended before dispatch (auth, bad JSON, client gone while sending): counted, never in flight."""
    _child(get_metrics().requests, status_label(http_status, aborted)).inc()


def observe_ttft(seconds: float) -> None:
    _child(get_metrics().time_to_first_token).observe(seconds)


def count_decision(path: PrefillPath) -> None:
    """Once per dispatched request: where its prompts are prefilled (conditional disaggregation)."""
    _labelled(get_metrics().pd_decisions, path=path.value).inc()


def count_cache_route(decision: CacheRoute) -> None:
    """Once per prefill the cache-aware policy picks (a retry picks again): by prefix, by load, or to rebalance."""
    _labelled(get_metrics().router_cache_aware, decision=decision.value).inc()


def count_retry() -> None:
    get_metrics().router_retries.inc()


def upstream_health(url: str, healthy: bool) -> None:
    get_metrics().router_upstream_healthy.labels(url=url).set(1 if healthy else 0)


def render() -> tuple[bytes, str]:
    """The Prometheus exposition of the router's metrics (its process's default registry)."""
    return _render()
