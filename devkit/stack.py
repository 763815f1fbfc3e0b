"""Throw-away BatchSender deployments for tests and benchmarks.

``isolated_environ`` names a deployment of its own (PostgreSQL and ClickHouse databases,
NATS prefix, key prefix, metrics folder, free ports) on this machine's services, and
``Stack`` runs the real processes on it, started as a user would: ``batchsender
mock-provider``, ``batchsender api`` and ``batchsender worker``; ``drop_all`` removes it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import orjson
from aiohttp import web

from engine.clickhouse import ClickHouse
from engine.config import Settings, load_settings
from engine.db import create_pool
from engine.migrate import migrate_all
from engine.tenants import create_key
from providers.mock import SIGNATURE_HEADER, TIMESTAMP_HEADER

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


async def drop_all(settings: Settings) -> None:
    """Remove everything of one deployment: streams, keys, ClickHouse and PostgreSQL
    databases. For throw-away deployments (test sessions, benchmark runs) only."""
    import contextlib

    import nats
    import redis.asyncio as aioredis

    from engine.topology import Topology, delete_topology

    nc = await nats.connect(settings.nats_url)
    with contextlib.suppress(Exception):
        await delete_topology(nc.jetstream(), Topology(settings.nats_prefix))
    await nc.close()
    client = aioredis.Redis.from_url(settings.dragonfly_url)
    keys = [k async for k in client.scan_iter(match=settings.key_prefix + "*", count=1000)]
    if keys:
        await client.delete(*keys)
    await client.aclose()
    with contextlib.suppress(Exception):
        clickhouse = ClickHouse(settings)
        clickhouse.command(f"DROP DATABASE IF EXISTS {settings.clickhouse_database}")
        clickhouse.close()
    parts = urlsplit(settings.database_url)
    admin = await asyncpg.connect(urlunsplit(parts._replace(path="/postgres")))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{parts.path.lstrip("/")}" WITH (FORCE)')
    finally:
        await admin.close()


def command(*args: str) -> list[str]:
    script = shutil.which("batchsender")
    return [script, *args] if script else [sys.executable, "-m", "cli.main", *args]


def mock_provider_command(port: int, latency_ms: float) -> list[str]:
    """The mock provider on 127.0.0.1:``port`` answering after ``latency_ms``, started
    as a module (no installed ``batchsender`` script needed)."""
    return [
        sys.executable, "-m", "devkit.mock_provider", "--host", "127.0.0.1",
        "--port", str(port), "--latency-ms", str(latency_ms),
    ]  # fmt: skip


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
        proc = subprocess.Popen(
            command(*args), env=self.environ, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )
        self.procs[name] = proc
        return proc

    def start_all(self, mock_options: tuple[str, ...] = (), *, webhooks: bool = True) -> None:
        """Mock provider (posting delivery webhooks to the API unless ``webhooks`` is
        false), API and worker; wait until up."""
        port = self.mock.rsplit(":", 1)[1]
        hooks = ("--webhook-url", f"{self.api}/webhooks/mock") if webhooks else ()
        self.start(
            "mock",
            "mock-provider",
            "--port",
            port,
            *hooks,
            "--webhook-secret",
            self.settings.mock_webhook_secret,
            *mock_options,
        )
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


_SERVICES = {
    "postgres": "postgres",
    "nats-server": "nats",
    "clickhouse-serv": "clickhouse",
    "redis-server": "redis",
    "dragonfly": "dragonfly",
}


def environ_for(settings_environ: dict[str, str], **overrides: str) -> dict[str, str]:
    return {**os.environ, **settings_environ, **overrides}


async def tenant_key(settings: Settings, tenant: str) -> str:
    pool = await create_pool(settings, max_size=1)
    try:
        return await create_key(pool, tenant)
    finally:
        await pool.close()


UNLIMITED = "100000000/10000000"  # a system / tenant / provider rate that never binds


# --- a throw-away deployment whose provider webhooks pass through this program -----------


class WebhookTap:
    """Stands between the mock provider and the API: records when the mock accepted each
    message (every delivery event carries it) and forwards the post unchanged."""

    def __init__(self, forward_to: str) -> None:
        self.forward_to = forward_to
        self.port = free_port()
        self.accepted_at: dict[str, float] = {}  # ref -> epoch seconds
        self._waiting: dict[str, asyncio.Future[float]] = {}
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/webhooks/mock"

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/webhooks/mock", self._receive)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        for event in orjson.loads(body):
            ref, at = event["ref"], float(event["timestamp"])
            self.accepted_at.setdefault(ref, at)
            waiter = self._waiting.pop(ref, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(at)
        assert self._session is not None
        headers = {"Content-Type": "application/json"}
        for name in (SIGNATURE_HEADER, TIMESTAMP_HEADER):
            if name in request.headers:
                headers[name] = request.headers[name]
        try:
            async with self._session.post(self.forward_to, data=body, headers=headers) as resp:
                return web.Response(status=resp.status, body=await resp.read())
        except (TimeoutError, aiohttp.ClientError):
            return web.Response(status=502)  # the mock posts it again later

    async def accepted(self, ref: str, give_up_s: float) -> float:
        """When the mock accepted ``ref`` (epoch seconds), waiting for its webhook."""
        if ref in self.accepted_at:
            return self.accepted_at[ref]
        waiter = self._waiting.setdefault(ref, asyncio.get_running_loop().create_future())
        return await asyncio.wait_for(waiter, give_up_s)


@dataclass(frozen=True, slots=True)
class Deployment:
    stack: Stack
    key: str  # an API key of tenant "bench"
    tap: WebhookTap


def _stop(stack: Stack) -> None:
    """Workers first (they drain what they hold, bounded by DRAIN_TIMEOUT), then the rest,
    so chunks in flight do not retry against a provider that is already gone."""
    stack.stop("worker")
    stack.stop_all()


@asynccontextmanager
async def deployment(
    tag: str, overrides: dict[str, str], mock_options: tuple[str, ...] = ()
) -> AsyncIterator[Deployment]:
    """Start mock provider, API and workers on their own databases, streams and keys, the
    mock's webhooks going through a ``WebhookTap``. Everything is stopped and dropped on
    the way out, also when the body (or the start) failed; the logs are kept then."""
    environ = isolated_environ(f"{tag}{uuid.uuid4().hex[:8]}")
    environ.update(overrides)
    settings = load_settings(environ)
    logs = Path(tempfile.mkdtemp(prefix=f"bench-{tag}-"))
    stack = Stack(settings, environ_for(environ), logs)
    tap = WebhookTap(f"{stack.api}/webhooks/mock")
    failed = True
    try:
        await migrate_all(settings)
        key = await tenant_key(settings, "bench")
        await tap.start()
        # start_all names the API as the webhook URL; a second --webhook-url wins (argparse).
        options = (*mock_options, "--webhook-url", tap.url)
        await asyncio.to_thread(stack.start_all, options)
        yield Deployment(stack, key, tap)
        failed = False
    except BaseException:
        print(stack.tail(), file=sys.stderr)
        print(f"logs kept in {logs}", file=sys.stderr)
        raise
    finally:
        await asyncio.to_thread(_stop, stack)
        await tap.stop()
        await drop_all(settings)
        shutil.rmtree(settings.metrics_dir, ignore_errors=True)
        if not failed:
            shutil.rmtree(logs, ignore_errors=True)


async def mock_stats(session: aiohttp.ClientSession, mock: str) -> dict[str, Any]:
    async with session.get(f"{mock}/v1/stats") as response:
        response.raise_for_status()
        return orjson.loads(await response.read())
