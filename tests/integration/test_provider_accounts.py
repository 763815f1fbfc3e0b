"""Provider accounts on the real API and PostgreSQL: credentials sealed at rest, never
answered (masked hints only), tenant-scoped, validated; keys rotate without loss."""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid

import pytest
from aiohttp.test_utils import TestClient

from devkit.stack import command, drop_all, isolated_environ
from engine import accounts
from engine.config import load_settings
from engine.db import create_pool
from engine.migrate import migrate_all
from engine.services import Services
from tests.integration.conftest import bearer

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
SES = {
    "name": "ses-eu",
    "provider": "ses",
    "credentials": {"access_key_id": "AKIAIOSFODNN7EXAMPLE", "secret_access_key": SECRET},
    "region": "eu-west-1",
    "rate_per_second": 14,
    "daily_quota": 50_000,
    "webhook_secret": "topic-secret-value",
}


async def _create(client: TestClient, key: str, body: dict) -> tuple[int, dict]:
    response = await client.post("/api/provider-accounts", headers=bearer(key), json=body)
    return response.status, await response.json()


async def test_an_account_is_stored_sealed_and_shown_masked(
    client: TestClient, tenant: tuple[str, str], services: Services
) -> None:
    tenant_id, key = tenant
    status, created = await _create(client, key, SES)
    assert status == 201, created
    assert created["credentials"] == {"access_key_id": "••••MPLE", "secret_access_key": "••••EKEY"}
    assert created["burst"] == 14 and created["daily_quota"] == 50_000
    assert created["webhook_secret_set"] is True and "webhook_secret" not in created
    for path in (f"/api/provider-accounts/{created['id']}", "/api/provider-accounts/ses-eu"):
        response = await client.get(path, headers=bearer(key))
        assert response.status == 200 and await response.json() == created
    listed = await (await client.get("/api/provider-accounts", headers=bearer(key))).json()
    assert listed == {"data": [created], "next_cursor": None}
    for answer in (created, listed):
        assert SECRET not in str(answer) and "AKIAIOSFODNN7EXAMPLE" not in str(answer)

    row = await services.pool.fetchrow(
        "SELECT credentials, webhook_secret FROM provider_accounts WHERE id = $1",
        uuid.UUID(created["id"]),
    )
    assert SECRET.encode() not in bytes(row["credentials"])  # sealed at rest
    opened = await accounts.account(
        services.pool, accounts.Sealer(services.settings.credentials_keys), tenant_id, "ses-eu"
    )
    assert opened.credentials["secret_access_key"] == SECRET and opened.region == "eu-west-1"
    assert SECRET not in repr(opened)

    status, again = await _create(client, key, SES)
    assert status == 409 and again["error"]["code"] == "account_exists"
    assert (await client.delete("/api/provider-accounts/ses-eu", headers=bearer(key))).status == 204
    missing = await client.get(f"/api/provider-accounts/{created['id']}", headers=bearer(key))
    assert missing.status == 404


async def test_another_tenant_sees_none_of_them(
    client: TestClient, tenant: tuple[str, str], services: Services
) -> None:
    from engine.tenants import create_key

    _, key = tenant
    _, created = await _create(client, key, {**SES, "name": "mine"})
    other = await create_key(services.pool, f"t{uuid.uuid4().hex[:10]}")
    for method in ("GET", "DELETE"):
        response = await client.request(
            method, f"/api/provider-accounts/{created['id']}", headers=bearer(other)
        )
        assert response.status == 404
    listed = await (await client.get("/api/provider-accounts", headers=bearer(other))).json()
    assert listed["data"] == []


@pytest.mark.parametrize(
    "change, field",
    [
        ({"provider": "mock"}, "provider"),
        ({"provider": "carrier-pigeon"}, "provider"),
        ({"credentials": {"access_key_id": "AKIA"}}, "credentials"),
        ({"credentials": {**SES["credentials"], "extra": "x"}}, "credentials"),
        ({"credentials": {"access_key_id": "", "secret_access_key": SECRET}}, "credentials.access_key_id"),
        ({"name": "has space"}, "name"),
        ({"rate_per_second": 0}, "rate_per_second"),
        ({"rate_per_second": True}, "rate_per_second"),
        ({"burst": 1.5}, "burst"),
        ({"daily_quota": -1}, "daily_quota"),
        ({"base_url": "ftp://example.com"}, "base_url"),
        ({"base_url": "https://user:pw@example.com"}, "base_url"),
        ({"region": "EU WEST"}, "region"),
        ({"colour": "blue"}, "colour"),
    ],
)  # fmt: skip
async def test_bad_input_is_refused_naming_the_field_and_changes_nothing(
    client: TestClient, tenant: tuple[str, str], change: dict, field: str
) -> None:
    _, key = tenant
    status, error = await _create(client, key, {**SES, "name": "bad", **change})
    assert status == 422, error
    assert error["error"]["code"] == "invalid_account"
    assert error["error"]["details"] == {"field": field}
    assert SECRET not in str(error)
    listed = await (await client.get("/api/provider-accounts", headers=bearer(key))).json()
    assert listed["data"] == []


async def test_paging_by_name(client: TestClient, tenant: tuple[str, str]) -> None:
    _, key = tenant
    for name in ("c", "a", "b"):
        assert (await _create(client, key, {**SES, "name": name}))[0] == 201
    first = await (await client.get("/api/provider-accounts?limit=2", headers=bearer(key))).json()
    assert [a["name"] for a in first["data"]] == ["a", "b"] and first["next_cursor"] == "b"
    rest = await client.get("/api/provider-accounts?cursor=b", headers=bearer(key))
    assert [a["name"] for a in (await rest.json())["data"]] == ["c"]


async def test_keys_rotate_without_losing_an_account(
    tenant: tuple[str, str], services: Services
) -> None:
    tenant_id, _ = tenant
    old, new = "old-credentials-key-" * 2, "new-credentials-key-" * 2
    await accounts.create(services.pool, accounts.Sealer((old,)), tenant_id, SES)
    both = accounts.Sealer((new, old))  # a new key first, the old one still there
    assert (await accounts.account(services.pool, both, tenant_id, "ses-eu")).credentials[
        "secret_access_key"
    ] == SECRET
    assert await accounts.reseal_all(services.pool, both, tenant_id) == 1
    only_new = accounts.Sealer((new,))  # the old key dropped after the reseal
    opened = await accounts.account(services.pool, only_new, tenant_id, "ses-eu")
    assert opened.credentials["secret_access_key"] == SECRET
    with pytest.raises(ValueError, match="none of CREDENTIALS_KEYS"):
        await accounts.account(services.pool, accounts.Sealer((old,)), tenant_id, "ses-eu")


async def test_the_cli_reseals_every_account_under_the_first_key() -> None:
    """``batchsender provider-accounts reseal``, on a deployment of its own."""
    environ = isolated_environ(f"pa{uuid.uuid4().hex[:8]}")
    settings = load_settings(environ)
    await migrate_all(settings)
    pool = await create_pool(settings, max_size=1)
    try:
        await accounts.create(pool, accounts.Sealer(settings.credentials_keys), "t1", SES)
        new = "new-credentials-key-" * 2
        done = await asyncio.to_thread(
            subprocess.run,
            command("provider-accounts", "reseal"),
            env={
                **os.environ,
                **environ,
                "CREDENTIALS_KEYS": f"{new},{settings.credentials_keys[0]}",
            },
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert "resealed 1 provider accounts" in done.stdout
        opened = await accounts.account(pool, accounts.Sealer((new,)), "t1", "ses-eu")
        assert opened.credentials["secret_access_key"] == SECRET
    finally:
        await pool.close()
        await drop_all(settings)


async def test_values_of_the_wrong_type_are_refused(client: TestClient, tenant) -> None:
    _, key = tenant
    for change in ({"provider": {}}, {"provider": ["ses"]}, {"credentials": ["x"]}, {"name": 5}):
        status, error = await _create(client, key, {**SES, **change})
        assert status == 422 and error["error"]["code"] == "invalid_account", (change, error)
    too_long = await client.get(f"/api/provider-accounts?cursor={'0' * 101}", headers=bearer(key))
    assert too_long.status == 422


async def test_an_account_is_replaced_whole_but_keeps_its_provider(
    client: TestClient, tenant: tuple[str, str], services: Services
) -> None:
    tenant_id, key = tenant
    _, created = await _create(client, key, SES)
    rotated = {**SES, "credentials": {**SES["credentials"], "secret_access_key": "n" * 40},
               "rate_per_second": 20, "daily_quota": None}  # fmt: skip
    path = f"/api/provider-accounts/{created['id']}"
    response = await client.put(path, headers=bearer(key), json=rotated)
    replaced = await response.json()
    assert response.status == 200, replaced
    assert replaced["id"] == created["id"] and replaced["rate_per_second"] == 20
    assert replaced["credentials"]["secret_access_key"] == "••••nnnn"
    assert replaced["daily_quota"] is None
    opened = await accounts.account(
        services.pool, accounts.Sealer(services.settings.credentials_keys), tenant_id, "ses-eu"
    )
    assert opened.credentials["secret_access_key"] == "n" * 40

    other = {"name": "ses-eu", "provider": "sendgrid", "credentials": {"api_key": "k" * 20},
             "rate_per_second": 5}  # fmt: skip
    response = await client.put(path, headers=bearer(key), json=other)
    assert response.status == 422
    assert (await response.json())["error"]["details"] == {"field": "provider"}
    response = await client.put(
        f"/api/provider-accounts/{uuid.uuid4()}", headers=bearer(key), json=rotated
    )
    assert response.status == 404
    response = await client.put(path, headers=bearer(key), json={**rotated, "region": "x"})
    assert response.status == 422  # validated as at create; nothing changed
    shown = await (await client.get(path, headers=bearer(key))).json()
    assert shown == replaced
