"""The real API app in-process (aiohttp's test server on 127.0.0.1), on the session's settings."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestClient, TestServer

from api.app import create_app
from engine.config import Settings
from tests.worker_support import own  # noqa: F401 - a fixture of every test here


@pytest.fixture(scope="module")
async def client(migrated: Settings) -> AsyncIterator[TestClient]:
    async with TestClient(TestServer(create_app(migrated), host="127.0.0.1")) as test_client:
        yield test_client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
