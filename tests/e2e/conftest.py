"""The real processes, started as a user would: ``batchsender mock-provider``, ``api``
and ``worker``, on this session's isolated settings."""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import aiohttp
import orjson
import pytest

from bench.stack import Stack, command, environ_for, isolated_environ
from engine.config import load_settings
from engine.db import create_pool
from engine.migrate import drop_all, migrate_all
from engine.tenants import create_key
from tests.conftest import SESSION

__all__ = ["Client", "Stack", "command", "eventually"]


@pytest.fixture(scope="session")
async def deployment() -> AsyncIterator[dict[str, str]]:
    """A deployment of its own for the running processes, apart from the one the
    integration tests use (they must see no worker consume their messages)."""
    environ = isolated_environ(f"e{SESSION}")
    environ.update(WORKER_PROCESSES="2", WORKER_HEARTBEAT_TIMEOUT="5", DRAIN_TIMEOUT="20")
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


async def eventually(predicate, within: float, interval: float = 0.25, what: str = "condition"):
    """Await ``predicate()`` until it returns something truthy (behaviour, not timing)."""
    import asyncio

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {within}s waiting for {what}")
