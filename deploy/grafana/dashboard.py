"""The pdserve Grafana dashboard, as code: the single source of pdserve-dashboard.json.

    python deploy/grafana/dashboard.py          # rewrite pdserve-dashboard.json
    python deploy/grafana/dashboard.py --check  # exit 1 if the committed JSON is out of date

Plain Python (standard library only), so it runs anywhere the tests do. Every query goes through the
`${datasource}` template variable and uses `$__rate_interval`; `$role` filters by pdserve's `role`
label (router | prefill | decode). Metric names are those of contracts/metrics.py; the test
tests/test_deploy_observability.py checks each `pdserve_*` name queried here against the /metrics of
a real local stack, checks that every expression parses (promtool), and that this file regenerates
the committed JSON exactly. Import the JSON into Grafana (>= 10.4), or ship it as a ConfigMap
labelled `grafana_dashboard: "1"` for the kube-prometheus-stack sidecar.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "pdserve-dashboard.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
R = 'role=~"$role"'  # label filter used by per-role queries


def q(expr: str, legend: str, **extra) -> dict:
    return {"expr": expr, "legendFormat": legend, "range": True, **extra}


def quantiles(metric: str, qs=(0.5, 0.9, 0.99), by: str = "role") -> list[dict]:
    return [
        q(
            f"histogram_quantile({qv}, sum by (le, {by}) (rate({metric}_bucket{{{R}}}[$__rate_interval])))",
            f"p{round(qv * 100)} {{{{{by}}}}}",
        )
        for qv in qs
    ]


class Layout:
    """Places panels left to right on Grafana's 24-column grid, wrapping rows; assigns ids."""

    def __init__(self) -> None:
        self.panels: list[dict] = []
        self.x = self.y = 0
        self.row_h = 0

    def _next_id(self) -> int:
        return len(self.panels) + 1

    def row(self, title: str) -> None:
        if self.x:
            self.y += self.row_h
        self.x, self.row_h = 0, 0
        self.panels.append(
            {
                "id": self._next_id(),
                "type": "row",
                "title": title,
                "collapsed": False,
                "panels": [],
                "gridPos": {"x": 0, "y": self.y, "w": 24, "h": 1},
            }
        )
        self.y += 1

    def add(self, panel: dict, w: int = 8, h: int = 8) -> None:
        if self.x + w > 24:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        panel = {"id": self._next_id(), **panel, "gridPos": {"x": self.x, "y": self.y, "w": w, "h": h}}
        for i, t in enumerate(panel.get("targets", [])):
            t.setdefault("refId", chr(ord("A") + i))
            t.setdefault("datasource", DS)
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)


def timeseries(title: str, targets: list[dict], unit: str, description: str = "", stack: bool = False) -> dict:
    custom = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never", "spanNulls": False}
    if stack:
        custom["stacking"] = {"mode": "normal", "group": "A"}
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DS,
        "fieldConfig": {"defaults": {"unit": unit, "min": 0, "custom": custom}, "overrides": []},
        "options": {
            "legend": {
                "displayMode": "table",
                "placement": "bottom",
                "showLegend": True,
                "calcs": ["lastNotNull", "max"],
            },
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": targets,
    }


def heatmap(title: str, expr: str, description: str = "") -> dict:
    return {
        "type": "heatmap",
        "title": title,
        "description": description,
        "datasource": DS,
        "fieldConfig": {"defaults": {"custom": {"scaleDistribution": {"type": "linear"}}}, "overrides": []},
        "options": {
            "calculate": False,
            "cellGap": 1,
            "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64, "exponent": 0.5, "fill": "dark-orange"},
            "yAxis": {"axisPlacement": "left", "unit": "s"},
            "rowsFrame": {"layout": "auto"},
            "tooltip": {"mode": "single", "yHistogram": True},
            "legend": {"show": True},
        },
        "targets": [q(expr, "{{le}}", format="heatmap")],
    }


def stat(title: str, targets: list[dict], unit: str, description: str = "") -> dict:
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DS,
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "thresholds": {
                    "mode": "absolute",
                    "steps": [{"color": "red", "value": None}, {"color": "green", "value": 1}],
                },
            },
            "overrides": [],
        },
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "background",
            "graphMode": "none",
            "textMode": "value_and_name",
        },
        "targets": targets,
    }


def build() -> dict:
    L = Layout()
    L.row("Latency (role=router is what clients see)")
    L.add(
        timeseries(
            "Time to first token p50 / p90 / p99",
            quantiles("pdserve_time_to_first_token_seconds"),
            "s",
            "histogram_quantile over the TTFT histogram, per role. SLO: router p99 <= 2 s (alert PdserveTTFTP99High).",
        )
    )
    L.add(
        heatmap(
            "Time to first token (router) heatmap",
            'sum by (le) (increase(pdserve_time_to_first_token_seconds_bucket{role="router"}[$__rate_interval]))',
            "Requests per TTFT bucket per interval, as seen by the router.",
        )
    )
    L.add(timeseries("Inter-token latency p50 / p90 / p99", quantiles("pdserve_inter_token_latency_seconds"), "s"))
    L.add(
        timeseries("End-to-end request latency p50 / p90 / p99", quantiles("pdserve_e2e_request_latency_seconds"), "s")
    )
    L.add(
        timeseries(
            "Time per disaggregation stage p99",
            [
                q(
                    "histogram_quantile(0.99, sum by (le, role, stage) "
                    f"(rate(pdserve_request_stage_seconds_bucket{{{R}}}[$__rate_interval])))",
                    "{{role}} {{stage}}",
                )
            ],
            "s",
            "bootstrap, wait_for_input, prefill_forward, kv_transfer, decode_admit.",
        )
    )
    L.add(timeseries("Queue time p50 / p99", quantiles("pdserve_queue_time_seconds", qs=(0.5, 0.99)), "s"))

    L.row("Throughput")
    L.add(
        timeseries(
            "Generated tokens / s",
            [
                q(
                    f"sum by (role) (rate(pdserve_time_to_first_token_seconds_count{{{R}}}[$__rate_interval]))"
                    f" + sum by (role) (rate(pdserve_inter_token_latency_seconds_count{{{R}}}[$__rate_interval]))",
                    "{{role}}",
                )
            ],
            "short",
            "First tokens (TTFT count) + following tokens (inter-token count).",
        )
    )
    L.add(
        timeseries(
            "Requests / s by status",
            [
                q(
                    f"sum by (role, status) (rate(pdserve_requests_total{{{R}}}[$__rate_interval]))",
                    "{{role}} {{status}}",
                )
            ],
            "reqps",
            stack=True,
        )
    )
    L.add(
        stat(
            "Targets up",
            [q('sum by (job) (up{job=~"pdserve-.*"})', "{{job}}", instant=True, range=False)],
            "short",
            "Scraped pdserve processes per job (alerts PdserveNoDecodeUp / PdserveNoPrefillUp).",
        )
    )

    L.row("Load")
    L.add(
        timeseries(
            "Running requests",
            [q(f"sum by (role, instance) (pdserve_running_requests{{{R}}})", "{{role}} {{instance}}")],
            "short",
        )
    )
    L.add(
        timeseries(
            "Queued requests",
            [q(f"sum by (role, instance) (pdserve_queued_requests{{{R}}})", "{{role}} {{instance}}")],
            "short",
        )
    )
    L.add(
        timeseries(
            "KV pool usage",
            [q(f"max by (role, instance) (pdserve_kv_pool_usage_ratio{{{R}}})", "{{role}} {{instance}}")],
            "percentunit",
            "Fraction of KV cache pages in use.",
        )
    )
    L.add(
        timeseries(
            "Servers in the router's rotation",
            [q("max by (url) (pdserve_router_upstream_healthy)", "{{url}}")],
            "short",
            "1: the router sends new requests to it; 0: marked down after a refused/reset connection or a failed "
            "/health, until /health answers (alert PdserveUpstreamDown after 2 minutes).",
        )
    )

    L.row("Decode memory and conditional disaggregation")
    L.add(
        timeseries(
            "Retractions / s",
            [
                q(
                    f"sum by (role, instance) (rate(pdserve_retractions_total{{{R}}}[$__rate_interval]))",
                    "{{role}} {{instance}}",
                )
            ],
            "short",
            "Running requests whose pages were taken back when the pool ran out; each recomputes its prompt and "
            "generated tokens later. A steady rate means the pool is too small for the load or the estimate too low.",
        )
    )
    L.add(
        timeseries(
            "Admission headroom",
            [
                q(f"max by (role, instance) (pdserve_headroom_ratio{{{R}}})", "ratio {{role}} {{instance}}"),
                q(f"max by (role, instance) (pdserve_headroom_pages{{{R}}})", "pages {{role}} {{instance}}"),
            ],
            "short",
            "ratio: the share of a request's remaining budget it is expected to still generate (learnt from finished "
            "requests, raised after retractions); pages: what the running requests are expected to still take.",
        )
    )
    L.add(
        timeseries(
            "Prefill path / s: remote vs local",
            [q("sum by (path) (rate(pdserve_pd_decision_total[$__rate_interval]))", "{{path}}")],
            "short",
            "The router's decision per request: remote (prefill server + KV transfer) or local (short prompt, "
            "prefilled by the decode server).",
            stack=True,
        )
    )

    L.row("Prefix cache, chunked prefill and cache-aware routing")
    L.add(
        timeseries(
            "Prefix cache hit rate",
            [
                q(
                    "sum by (instance) (rate(pdserve_cached_prompt_tokens_total[$__rate_interval])) / "
                    "sum by (instance) (rate(pdserve_prompt_tokens_total[$__rate_interval]))",
                    "{{instance}}",
                )
            ],
            "percentunit",
            "Share of prompt tokens whose KV came from the prefill's prefix cache instead of a forward.",
        )
    )
    L.add(
        timeseries(
            "Prefix cache pages / chunks per s",
            [
                q("max by (instance) (pdserve_prefix_cache_pages)", "cache pages {{instance}}"),
                q("sum by (instance) (rate(pdserve_prefill_chunks_total[$__rate_interval]))", "chunks/s {{instance}}"),
            ],
            "short",
            "Pages the prefix cache holds (reusable ones are evicted least recently used first under pressure), and "
            "prefill chunks run: prompts longer than --chunked-prefill-size.",
        )
    )
    L.add(
        timeseries(
            "Cache-aware routing / s",
            [q("sum by (decision) (rate(pdserve_router_cache_aware_total[$__rate_interval]))", "{{decision}}")],
            "short",
            "How --policy cache_aware chose each prefill: by shared prefix, or by load (no match, or loads uneven).",
            stack=True,
        )
    )

    L.row("Prefill → decode KV transfer")
    L.add(timeseries("KV transfer latency p50 / p90 / p99", quantiles("pdserve_kv_transfer_seconds"), "s"), w=6)
    L.add(
        timeseries(
            "KV transfer bytes / s",
            [q(f"sum by (role) (rate(pdserve_kv_transfer_bytes_total{{{R}}}[$__rate_interval]))", "{{role}}")],
            "Bps",
        ),
        w=6,
    )
    L.add(
        timeseries(
            "KV transfer failures / s",
            [
                q(
                    f"sum by (role, stage, reason) (rate(pdserve_kv_transfer_failures_total{{{R}}}[$__rate_interval]))",
                    "{{role}} {{stage}} {{reason}}",
                )
            ],
            "short",
            "Alert PdserveKVTransferFailures fires on any failure.",
        ),
        w=6,
    )
    L.add(
        timeseries(
            "Prefill batches / s: pipelined vs whole",
            [q("sum by (mode) (rate(pdserve_prefill_batches_total[$__rate_interval]))", "{{mode}}")],
            "short",
            "Layer-group pipelined prefill batches vs whole-forward batches.",
            stack=True,
        ),
        w=6,
    )

    return {
        "uid": "pdserve-overview",
        "title": "pdserve: disaggregated prefill/decode serving",
        "description": "Generated by deploy/grafana/dashboard.py; do not edit the JSON by hand.",
        "tags": ["pdserve", "llm", "prefill-decode"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "timezone": "browser",
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "refresh": 1,
                    "regex": "",
                    "options": [],
                },
                {
                    "name": "role",
                    "label": "Role",
                    "type": "query",
                    "datasource": DS,
                    "query": {"query": "label_values(pdserve_requests_total, role)", "refId": "role"},
                    "definition": "label_values(pdserve_requests_total, role)",
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "current": {"text": "All", "value": "$__all"},
                    "refresh": 2,
                    "sort": 1,
                    "hide": 0,
                    "regex": "",
                    "options": [],
                },
            ]
        },
        "panels": L.panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python {Path(__file__).as_posix()}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
