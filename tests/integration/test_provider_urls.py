"""SSRF: the base URL a tenant gives a provider account, with ``PROVIDER_ALLOW_PRIVATE_URLS``
off (as in prod). The API refuses plain http and hosts written as loopback, private or
link-local addresses; a name that resolves inside is refused when the adapter connects
(``engine.outbound.PublicResolver``), for the credentials check and for sending alike.
Real API and PostgreSQL; the fake SendGrid on 127.0.0.1, reached as ``localhost``."""

from __future__ import annotations

import asyncio
import dataclasses
from urllib.parse import urlsplit

from aiohttp.test_utils import TestClient, TestServer

from api.app import create_app
from devkit.fakes import sendgrid
from engine import accounts
from engine.config import Settings
from engine.services import Services
from providers.base import Message
from providers.registry import PROVIDERS
from tests.integration.conftest import bearer

ACCOUNT = {
    "name": "sg",
    "provider": "sendgrid",
    "credentials": {"api_key": sendgrid.TEST_API_KEY},
    "rate_per_second": 10,
}
SMTP = {
    "name": "relay",
    "provider": "smtp",
    "credentials": {"username": "u", "password": "password-0123"},
    "rate_per_second": 10,
}


async def test_without_the_setting_only_public_https_base_urls_are_taken(
    migrated: Settings, tenant: tuple[str, str]
) -> None:
    _, key = tenant
    settings = dataclasses.replace(migrated, provider_allow_private_urls=False)
    async with TestClient(TestServer(create_app(settings), host="127.0.0.1")) as strict:
        refused = [
            (ACCOUNT, "http://api.sendgrid.com"),
            (ACCOUNT, "https://127.0.0.1:8443"),
            (ACCOUNT, "https://localhost:8443"),
            (ACCOUNT, "https://10.0.0.7"),
            (ACCOUNT, "https://169.254.169.254/latest/meta-data"),
            (ACCOUNT, "https://[::1]:8443"),
            (ACCOUNT, "https://[::ffff:192.168.0.1]"),
            (ACCOUNT, "https://2130706433"),  # 127.0.0.1 written as a number
            (SMTP, "smtp://127.0.0.1:25"),
            (SMTP, "smtps://192.168.1.20:465"),
        ]
        for body, url in refused:
            response = await strict.post(
                "/api/provider-accounts", headers=bearer(key), json={**body, "base_url": url}
            )
            error = await response.json()
            assert response.status == 422, (url, error)
            assert error["error"]["details"] == {"field": "base_url"}, url
        listed = await (await strict.get("/api/provider-accounts", headers=bearer(key))).json()
        assert listed["data"] == []  # nothing was written

        body = {**ACCOUNT, "base_url": "https://api.eu.sendgrid.com"}
        response = await strict.post("/api/provider-accounts", headers=bearer(key), json=body)
        assert response.status == 201, await response.json()
        body["base_url"] = "https://10.1.1.1"
        response = await strict.put("/api/provider-accounts/sg", headers=bearer(key), json=body)
        assert response.status == 422
        shown = await (await strict.get("/api/provider-accounts/sg", headers=bearer(key))).json()
        assert shown["base_url"] == "https://api.eu.sendgrid.com"  # unchanged

        smtp = {**SMTP, "base_url": "smtps://smtp.example.com:465"}
        response = await strict.post("/api/provider-accounts", headers=bearer(key), json=smtp)
        assert response.status == 201, await response.json()


async def test_a_name_that_resolves_inside_is_refused_when_connecting(
    services: Services, tenant: tuple[str, str]
) -> None:
    """The account was taken while private URLs were allowed (or its name resolved outside
    then): without the setting, neither the check nor a send reaches the server."""
    tenant_id, _ = tenant
    sealer = accounts.Sealer(services.settings.credentials_keys)
    async with sendgrid.FakeSendGrid() as fake:
        port = urlsplit(fake.url).port
        body = {**ACCOUNT, "name": "inside", "base_url": f"http://localhost:{port}"}
        made = await accounts.create(services.pool, sealer, tenant_id, body, allow_private=True)

        allowed = await accounts.check(
            services.pool, sealer, tenant_id, "inside", allow_private=True
        )
        assert allowed["ok"] is True, allowed
        guarded = await accounts.check(
            services.pool, sealer, tenant_id, "inside", allow_private=False
        )
        assert guarded["ok"] is False and "not public" in guarded["detail"], guarded

        sending = await accounts.sending(services.pool, sealer, made["id"], allow_private=False)
        assert sending is not None
        adapter = PROVIDERS["sendgrid"].for_account(sending.account)
        message = Message("b:1", "ann@example.com", None, "news@shop.example", None, "Hi",
                          None, "Hello", {})  # fmt: skip
        try:
            [result] = await adapter.send([message])
        finally:
            await adapter.close()
        assert result.ok is False and "not public" in (result.error or ""), result
        assert fake.requests == []  # no send reached the fake (202s are sends only)


async def test_an_smtp_relay_that_resolves_inside_is_refused_when_connecting(
    services: Services, tenant: tuple[str, str]
) -> None:
    tenant_id, _ = tenant
    sealer = accounts.Sealer(services.settings.credentials_keys)
    connected = asyncio.Event()

    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connected.set()
        writer.close()

    server = await asyncio.start_server(greet, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        body = {**SMTP, "base_url": f"smtp://localhost:{port}"}
        await accounts.create(services.pool, sealer, tenant_id, body, allow_private=True)
        guarded = await accounts.check(
            services.pool, sealer, tenant_id, "relay", allow_private=False
        )
        assert guarded["ok"] is False and "not public" in guarded["detail"], guarded
        assert not connected.is_set()  # refused before connecting
    finally:
        server.close()
        await server.wait_closed()
