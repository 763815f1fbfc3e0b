"""The Prometheus configuration and rules in monitoring/: valid for promtool (config, rules,
and the rule unit tests in monitoring/tests/), every alert tested both firing and quiet,
labelled and annotated, and every name a rule selects a metric the code really exposes.

promtool must be installed (Debian: ``apt-get install prometheus``): without it these tests
fail, they are never skipped."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from devkit.prometheus import selected_names
from engine import metrics

ROOT = Path(__file__).parents[2]
MONITORING = ROOT / "monitoring"
CONFIG = MONITORING / "prometheus.yml"
ALERTS = MONITORING / "rules" / "alerts.yml"
RECORDING = MONITORING / "rules" / "recording.yml"
RULE_FILES = sorted((MONITORING / "rules").glob("*.yml"))
TEST_FILES = sorted((MONITORING / "tests").glob("*.yml"))
API_JOB = "batchsender-api"
SEVERITIES = {"critical", "warning"}
# The Grafana dashboard queries these by name.
DASHBOARD_RECORDINGS = {
    "provider_status:batchsender_emails:rate1m",
    "provider:batchsender_send_duration_seconds:p50_5m",
    "provider:batchsender_send_duration_seconds:p95_5m",
    "provider:batchsender_send_duration_seconds:p99_5m",
    "provider:batchsender_rate_limit_wait_seconds:p95_5m",
    "route_status:batchsender_http_requests:rate1m",
    "route:batchsender_http_request_seconds:p95_5m",
    "batchsender_clickhouse_rows:rate1m",
    "consumer:nats_queue_depth:max",
    "provider_event:batchsender_webhooks:rate1m",
}
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
}


def promtool(*args: str) -> str:
    """Run promtool from the repository root; its output, or a failure that shows it."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not on the PATH, so the Prometheus rules cannot be checked. "
            "Install it (Debian/Ubuntu: apt-get install prometheus; or the promtool binary "
            "of a Prometheus release tarball). These tests are never skipped.",
            pytrace=False,
        )
    result = subprocess.run(
        [path, *args], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    output = f"{result.stdout}\n{result.stderr}".strip()
    assert result.returncode == 0, (
        f"promtool {' '.join(args)} exited with {result.returncode}:\n{output}"
    )
    return output


def relative(paths: list[Path]) -> list[str]:
    return [str(path.relative_to(ROOT)) for path in paths]


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def rules(path: Path, kind: str) -> list[dict[str, Any]]:
    """The rules of ``kind`` ("alert" or "record") in a rule file, all groups."""
    return [rule for group in load(path)["groups"] for rule in group["rules"] if kind in rule]


def alert_cases() -> list[tuple[str, str, bool]]:
    """(test file, alert name, whether it fires) for every alert_rule_test case."""
    cases = []
    for path in TEST_FILES:
        for test in load(path).get("tests") or []:
            for case in test.get("alert_rule_test") or []:
                cases.append((path.name, case["alertname"], bool(case.get("exp_alerts"))))
    return cases


def exposed_names() -> set[str]:
    """Every series name /api/metrics can expose: engine/metrics.py's metrics with their
    suffixes, the families it adds at scrape time, and Prometheus's own ``up``."""
    names = {"up"}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            names |= {value._name + suffix for suffix in SUFFIXES[value._type]}
    source = Path(metrics.__file__).read_text()
    names |= set(re.findall(r'GaugeMetricFamily\(\s*"(\w+)"', source))
    return names


# --- promtool ----------------------------------------------------------------------------


def test_promtool_accepts_the_config():
    output = promtool("check", "config", str(CONFIG.relative_to(ROOT)))
    assert "SUCCESS" in output, output


def test_promtool_accepts_the_rules():
    assert ALERTS in RULE_FILES and RECORDING in RULE_FILES
    output = promtool("check", "rules", *relative(RULE_FILES))
    assert output.count("SUCCESS") == len(RULE_FILES), output


def test_promtool_rule_unit_tests_pass():
    assert TEST_FILES, "no promtool rule tests in monitoring/tests/"
    output = promtool("test", "rules", *relative(TEST_FILES))
    assert "FAILED" not in output, output


# --- the files themselves ----------------------------------------------------------------


def test_config_scrapes_the_api_and_loads_every_rule_file():
    config = load(CONFIG)
    assert config["global"]["scrape_interval"] == "5s"
    assert config["global"]["evaluation_interval"] == "5s"
    loaded = {path for pattern in config["rule_files"] for path in CONFIG.parent.glob(pattern)}
    assert loaded == set(RULE_FILES)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    api = jobs[API_JOB]
    assert api["metrics_path"] == "/api/metrics"
    assert [t for c in api["static_configs"] for t in c["targets"]] == ["127.0.0.1:6001"]


def test_every_alert_fires_and_stays_quiet_in_some_test():
    alerts = {rule["alert"] for rule in rules(ALERTS, "alert")}
    cases = alert_cases()
    unknown = sorted({name for _, name, _ in cases} - alerts)
    assert not unknown, f"tests of alerts that do not exist (renamed?): {unknown}"
    firing = {name for _, name, fires in cases if fires}
    quiet = {name for _, name, fires in cases if not fires}
    assert not alerts - firing, f"alerts without a test where they fire: {sorted(alerts - firing)}"
    assert not alerts - quiet, (
        f"alerts without a test where they do not fire: {sorted(alerts - quiet)}"
    )


def test_alert_tests_load_the_alert_rules():
    """A case of an alert whose rules are not loaded would pass without testing anything."""
    for path in TEST_FILES:
        spec = load(path)
        if any(test.get("alert_rule_test") for test in spec.get("tests") or []):
            loaded = {(path.parent / name).resolve() for name in spec.get("rule_files") or []}
            assert ALERTS.resolve() in loaded, f"{path.name} does not load {ALERTS.name}"


def test_alerts_are_unique_labelled_and_annotated():
    alerts = rules(ALERTS, "alert")
    names = [rule["alert"] for rule in alerts]
    assert len(names) == len(set(names)), f"duplicate alert names: {names}"
    for rule in alerts:
        name = rule["alert"]
        assert re.fullmatch(r"BatchSender[A-Z]\w+", name), name
        assert rule.get("labels", {}).get("severity") in SEVERITIES, name
        annotations = rule.get("annotations", {})
        for key in ("summary", "description"):
            assert str(annotations.get(key, "")).strip(), f"{name} has no {key}"
        assert not re.search(r"https?://|\b\d+\.\d+\.\d+\.\d+\b", str(annotations)), (
            f"{name}: no addresses in annotations"
        )


def test_recording_rules_the_dashboard_reads_exist():
    recorded = [rule["record"] for rule in rules(RECORDING, "record")]
    assert len(recorded) == len(set(recorded)), recorded
    assert not DASHBOARD_RECORDINGS - set(recorded), sorted(DASHBOARD_RECORDINGS - set(recorded))
    for name in recorded:  # level:metric:operations
        assert name.count(":") in (1, 2), name


def test_rules_select_only_real_metrics():
    """An alert on a name nothing exposes can never fire."""
    known = exposed_names() | {rule["record"] for rule in rules(RECORDING, "record")}
    for path in RULE_FILES:
        for rule in rules(path, "alert") + rules(path, "record"):
            unknown = selected_names(rule["expr"]) - known
            assert not unknown, f"{path.name} {rule.get('alert') or rule['record']}: {unknown}"
