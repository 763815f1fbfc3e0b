"""``./setup-dev.sh`` as a newcomer runs it: up (infrastructure, monitoring, application,
migrations, demo tenant), up again (harmless), status, stop. Its state goes to a directory of
this test's own (BATCHSENDER_DEV_DIR), so ``stop`` ends only what this run started, never a
service the test session or the machine already ran."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
API = "http://127.0.0.1:6001"
PROMETHEUS = "http://127.0.0.1:9090"
MACHINE_SERVICES = (5432, 6379, 4222, 8123)  # running before the test; must stay up


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _get(url: str, key: str | None = None, body: bytes | None = None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if body is not None:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=body, headers=headers)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _until(check, within: float, what: str):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {within}s waiting for {what}")


@pytest.fixture
def dev_dir(tmp_path: Path) -> Path:
    for port in (6001, 9090):
        if _listening(port):
            pytest.fail(f"127.0.0.1:{port} is taken: stop your dev stack (./setup-dev.sh stop) "
                        "before this test, which runs ./setup-dev.sh up and stop")  # fmt: skip
    state = tmp_path / "dev"
    state.mkdir()
    stamp = ROOT / ".dev" / "pip.sha256"  # the packages are installed: no second pip run
    if stamp.exists():
        shutil.copy(stamp, state / "pip.sha256")
    return state


def _run(dev_dir: Path, *args: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHSENDER", "PYTEST"))}
    environ["BATCHSENDER_DEV_DIR"] = str(dev_dir)
    done = subprocess.run(
        ["bash", str(ROOT / "setup-dev.sh"), *args],
        cwd=ROOT, env=environ, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, f"setup-dev.sh {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done


def test_up_twice_status_and_stop(dev_dir: Path):
    try:
        first = _run(dev_dir, "up").stdout
        steps = [line for line in first.splitlines() if line.startswith("==>")]
        order = ["prerequisites", "PostgreSQL", "NATS", "Redis", "ClickHouse", "monitoring",
                 "application", "migrations"]  # fmt: skip
        positions = [next(i for i, s in enumerate(steps) if word in s) for word in order]
        assert positions == sorted(positions), steps  # the seed's order
        graph = f"{PROMETHEUS}/graph?g0.expr=nats_queue_depth"
        assert graph in first and "BatchSender dev stack is up." in first
        assert (
            "Grafana" in first
            and "/d/batchsender/batchsender-monitoring" in first
            or ("Grafana (3003) skipped:" in first)
        )
        key = (dev_dir / "api-key").read_text().strip()

        status, text = _get(f"{API}/api/metrics")
        assert status == 200 and b"nats_queue_depth{" in text

        def scraped():
            query = urllib.parse.quote("nats_queue_depth")
            _, answer = _get(f"{PROMETHEUS}/api/v1/query?query={query}")
            return json.loads(answer)["data"]["result"]

        series = _until(scraped, 60, "Prometheus to hold nats_queue_depth")
        assert {s["metric"]["consumer"] for s in series} >= {"send", "intake"}

        body = {"name": "setup-dev", "from_email": "ops@example.com", "subject": "Hi {{ name }}",
                "text": "x", "provider": "mock",
                "recipients": [{"email": f"r{i}@example.com", "name": "R"} for i in range(3)]}  # fmt: skip
        status, created = _get(f"{API}/api/batches", key, json.dumps(body).encode())
        assert status == 201, created
        batch_id = json.loads(created)["id"]

        def completed():
            _, batch = _get(f"{API}/api/batches/{batch_id}", key)
            return json.loads(batch)["status"] == "completed"

        _until(completed, 120, "the demo batch to complete")

        app_pid = (dev_dir / "app.pid").read_text()
        second = _run(dev_dir, "up").stdout
        assert "already running" in second
        assert (dev_dir / "app.pid").read_text() == app_pid
        assert (dev_dir / "api-key").read_text().strip() == key  # the same demo key

        status_out = _run(dev_dir, "status").stdout
        for name in ("PostgreSQL (dev)", "NATS JetStream", "ClickHouse HTTP", "Prometheus", "API"):
            line = next(line for line in status_out.splitlines() if name in line)
            assert "up" in line, status_out
    finally:
        _run(dev_dir, "stop")
    assert not _listening(6001) and not _listening(9090)
    assert all(_listening(port) for port in MACHINE_SERVICES)
