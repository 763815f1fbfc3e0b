"""What the tests that run the worker's own loops in-process share: services on NATS
streams and Dragonfly keys of one test alone (``own``), the send and results-pg loops as
``Worker.run`` starts them, waiting for a condition, and reading what the engine stored."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
from nats.js.errors import NotFoundError

from engine.config import Settings
from engine.sender import Sender
from engine.services import Services
from engine.topology import Redelivery, delete_topology
from engine.worker import Worker

FAST = Redelivery(max_deliveries=3, base_delay=0.2, max_delay=0.2)


@pytest.fixture
async def own(migrated: Settings) -> AsyncIterator[Services]:
    """Services on streams and Dragonfly keys of this test alone (the session's database)."""
    tag = uuid.uuid4().hex[:6]
    settings = dataclasses.replace(
        migrated, nats_prefix=f"{migrated.nats_prefix}p{tag}", key_prefix=f"bsp{tag}:"
    )
    services = await Services.open(settings)
    await services.redis.set(services.key("state"), "1")  # a deployment with its state
    try:
        yield services
    finally:
        await delete_topology(services.js, services.topology)
        keys = [key async for key in services.redis.scan_iter(match=f"bsp{tag}:*")]
        if keys:
            await services.redis.delete(*keys)
        await services.close()


@asynccontextmanager
async def worker_loops(
    services: Services, sender: Sender, redelivery: Redelivery = FAST
) -> AsyncIterator[Worker]:
    """The worker's send and results-pg loops, as ``Worker.run`` starts them."""
    worker = Worker(services.settings, redelivery=redelivery)
    loops = [
        asyncio.create_task(worker._send_loop(services.js, services.topology.send_stream, sender)),
        asyncio.create_task(worker._results_loop(services)),
    ]
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(asyncio.gather(*loops), 30)


async def eventually(check: Callable[[], Awaitable[Any]], within: float, what: str) -> Any:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out after {within}s waiting for {what}")


async def batch_status(services: Services, batch_id: str) -> str:
    return await services.pool.fetchval(
        "SELECT status FROM batches WHERE id = $1", uuid.UUID(batch_id)
    )


async def recipients(services: Services, batch_id: str) -> dict[str, dict[str, Any]]:
    rows = await services.pool.fetch(
        "SELECT seq, email, status, error FROM recipient_statuses WHERE batch_id = $1",
        uuid.UUID(batch_id),
    )
    return {r["email"]: dict(r) for r in rows}


async def dead_letters(services: Services) -> list[dict[str, Any]]:
    stream = services.topology.dlq_stream
    state = (await services.js.stream_info(stream)).state
    found = []
    for seq in range(max(1, state.first_seq), state.last_seq + 1):
        try:
            found.append(orjson.loads((await services.js.get_msg(stream, seq)).data))
        except NotFoundError:
            continue
    return found
