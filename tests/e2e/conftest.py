"""The real processes, started as a user would: ``batchsender mock-provider``, ``api``
and ``worker``, on this session's isolated settings."""

from __future__ import annotations

import time
from collections.abc import Iterator

import aiohttp
import orjson
import pytest

from bench.stack import Stack, command, environ_for
from engine.config import Settings

__all__ = ["Client", "Stack", "command", "eventually"]


@pytest.fixture(scope="session")
def stack(migrated: Settings, test_environ: dict[str, str], tmp_path_factory) -> Iterator[Stack]:
    environ = environ_for(test_environ, WORKER_PROCESSES="2", WORKER_HEARTBEAT_TIMEOUT="5",
                          DRAIN_TIMEOUT="20")  # fmt: skip
    running = Stack(migrated, environ, tmp_path_factory.mktemp("logs"))
    try:
        running.start_all()
        yield running
    except BaseException:
        print(running.tail())
        raise
    finally:
        running.stop_all()


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
