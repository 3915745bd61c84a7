"""contracts.metrics: multiprocess aggregation across real processes, lazy creation, promtool validity."""

from __future__ import annotations

import multiprocessing as mp
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from contracts import metrics as M


def _record(multiproc_dir: str, running: int, ttft: float, n_ok: int) -> None:
    """Runs in a spawned child: set up multiprocess mode, then record a known set of values."""
    from contracts import metrics

    # Imported before setup on purpose: laziness must make the order irrelevant.
    metrics.setup_multiprocess(multiproc_dir)
    m = metrics.get_metrics()
    m.time_to_first_token.labels(role="decode").observe(ttft)
    m.inter_token_latency.labels(role="decode").observe(0.002)
    m.e2e_request_latency.labels(role="decode").observe(1.5)
    m.queue_time.labels(role="decode").observe(0.05)
    m.request_stage.labels(role="decode", stage="kv_transfer").observe(0.3)
    m.kv_transfer_seconds.labels(role="decode").observe(0.004)
    m.kv_transfer_bytes.labels(role="decode").inc(1000)
    m.kv_transfer_failures.labels(role="decode", stage="kv_transfer", reason="timed_out").inc()
    m.requests.labels(role="decode", status="ok").inc(n_ok)
    m.requests.labels(role="decode", status="aborted").inc()
    m.prefill_batches.labels(mode="pipelined").inc()
    m.router_retries.inc()
    m.running_requests.labels(role="decode").set(running)
    m.queued_requests.labels(role="decode").set(1)
    m.kv_pool_usage_ratio.labels(role="decode").set(running / 10)


def _late_setup(multiproc_dir: str) -> str:
    """Runs in a spawned child: setup after metrics exist must fail loudly, not silently split values."""
    from contracts import metrics

    metrics.get_metrics()
    try:
        metrics.setup_multiprocess(multiproc_dir)
    except RuntimeError as exc:
        return str(exc)
    return ""


def _samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture(scope="module")
def two_process_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("prom_multiproc")
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_record, args=(str(d), 2, 0.12, 3)),
        ctx.Process(target=_record, args=(str(d), 3, 0.9, 4)),
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return d


def test_multiprocess_values_add_up(two_process_dir: Path) -> None:
    body, ctype = M.render(two_process_dir)
    assert ctype.startswith("text/plain")
    s = _samples(body)
    dec = (("role", "decode"),)
    assert s[("pdserve_requests_total", (("role", "decode"), ("status", "ok")))] == 7
    assert s[("pdserve_requests_total", (("role", "decode"), ("status", "aborted")))] == 2
    assert s[("pdserve_kv_transfer_bytes_total", dec)] == 2000
    key = (
        "pdserve_kv_transfer_failures_total",
        (("reason", "timed_out"), ("role", "decode"), ("stage", "kv_transfer")),
    )
    assert s[key] == 2
    assert s[("pdserve_prefill_batches_total", (("mode", "pipelined"),))] == 2
    assert s[("pdserve_router_retries_total", ())] == 2
    # Histograms: counts and sums add up, and buckets are cumulative across processes.
    assert s[("pdserve_time_to_first_token_seconds_count", dec)] == 2
    assert s[("pdserve_time_to_first_token_seconds_sum", dec)] == pytest.approx(1.02)
    assert s[("pdserve_time_to_first_token_seconds_bucket", (("le", "0.15"), ("role", "decode")))] == 1
    assert s[("pdserve_time_to_first_token_seconds_bucket", (("le", "1.0"), ("role", "decode")))] == 2
    assert s[("pdserve_inter_token_latency_seconds_bucket", (("le", "0.0025"), ("role", "decode")))] == 2
    stage = (("role", "decode"), ("stage", "kv_transfer"))
    assert s[("pdserve_request_stage_seconds_count", stage)] == 2
    # Gauges: running/queued sum over live processes, KV usage takes the max.
    assert s[("pdserve_running_requests", dec)] == 5
    assert s[("pdserve_queued_requests", dec)] == 2
    assert s[("pdserve_kv_pool_usage_ratio", dec)] == pytest.approx(0.3)


def test_mark_process_dead_drops_live_gauges(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_record, args=(str(tmp_path), 4, 0.2, 1))
    p.start()
    p.join(60)
    assert p.exitcode == 0
    M.mark_process_dead(p.pid, tmp_path)
    s = _samples(M.render(tmp_path)[0])
    assert ("pdserve_running_requests", (("role", "decode"),)) not in s
    # Counters of a dead process are kept, so totals never go backwards.
    assert s[("pdserve_requests_total", (("role", "decode"), ("status", "ok")))] == 1


def test_setup_after_get_metrics_is_an_error(tmp_path: Path) -> None:
    with mp.get_context("spawn").Pool(1) as pool:
        msg = pool.apply(_late_setup, (str(tmp_path),))
    assert "setup_multiprocess() was called after get_metrics()" in msg


def test_single_process_mode_exports_definitions() -> None:
    # This pytest process never calls setup_multiprocess: the default registry path (the router's).
    m = M.get_metrics()
    m.requests.labels(role="router", status="ok").inc()
    m.running_requests.labels(role="router").inc()
    body, _ = M.render()
    s = _samples(body)
    assert s[("pdserve_requests_total", (("role", "router"), ("status", "ok")))] >= 1
    assert b"# TYPE pdserve_time_to_first_token_seconds histogram" in body


def test_status_label() -> None:
    assert M.status_label(200) == "ok"
    assert M.status_label(404) == "client_error"
    assert M.status_label(504) == "server_error"
    assert M.status_label(200, aborted=True) == "aborted"


def test_promtool_check_metrics(two_process_dir: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not on PATH (Debian: apt-get install -y prometheus); cannot lint the exposition")
    for body in (M.render(two_process_dir)[0], M.render()[0]):
        res = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=60)
        assert res.returncode == 0, (res.stdout + res.stderr).decode()
