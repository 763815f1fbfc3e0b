"""The real processes, started as a user would: ``batchsender mock-provider``, ``api``
and ``worker``, on this session's isolated settings.

When the session's processes stop, every line they logged is checked (``log_problems``):
each one JSON, and none with an e-mail address, an API key or a message body of the tests
(``BODY_MARKERS``). A line that fails makes the ``stack`` fixture's teardown an error.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from devkit.stack import Stack, command, drop_all, environ_for, isolated_environ
from engine.config import load_settings
from engine.db import create_pool
from engine.migrate import migrate_all
from engine.tenants import API_KEY_PREFIX, create_key
from tests.conftest import SESSION

__all__ = [
    "BODY_MARKERS",
    "FINAL",
    "Client",
    "Stack",
    "command",
    "eventually",
    "final_at_least",
    "log_problems",
]

# Text that only ever appears in the subject or body of messages the e2e tests send: found
# in a log line, it means a message body was logged.
BODY_MARKERS = ("bs-body-marker-5d1f", "bs-subject-marker-9c2e")
EMAIL = re.compile(r"[\w.!#$%&'*+/=?^`{|}~-]+@[\w-]+(?:\.[\w-]+)+")
API_KEY = re.compile(re.escape(API_KEY_PREFIX) + r"[A-Za-z0-9_-]{16,}")
# Lines of the processes' output that may be other than JSON, with the reason: none.
NOT_JSON_ALLOWED: tuple[re.Pattern[str], ...] = ()


def log_problems(logs: Path, limit: int = 20) -> list[str]:
    """What is wrong with the lines of every log file in ``logs`` (at most ``limit``)."""
    problems: list[str] = []
    for path in sorted(logs.glob("*.log")):
        for number, line in enumerate(path.read_text(errors="replace").split("\n"), 1):
            where = f"{path.name}:{number}"
            if not line.strip():
                continue
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                entry = None
            if not isinstance(entry, dict) and not any(p.search(line) for p in NOT_JSON_ALLOWED):
                problems.append(f"{where}: not a JSON object: {line[:300]!r}")
            if EMAIL.search(line):
                problems.append(f"{where}: an e-mail address: {line[:300]!r}")
            if API_KEY.search(line):
                problems.append(f"{where}: an API key: {line[:300]!r}")
            for marker in BODY_MARKERS:
                if marker in line:
                    problems.append(f"{where}: a message subject or body: {line[:300]!r}")
            if len(problems) >= limit:
                return problems
    return problems


@pytest.fixture(scope="session")
async def deployment() -> AsyncIterator[dict[str, str]]:
    """A deployment of its own for the running processes, apart from the one the
    integration tests use (they must see no worker consume their messages)."""
    environ = isolated_environ(f"e{SESSION}")
    environ.update(WORKER_PROCESSES="2", WORKER_HEARTBEAT_TIMEOUT="5", DRAIN_TIMEOUT="20",
                   STALL_SECONDS="5")  # fmt: skip
    await migrate_all(load_settings(environ))
    yield environ
    await drop_all(load_settings(environ))
    shutil.rmtree(environ["METRICS_DIR"], ignore_errors=True)


@pytest.fixture(scope="session")
def stack(deployment: dict[str, str], tmp_path_factory) -> Iterator[Stack]:
    running = Stack(
        load_settings(deployment), environ_for(deployment), tmp_path_factory.mktemp("logs")
    )
    try:
        running.start_all()
        yield running
    except BaseException:
        print(running.tail())
        raise
    finally:
        running.stop_all()
    # Every line the session's processes wrote, now that they have stopped.
    if problems := log_problems(running.logs):
        raise AssertionError(
            f"log lines of the e2e run (in {running.logs}) that must not be:\n"
            + "\n".join(problems)
        )


@pytest.fixture
async def tenant(stack: Stack) -> tuple[str, str]:
    """A fresh tenant and key in the running deployment."""
    tenant_id = f"t{uuid.uuid4().hex[:10]}"
    pool = await create_pool(stack.settings, max_size=1)
    try:
        return tenant_id, await create_key(pool, tenant_id)
    finally:
        await pool.close()


FINAL = {"sent", "delivered", "bounced", "complained", "failed", "suppressed", "cancelled"}


def final_at_least(n: int):
    """A check for ``Client.until``: at least ``n`` recipients in a final status."""
    return lambda batch: batch["progress"]["final"] >= n


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

    async def post_json(self, url: str, body: object) -> tuple[int, object]:
        return await self.request("POST", url, data=orjson.dumps(body),
                                  headers={"Content-Type": "application/json"})  # fmt: skip

    async def create(self, total: int, *, emails: list[str] | None = None, **fields) -> str:
        """A batch of ``total`` recipients (or the given addresses) to the mock provider."""
        emails = emails or [f"r{i}@example.com" for i in range(total)]
        body = {"name": "e2e", "from_email": "ops@example.com", "subject": "Hi {{ name }}",
                "text": "x", "provider": "mock",
                "recipients": [{"email": e, "name": f"R{i}"} for i, e in enumerate(emails)],
                **fields}  # fmt: skip
        status, created = await self.post_json(f"{self.stack.api}/api/batches", body)
        assert status == 201, created
        return created["id"]

    async def batch(self, batch_id: str) -> dict:
        _, batch = await self.request("GET", f"{self.stack.api}/api/batches/{batch_id}")
        return batch

    async def until(self, batch_id: str, what: str, check, within: float = 240) -> dict:
        """The batch once ``check(batch)`` holds; when it never does, the failure shows the
        batch as it was and the last lines of every process's log."""
        last: dict = {}

        async def probe():
            nonlocal last
            last = await self.batch(batch_id)
            return last if check(last) else None

        try:
            return await eventually(probe, within, what=what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nthe batch: {last}\n{self.stack.tail(25)}") from None

    async def received(self, batch_id: str) -> dict[str, int]:
        """How many times the mock provider accepted each recipient of the batch."""
        _, received = await self.request("GET", f"{self.stack.mock}/v1/received")
        return {ref: n for ref, n in received["refs"].items() if ref.startswith(batch_id)}

    async def mock_config(self, **values) -> None:
        """Latency (``latency_ms``) and injected failures (``failure_rate``) of the mock."""
        status, _ = await self.post_json(f"{self.stack.mock}/v1/config", values)
        assert status == 200


async def ensure_workers(stack: Stack) -> None:
    """The supervisor running with its two worker processes (a test may have stopped it)."""
    proc = stack.procs.get("worker")
    if proc is None or proc.poll() is not None:
        stack.start("worker", "worker")

    async def two():
        return len(stack.worker_children()) == 2

    await eventually(two, 60, what="2 worker processes")


@pytest.fixture
async def client(stack: Stack, tenant: tuple[str, str]) -> AsyncIterator[Client]:
    """A fresh tenant's client; the workers running, the mock provider reset afterwards."""
    await ensure_workers(stack)
    c = Client(stack, tenant[1])
    yield c
    await c.mock_config(latency_ms=0, failure_rate=0.0)
    await ensure_workers(stack)


async def eventually(predicate, within: float, interval: float = 0.25, what: str = "condition"):
    """Await ``predicate()`` until it returns something truthy (behaviour, not timing)."""

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {within}s waiting for {what}")
