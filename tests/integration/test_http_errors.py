"""How the real API answers what goes wrong around a request: 405 with ``Allow``, a public
``/health`` that names what is down but not how, and clients that go away mid-request
logged as one quiet line instead of an unhandled error."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket

import pytest
from aiohttp.test_utils import TestClient, TestServer

from api.app import create_app
from engine.config import Settings
from tests.integration.conftest import bearer
from tests.integration.test_api import error_body


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/health", {"GET", "HEAD"}),
        ("DELETE", "/api/batches", {"GET", "HEAD", "POST"}),
        ("PATCH", "/api/keys", {"GET", "HEAD", "POST"}),
        ("GET", "/api/queue/dlq/replay", {"POST"}),
    ],
)
async def test_405_names_the_allowed_methods(
    client: TestClient, tenant: tuple[str, str], method: str, path: str, allowed: set[str]
) -> None:
    response = await client.request(method, path, headers=bearer(tenant[1]))
    await error_body(response, 405, "method_not_allowed")
    assert {m.strip() for m in response.headers["Allow"].split(",")} == allowed


async def test_health_names_what_is_down_not_how(
    migrated: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    broken = dataclasses.replace(migrated, clickhouse_url=f"http://127.0.0.1:{port}")
    async with TestClient(TestServer(create_app(broken), host="127.0.0.1")) as down_client:
        with caplog.at_level(logging.WARNING, logger="engine.health"):
            response = await down_client.get("/health")
        assert response.status == 503
        body = await response.json()
        assert body == {
            "status": "down", "down": ["clickhouse"],
            "checks": {"postgres": "ok", "nats": "ok", "dragonfly": "ok", "clickhouse": "down"},
        }  # fmt: skip
        assert str(port) not in await response.text()
    logged = [r for r in caplog.records if r.name == "engine.health"]
    assert logged and logged[0].check == "clickhouse" and str(port) in logged[0].error


async def test_a_client_that_goes_away_mid_request_is_one_info_line(
    client: TestClient, tenant: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(
        b"POST /api/suppressions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + tenant[1].encode() + b"\r\nContent-Length: 100000\r\n\r\n"
        b'{"emails": ['
    )
    await writer.drain()
    await asyncio.sleep(0.2)  # the handler is reading the body now
    writer.transport.abort()  # the client goes away
    for _ in range(100):
        if any(r.getMessage() == "client disconnected" for r in caplog.records):
            break
        await asyncio.sleep(0.02)
    gone = [r for r in caplog.records if r.getMessage() == "client disconnected"]
    assert gone and gone[0].levelno == logging.INFO and gone[0].path == "/api/suppressions"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [
        (r.name, r.getMessage()) for r in caplog.records if r.levelno >= logging.ERROR
    ]
    assert not [r for r in caplog.records if r.exc_info and r.name.startswith(("api", "aiohttp"))]
