"""The dashboard in-process (aiohttp's test server) on the session's real services: sign-in,
cookies, CSRF, sessions that end (sign-out, expiry, revoked key), tenant isolation, and
the new-batch form reporting the API's own errors. The browser's view of it is
tests/e2e/test_web.py."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import time
import uuid
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from engine import tenants
from engine.auth import revoke_key
from engine.config import Settings
from engine.intake import decoders, fields, store
from engine.services import Services
from web.app import create_app
from web.sessions import COOKIE

TOKEN = re.compile(r'name="csrf_token" value="([^"]+)"')


async def _client(settings: Settings) -> TestClient:
    client = TestClient(TestServer(create_app(settings), host="127.0.0.1"))
    await client.start_server()
    return client


@pytest.fixture(scope="module")
async def web_client(migrated: Settings) -> AsyncIterator[TestClient]:
    client = await _client(migrated)
    yield client
    await client.close()


async def tenant_key(services: Services) -> tuple[str, str]:
    tenant_id = f"w{uuid.uuid4().hex[:10]}"
    return tenant_id, await tenants.create_key(services.pool, tenant_id)


async def sign_in(client: TestClient, key: str) -> str:
    """Sign in (a fresh cookie jar); the session's CSRF token."""
    client.session.cookie_jar.clear()
    page = await client.get("/login")
    token = TOKEN.search(await page.text()).group(1)
    answer = await client.post(
        "/login", data={"csrf_token": token, "api_key": key, "next": "/keys"}, allow_redirects=False
    )
    assert answer.status == 303, await answer.text()
    assert answer.headers["Location"] == "/keys"
    keys_page = await client.get("/keys")
    assert keys_page.status == 200
    return TOKEN.search(await keys_page.text()).group(1)


async def test_pages_need_a_session(web_client: TestClient) -> None:
    web_client.session.cookie_jar.clear()
    for path in ("/batches", "/analytics", "/keys", "/queue"):
        answer = await web_client.get(path, allow_redirects=False)
        assert answer.status == 303
        assert answer.headers["Location"].startswith("/login?next=" + path.replace("/", "%2F"))
    data = await web_client.get("/analytics/data.json", allow_redirects=False)
    assert data.status == 401
    assert (await web_client.get("/health/live")).status == 200


async def test_sign_in_sets_a_strict_cookie(web_client: TestClient, services: Services) -> None:
    _, key = await tenant_key(services)
    web_client.session.cookie_jar.clear()
    token = TOKEN.search(await (await web_client.get("/login")).text()).group(1)
    bad = await web_client.post("/login", data={"csrf_token": token, "api_key": "bsk_nope"})
    assert bad.status == 401 and "not valid" in await bad.text()
    token = TOKEN.search(await (await web_client.get("/login")).text()).group(1)
    good = await web_client.post(
        "/login", data={"csrf_token": token, "api_key": key}, allow_redirects=False
    )
    cookie = next(v for v in good.headers.getall("Set-Cookie") if v.startswith(COOKIE + "="))
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie  # plain http, no trusted proxy
    assert key not in cookie
    # the store holds the token's hash, never the token or the key
    value = cookie.split(";")[0].split("=", 1)[1]
    stored = [k async for k in services.redis.scan_iter(match=services.key("web", "session", "*"))]
    assert stored and not any(value in k.decode() for k in stored)
    for raw in await services.redis.mget(stored):
        assert key not in raw.decode()


async def test_login_form_needs_its_token(web_client: TestClient, services: Services) -> None:
    _, key = await tenant_key(services)
    web_client.session.cookie_jar.clear()
    await web_client.get("/login")
    answer = await web_client.post("/login", data={"api_key": key}, allow_redirects=False)
    assert answer.status == 403


async def test_secure_cookie_behind_a_trusted_proxy(migrated: Settings, services: Services) -> None:
    _, key = await tenant_key(services)
    trusted = dataclasses.replace(migrated, trusted_proxies=(ipaddress.ip_network("127.0.0.0/8"),))
    for settings, secure in ((trusted, True), (migrated, False)):
        client = await _client(settings)
        try:
            headers = {"X-Forwarded-Proto": "https"}
            page = await client.get("/login", headers=headers)
            token = TOKEN.search(await page.text()).group(1)
            login_cookie = page.headers["Set-Cookie"].split(";")[0]
            assert ("Secure" in page.headers["Set-Cookie"]) is secure
            answer = await client.post(  # a client keeps a Secure cookie from plain http
                "/login",
                data={"csrf_token": token, "api_key": key},
                headers={**headers, "Cookie": login_cookie},
                allow_redirects=False,
            )
            cookie = next(v for v in answer.headers.getall("Set-Cookie") if v.startswith(COOKIE))
            assert ("Secure" in cookie) is secure, cookie
        finally:
            await client.close()


async def test_every_action_needs_the_csrf_token(
    web_client: TestClient, services: Services
) -> None:
    _, key = await tenant_key(services)
    token = await sign_in(web_client, key)
    form = {"emails": "csrf@example.com"}
    assert (await web_client.post("/suppressions", data=form)).status == 403
    wrong = {**form, "csrf_token": "x" * 43}
    assert (await web_client.post("/suppressions", data=wrong)).status == 403
    cross = await web_client.post(
        "/suppressions",
        data={**form, "csrf_token": token},
        headers={"Origin": "https://evil.example"},
    )
    assert cross.status == 403
    multipart = aiohttp.FormData({"name": "x"})
    multipart.add_field("csv_file", b"email\nx@example.com\n", filename="r.csv")
    assert (await web_client.post("/batches/new", data=multipart)).status == 403
    assert (await web_client.post("/keys", data={})).status == 403
    ok = await web_client.post(
        "/suppressions", data={**form, "csrf_token": token}, allow_redirects=False
    )
    assert ok.status == 303
    by_header = await web_client.post(
        "/suppressions/remove",
        data={"email": "csrf@example.com"},
        headers={"X-CSRF-Token": token},
        allow_redirects=False,
    )
    assert by_header.status == 303


async def test_sign_out_and_expiry_end_the_session(
    web_client: TestClient, services: Services
) -> None:
    _, key = await tenant_key(services)
    token = await sign_in(web_client, key)
    out = await web_client.post("/logout", data={"csrf_token": token}, allow_redirects=False)
    assert out.status == 303
    assert (await web_client.get("/batches", allow_redirects=False)).status == 303

    await sign_in(web_client, key)
    (name,) = [k async for k in services.redis.scan_iter(match=services.key("web", "session", "*"))
               if key[:10] in (await services.redis.get(k) or b"").decode()]  # fmt: skip
    data = orjson.loads(await services.redis.get(name))
    data["created"] = time.time() - services.settings.web_session_seconds - 1
    await services.redis.set(name, orjson.dumps(data), keepttl=True)
    answer = await web_client.get("/batches", allow_redirects=False)
    assert answer.status == 303 and "reason=expired" in answer.headers["Location"]
    assert not await services.redis.exists(name)


async def test_a_revoked_key_ends_its_sessions(web_client: TestClient, services: Services) -> None:
    tenant_id, key = await tenant_key(services)
    await sign_in(web_client, key)
    assert (await web_client.get("/batches", allow_redirects=False)).status == 200
    key_id, _ = await tenants.find_key(services.pool, key)
    await revoke_key(services, str(key_id), tenant_id)  # as the API or the CLI does
    answer = await web_client.get("/batches", allow_redirects=False)
    assert answer.status == 303 and "reason=revoked" in answer.headers["Location"]


async def test_another_tenants_batch_is_not_found(
    web_client: TestClient, services: Services
) -> None:
    owner, _ = await tenant_key(services)
    _, key = await tenant_key(services)
    spec = fields.parse_batch_fields(
        {
            "name": "theirs",
            "from_email": "a@example.com",
            "subject": "s",
            "text": "t",
            "provider": "mock",
            "draft": True,
        }  # fmt: skip
    )
    created = await store.create_batch(services, owner, spec, decoders.list_rows([]))
    token = await sign_in(web_client, key)
    for path in ("", "/summary", "/recipients", "/analytics.json"):
        assert (await web_client.get(f"/batches/{created.id}{path}")).status == 404, path
    for action in ("pause", "cancel", "send"):
        answer = await web_client.post(
            f"/batches/{created.id}/{action}", data={"csrf_token": token}, allow_redirects=False
        )
        assert answer.status == 404, action
    listing = await web_client.get("/batches")
    assert created.id not in await listing.text()


async def test_new_batch_reports_the_apis_errors(
    web_client: TestClient, services: Services
) -> None:
    _, key = await tenant_key(services)
    token = await sign_in(web_client, key)
    form = aiohttp.FormData()
    form.add_field("csrf_token", token)
    for name, value in (("name", "n"), ("from_email", "not-an-address"), ("subject", "Hi {{ name }}"),
                        ("text", "code {{ code }}"), ("send_through", "provider:mock")):  # fmt: skip
        form.add_field(name, value)
    form.add_field("csv_file", b"email,code\nok@example.com,1\nbroken,2\n", filename="r.csv")
    answer = await web_client.post("/batches/new", data=form)
    assert answer.status == 422
    text = await answer.text()
    assert "from_email: is not a valid e-mail address" in text  # the API's summary line
    assert 'id="from_email-error"' in text and "is not a valid e-mail address" in text

    form = aiohttp.FormData()
    form.add_field("csrf_token", token)
    for name, value in (("name", "n"), ("from_email", "a@example.com"), ("subject", "Hi {{ name }}"),
                        ("text", "code {{ code }}"), ("send_through", "provider:mock")):  # fmt: skip
        form.add_field(name, value)
    form.add_field("csv_file", b"email,code\nok@example.com,1\nbroken,2\n", filename="r.csv")
    answer = await web_client.post("/batches/new", data=form)
    assert answer.status == 422
    text = await answer.text()
    assert "recipient 2 email: is not a valid e-mail address" in text
    assert '<td class="num">2</td><td class="num">3</td>' in text  # recipient 2, CSV line 3
