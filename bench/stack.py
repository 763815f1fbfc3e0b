"""Throw-away BatchSender deployments for tests and benchmarks.

``isolated_environ`` names a deployment of its own (PostgreSQL and ClickHouse databases,
NATS prefix, key prefix, metrics folder, free ports) on this machine's services, and
``Stack`` runs the real processes on it, started as a user would: ``batchsender
mock-provider``, ``batchsender api`` and ``batchsender worker``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from engine.config import Settings

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def isolated_environ(tag: str, database_host: str = "127.0.0.1:5432") -> dict[str, str]:
    """Settings variables for a deployment that shares nothing with any other."""
    return {
        "BATCHSENDER_ENV": "test",
        "DATABASE_URL": f"postgresql://postgres@{database_host}/bs_{tag}",
        "CLICKHOUSE_DATABASE": f"bs_{tag}",
        "NATS_PREFIX": f"bs{tag}",
        "KEY_PREFIX": f"bs{tag}:",
        "METRICS_DIR": tempfile.mkdtemp(prefix=f"bs-metrics-{tag}-"),
        "API_PORT": str(free_port()),
        "WEB_PORT": str(free_port()),
        "MOCK_PROVIDER_URL": f"http://127.0.0.1:{free_port()}",
    }


def command(*args: str) -> list[str]:
    script = shutil.which("batchsender")
    return [script, *args] if script else [sys.executable, "-m", "api.cli", *args]


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except Exception:
        return False


def wait_until(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


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

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("ab")
        proc = subprocess.Popen(command(*args), env=self.environ, cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        self.procs[name] = proc
        return proc

    def start_all(self, mock_options: tuple[str, ...] = ()) -> None:
        """Mock provider (posting webhooks to the API), API and worker; wait until up."""
        port = self.mock.rsplit(":", 1)[1]
        self.start("mock", "mock-provider", "--port", port,
                   "--webhook-url", f"{self.api}/webhooks/mock",
                   "--webhook-secret", self.settings.mock_webhook_secret, *mock_options)  # fmt: skip
        self.start("api", "api")
        self.start("worker", "worker")
        wait_until(lambda: http_ok(f"{self.api}/health"), 60, what="API /health")
        wait_until(lambda: http_ok(f"{self.mock}/health"), 30, what="mock provider")
        wanted = self.settings.worker_processes
        wait_until(lambda: len(self.worker_children()) == wanted, 30, what=f"{wanted} workers")

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

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)

    def worker_children(self, name: str = "worker") -> list[int]:
        out = subprocess.run(
            ["pgrep", "-P", str(self.procs[name].pid)], capture_output=True, text=True
        )
        return [int(pid) for pid in out.stdout.split()]

    def pids(self) -> dict[str, int]:
        """Every process of the stack by name; the supervisor's children as worker[i]."""
        pids = {name: proc.pid for name, proc in self.procs.items()}
        for i, pid in enumerate(self.worker_children()):
            pids[f"worker[{i}]"] = pid
        return pids

    def peak_rss_mb(self) -> dict[str, float]:
        """Peak resident memory (VmHWM) of every process of the stack, in MB."""
        peaks = {}
        for name, pid in self.pids().items():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except FileNotFoundError:
                continue
            kb = next(
                int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM")
            )
            peaks[name] = kb / 1024
        return peaks

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time used so far by each process of the stack and by each service on the
        machine (all processes of one program summed): where the time goes."""
        ours = {pid: name for name, pid in self.pids().items()}
        totals: dict[str, float] = {}
        tick = os.sysconf("SC_CLK_TCK")
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2 :].split()
            used = (int(fields[11]) + int(fields[12])) / tick
            name = ours.get(int(entry.name)) or _SERVICES.get(comm)
            if name:
                totals[name] = totals.get(name, 0.0) + used
        return totals

    def tail(self, lines: int = 40) -> str:
        return "\n".join(
            f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-lines:])
            for p in sorted(self.logs.glob("*.log"))
        )


_SERVICES = {"postgres": "postgres", "nats-server": "nats", "clickhouse-serv": "clickhouse",
             "redis-server": "redis", "dragonfly": "dragonfly"}  # fmt: skip


def environ_for(settings_environ: dict[str, str], **overrides: str) -> dict[str, str]:
    return {**os.environ, **settings_environ, **overrides}
