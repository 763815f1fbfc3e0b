"""Testing a provider account's credentials (``engine.accounts.check``) on the real API,
dashboard and PostgreSQL, against the fake providers on 127.0.0.1: an answer for good and
refused credentials (200 either way), the quota SES reports set against the account's own
rate, a provider that hangs (timed out), another tenant's account (404), no key (401), no
CSRF token (403), and never a credential in an answer or a log line."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from devkit.fakes import mailgun, postmark, resend, sendgrid, ses
from devkit.fakes.base import running
from engine import accounts
from engine.config import Settings
from engine.services import Services
from engine.tenants import create_key
from tests.integration.conftest import bearer
from tests.integration.test_web import TOKEN, sign_in
from web.app import create_app as create_web_app


@pytest.fixture(scope="module")
async def fakes() -> AsyncIterator[dict[str, str]]:
    """Every HTTP provider's fake on a free port: their base URLs."""
    async with (
        sendgrid.FakeSendGrid() as sendgrid_fake,
        mailgun.FakeMailgun() as mailgun_fake,
        postmark.serving() as (postmark_url, _),
        resend.serving() as (resend_url, _),
        running(ses.build_app(ses.FakeSes(max_send_rate=14, max_24_hour_send=50_000))) as ses_url,
    ):
        yield {
            "sendgrid": sendgrid_fake.url,
            "mailgun": mailgun_fake.url,
            "postmark": postmark_url,
            "resend": resend_url,
            "ses": ses_url,
        }


def body(fakes: dict[str, str], provider: str, name: str | None = None, **change: Any) -> dict:
    """A new account of ``provider`` at its fake, with the fake's own credentials."""
    credentials = {
        "sendgrid": {"api_key": sendgrid.TEST_API_KEY},
        "mailgun": {"api_key": mailgun.TEST_API_KEY},
        "postmark": {"server_token": postmark.TEST_SERVER_TOKEN},
        "resend": {"api_key": resend.TEST_API_KEY},
        "ses": ses.TEST_CREDENTIALS,
    }[provider]
    extra = {"mailgun": {"domain": mailgun.TEST_DOMAIN}, "ses": {"region": ses.TEST_REGION}}
    return {
        "name": name or provider,
        "provider": provider,
        "credentials": credentials,
        "base_url": fakes[provider],
        "rate_per_second": 10,
        **extra.get(provider, {}),
        **change,
    }


async def create(client: TestClient, key: str, account: dict) -> dict:
    response = await client.post("/api/provider-accounts", headers=bearer(key), json=account)
    created = await response.json()
    assert response.status == 201, created
    return created


async def checked(client: TestClient, key: str, ref: str, status: int = 200) -> dict:
    response = await client.post(f"/api/provider-accounts/{ref}/check", headers=bearer(key))
    answer = await response.json()
    assert response.status == status, answer
    return answer


def secrets_of(account: dict) -> list[str]:
    return list(account["credentials"].values())


@pytest.mark.parametrize("provider", ["sendgrid", "mailgun", "postmark", "resend", "ses"])
async def test_good_credentials_check_ok(
    client: TestClient, tenant: tuple[str, str], fakes: dict[str, str], provider: str
) -> None:
    _, key = tenant
    account = body(fakes, provider)
    created = await create(client, key, account)
    for ref in (created["id"], created["name"]):
        answer = await checked(client, key, ref)
        assert answer["ok"] is True, answer
        assert answer["account"] == provider and answer["provider"] == provider
        assert answer["call"].startswith("GET /")
        assert 0 <= answer["seconds"] < 10
        for secret in secrets_of(account):
            assert secret not in str(answer)
    assert (answer["quota"] is not None) is (provider == "ses")


@pytest.mark.parametrize(
    "provider, credentials, expected",
    [
        ("sendgrid", {"api_key": "SG.not-this-key-0123456789"},
         "the provider refused the API key (HTTP 401)"),
        ("mailgun", {"api_key": "key-not-this-one-0123456789"},
         "the provider refused the API key (HTTP 401)"),
        ("postmark", {"server_token": "pm-not-this-token-0123456789"},
         "Postmark refused the server token (HTTP 401)"),
        ("resend", {"api_key": "re_not_this_key_0123456789"},
         "the provider refused access with the API key (HTTP 403)"),
        ("ses", {"access_key_id": "AKIANOTTHISKEY000000", "secret_access_key": "s" * 40},
         "SES refused the credentials (HTTP 403 UnrecognizedClientException"),
    ],
)  # fmt: skip
async def test_refused_credentials_are_a_200_with_the_reason(
    client: TestClient,
    tenant: tuple[str, str],
    fakes: dict[str, str],
    provider: str,
    credentials: dict[str, str],
    expected: str,
) -> None:
    _, key = tenant
    account = body(fakes, provider, credentials=credentials)
    created = await create(client, key, account)
    answer = await checked(client, key, created["id"])
    assert answer["ok"] is False and answer["detail"].startswith(expected), answer
    for secret in credentials.values():
        assert secret not in str(answer)


async def test_an_unknown_mailgun_domain_and_an_unreachable_provider(
    client: TestClient, tenant: tuple[str, str], fakes: dict[str, str]
) -> None:
    _, key = tenant
    await create(client, key, body(fakes, "mailgun", "mg-other", domain="example.com"))
    answer = await checked(client, key, "mg-other")
    assert not answer["ok"]
    assert answer["detail"].startswith("domain example.com not found at Mailgun (HTTP 404)")
    down = {"sendgrid": "http://127.0.0.1:9"}  # discard: nothing listens
    await create(client, key, body(down, "sendgrid", "sg-down"))
    answer = await checked(client, key, "sg-down")
    assert not answer["ok"] and answer["detail"] == "127.0.0.1:9: connection refused"


async def test_ses_reports_its_quota_against_the_accounts_own_rate(
    client: TestClient, tenant: tuple[str, str], fakes: dict[str, str]
) -> None:
    _, key = tenant
    account = body(fakes, "ses", rate_per_second=100, daily_quota=100_000)
    await create(client, key, account)
    answer = await checked(client, key, "ses")
    assert answer["ok"] is True
    assert answer["quota"] == {"per_day": 50_000, "per_second": 14, "sent_last_24_hours": 0}
    assert answer["call"] == "GET /v2/email/account"
    assert "quota 50,000 per 24 h (0 sent), 14 per second" in answer["detail"]
    assert "the account's rate of 100/s is above the provider's 14/s" in answer["detail"]
    assert "daily quota of 100,000 is above the provider's 50,000 per 24 h" in answer["detail"]


async def test_a_provider_that_does_not_answer_times_out(
    tenant: tuple[str, str], services: Services
) -> None:
    """An HTTP provider that never answers, and an SMTP server that never greets."""
    tenant_id, _ = tenant
    sealer = accounts.Sealer(services.settings.credentials_keys)

    released = asyncio.Event()

    async def hang(_: web.Request) -> web.Response:
        await released.wait()
        return web.Response(status=503)

    app = web.Application()
    app.router.add_get("/domains", hang)
    silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    try:
        async with running(app) as url:
            for account in (
                {**body({"resend": url}, "resend"), "name": "hangs"},
                {"name": "smtp-silent", "provider": "smtp", "rate_per_second": 1,
                 "credentials": {"username": "u", "password": "password-0123"},
                 "base_url": f"smtp://127.0.0.1:{port}"},
            ):  # fmt: skip
                await accounts.create(services.pool, sealer, tenant_id, account, allow_private=True)
                started = asyncio.get_running_loop().time()
                answer = await accounts.check(
                    services.pool,
                    sealer,
                    tenant_id,
                    account["name"],
                    allow_private=True,
                    within=0.5,
                )
                took = asyncio.get_running_loop().time() - started
                assert answer["ok"] is False and took < 3, (answer, took)
                assert answer["detail"] == "timed out: the provider did not answer within 0.5 s"
            released.set()
    finally:
        silent.close()
        await silent.wait_closed()


async def test_credentials_sealed_under_other_keys(
    tenant: tuple[str, str], services: Services, fakes: dict[str, str]
) -> None:
    tenant_id, _ = tenant
    await accounts.create(services.pool, accounts.Sealer(("an-old-key-" * 4,)), tenant_id,
                          body(fakes, "sendgrid"), allow_private=True)  # fmt: skip
    answer = await accounts.check(
        services.pool, accounts.Sealer(services.settings.credentials_keys), tenant_id, "sendgrid"
    )
    assert answer["ok"] is False and "sealed under none of CREDENTIALS_KEYS" in answer["detail"]


async def test_another_tenants_account_is_not_found_and_a_key_is_needed(
    client: TestClient, tenant: tuple[str, str], services: Services, fakes: dict[str, str]
) -> None:
    _, key = tenant
    created = await create(client, key, body(fakes, "postmark"))
    other = await create_key(services.pool, f"t{uuid.uuid4().hex[:10]}")
    for ref in (created["id"], created["name"]):
        answer = await checked(client, other, ref, 404)
        assert answer["error"]["code"] == "account_not_found"
    assert (await checked(client, key, str(uuid.uuid4()), 404))["error"]["code"] == (
        "account_not_found"
    )
    response = await client.post(f"/api/provider-accounts/{created['id']}/check")
    assert response.status == 401


async def test_no_credential_reaches_the_log(
    client: TestClient,
    tenant: tuple[str, str],
    fakes: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, key = tenant
    account = body(fakes, "sendgrid", credentials={"api_key": "SG.logged-never-0123456789"})
    created = await create(client, key, account)
    with caplog.at_level(logging.DEBUG):
        await checked(client, key, created["id"])
    assert "SG.logged-never-0123456789" not in caplog.text
    record = next(r for r in caplog.records if r.getMessage() == "provider account checked")
    assert (record.account_id, record.provider, record.ok) == (created["id"], "sendgrid", False)


# --- the dashboard's "Test credentials" ---------------------------------------------------


@pytest.fixture(scope="module")
async def dashboard(migrated: Settings) -> AsyncIterator[TestClient]:
    client = TestClient(TestServer(create_web_app(migrated), host="127.0.0.1"))
    await client.start_server()
    yield client
    await client.close()


async def test_the_dashboard_tests_credentials_inline(
    dashboard: TestClient, client: TestClient, tenant: tuple[str, str], fakes: dict[str, str]
) -> None:
    _, key = tenant
    good = await create(client, key, body(fakes, "resend", "resend-main"))
    bad = await create(client, key, body(fakes, "sendgrid", "sendgrid-old",
                                         credentials={"api_key": "SG.revoked-0123456789"}))  # fmt: skip
    token = await sign_in(dashboard, key)
    page = await (await dashboard.get("/provider-accounts")).text()
    assert 'id="check-result" role="status" aria-live="polite"' in page
    assert f'action="/provider-accounts/{good["id"]}/check"' in page
    htmx = {"HX-Request": "true", "X-CSRF-Token": token}

    answer = await dashboard.post(f"/provider-accounts/{good['id']}/check", headers=htmx)
    text = await answer.text()
    assert answer.status == 200, text
    assert 'class="alert alert-ok"' in text and "resend-main: the credentials work." in text
    assert "<html" not in text  # the fragment only
    answer = await dashboard.post(f"/provider-accounts/{bad['id']}/check", headers=htmx)
    text = await answer.text()
    assert 'class="alert alert-error"' in text and "sendgrid-old: the check failed." in text
    assert "The provider refused the API key (HTTP 401)" in text
    assert "SG.revoked-0123456789" not in text

    # Without htmx: the page again, the answer as its message.
    answer = await dashboard.post(
        f"/provider-accounts/{good['id']}/check", data={"csrf_token": token}, allow_redirects=False
    )
    assert answer.status == 303 and answer.headers["Location"] == "/provider-accounts"
    page = await (await dashboard.get("/provider-accounts")).text()
    assert "resend-main: the credentials work. The API key works (full access)" in page


async def test_the_dashboards_check_needs_its_token_and_the_tenants_account(
    dashboard: TestClient,
    client: TestClient,
    tenant: tuple[str, str],
    services: Services,
    fakes: dict[str, str],
) -> None:
    _, key = tenant
    mine = await create(client, key, body(fakes, "postmark"))
    other_key = await create_key(services.pool, f"t{uuid.uuid4().hex[:10]}")
    theirs = await create(client, other_key, body(fakes, "postmark"))
    token = await sign_in(dashboard, key)
    path = f"/provider-accounts/{mine['id']}/check"
    assert (await dashboard.post(path, headers={"HX-Request": "true"})).status == 403
    assert (await dashboard.post(path, data={"csrf_token": "forged"})).status == 403
    cross = await dashboard.post(
        path, headers={"X-CSRF-Token": token, "Origin": "https://evil.example"}
    )
    assert cross.status == 403
    answer = await dashboard.post(
        f"/provider-accounts/{theirs['id']}/check", headers={"X-CSRF-Token": token}
    )
    assert answer.status == 404
    assert TOKEN.search(await (await dashboard.get("/provider-accounts")).text())
