"""The real processes, started as a user would: ``batchsender mock-provider``, ``api``
and ``worker``, on this session's isolated settings."""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import aiohttp
import orjson
import pytest

from devkit.stack import Stack, command, drop_all, environ_for, isolated_environ
from engine.config import load_settings
from engine.db import create_pool
from engine.migrate import migrate_all
from engine.tenants import create_key
from tests.conftest import SESSION

__all__ = ["FINAL", "Client", "Stack", "command", "eventually", "final_at_least"]


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
