"""A real, throw-away Prometheus for tests: the repository's ``monitoring/prometheus.yml``
(its jobs, metrics paths and recording rules) pointed at a local BatchSender API, scraping
and evaluating every second.

    with Prometheus("127.0.0.1:6001") as prom:  # started, ready; stopped on the way out
        prom.query("up")  # -> [{"metric": {"job": ..., "instance": ...}, "value": [t, "1"]}]

Also the Grafana dashboard's queries as Prometheus runs them (``dashboard_queries``,
``substitute``). Needs ``prometheus`` on the PATH (Debian: ``apt-get install prometheus``).
"""

from __future__ import annotations

import glob
import json
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from devkit.stack import free_port

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "monitoring" / "prometheus.yml"
API_JOB = "batchsender-api"
INTERVAL = "1s"
DASHBOARD = ROOT / "monitoring" / "grafana" / "dashboards" / "batchsender.json"
# Grafana's built-in variables as a test runs the dashboard's queries: a one-minute step
# (at least four scrapes of the 1 s test Prometheus) and a one-hour time range.
GRAFANA_BUILTINS = {"__rate_interval": "1m", "__interval": "1m", "__range": "1h"}
_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)|\[\[(\w+)\]\]")


def substitute(expr: str, values: dict[str, str]) -> str:
    """``expr`` with the Grafana variables of ``values`` (``$name``, ``${name}``,
    ``[[name]]``) replaced; other ``$`` words (e.g. ``$1`` of label_replace) stay."""

    def one(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group)
        return values.get(name, match.group(0))

    return _VARIABLE.sub(one, expr)


def variables(expr: str) -> set[str]:
    """The names of the Grafana variables ``expr`` uses (not ``$1`` and the like)."""
    names = {next(group for group in m.groups() if group) for m in _VARIABLE.finditer(expr)}
    return {name for name in names if not name.isdigit()}


_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
             "or", "unless", "offset", "inf", "nan"}  # fmt: skip


def selected_names(expr: str) -> set[str]:
    """The metric (and recording-rule) names a PromQL expression selects: what is left of
    it without strings, label matchers, ranges, grouping labels, functions and keywords."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.:])([A-Za-z_:][\w:]*)(\s*\()?", text):
        name, call = match.groups()
        if not call and name.lower() not in _KEYWORDS:
            names.add(name)
    return names


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(panel, target) for every query target of the dashboard, in nested rows too."""
    found = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            found.extend((panel, target) for target in panel.get("targets") or [])
            walk(panel.get("panels") or [])

    walk(dashboard.get("panels") or [])
    return found


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    return json.loads(path.read_text())


class PrometheusError(RuntimeError):
    """Prometheus did not start, did not answer, or rejected a query."""


def scrape_config(
    targets: dict[str, str], source: Path = CONFIG, interval: str = INTERVAL
) -> dict[str, Any]:
    """``source`` with only the jobs named in ``targets`` (job name -> host:port), each
    scraping its one target; scrape and evaluation every ``interval``; rule files by
    absolute path; no alerting (there is no Alertmanager here)."""
    config = yaml.safe_load(source.read_text()) or {}
    jobs = {job["job_name"]: job for job in config.get("scrape_configs") or []}
    unknown = sorted(set(targets) - set(jobs))
    if unknown:
        raise PrometheusError(f"{source} has no job {unknown}; its jobs: {sorted(jobs)}")
    scrape_configs = []
    for name, target in targets.items():
        job = dict(jobs[name])
        if any(key.endswith("_sd_configs") for key in job):  # e.g. Kubernetes discovery
            job = {k: v for k, v in job.items() if not k.endswith("_sd_configs")}
            job.pop("relabel_configs", None)  # written for the discovered labels
        job.update(
            scrape_interval=interval,
            scrape_timeout=interval,
            static_configs=[{"targets": [target]}],
        )
        scrape_configs.append(job)
    rule_files = []
    for pattern in config.get("rule_files") or []:
        absolute = pattern if Path(pattern).is_absolute() else str(source.parent / pattern)
        rule_files.extend(sorted(glob.glob(absolute)))
    global_ = {**(config.get("global") or {})}
    global_.update(scrape_interval=interval, scrape_timeout=interval, evaluation_interval=interval)
    return {"global": global_, "rule_files": rule_files, "scrape_configs": scrape_configs}


class Prometheus:
    """One Prometheus process on 127.0.0.1 and a free port, its configuration, data and
    log in a temporary folder (removed by ``stop`` unless ``keep``)."""

    def __init__(
        self,
        target: str | dict[str, str],
        *,
        source: Path = CONFIG,
        binary: str | None = None,
        keep: bool = False,
    ) -> None:
        self.targets = {API_JOB: target} if isinstance(target, str) else dict(target)
        self.source = source
        self.binary = binary or shutil.which("prometheus")
        self.keep = keep
        self.port = free_port()
        self.folder: Path | None = None
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path | None:
        return self.folder / "prometheus.log" if self.folder else None

    @property
    def rule_files(self) -> list[str]:
        return scrape_config(self.targets, self.source)["rule_files"]

    def start(self) -> Prometheus:
        if not self.binary:
            raise PrometheusError("prometheus not found on PATH (apt-get install prometheus)")
        self.folder = Path(tempfile.mkdtemp(prefix="bs-prometheus-"))
        config = self.folder / "prometheus.yml"
        config.write_text(yaml.safe_dump(scrape_config(self.targets, self.source), sort_keys=False))
        args = [
            self.binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={self.folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=info",
        ]
        with self.log.open("ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                args, cwd=self.folder, stdout=log, stderr=subprocess.STDOUT
            )
        return self

    def wait_ready(self, timeout: float = 30) -> None:
        """Until ``/-/ready`` answers 200: the configuration and rules loaded, the TSDB open."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise PrometheusError(f"prometheus exited with code {code}\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise PrometheusError(f"prometheus not ready after {timeout}s\n{self.tail()}")

    def api(self, path: str, **params: str) -> Any:
        """The ``data`` of one HTTP API answer (``/api/v1/...``); its error otherwise."""
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as exc:  # 400/422/503 carry Prometheus's error JSON
            try:
                body = json.loads(exc.read())
            except ValueError:
                raise PrometheusError(f"{path} {params}: HTTP {exc.code}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise PrometheusError(f"{path} {params}: {exc!r}\n{self.tail()}") from exc
        if body.get("status") != "success":
            raise PrometheusError(
                f"{params.get('query', path)}: {body.get('errorType')}: {body.get('error')}"
            )
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query at the current time: the vector's samples (a scalar or string
        result comes back as one sample without labels)."""
        data = self.api("/api/v1/query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def value(self, expr: str) -> float | None:
        """The value of a one-sample query, None when it has no sample."""
        result = self.query(expr)
        if len(result) > 1:
            raise PrometheusError(f"{expr}: {len(result)} samples, expected at most one")
        return float(result[0]["value"][1]) if result else None

    def label_values(self, label: str, match: str) -> list[str]:
        return self.api(f"/api/v1/label/{label}/values", **{"match[]": match})

    def rules(self) -> dict[str, dict[str, Any]]:
        """The loaded rules by name: their health, last error and query."""
        groups = self.api("/api/v1/rules")["groups"]
        return {rule["name"]: rule for group in groups for rule in group["rules"]}

    def tail(self, lines: int = 30) -> str:
        if self.log is None or not self.log.exists():
            return "(no prometheus log)"
        text = self.log.read_text(errors="replace").splitlines()[-lines:]
        return "--- prometheus log\n" + "\n".join(text)

    def stop(self, timeout: float = 10) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        if self.folder is not None and not self.keep:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Prometheus:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
