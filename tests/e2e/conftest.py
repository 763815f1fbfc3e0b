"""The real processes, started as a user would: ``batchsender mock-provider``, ``api``
and ``worker``, on this session's isolated settings."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
import pytest

from engine.config import Settings

ROOT = Path(__file__).resolve().parents[2]


def command(*args: str) -> list[str]:
    script = shutil.which("batchsender")
    return [script, *args] if script else [sys.executable, "-m", "api.cli", *args]


@dataclass
class Stack:
    settings: Settings
    environ: dict[str, str]
    logs: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.settings.api_port}"

    @property
    def mock(self) -> str:
        return self.settings.mock_provider_url

    def start(self, name: str, *args: str, **extra_env: str) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("ab")
        proc = subprocess.Popen(command(*args), env={**self.environ, **extra_env}, cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        self.procs[name] = proc
        return proc

    def stop(self, name: str, sig: int = signal.SIGTERM, wait: float = 60) -> int | None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc else None
        proc.send_signal(sig)
        try:
            return proc.wait(wait)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def worker_children(self, name: str = "worker") -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.procs[name].pid)], capture_output=True, text=True)
        return [int(pid) for pid in out.stdout.split()]

    def tail(self, lines: int = 40) -> str:
        return "\n".join(
            f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-lines:])
            for p in sorted(self.logs.glob("*.log"))
        )


def wait_until(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="session")
def stack(migrated: Settings, test_environ: dict[str, str], tmp_path_factory) -> Iterator[Stack]:
    environ = {**os.environ, **test_environ, "WORKER_PROCESSES": "2", "WORKER_HEARTBEAT_TIMEOUT": "5",
               "DRAIN_TIMEOUT": "20"}  # fmt: skip
    logs = tmp_path_factory.mktemp("logs")
    running = Stack(migrated, environ, logs)
    port = migrated.mock_provider_url.rsplit(":", 1)[1]
    running.start("mock", "mock-provider", "--port", port,
                  "--webhook-url", f"{running.api}/webhooks/mock",
                  "--webhook-secret", migrated.mock_webhook_secret)  # fmt: skip
    running.start("api", "api")
    running.start("worker", "worker")
    try:
        wait_until(lambda: _ok(f"{running.api}/health"), 60, what="API /health")
        wait_until(lambda: _ok(f"{running.mock}/health"), 30, what="mock provider")
        wait_until(lambda: len(running.worker_children()) == 2, 30, what="2 worker processes")
        yield running
    except BaseException:
        print(running.tail())
        raise
    finally:
        for name in list(running.procs):
            running.stop(name)


def _ok(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except Exception:
        return False


class Client:
    """A small HTTP client for the API and the mock provider."""

    def __init__(self, stack: Stack, key: str):
        self.stack = stack
        self.headers = {"Authorization": f"Bearer {key}"}

    async def request(self, method: str, url: str, **kwargs) -> tuple[int, object]:
        async with aiohttp.ClientSession() as session:
            headers = {**self.headers, **kwargs.pop("headers", {})}
            async with session.request(method, url, headers=headers, **kwargs) as response:
                body = await response.read()
                kind = response.headers.get("Content-Type", "")
                return response.status, orjson.loads(body) if "json" in kind else body.decode()


async def eventually(predicate, timeout: float, interval: float = 0.25, what: str = "condition"):
    """Await ``predicate()`` until it returns something truthy (behaviour, not timing)."""
    import asyncio

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
