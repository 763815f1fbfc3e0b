"""docker-compose.yml: valid for Compose, on SPEC section 2's ports, healthchecked, started in
order, and mounting only files of the repository that exist.

Needs Compose itself (``docker-compose`` or the ``docker compose`` plugin; no Docker engine:
``config`` only reads the file). A machine without it fails here: CI installs it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"

# SPEC section 2: the published host port of each service.
SPEC_PORTS = {
    "postgres": 5433,
    "nats": 4222,
    "clickhouse": 8123,
    "dragonfly": 6379,
    "prometheus": 9090,
    "grafana": 3003,
    "api": 6001,
    "web": 3000,
    "mock-provider": 6100,
}
INFRASTRUCTURE = ("postgres", "nats", "dragonfly", "clickhouse")
ONE_SHOT = {"migrate"}


def compose_command() -> list[str]:
    found = shutil.which("docker-compose")
    if found:
        return [found]
    docker = shutil.which("docker")
    if docker:
        plugin = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
        if plugin.returncode == 0:
            return [docker, "compose"]
    pytest.fail(
        "neither docker-compose nor the docker compose plugin is installed: this test needs "
        "Compose to read docker-compose.yml (e.g. apt-get install docker-compose)",
        pytrace=False,
    )


def compose(*args: str) -> subprocess.CompletedProcess[str]:
    # --profile web: the services behind a profile are checked too.
    return subprocess.run(
        [*compose_command(), "-f", str(COMPOSE_FILE), "--profile", "web", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def services() -> dict[str, dict]:
    run = compose("config")
    assert run.returncode == 0, run.stderr
    return yaml.safe_load(run.stdout)["services"]


def test_compose_accepts_the_file():
    run = compose("config", "-q")
    assert run.returncode == 0, run.stderr


def _published(service: dict) -> set[int]:
    ports = set()
    for port in service.get("ports", []):
        if isinstance(port, dict):
            ports.add(int(port["published"]))
        else:  # "HOST:CONTAINER" (older Compose versions print the short form)
            ports.add(int(str(port).rsplit(":", 1)[0].rsplit(":", 1)[-1]))
    return ports


def test_every_service_is_published_on_its_spec_port(services):
    for name, port in SPEC_PORTS.items():
        assert name in services, f"no service {name!r}"
        assert port in _published(services[name]), (name, services[name].get("ports"))
    assert _container_port(services["postgres"], 5433) == 5432
    assert _container_port(services["grafana"], 3003) == 3000


def _container_port(service: dict, published: int) -> int:
    for port in service["ports"]:
        if isinstance(port, dict) and int(port["published"]) == published:
            return int(port["target"])
        if not isinstance(port, dict) and str(port).startswith(f"{published}:"):
            return int(str(port).rsplit(":", 1)[1].split("/")[0])
    raise AssertionError(f"{published} not published")


def test_every_long_running_service_has_a_healthcheck(services):
    for name, service in services.items():
        if name in ONE_SHOT:
            assert service.get("restart") == "no", name
            continue
        check = service.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), f"{name}: no healthcheck"


def test_api_and_worker_wait_for_healthy_infrastructure_and_the_migration(services):
    for name in ("api", "worker"):
        depends = services[name]["depends_on"]
        for infra in INFRASTRUCTURE:
            assert depends[infra]["condition"] == "service_healthy", (name, infra)
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
    migrate = services["migrate"]["depends_on"]
    assert {migrate[s]["condition"] for s in ("postgres", "clickhouse")} == {"service_healthy"}


def test_the_app_services_run_the_repository_image(services):
    images = {services[name].get("image") for name in ("migrate", "api", "worker", "web")}
    assert len(images) == 1
    for name in ("migrate", "api", "worker", "mock-provider", "web"):
        assert Path(services[name]["build"]["context"]).resolve() == ROOT, name
        assert services[name]["environment"]["BATCHSENDER_ENV"] == "dev", name
    assert services["web"].get("profiles") == ["web"]
    assert services["web"]["command"] == ["batchsender", "web"]


def test_the_app_gets_service_names_as_hosts(services):
    environment = services["api"]["environment"]
    assert "@postgres:5432/" in environment["DATABASE_URL"]
    assert environment["NATS_URL"] == "nats://nats:4222"
    assert environment["DRAGONFLY_URL"].startswith("redis://dragonfly:6379")
    assert environment["CLICKHOUSE_URL"] == "http://clickhouse:8123"
    assert "-js" in services["nats"]["command"]


def _binds(service: dict) -> list[tuple[str, str]]:
    """(source on the host, target) of the bind mounts of a service."""
    found = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") == "bind":
                found.append((volume["source"], volume["target"]))
        else:
            source, target = str(volume).split(":")[:2]
            if source.startswith(("/", ".")):
                found.append((source, target))
    return found


def test_grafana_is_provisioned_from_the_repository(services):
    binds = {target: source for source, target in _binds(services["grafana"])}
    provisioning = ROOT / "monitoring" / "grafana" / "provisioning"
    assert Path(binds["/etc/grafana/provisioning"]).resolve() == provisioning
    dashboards = ROOT / "monitoring" / "grafana" / "dashboards"
    assert Path(binds["/var/lib/grafana/dashboards"]).resolve() == dashboards


def test_every_file_mounted_from_the_repository_exists(services):
    missing = []
    for name, service in services.items():
        for source, target in _binds(service):
            path = (ROOT / source).resolve()
            assert path.is_relative_to(ROOT), f"{name} mounts {source}, outside the repository"
            if not path.exists():
                missing.append(f"{name}: {path.relative_to(ROOT)} (at {target})")
    assert not missing, "mounted but not in the repository: " + ", ".join(missing)


def test_the_compose_prometheus_config_differs_only_in_targets_and_the_worker_job(services):
    """One configuration in substance: the compose copy names the API by its service and
    adds the worker container's own endpoint (its WORKER_METRICS_PORT)."""
    binds = {target: source for source, target in _binds(services["prometheus"])}
    mounted = yaml.safe_load(Path(binds["/etc/prometheus/prometheus.yml"]).read_text())
    host = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in mounted["scrape_configs"]}
    port = services["worker"]["environment"]["WORKER_METRICS_PORT"]
    worker = jobs.pop("batchsender-worker")
    assert worker["static_configs"] == [{"targets": [f"worker:{port}"]}]
    assert jobs["batchsender-api"]["static_configs"] == [{"targets": ["api:6001"]}]
    jobs["batchsender-api"]["static_configs"] = [{"targets": ["127.0.0.1:6001"]}]
    mounted["scrape_configs"] = list(jobs.values())
    assert mounted == host
    assert Path(binds["/etc/prometheus/rules"]).resolve() == ROOT / "monitoring" / "rules"


def test_the_worker_gets_longer_than_its_drain_deadline_to_stop(services):
    """SIGTERM drains (engine/supervisor.py): Compose must not SIGKILL before DRAIN_TIMEOUT
    has passed, like terminationGracePeriodSeconds in k8s/ (tests/deploy/test_k8s.py)."""
    from engine.config import load_settings

    drain = load_settings(
        {**services["worker"]["environment"], "BATCHSENDER_ENV": "dev"}
    ).drain_timeout
    grace = str(services["worker"]["stop_grace_period"])
    seconds = float(grace.rstrip("s")) if grace.endswith("s") and "m" not in grace else None
    assert seconds is not None, f"stop_grace_period {grace!r}: give it in seconds"
    assert seconds > drain, (seconds, drain)
