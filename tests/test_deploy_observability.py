"""deploy/prometheus and deploy/grafana: rules, scrape config, Kubernetes monitors and the dashboard.

- promtool: `check rules`, `test rules` (synthetic series for every rule and alert), `check config`;
  skipped, with the reason printed, only when promtool is not installed (Debian: `apt-get install
  prometheus`).
- The committed generated files (PrometheusRule, dashboard JSON) equal what their sources generate.
- ServiceMonitor / PodMonitor / PrometheusRule validate against the CRD JSON schemas in
  ../shared/k8s-schemas (skipped, with the reason printed, when that folder is absent).
- Dashboard structure: `${datasource}` everywhere, unique ids, a sane grid, `$__rate_interval`,
  every expression parses (promtool).
- Against a real local stack (router + prefill + decode, Mooncake): every `pdserve_*` name that a
  rule or panel queries is defined in contracts/metrics.py and appears in the stack's real /metrics;
  and a real Prometheus scraping the stack evaluates the TTFT p99 recording rule to a number.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from harness.stack import MODEL, Stack, free_port

ROOT = Path(__file__).resolve().parents[1]
PROM_DIR = ROOT / "deploy" / "prometheus"
RULES = PROM_DIR / "rules" / "pdserve.rules.yml"
RULES_TEST = PROM_DIR / "rules" / "pdserve.rules.test.yml"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "pdserve-dashboard.json"
# CI checks shared/ out beside the repository (../shared); the schemas are fixtures there.
SCHEMAS = Path(__file__).resolve().parents[2] / "shared" / "k8s-schemas"

# Counters that only get a sample once the event happens (prometheus_client exports a labelled
# metric only after its first labels() call), so a healthy local stack cannot show them. They must
# still be defined in contracts/metrics.py.
# counted only on failures, or only under --policy cache_aware (the stack routes round-robin)
EVENT_ONLY = {"pdserve_kv_transfer_failures_total", "pdserve_router_cache_aware_total"}


def _skip(reason: str) -> None:
    print(f"SKIPPED: {reason}", file=sys.stderr)
    pytest.skip(reason)


def _promtool() -> str:
    exe = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None)
    if exe is None:
        _skip("promtool is not installed (Debian: apt-get install prometheus); Prometheus checks NOT run")
    return exe


def _run(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"{' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r


def _load_module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------- expressions queried


def _rule_exprs() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [r["expr"] for g in groups for r in g["rules"]]


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(dash: dict) -> list[dict]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows
    return out


def _dashboard_exprs() -> list[str]:
    return [t["expr"] for p in _panels(_dashboard()) for t in p.get("targets", [])]


def _template_queries() -> list[str]:
    out = []
    for v in _dashboard()["templating"]["list"]:
        if v["type"] == "query":
            out.append(v["query"]["query"] if isinstance(v["query"], dict) else v["query"])
    return out


# A metric name in PromQL: `pdserve_…` not part of a recording-rule name (`level:metric:op`).
_NAME = re.compile(r"(?<![\w:])(pdserve_[A-Za-z0-9_]+)\b(?!:)")


def _names(exprs: list[str]) -> set[str]:
    return {m for e in exprs for m in _NAME.findall(e)}


def _queried_names() -> set[str]:
    names = _names(_rule_exprs() + _dashboard_exprs() + _template_queries())
    assert names, "no pdserve_* names found in the rules/dashboard: the parser is broken"
    return names


def _family(sample_name: str, histograms: set[str]) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if sample_name.endswith(suffix) and sample_name[: -len(suffix)] in histograms:
            return sample_name[: -len(suffix)]
    return sample_name


def _defined_sample_names() -> tuple[set[str], set[str]]:
    """(sample names contracts/metrics.py can export, its histogram names), from the real definitions."""
    from contracts import metrics as sm

    # registry=None objects (what multiprocess mode builds): nothing is registered globally.
    m = sm._build(multiproc=True)
    samples, hists = set(), set()
    for obj in vars(m).values():
        for fam in obj.describe():
            if fam.type == "histogram":
                hists.add(fam.name)
                samples |= {f"{fam.name}_bucket", f"{fam.name}_sum", f"{fam.name}_count"}
            elif fam.type == "counter":
                samples.add(f"{fam.name}_total")
            else:
                samples.add(fam.name)
    return samples, hists


# --------------------------------------------------------------------------- promtool


def test_promtool_check_rules():
    out = _run([_promtool(), "check", "rules", str(RULES)])
    assert "SUCCESS" in out.stdout, out.stdout


def test_promtool_test_rules():
    # every recording rule's value and every alert firing / not firing (see the test file's comments)
    out = _run([_promtool(), "test", "rules", RULES_TEST.name], cwd=RULES_TEST.parent)
    assert "SUCCESS" in out.stdout, out.stdout


def test_rule_unit_tests_cover_every_rule():
    groups = yaml.safe_load(RULES.read_text())["groups"]
    records = {r["record"] for g in groups for r in g["rules"] if "record" in r}
    alerts = {r["alert"] for g in groups for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load(RULES_TEST.read_text())["tests"]
    tested_exprs = " ".join(t["expr"] for tc in tests for t in tc.get("promql_expr_test", []))
    fired = {t["alertname"] for tc in tests for t in tc.get("alert_rule_test", []) if t.get("exp_alerts")}
    quiet = {t["alertname"] for tc in tests for t in tc.get("alert_rule_test", []) if not t.get("exp_alerts")}
    assert {r for r in records if r not in tested_exprs} == set(), "recording rules without a value test"
    assert alerts - fired == set(), "alerts never tested firing"
    assert alerts - quiet == set(), "alerts never tested not firing"


def test_promtool_check_config():
    out = _run([_promtool(), "check", "config", "prometheus.yml"], cwd=PROM_DIR)
    assert "SUCCESS" in out.stdout, out.stdout


# --------------------------------------------------------------------------- generated files


def test_prometheusrule_is_generated_from_the_rule_file():
    gen = _load_module(PROM_DIR / "make_prometheusrule.py")
    committed = (PROM_DIR / "prometheusrule.yaml").read_text()
    assert committed == gen.render(), "deploy/prometheus/prometheusrule.yaml is stale: run make_prometheusrule.py"
    doc = yaml.safe_load(committed)
    assert doc["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


def test_dashboard_is_generated_from_its_source():
    gen = _load_module(GRAFANA_DIR / "dashboard.py")
    assert DASHBOARD.read_text() == gen.render(), "pdserve-dashboard.json is stale: run deploy/grafana/dashboard.py"


# --------------------------------------------------------------------------- Kubernetes CRD schemas


def _drop_bad_patterns(node):
    """The datree schemas carry Go-only regexes (`(?i)…`) that Python's re rejects: drop those."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "pattern" and isinstance(v, str):
                try:
                    re.compile(v)
                except re.error:
                    continue
            out[k] = _drop_bad_patterns(v)
        return out
    if isinstance(node, list):
        return [_drop_bad_patterns(v) for v in node]
    return node


@pytest.mark.parametrize(
    ("manifest", "schema"),
    [
        ("servicemonitor.yaml", "servicemonitor_v1.json"),
        ("podmonitor.yaml", "podmonitor_v1.json"),
        ("prometheusrule.yaml", "prometheusrule_v1.json"),
    ],
)
def test_monitoring_crs_match_crd_schemas(manifest, schema):
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema not installed: CRD schema checks NOT run")
    path = SCHEMAS / schema
    if not path.exists():
        _skip(f"{path} not found (CI has shared/ beside the checkout): CRD schema check NOT run")
    schema_doc = _drop_bad_patterns(json.loads(path.read_text()))
    docs = [d for d in yaml.safe_load_all((PROM_DIR / manifest).read_text()) if d]
    assert docs
    cls = jsonschema.validators.validator_for(schema_doc)
    validator = cls(schema_doc)
    for doc in docs:
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
        assert errors == [], f"{manifest}:\n" + "\n".join(errors)


def test_monitors_select_the_k8s_labels_and_jobs_the_alerts_use():
    pm = yaml.safe_load((PROM_DIR / "podmonitor.yaml").read_text())
    sm = yaml.safe_load((PROM_DIR / "servicemonitor.yaml").read_text())
    assert pm["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "pdserve"}
    assert sm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "router"
    relabel = pm["spec"]["podMetricsEndpoints"][0]["relabelings"][0]
    assert relabel["targetLabel"] == "job" and relabel["replacement"] == "pdserve-$1"
    assert sm["spec"]["endpoints"][0]["relabelings"][0] == {"targetLabel": "job", "replacement": "pdserve-router"}
    jobs = {j["job_name"] for j in yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())["scrape_configs"]}
    assert jobs == {"pdserve-router", "pdserve-prefill", "pdserve-decode"}
    rules = RULES.read_text()
    assert 'up{job="pdserve-decode"}' in rules and 'up{job="pdserve-prefill"}' in rules


# --------------------------------------------------------------------------- dashboard structure


def test_dashboard_structure():
    dash = _dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = _panels(dash)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['title']!r} overlaps another"
                cells.add((x, y))
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
            for fn in re.findall(r"\b(rate|irate|increase)\(([^()]*(?:\([^()]*\))?[^()]*)\)", t["expr"]):
                assert "[$__rate_interval]" in fn[1], f"{p['title']}: {fn[0]} without $__rate_interval"
            for var in re.findall(r"\$(\w+)", t["expr"]):
                assert var.startswith("__") or var in variables, f"{p['title']}: undefined ${var}"
    titles = " | ".join(p["title"] for p in panels).lower()
    for want in ("time to first token", "heatmap", "inter-token", "end-to-end", "tokens / s", "status",
                 "running", "queued", "kv pool", "kv transfer latency", "bytes", "failures", "pipelined"):  # fmt: skip
        assert want in titles, f"no panel for {want!r}"
    assert any(p["type"] == "heatmap" for p in panels)


def test_dashboard_expressions_parse(tmp_path):
    promtool = _promtool()
    rules = [
        {"record": f"dashboard:expr_{i}", "expr": e.replace("$__rate_interval", "1m").replace("$role", ".*")}
        for i, e in enumerate(_dashboard_exprs())
    ]
    f = tmp_path / "dashboard-exprs.yml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    _run([promtool, "check", "rules", str(f)])


def test_queried_metrics_are_defined_in_contracts_metrics():
    defined, _ = _defined_sample_names()
    assert _queried_names() - defined == set(), "queried metrics that contracts/metrics.py does not define"


# --------------------------------------------------------------------------- against a real stack


def _completion(url: str, i: int, stream: bool) -> None:
    body = {"model": MODEL, "prompt": f"Request number {i}:", "max_tokens": 4, "temperature": 0, "stream": stream}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def stack():
    s = Stack("mooncake")
    try:
        # the router records TTFT for streamed requests only: send both kinds
        for i in range(3):
            _completion(s.router_url, i, stream=False)
            _completion(s.router_url, i, stream=True)
        yield s
    finally:
        s.stop()


def _scrape(url: str) -> set[str]:
    r = httpx.get(f"{url}/metrics", timeout=10)
    assert r.status_code == 200
    return {line.split("{")[0].split(" ")[0] for line in r.text.splitlines() if line and not line.startswith("#")}


def test_queried_metrics_exist_in_real_metrics(stack):
    live = set()
    for url in (stack.router_url, stack.prefill_url, stack.decode_url):
        live |= _scrape(url)
    _, hists = _defined_sample_names()
    queried = _queried_names()
    missing = sorted(n for n in queried - live if n not in EVENT_ONLY)
    assert missing == [], (
        "metrics queried by deploy/prometheus rules or the Grafana dashboard but absent from the stack's "
        f"/metrics: {missing} (families: {sorted({_family(n, hists) for n in missing})})"
    )
    not_seen = sorted(queried & EVENT_ONLY - live)
    if not_seen:
        print(f"event-only metrics not exercised by a healthy stack (checked against contracts/metrics.py): {not_seen}")


def _query(prom: str, expr: str) -> list[dict]:
    r = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=5)
    r.raise_for_status()
    return r.json()["data"]["result"]


def _wait_prometheus_ready(proc: subprocess.Popen, prom: str, log_path: Path, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, "prometheus exited:\n" + log_path.read_text()
        try:
            if httpx.get(f"{prom}/-/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "prometheus not ready:\n" + log_path.read_text()
        time.sleep(0.2)


def test_real_prometheus_evaluates_ttft_p99(stack, tmp_path):
    """Prometheus scrapes the stack every 1 s and evaluates the committed rule file every 1 s.

    The rules keep their production `[5m]` windows: rate() needs just two samples inside its window,
    so with a 1 s scrape the rules have values a few seconds after load starts, and the long window
    keeps the quantile defined after the load stops (a short window would go NaN once no request
    lands in it). So the test runs the very file that ships, not an edited copy.
    """
    exe = shutil.which("prometheus") or ("/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)
    if exe is None:
        _skip("prometheus is not installed (Debian: apt-get install prometheus); live Prometheus test NOT run")
    host = lambda url: url.removeprefix("http://")  # noqa: E731
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": f"pdserve-{role}", "static_configs": [{"targets": [host(url)]}]}
            for role, url in (
                ("router", stack.router_url),
                ("prefill", stack.prefill_url),
                ("decode", stack.decode_url),
            )
        ],
    }
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(yaml.safe_dump(config))
    port = free_port()
    prom = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "prometheus.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [exe, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    stop_load = threading.Event()
    load_errors: list[BaseException] = []

    def load() -> None:
        i, end = 100, time.monotonic() + 15
        while time.monotonic() < end and not stop_load.is_set():
            try:
                _completion(stack.router_url, i, stream=True)
                _completion(stack.router_url, i, stream=False)
            except BaseException as e:  # surfaced below
                load_errors.append(e)
                return
            i += 1
            time.sleep(0.5)

    loader = threading.Thread(target=load, daemon=True)
    try:
        _wait_prometheus_ready(proc, prom, tmp_path / "prometheus.log")
        loader.start()
        expr = 'role:pdserve_time_to_first_token_seconds:p99_rate5m{role="router"}'
        deadline, value, result = time.monotonic() + 60, None, []
        while time.monotonic() < deadline:
            result = _query(prom, expr)
            if result and math.isfinite(v := float(result[0]["value"][1])):
                value = v
                break
            time.sleep(1)
        assert value is not None, f"{expr} gave no finite value in 60 s (last result {result})"
        assert 0 < value < 60, value
        # every target is scraped, and the other roles' TTFT p99 is there too
        # a scrape slower than its 1 s timeout under CI load reads as down for that one scrape: poll, don't sample
        want_up = {"pdserve-router": "1", "pdserve-prefill": "1", "pdserve-decode": "1"}
        deadline, up = time.monotonic() + 15, {}
        while (up := {r["metric"]["job"]: r["value"][1] for r in _query(prom, "up")}) != want_up:
            assert time.monotonic() < deadline, up
            time.sleep(0.5)
        roles: set[str] = set()
        deadline = time.monotonic() + 20  # targets are scraped independently: give the others a moment
        while not {"router", "prefill", "decode"} <= roles and time.monotonic() < deadline:
            time.sleep(0.5)
            roles = {r["metric"]["role"] for r in _query(prom, "role:pdserve_time_to_first_token_seconds:p99_rate5m")}
        assert {"router", "prefill", "decode"} <= roles, roles
        # a missed scrape can make a "no server up" alert pending for one evaluation; it must clear, never stay
        deadline, alerts = time.monotonic() + 15, None
        while (alerts := _query(prom, 'ALERTS{alertname=~"PdserveNo.*"}')) != []:
            assert time.monotonic() < deadline, alerts
            time.sleep(0.5)
        print(f"router TTFT p99 from Prometheus: {value:.4f} s")
    finally:
        stop_load.set()
        if loader.is_alive():
            loader.join(timeout=60)
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    assert load_errors == [], load_errors
