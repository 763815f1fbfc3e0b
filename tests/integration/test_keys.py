"""API keys on the real API, PostgreSQL, NATS and Redis: list, create and revoke (API and
CLI), revocation reaching every API process at once, failed authentications slowed per
client address without locking others out."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from aiohttp.test_utils import TestClient, TestServer

from api.app import create_app
from engine import auth, tenants
from engine.config import Settings
from engine.services import Services
from tests.integration.conftest import bearer
from tests.integration.test_api import error_body
from tests.integration.test_webhooks import raw_post


@asynccontextmanager
async def api_process(settings: Settings) -> AsyncIterator[TestClient]:
    """One more API process: its own app, connections and key cache."""
    async with TestClient(TestServer(create_app(settings), host="127.0.0.1")) as client:
        yield client


def behind_proxy(settings: Settings, limit: int = 5) -> Settings:
    """The API behind a trusted proxy on 127.0.0.1, so each test names its own client
    addresses in X-Forwarded-For, with a small failure limit."""
    return dataclasses.replace(
        settings, trusted_proxies=(ipaddress.ip_network("127.0.0.1/32"),),
        auth_failure_limit=limit, auth_failure_window_seconds=60,
    )  # fmt: skip


def new_address() -> str:
    """A client address no other test uses (a random /64 of the documentation prefix)."""
    block = uuid.uuid4().int
    return f"2001:db8:{block >> 112:x}:{(block >> 96) & 0xFFFF:x}::{block & 0xFFFF:x}"


def from_(address: str, key: str | None = None) -> dict[str, str]:
    return {"X-Forwarded-For": address, **(bearer(key) if key else {})}


# --- list, create, revoke over the API -----------------------------------------------------


async def test_create_list_and_revoke_own_keys(
    client: TestClient, services: Services, tenant: tuple[str, str]
) -> None:
    tenant_id, key = tenant
    response = await client.post("/api/keys", headers=bearer(key))
    assert response.status == 201
    created = await response.json()
    assert set(created) == {"id", "key", "prefix", "created_at", "revoked_at", "last_used_at"}
    assert created["key"].startswith("bsk_") and created["key"][:10] == created["prefix"]
    assert (await client.get("/api/batches", headers=bearer(created["key"]))).status == 200

    other_key = await tenants.create_key(services.pool, f"k{uuid.uuid4().hex[:10]}")
    listed = await (await client.get("/api/keys", headers=bearer(key))).json()
    assert [k["prefix"] for k in listed["data"]] == [created["prefix"], key[:10]]  # newest first
    assert all(set(k) == {"id", "prefix", "created_at", "revoked_at", "last_used_at"}
               for k in listed["data"])  # fmt: skip
    assert other_key[:10] not in str(listed) and "hash" not in str(listed)
    assert listed["data"][1]["last_used_at"] is not None  # the key that listed them
    first = await (await client.get("/api/keys?limit=1", headers=bearer(key))).json()
    rest = await (
        await client.get(f"/api/keys?limit=1&cursor={first['next_cursor']}", headers=bearer(key))
    ).json()
    assert [k["id"] for k in first["data"] + rest["data"]] == [k["id"] for k in listed["data"]]

    revoked = await client.delete(f"/api/keys/{created['id']}", headers=bearer(key))
    assert revoked.status == 204
    await error_body(await client.get("/api/batches", headers=bearer(created["key"])), 401)
    again = await client.delete(f"/api/keys/{created['id']}", headers=bearer(key))
    assert again.status == 204  # revoking twice changes nothing
    listed = await (await client.get("/api/keys", headers=bearer(key))).json()
    assert listed["data"][0]["revoked_at"] is not None and listed["data"][1]["revoked_at"] is None


async def test_a_tenant_cannot_touch_another_tenants_keys(
    client: TestClient, services: Services, tenant: tuple[str, str]
) -> None:
    _, key = tenant
    other_id = f"k{uuid.uuid4().hex[:10]}"
    other_key = await tenants.create_key(services.pool, other_id)
    (theirs,) = (await tenants.list_keys(services.pool, other_id)).keys
    for path in (f"/api/keys/{theirs.id}", f"/api/keys/{other_key[:10]}", f"/api/keys/{other_key}",
                 "/api/keys/abc", "/api/keys/0", "/api/keys/99999999999999999999999"):  # fmt: skip
        await error_body(await client.delete(path, headers=bearer(key)), 404, "unknown_key")
    assert (await client.get("/api/batches", headers=bearer(other_key))).status == 200
    for query in ("cursor=abc", "cursor=-1", "limit=0", "cursor=99999999999999999999"):
        await error_body(await client.get(f"/api/keys?{query}", headers=bearer(key)), 422)


async def test_active_keys_per_tenant_are_bounded(
    client: TestClient, services: Services, tenant: tuple[str, str], monkeypatch
) -> None:
    tenant_id, key = tenant
    monkeypatch.setattr(tenants, "MAX_ACTIVE_KEYS", 3)
    for _ in range(2):
        assert (await client.post("/api/keys", headers=bearer(key))).status == 201
    await error_body(await client.post("/api/keys", headers=bearer(key)), 409, "too_many_keys")


# --- revocation across processes -------------------------------------------------------


async def test_a_key_revoked_through_one_process_is_refused_by_another_at_once(
    client: TestClient, migrated: Settings, tenant: tuple[str, str]
) -> None:
    _, key = tenant
    async with api_process(migrated) as other:
        created = await (await client.post("/api/keys", headers=bearer(key))).json()
        doomed = bearer(created["key"])
        for process in (client, other):  # both have it in their caches now
            assert (await process.get("/api/batches", headers=doomed)).status == 200
        assert (
            await client.delete(f"/api/keys/{created['id']}", headers=bearer(key))
        ).status == 204
        await error_body(await other.get("/api/batches", headers=doomed), 401, "unauthorized")
        await error_body(await client.get("/api/batches", headers=doomed), 401, "unauthorized")
        assert (await other.get("/api/batches", headers=bearer(key))).status == 200


async def test_a_revocation_does_not_wait_long_for_a_process_that_does_not_answer(
    client: TestClient, services: Services, tenant: tuple[str, str], monkeypatch
) -> None:
    _, key = tenant
    monkeypatch.setattr(auth, "ACK_TIMEOUT", 0.3)
    registry = services.key("auth-listeners")
    await services.redis.zadd(registry, {"hung-process": time.time() + 60})
    try:
        created = await (await client.post("/api/keys", headers=bearer(key))).json()
        started = time.monotonic()
        response = await client.delete(f"/api/keys/{created['id']}", headers=bearer(key))
        assert response.status == 204 and 0.3 <= time.monotonic() - started < 3
        await error_body(await client.get("/api/batches", headers=bearer(created["key"])), 401)
    finally:
        await services.redis.zrem(registry, "hung-process")


def cli(environ: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", "keys", *args], env={**os.environ, **environ},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


async def test_cli_lists_and_revokes_keys_and_running_apis_refuse_them_at_once(
    client: TestClient, services: Services, test_environ: dict[str, str]
) -> None:
    tenant_id = f"c{uuid.uuid4().hex[:10]}"
    keys = [await tenants.create_key(services.pool, tenant_id) for _ in range(3)]
    for key in keys:
        assert (await client.get("/api/batches", headers=bearer(key))).status == 200  # cached

    listed = await asyncio.to_thread(cli, test_environ, "list", "--tenant", tenant_id)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.strip().splitlines()
    assert lines[0].split() == ["id", "prefix", "created", "last", "used", "revoked"]
    assert [line.split()[1] for line in lines[1:]] == [k[:10] for k in reversed(keys)]
    assert all(k[10:] not in listed.stdout for k in keys)

    (by_id, by_prefix, by_key) = (await tenants.list_keys(services.pool, tenant_id)).keys[::-1]
    for ref in (str(by_id.id), by_prefix.prefix, keys[2]):
        done = await asyncio.to_thread(cli, test_environ, "revoke", ref)
        assert done.returncode == 0, done.stderr
        assert tenant_id in done.stdout
    for key in keys:
        await error_body(await client.get("/api/batches", headers=bearer(key)), 401)
    missing = await asyncio.to_thread(cli, test_environ, "revoke", "bsk_nothere")
    assert missing.returncode == 2 and "no API key" in missing.stderr
    after = await asyncio.to_thread(cli, test_environ, "list", "--tenant", tenant_id)
    assert all(line.split()[-1] != "-" for line in after.stdout.strip().splitlines()[1:])


# --- failed authentications ----------------------------------------------------------------


async def test_repeated_failures_from_one_address_get_429_before_the_database(
    migrated: Settings, services: Services, tenant: tuple[str, str]
) -> None:
    _, key = tenant
    attacker, neighbour = new_address(), new_address()
    async with api_process(behind_proxy(migrated, limit=5)) as api:
        assert (await api.get("/api/batches", headers=from_(attacker, key))).status == 200
        fresh = await tenants.create_key(services.pool, tenant[0])  # never used yet
        for i in range(5):
            response = await api.get("/api/batches", headers=from_(attacker, f"bsk_guess{i}"))
            await error_body(response, 401, "unauthorized")
        # The table locked: any key query would hang; the blocked address is answered
        # at once, without one.
        async with services.pool.acquire() as conn, conn.transaction():
            await conn.execute("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE")
            for guess in ("bsk_guess9", fresh, "not-even-a-key"):
                response = await asyncio.wait_for(
                    api.get("/api/batches", headers=from_(attacker, guess)), 5
                )
                error = await error_body(response, 429, "too_many_failed_auth")
                assert 0 < int(response.headers["Retry-After"]) <= 60
                assert error["details"] == {"limit": "auth_failures", "value": 5}
            # a key this process verified a moment ago still works from there
            assert (await api.get("/api/batches", headers=from_(attacker, key))).status == 200
        # another address is not affected, the fresh key included
        assert (await api.get("/api/batches", headers=from_(neighbour, fresh))).status == 200
        # no key at all is not counted, and answers 401 as before
        await error_body(await api.get("/api/batches", headers=from_(neighbour)), 401)


async def test_a_client_cannot_choose_its_address_without_a_trusted_proxy(
    migrated: Settings, tenant: tuple[str, str]
) -> None:
    _, key = tenant
    direct = dataclasses.replace(
        migrated, auth_failure_limit=3, key_prefix=f"{migrated.key_prefix}{uuid.uuid4().hex[:6]}:"
    )
    async with api_process(direct) as api:
        for i in range(3):  # a new X-Forwarded-For each time: still one client, 127.0.0.1
            response = await api.get("/api/batches", headers=from_(new_address(), f"bsk_g{i}"))
            await error_body(response, 401)
        response = await api.get("/api/batches", headers=from_(new_address(), "bsk_g9"))
        await error_body(response, 429, "too_many_failed_auth")


@pytest.mark.parametrize(
    "header",
    [
        b"Authorization: Bearer \xff\xfe\xfd\r\n",
        b"Authorization: Bearer bsk_\xc3\x28abc\r\n",
        b"X-API-Key: \xc3\x28\r\n",
        b"X-API-Key: bsk_\xe2\x82\r\n",
    ],
)
async def test_non_utf8_keys_answer_401(client: TestClient, header: bytes) -> None:
    answer = await raw_post(client, "/api/suppressions", header, b"{}")
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert b'"code":"unauthorized"' in answer
