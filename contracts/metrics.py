"""Every Prometheus metric pdserve exports, defined in one place (DESIGN §5), with its label values.

Names are snake_case with the `pdserve_` prefix; the router, the prefill server and the decode server
all use these definitions and tell themselves apart with the `role` label.

Servers run several processes (HTTP front + scheduler) that all record metrics, so they use
prometheus_client's multiprocess mode: each process writes its values to mmap'ed files in a shared
directory, and `/metrics` (served by the front) merges them. prometheus_client picks the value
storage when a metric object is *created*, so `setup_multiprocess()` must run before that; metric
objects are therefore built lazily by `get_metrics()` rather than at import time, which makes import
order irrelevant. The router is one process and uses the same definitions without multiprocess mode.
"""

from __future__ import annotations

import enum
import glob
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import prometheus_client
import prometheus_client.values
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from contracts.parallel_metrics import parallel_metrics

__all__ = [
    "BATCH_MODES",
    "FAILURE_REASONS",
    "FAST_BUCKETS",
    "LATENCY_BUCKETS",
    "MULTIPROC_ENV",
    "PREFILL_PATHS",
    "REQUEST_STATUSES",
    "ROLES",
    "STAGES",
    "BatchMode",
    "FailureReason",
    "Metrics",
    "PrefillPath",
    "RequestStatus",
    "Role",
    "Stage",
    "get_metrics",
    "mark_process_dead",
    "render",
    "setup_multiprocess",
    "status_label",
]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Allowed label values, as enums so that call sites cannot misspell them; dashboards, alert rules and
# code agree on these spellings. Each is a `str` enum, so a member is its label value.


class Role(str, enum.Enum):
    ROUTER = "router"
    PREFILL = "prefill"
    DECODE = "decode"


class Stage(str, enum.Enum):
    """Disaggregation stages of pdserve_request_stage_seconds and pdserve_kv_transfer_failures_total."""

    BOOTSTRAP = "bootstrap"
    WAIT_FOR_INPUT = "wait_for_input"
    PREFILL_FORWARD = "prefill_forward"
    KV_TRANSFER = "kv_transfer"
    DECODE_ADMIT = "decode_admit"


class FailureReason(str, enum.Enum):
    """Why a KV transfer did not succeed. The transfer layer sets it where the failure happens."""

    FAILED = "failed"  # an engine, peer or protocol error
    ABORTED = "aborted"  # either side aborted the room (client gone, peer abort)
    TIMED_OUT = "timed_out"  # a state's deadline passed
    PEER_RESTARTED = "peer_restarted"  # the other side restarted (a new instance id): its rooms are lost


class RequestStatus(str, enum.Enum):
    """The `status` label of pdserve_requests_total."""

    OK = "ok"
    CLIENT_ERROR = "client_error"
    SERVER_ERROR = "server_error"
    ABORTED = "aborted"


class BatchMode(str, enum.Enum):
    PIPELINED = "pipelined"
    WHOLE = "whole"


class PrefillPath(str, enum.Enum):
    """The `path` label of pdserve_pd_decision_total: where the router had a request's prompt prefilled."""

    REMOTE = "remote"  # on a prefill server, KV sent to the decode server
    LOCAL = "local"  # on the decode server itself, in its running batch (conditional disaggregation)


ROLES = tuple(m.value for m in Role)
STAGES = tuple(m.value for m in Stage)
FAILURE_REASONS = tuple(m.value for m in FailureReason)
REQUEST_STATUSES = tuple(m.value for m in RequestStatus)
BATCH_MODES = tuple(m.value for m in BatchMode)


class CacheRoute(str, enum.Enum):
    """The `decision` label of pdserve_router_cache_aware_total: how the cache-aware policy chose a prefill."""

    PREFIX = "prefix"  # the server whose routed prompts share the longest prefix with this one
    LEAST_LOAD = "least_load"  # no server matched enough of the prompt: the least loaded one
    BALANCE = "balance"  # loads were too uneven to follow the prefix: the least loaded one


PREFILL_PATHS = tuple(m.value for m in PrefillPath)
CACHE_ROUTES = tuple(m.value for m in CacheRoute)

# SLO-friendly latency buckets: dense between 0.1 s and 2 s, where TTFT/ITL SLOs usually sit, and
# reaching 640 s so that long generations still land in a finite bucket.
LATENCY_BUCKETS: tuple[float, ...] = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.75, 1.0,
                                      1.25, 1.5, 1.75, 2.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0,
                                      640.0)  # fmt: skip
# Inter-token latency on a GPU and small KV transfers over RDMA are often a few milliseconds; without
# these extra low buckets they would all collapse into the first one.
FAST_BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, *LATENCY_BUCKETS)


@dataclass(frozen=True)
class Metrics:
    """The metric objects. Attribute → exposed name {labels}."""

    time_to_first_token: Histogram  # pdserve_time_to_first_token_seconds{role}
    inter_token_latency: Histogram  # pdserve_inter_token_latency_seconds{role}
    e2e_request_latency: Histogram  # pdserve_e2e_request_latency_seconds{role}
    queue_time: Histogram  # pdserve_queue_time_seconds{role}
    request_stage: Histogram  # pdserve_request_stage_seconds{role,stage}
    kv_transfer_seconds: Histogram  # pdserve_kv_transfer_seconds{role}
    kv_transfer_bytes: Counter  # pdserve_kv_transfer_bytes_total{role}
    kv_transfer_rank_bytes: Counter  # pdserve_kv_transfer_rank_bytes_total{role,tp_rank}
    kv_transfer_failures: Counter  # pdserve_kv_transfer_failures_total{role,stage,reason}
    requests: Counter  # pdserve_requests_total{role,status}
    prefill_batches: Counter  # pdserve_prefill_batches_total{mode}
    router_retries: Counter  # pdserve_router_retries_total
    router_upstream_healthy: Gauge  # pdserve_router_upstream_healthy{url}
    running_requests: Gauge  # pdserve_running_requests{role}
    queued_requests: Gauge  # pdserve_queued_requests{role}
    kv_pool_usage_ratio: Gauge  # pdserve_kv_pool_usage_ratio{role}
    retractions: Counter  # pdserve_retractions_total{role}
    headroom_ratio: Gauge  # pdserve_headroom_ratio{role}
    headroom_pages: Gauge  # pdserve_headroom_pages{role}
    pd_decisions: Counter  # pdserve_pd_decision_total{path}
    prompt_tokens: Counter  # pdserve_prompt_tokens_total{role}
    cached_prompt_tokens: Counter  # pdserve_cached_prompt_tokens_total{role}
    prefix_cache_pages: Gauge  # pdserve_prefix_cache_pages{role}
    prefill_chunks: Counter  # pdserve_prefill_chunks_total{role}
    cp_batches: Counter  # pdserve_cp_batches_total{role}
    cp_fallbacks: Counter  # pdserve_cp_fallbacks_total{role,reason}
    tbo_steps: Counter  # pdserve_tbo_steps_total{role}
    tbo_two_chunk_steps: Counter  # pdserve_tbo_two_chunk_steps_total{role}
    dp_idle_steps: Counter  # pdserve_dp_idle_steps_total{role} (contracts/parallel_metrics.py: these five)
    router_cache_aware: Counter  # pdserve_router_cache_aware_total{decision}


_lock = threading.Lock()
_metrics: Metrics | None = None
_multiproc_dir: str | None = None


def setup_multiprocess(dir: str | os.PathLike[str], *, clear: bool = False) -> None:
    """Put this process in multiprocess mode, sharing metric files in `dir`. Call before `get_metrics()`.

    Every process of one server (front, scheduler, workers) calls it with the same directory. The
    process that starts the others should pass `clear=True` once, before starting them: files left
    by an earlier run would otherwise be merged into this run's counters. Child processes inherit
    the environment variable, so calling it again there with the same directory is harmless.
    """
    global _multiproc_dir
    path = str(Path(dir).resolve())
    with _lock:
        if _metrics is not None and _multiproc_dir != path:
            raise RuntimeError(
                "setup_multiprocess() was called after get_metrics() created the metric objects "
                f"(multiprocess dir then: {_multiproc_dir!r}, now: {path!r}); call it first in the process"
            )
        if clear and os.path.isdir(path):
            shutil.rmtree(path)
        os.makedirs(path, exist_ok=True)
        os.environ[MULTIPROC_ENV] = path
        # prometheus_client chooses its value class when `prometheus_client.values` is imported and
        # metric constructors read it from there; re-evaluating it here makes the environment
        # variable take effect even if prometheus_client was imported before this call.
        prometheus_client.values.ValueClass = prometheus_client.values.get_value_class()
        _multiproc_dir = path


def _build(multiproc: bool) -> Metrics:
    # In multiprocess mode the values live in files and /metrics reads them through a
    # MultiProcessCollector, so the objects need no registry (registering them would only make the
    # default registry export this process's partial view next to the merged one).
    reg = None if multiproc else prometheus_client.REGISTRY
    return Metrics(
        time_to_first_token=Histogram(
            "pdserve_time_to_first_token_seconds",
            "Time from request arrival to its first generated token.",
            ["role"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        ),
        inter_token_latency=Histogram(
            "pdserve_inter_token_latency_seconds",
            "Time between consecutive generated tokens of a request.",
            ["role"],
            buckets=FAST_BUCKETS,
            registry=reg,
        ),
        e2e_request_latency=Histogram(
            "pdserve_e2e_request_latency_seconds",
            "Time from request arrival to its last token (successful requests).",
            ["role"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        ),
        queue_time=Histogram(
            "pdserve_queue_time_seconds",
            "Time a request waited in the scheduler before its first forward pass.",
            ["role"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        ),
        request_stage=Histogram(
            "pdserve_request_stage_seconds",
            "Time a request spent in each disaggregation stage.",
            ["role", "stage"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        ),
        kv_transfer_seconds=Histogram(
            "pdserve_kv_transfer_seconds",
            "Duration of one request's KV cache transfer, first write to last completion.",
            ["role"],
            buckets=FAST_BUCKETS,
            registry=reg,
        ),
        kv_transfer_bytes=Counter(
            "pdserve_kv_transfer_bytes",
            "KV cache bytes transferred between prefill and decode.",
            ["role"],
            registry=reg,
        ),
        kv_transfer_rank_bytes=Counter(
            "pdserve_kv_transfer_rank_bytes",
            "KV cache bytes written by one tensor-parallel rank of a prefill server.",
            ["role", "tp_rank"],
            registry=reg,
        ),
        kv_transfer_failures=Counter(
            "pdserve_kv_transfer_failures",
            "KV transfers that did not succeed, by the stage they were in and why.",
            ["role", "stage", "reason"],
            registry=reg,
        ),
        requests=Counter(
            "pdserve_requests",
            "Finished generation requests by outcome.",
            ["role", "status"],
            registry=reg,
        ),
        prefill_batches=Counter(
            "pdserve_prefill_batches",
            "Prefill batches run, layer-group pipelined or whole-forward.",
            ["mode"],
            registry=reg,
        ),
        router_retries=Counter(
            "pdserve_router_retries",
            "Requests the router re-dispatched to a new prefill/decode pair.",
            registry=reg,
        ),
        router_upstream_healthy=Gauge(
            "pdserve_router_upstream_healthy",
            "1 while the router sends new requests to this server, 0 while it is marked down (a refused or reset "
            "connection, or a failed /health probe) until /health answers again.",
            ["url"],
            multiprocess_mode="livemax",  # only the (single-process) router sets it
            registry=reg,
        ),
        # One process per server (the front, from the scheduler's stats) sets each gauge, and "live"
        # modes drop the values of processes marked dead. livesum also allows inc()/dec(), which the
        # single-process router may use for its in-flight count.
        running_requests=Gauge(
            "pdserve_running_requests",
            "Requests currently being processed (in a running batch or transferring).",
            ["role"],
            multiprocess_mode="livesum",
            registry=reg,
        ),
        queued_requests=Gauge(
            "pdserve_queued_requests",
            "Requests waiting (for bootstrap, KV pages or a batch slot).",
            ["role"],
            multiprocess_mode="livesum",
            registry=reg,
        ),
        kv_pool_usage_ratio=Gauge(
            "pdserve_kv_pool_usage_ratio",
            "Fraction of KV cache pages in use.",
            ["role"],
            multiprocess_mode="livemax",
            registry=reg,
        ),
        retractions=Counter(
            "pdserve_retractions",
            "Running requests retracted because the KV pool ran out mid-decode: their pages were freed and they "
            "recompute their prompt and generated tokens when pages come back.",
            ["role"],
            registry=reg,
        ),
        headroom_ratio=Gauge(
            "pdserve_headroom_ratio",
            "The admission estimate: the fraction of a request's remaining token budget it is expected to still "
            "generate, learned from finished requests and raised after a retraction.",
            ["role"],
            multiprocess_mode="livemax",
            registry=reg,
        ),
        headroom_pages=Gauge(
            "pdserve_headroom_pages",
            "KV pages the running requests are estimated to still need (kept free when admitting new ones).",
            ["role"],
            multiprocess_mode="livemax",
            registry=reg,
        ),
        pd_decisions=Counter(
            "pdserve_pd_decision",
            "Requests the router sent by prefill path: remote (prefill server + KV transfer) or local (prefilled "
            "by the decode server in its running batch).",
            ["path"],
            registry=reg,
        ),
        prompt_tokens=Counter(
            "pdserve_prompt_tokens",
            "Prompt tokens of the requests a server prefilled (cached ones included).",
            ["role"],
            registry=reg,
        ),
        cached_prompt_tokens=Counter(
            "pdserve_cached_prompt_tokens",
            "Prompt tokens whose KV came from the prefix cache instead of a forward: the hit rate is this over "
            "pdserve_prompt_tokens_total.",
            ["role"],
            registry=reg,
        ),
        prefix_cache_pages=Gauge(
            "pdserve_prefix_cache_pages",
            "KV pages held by the prefix cache (shared by running requests or kept for reuse until evicted).",
            ["role"],
            multiprocess_mode="livemax",
            registry=reg,
        ),
        prefill_chunks=Counter(
            "pdserve_prefill_chunks",
            "Prefill chunks run: a prompt longer than --chunked-prefill-size runs as several, each sent on its own.",
            ["role"],
            registry=reg,
        ),
        **parallel_metrics(reg),
        router_cache_aware=Counter(
            "pdserve_router_cache_aware",
            "Prefill choices of the cache-aware policy: by shared prefix, or by load (no match, or loads uneven).",
            ["decision"],
            registry=reg,
        ),
    )


def get_metrics() -> Metrics:
    """The process's metric objects, created on first call (in multiprocess mode if set up before)."""
    global _metrics
    with _lock:
        if _metrics is None:
            multiproc = MULTIPROC_ENV in os.environ
            if multiproc:
                # The variable may have been set (or inherited) after prometheus_client was imported.
                prometheus_client.values.ValueClass = prometheus_client.values.get_value_class()
            _metrics = _build(multiproc)
        return _metrics


def render(multiproc_dir: str | os.PathLike[str] | None = None) -> tuple[bytes, str]:
    """The exposition text and its content type for a /metrics response.

    Merges every process's files when `multiproc_dir` is given or this process is in multiprocess
    mode; otherwise exports the default registry (which also carries process/GC metrics).
    """
    path = str(multiproc_dir) if multiproc_dir is not None else os.environ.get(MULTIPROC_ENV)
    if path:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=path)
        return generate_latest(registry), CONTENT_TYPE_PLAIN_0_0_4
    # The 0.0.4 text format is what every Prometheus version parses; our names need nothing newer.
    return generate_latest(prometheus_client.REGISTRY), CONTENT_TYPE_PLAIN_0_0_4


def mark_process_dead(pid: int, multiproc_dir: str | os.PathLike[str] | None = None) -> None:
    """Forget the live gauges of a process that exited (call from the process that supervises it).

    Counters and histograms of dead processes are kept: their totals must not go backwards.
    """
    path = str(multiproc_dir) if multiproc_dir is not None else os.environ.get(MULTIPROC_ENV)
    if not path:
        return
    for f in glob.glob(os.path.join(path, f"gauge_live*_{pid}.db")):
        os.remove(f)


def status_label(http_status: int, aborted: bool = False) -> str:
    """The `status` label of pdserve_requests_total for a request that ended with `http_status`."""
    if aborted:
        return RequestStatus.ABORTED.value
    if http_status < 400:
        return RequestStatus.OK.value
    if http_status < 500:
        return RequestStatus.CLIENT_ERROR.value
    return RequestStatus.SERVER_ERROR.value


def count_failure(metrics: Metrics, role: Role, stage: Stage, reason: FailureReason) -> None:
    """Count one failed transfer under the stage it was in and its typed reason."""
    metrics.kv_transfer_failures.labels(role.value, stage.value, reason.value).inc()
