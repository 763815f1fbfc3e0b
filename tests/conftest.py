"""Test session isolation: every session gets its own PostgreSQL database, ClickHouse
database, NATS prefix (so its own streams), Dragonfly key prefix, metrics folder and
ports, and removes them at the end. Tests can therefore run while the dev stack runs.

Service fixtures are lazy: unit tests that do not ask for them need no services.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator

import asyncpg
import nats
import pytest
import redis.asyncio as aioredis

from engine.clickhouse import ClickHouse
from engine.config import Settings, load_settings
from engine.migrate import migrate_all
from engine.services import Services
from engine.tenants import create_key
from engine.topology import Topology, delete_topology

SESSION = uuid.uuid4().hex[:8]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def test_environ() -> dict[str, str]:
    """The variables that make this session's settings (for in-process and child processes)."""
    metrics_dir = tempfile.mkdtemp(prefix=f"bst-metrics-{SESSION}-")
    environ = {
        "BATCHSENDER_ENV": "test",
        "DATABASE_URL": f"postgresql://postgres@127.0.0.1:5432/bst_{SESSION}",
        "CLICKHOUSE_DATABASE": f"bst_{SESSION}",
        "NATS_PREFIX": f"bst{SESSION}",
        "KEY_PREFIX": f"bst{SESSION}:",
        "METRICS_DIR": metrics_dir,
        "API_PORT": str(free_port()),
        "WEB_PORT": str(free_port()),
        "MOCK_PROVIDER_URL": f"http://127.0.0.1:{free_port()}",
    }
    yield environ
    shutil.rmtree(metrics_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def settings(test_environ: dict[str, str]) -> Settings:
    return load_settings(test_environ)


@pytest.fixture(scope="session")
async def migrated(settings: Settings) -> AsyncIterator[Settings]:
    await migrate_all(settings)
    yield settings
    await _drop_everything(settings)


async def _drop_everything(settings: Settings) -> None:
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
    admin = await asyncpg.connect(settings.database_url.rsplit("/", 1)[0] + "/postgres")
    name = settings.database_url.rsplit("/", 1)[1]
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.close()


@pytest.fixture(scope="session")
async def services(migrated: Settings) -> AsyncIterator[Services]:
    opened = await Services.open(migrated)
    yield opened
    await opened.close()


@pytest.fixture
async def tenant(services: Services) -> tuple[str, str]:
    """A fresh tenant and its API key."""
    tenant_id = f"t{uuid.uuid4().hex[:10]}"
    return tenant_id, await create_key(services.pool, tenant_id)
