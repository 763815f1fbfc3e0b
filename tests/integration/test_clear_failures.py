"""A service that is down is named in one line, not a traceback: by the ``batchsender``
commands and by the benchmark, each run with one service's URL on a closed port (the
machine's services keep running)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest

from devkit.stack import ROOT, command, drop_all, free_port, isolated_environ
from engine.config import load_settings
from engine.services import ServiceUnavailable, Unreachable, safe_url

EXIT_UNAVAILABLE = 69
NAMES = {
    "DATABASE_URL": "PostgreSQL",
    "NATS_URL": "NATS",
    "DRAGONFLY_URL": "Dragonfly/Redis",
    "CLICKHOUSE_URL": "ClickHouse",
}


def closed(variable: str, port: int, database: str) -> str:
    """The variable's URL on 127.0.0.1:``port``, with credentials that must not be shown."""
    return {
        "DATABASE_URL": f"postgresql://postgres:pg-password@127.0.0.1:{port}/{database}",
        "NATS_URL": f"nats://nats-user:nats-password@127.0.0.1:{port}",
        "DRAGONFLY_URL": f"redis://:redis-password@127.0.0.1:{port}/0",
        "CLICKHOUSE_URL": f"http://default:ch-password@127.0.0.1:{port}",
    }[variable]


@pytest.fixture
def environ() -> Iterator[dict[str, str]]:
    """Settings of a deployment nobody uses (dropped afterwards)."""
    env = isolated_environ(f"cf{uuid.uuid4().hex[:8]}")
    yield env
    shutil.rmtree(env["METRICS_DIR"], ignore_errors=True)
    # The worker migrates before it forks: PostgreSQL's part is done when ClickHouse is down.
    asyncio.run(drop_all(load_settings(env)))


def run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def assert_names(result: subprocess.CompletedProcess[str], variable: str, port: int) -> None:
    """Exit code 69, no traceback, and a last line naming the service and where it is
    (without the URL's credentials)."""
    output = result.stdout + result.stderr
    assert result.returncode == EXIT_UNAVAILABLE, output
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert f"{NAMES[variable]} at " in last and f"127.0.0.1:{port}" in last, last
    assert "is not reachable (connection refused)" in last, last
    assert "password" not in output, output


# What each command needs: migrate the schema's two databases, the API all four. The worker
# migrates first (PostgreSQL, ClickHouse); its processes give up on Dragonfly after a crash
# loop, and wait for NATS (test below).
CLI_CASES = [
    ("migrate", "DATABASE_URL"),
    ("migrate", "CLICKHOUSE_URL"),
    *(("api", variable) for variable in NAMES),
    *(("worker", variable) for variable in ("DATABASE_URL", "CLICKHOUSE_URL")),
]


@pytest.mark.parametrize("name, variable", CLI_CASES)
def test_the_command_names_the_service_that_is_down(
    name: str, variable: str, environ: dict[str, str]
):
    port = free_port()
    database = environ["DATABASE_URL"].rsplit("/", 1)[1]
    env = {**os.environ, **environ, variable: closed(variable, port, database)}
    assert_names(run(command(name), env), variable, port)


def test_the_worker_names_nats_while_it_waits_for_it(environ: dict[str, str], tmp_path):
    """NATS down: the worker processes keep trying (a pod that starts before NATS does not
    crash-loop), say so in their log with the URL, and stop at once on SIGTERM."""
    port = free_port()
    env = {**os.environ, **environ, "NATS_URL": closed("NATS_URL", port, "")}
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command("worker", "-n", "1"), env=env, cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip
    try:
        expected = f"NATS at nats://127.0.0.1:{port} is not reachable"
        deadline = time.monotonic() + 60
        while expected not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        text = log_path.read_text()
        assert expected in text, text
        assert "nats-password" not in text and "Traceback" not in text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("variable", list(NAMES))
def test_the_benchmark_names_the_service_that_is_down(variable: str):
    port = free_port()
    env = {**os.environ, variable: closed(variable, port, "postgres")}
    result = run([sys.executable, "-m", "bench.e2e", "--recipients", "10"], env)
    assert_names(result, variable, port)
    assert result.stderr.strip().splitlines()[-1].startswith("bench.e2e: error: ")


def test_send_names_the_api_that_is_down(environ: dict[str, str], tmp_path):
    port = free_port()
    path = tmp_path / "one.csv"
    path.write_text("email,name\nsomeone@example.com,S\n")
    argv = command(
        "send", str(path), "--key", "k", "--subject", "s", "--from-email", "f@example.com",
        "--api-url", f"http://127.0.0.1:{port}",
    )  # fmt: skip
    result = run(argv, {**os.environ, **environ})
    assert result.returncode == EXIT_UNAVAILABLE, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert f"the API at http://127.0.0.1:{port} is not reachable (connection refused)" in last


def test_urls_are_shown_without_credentials():
    assert safe_url("postgresql://u:secret@db.example:5433/app?password=x") == (
        "postgresql://db.example:5433/app"
    )
    assert safe_url("redis://:pw@[::1]:6379/0") == "redis://[::1]:6379/0"
    assert safe_url("http://127.0.0.1:8123") == "http://127.0.0.1:8123"


def test_one_line_names_every_service_that_is_down():
    message = ServiceUnavailable(
        [
            Unreachable("postgres", "postgresql://127.0.0.1:1/x", "connection refused"),
            Unreachable("nats", "nats://127.0.0.1:2", "no answer within 3 s"),
            Unreachable("clickhouse", "http://127.0.0.1:3", "HTTP 401 for /ping", refused=True),
        ]
    ).message
    assert "\n" not in message
    assert message.startswith("PostgreSQL at postgresql://127.0.0.1:1/x is not reachable")
    assert "NATS at nats://127.0.0.1:2 is not reachable (no answer within 3 s)" in message
    assert "ClickHouse at http://127.0.0.1:3 refused the connection (HTTP 401" in message
    assert message.endswith("are they running? ./setup-dev.sh starts them")
