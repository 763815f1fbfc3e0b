"""The Grafana dashboard (monitoring/grafana/dashboards/batchsender.json) and its
provisioning: well formed, every topic shown, every name it queries a real metric or
recording rule, and every query valid PromQL for Prometheus's own parser (promtool)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from devkit.prometheus import (
    DASHBOARD,
    GRAFANA_BUILTINS,
    ROOT,
    dashboard_queries,
    load_dashboard,
    selected_names,
    substitute,
    variables,
)
from engine import metrics

RECORDING = ROOT / "monitoring" / "rules" / "recording.yml"
PROVISIONING = ROOT / "monitoring" / "grafana" / "provisioning"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
# Series the API adds at scrape time (engine/metrics.py render_metrics) and Prometheus's own.
SCRAPE_TIME = {"nats_queue_depth", "batchsender_batches", "batchsender_results_lag_seconds", "up"}
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
}
EMAILS = "provider_status:batchsender_emails:rate1m"
HTTP = "route_status:batchsender_http_requests:rate1m"
# (topic, names one panel must all use, a text one of that panel's queries must contain)
TOPICS = [
    ("throughput per provider and status", {EMAILS}, "by (provider, status)"),
    ("queue depth per consumer", {"consumer:nats_queue_depth:max"}, ""),
    (
        "send latency p50/p95/p99 per provider",
        {f"provider:batchsender_send_duration_seconds:{q}_5m" for q in ("p50", "p95", "p99")},
        "",
    ),
    ("rate-limit wait p95", {"provider:batchsender_rate_limit_wait_seconds:p95_5m"}, ""),
    ("rate-limit waits per bucket", {"batchsender_rate_limit_waits_total"}, "by (bucket)"),
    ("tokens waited per bucket", {"batchsender_rate_limit_tokens_waited_total"}, "by (bucket)"),
    ("send errors", {EMAILS}, 'status="failed"'),
    ("retries", {"batchsender_retries_total"}, "reason"),
    ("dead letters", {"batchsender_dead_letters_total"}, "kind"),
    ("ClickHouse insert rate", {"batchsender_clickhouse_rows:rate1m"}, ""),
    ("ClickHouse insert latency", {"batchsender_clickhouse_insert_seconds_bucket"}, ""),
    ("ClickHouse insert failures", {"batchsender_clickhouse_insert_failures_total"}, ""),
    ("ClickHouse buffer", {"batchsender_clickhouse_buffer_rows"}, ""),
    ("results lag", {"batchsender_results_lag_seconds"}, "consumer"),
    ("worker processes", {"batchsender_worker_processes"}, ""),
    ("worker restarts", {"batchsender_worker_restarts_total"}, "reason"),
    ("leader", {"batchsender_leader", "batchsender_leader_changes_total"}, ""),
    ("webhooks per provider and event", {"provider_event:batchsender_webhooks:rate1m"}, "event"),
    ("batches by status", {"batchsender_batches"}, "by (status)"),
    ("API request rate per route", {HTTP}, "by (route)"),
    ("API 5xx errors", {HTTP}, 'status=~"5..'),
    ("API latency per route", {"route:batchsender_http_request_seconds:p95_5m"}, ""),
]
# Series with a provider label: their queries follow the dashboard's $provider choice.
PER_PROVIDER = {
    EMAILS,
    "provider:batchsender_send_duration_seconds:p50_5m",
    "provider:batchsender_send_duration_seconds:p95_5m",
    "provider:batchsender_send_duration_seconds:p99_5m",
    "provider:batchsender_rate_limit_wait_seconds:p95_5m",
    "provider_event:batchsender_webhooks:rate1m",
    "batchsender_retries_total",
}


def exposed_names() -> set[str]:
    """Every sample name the collectors of engine/metrics.py expose."""
    names = set()
    for collector in vars(metrics).values():
        if isinstance(collector, MetricWrapperBase):
            for family in collector.describe():
                names.update(family.name + suffix for suffix in SUFFIXES[family.type])
    return names


def recording_rules() -> dict[str, str]:
    assert RECORDING.exists(), f"{RECORDING} is missing"
    groups = yaml.safe_load(RECORDING.read_text())["groups"]
    return {rule["record"]: rule["expr"] for g in groups for rule in g["rules"] if "record" in rule}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return load_dashboard()


@pytest.fixture(scope="module")
def queries(dashboard) -> list[tuple[dict, dict]]:
    return dashboard_queries(dashboard)


def all_panels(dashboard: dict) -> list[dict]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels") or [])
    return panels


def test_dashboard_identity(dashboard):
    assert dashboard["uid"] == "batchsender"
    assert dashboard["title"] == "BatchSender Monitoring"  # /d/batchsender/batchsender-monitoring
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert DASHBOARD.read_text().endswith("}\n")


def test_provider_variable(dashboard, queries):
    (provider,) = [v for v in dashboard["templating"]["list"] if v["name"] == "provider"]
    assert provider["type"] == "query"
    assert provider["datasource"] == DATASOURCE
    assert provider["definition"] == "label_values(batchsender_emails_total, provider)"
    assert provider["query"]["query"] == provider["definition"]
    assert provider["includeAll"] and provider["allValue"] == ".*"
    defined = {v["name"] for v in dashboard["templating"]["list"]} | set(GRAFANA_BUILTINS)
    for panel, target in queries:
        unknown = variables(target["expr"]) - defined
        assert not unknown, f"{panel['title']}: undefined variables {unknown}"
    for panel, target in queries:
        if selected_names(target["expr"]) & PER_PROVIDER:
            assert 'provider=~"$provider"' in target["expr"], panel["title"]


def test_every_panel_queries_prometheus(dashboard):
    for panel in all_panels(dashboard):
        if panel["type"] == "row":
            assert not panel.get("targets"), f"row {panel['title']} has queries"
            continue
        title = panel.get("title")
        assert title, f"panel {panel['id']} has no title"
        assert panel.get("datasource") == DATASOURCE, title
        assert panel.get("targets"), f"{title}: no query"
        for target in panel["targets"]:
            assert target.get("datasource") == DATASOURCE, title
            assert target.get("expr", "").strip(), f"{title}: a target without expr"
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), f"{title}: refIds {ref_ids}"
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{title}: no unit"
        if panel["type"] == "timeseries":
            for target in panel["targets"]:
                assert target.get("legendFormat"), f"{title} {target['refId']}: no legend"
        assert panel["type"] in ("timeseries", "stat"), title


def test_panel_ids_unique_and_layout_sane(dashboard):
    panels = all_panels(dashboard)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(ids)}"
    boxes = []
    for panel in panels:
        grid = panel["gridPos"]
        x, y, w, h = (grid[k] for k in "xywh")
        assert all(isinstance(v, int) for v in (x, y, w, h)), panel["title"]
        assert 0 <= x and 0 <= y and 1 <= w and 1 <= h and x + w <= 24, panel["title"]
        if panel["type"] == "row":
            assert (x, w, h) == (0, 24, 1), panel["title"]
        boxes.append((panel["title"], x, y, w, h))
    for i, (a, ax, ay, aw, ah) in enumerate(boxes):
        for b, bx, by, bw, bh in boxes[i + 1 :]:
            apart = ax + aw <= bx or bx + bw <= ax or ay + ah <= by or by + bh <= ay
            assert apart, f"panels {a!r} and {b!r} overlap"


def test_every_topic_has_a_panel(dashboard):
    panels = [p for p in all_panels(dashboard) if p.get("targets")]
    missing = []
    for topic, names, text in TOPICS:
        if not any(
            names <= set().union(*(selected_names(t["expr"]) for t in panel["targets"]))
            and any(text in t["expr"] for t in panel["targets"])
            for panel in panels
        ):
            missing.append(topic)
    assert not missing, f"no panel for: {missing}"


def test_names_in_queries_are_metrics_or_recording_rules(dashboard, queries):
    known = exposed_names() | SCRAPE_TIME
    assert {"batchsender_emails_total", "batchsender_send_duration_seconds_bucket"} <= known
    rules = recording_rules()
    unknown = {}
    for panel, target in queries:
        for name in selected_names(target["expr"]) - known - rules.keys():
            unknown.setdefault(name, []).append(panel["title"])
    variable = dashboard["templating"]["list"][0]["definition"]
    for name in selected_names(re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", variable)):
        if name not in known:
            unknown.setdefault(name, []).append("variable provider")
    assert not unknown, f"neither a metric nor a recording rule: {unknown}"


def test_heavy_queries_use_the_recording_rules(queries):
    """A raw series that a recording rule aggregates is not queried again by a panel."""
    raw = {}
    for record, expr in recording_rules().items():
        for name in selected_names(expr):
            raw[name] = record
    for panel, target in queries:
        for name in selected_names(target["expr"]) & raw.keys():
            pytest.fail(f"{panel['title']}: queries {name}; use {raw[name]}")


def test_name_extraction():
    assert selected_names(
        'histogram_quantile(0.95, sum by (le) (rate(a_bucket{x="b c", y=~"$v"}[5m])))'
        " / on (i) group_left b:c:rate1m offset 5m or vector(0) > bool 1e-9"
    ) == {"a_bucket", "b:c:rate1m"}


def _promtool() -> str:
    promtool = shutil.which("promtool")
    assert promtool, (
        "promtool is not on PATH: the dashboard's queries are checked with Prometheus's own "
        "parser (Debian: apt-get install prometheus, which ships promtool)"
    )
    return promtool


def _check_rules(tmp_path: Path, rules: list[dict]) -> subprocess.CompletedProcess:
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    return subprocess.run(
        [_promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )


def test_every_query_parses_with_promtool(queries, tmp_path):
    values = {**GRAFANA_BUILTINS, "provider": ".*"}
    rules, origin = [], {}
    for panel, target in queries:
        record = f"dashboard:panel_{panel['id']}_{target['refId']}"
        rules.append({"record": record, "expr": substitute(target["expr"], values)})
        origin[record] = f"{panel['title']}: {rules[-1]['expr']}"
    assert len(rules) >= 30
    out = _check_rules(tmp_path, rules)
    listing = "\n".join(f"  {record} = {what}" for record, what in origin.items())
    assert out.returncode == 0, f"promtool:\n{out.stdout}{out.stderr}\nthe queries:\n{listing}"
    assert f"SUCCESS: {len(rules)} rules found" in out.stdout, out.stdout


def test_promtool_rejects_a_broken_query(tmp_path):
    out = _check_rules(tmp_path, [{"record": "dashboard:broken", "expr": "sum by (le (x)"}])
    assert out.returncode != 0 and "dashboard:broken" in out.stdout + out.stderr


def test_provisioning():
    datasources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["name"] == "Prometheus" and source["type"] == "prometheus"
    assert source["uid"] == DATASOURCE["uid"]  # what every panel names
    assert source["url"] == "http://prometheus:9090"
    dashboards = yaml.safe_load((PROVISIONING / "dashboards" / "batchsender.yml").read_text())
    (provider,) = dashboards["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
