"""Test session isolation: every session gets its own PostgreSQL database, ClickHouse
database, NATS prefix (so its own streams), Dragonfly key prefix, metrics folder and
ports, and removes them at the end. Tests can therefore run while the dev stack runs.

Service fixtures are lazy: unit tests that do not ask for them need no services.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from devkit.stack import drop_all, isolated_environ
from engine.config import Settings, load_settings
from engine.migrate import migrate_all
from engine.services import Services
from engine.tenants import create_key

SESSION = uuid.uuid4().hex[:8]


@pytest.fixture(scope="session")
def test_environ() -> Iterator[dict[str, str]]:
    """The variables that make this session's settings (for in-process and child processes)."""
    environ = isolated_environ(f"t{SESSION}")
    yield environ
    shutil.rmtree(environ["METRICS_DIR"], ignore_errors=True)


@pytest.fixture(scope="session")
def settings(test_environ: dict[str, str]) -> Settings:
    return load_settings(test_environ)


@pytest.fixture(scope="session")
async def migrated(settings: Settings) -> AsyncIterator[Settings]:
    await migrate_all(settings)
    yield settings
    await drop_all(settings)


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
