"""Batches sent through tenants' provider accounts, end to end through the real engine:
intake with ``provider_account``, the worker's send and results-pg loops in-process on the
real NATS, PostgreSQL and Dragonfly, each provider's adapter talking to its local fake
server (which checks every request against the provider's documented format).

Each account has its own token bucket (``rl:account:<id>``), its daily quota holds the
rest of a batch (paused with the reason, resumed by the leader when the window reopens),
and a provider that refuses the account pauses the batch instead of burning retries.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest

from devkit.fakes import mailgun, postmark, resend, sendgrid, ses
from devkit.fakes.base import running
from engine import accounts, leader, lifecycle, routes
from engine.accounts import Sealer
from engine.errors import Conflict, ValidationError
from engine.intake.decoders import list_rows
from engine.intake.fields import parse_batch_fields
from engine.intake.store import create_batch
from engine.ratelimit import quota_window
from engine.sender import Sender
from engine.services import Services
from providers.registry import PROVIDERS
from providers.resend import REF_TAG, decode_ref
from tests.worker_support import batch_status, eventually, recipients, worker_loops

FIELDS = {"name": "accounts", "from_email": "news@shop.example", "subject": "Hi {{ name }}",
          "text": "Hello {{ name }}"}  # fmt: skip


@dataclass
class Fake:
    """A provider's fake server while it runs: the account fields that reach it, and how
    many times it accepted each ref."""

    account: dict[str, Any]
    sent_refs: Callable[[], Counter[str]]
    state: Any


@asynccontextmanager
async def fake_sendgrid() -> AsyncIterator[Fake]:
    async with sendgrid.FakeSendGrid() as fake:
        account = {"credentials": {"api_key": sendgrid.TEST_API_KEY}, "base_url": fake.url}
        yield Fake(account, lambda: Counter(d.custom_args.get("ref") for d in fake.delivered), fake)


@asynccontextmanager
async def fake_mailgun() -> AsyncIterator[Fake]:
    async with mailgun.FakeMailgun() as fake:
        account = {"credentials": {"api_key": mailgun.TEST_API_KEY}, "base_url": fake.url,
                   "domain": mailgun.TEST_DOMAIN}  # fmt: skip
        yield Fake(
            account, lambda: Counter(d.user_variables.get("ref") for d in fake.delivered), fake
        )


@asynccontextmanager
async def fake_postmark() -> AsyncIterator[Fake]:
    async with postmark.serving() as (url, fake):
        account = {"credentials": {"server_token": postmark.TEST_SERVER_TOKEN}, "base_url": url}
        yield Fake(account, fake.sent_refs, fake)


@asynccontextmanager
async def fake_resend() -> AsyncIterator[Fake]:
    async with resend.serving() as (url, fake):
        account = {"credentials": {"api_key": resend.TEST_API_KEY}, "base_url": url}

        def sent_refs() -> Counter[str]:  # the ref tags hold "<batch>_<seq>"
            return Counter({decode_ref(REF_TAG, tag): n for tag, n in fake.sent_refs().items()})

        yield Fake(account, sent_refs, fake)


@asynccontextmanager
async def fake_ses() -> AsyncIterator[Fake]:
    app = ses.build_app()
    state = app[ses.STATE]
    async with running(app) as url:
        account = {"credentials": dict(ses.TEST_CREDENTIALS), "base_url": url,
                   "region": ses.TEST_REGION}  # fmt: skip

        def sent_refs() -> Counter[str]:
            refs: Counter[str] = Counter()
            for item in state.received:
                for header in item["request"]["Content"]["Simple"].get("Headers", []):
                    if header["Name"].lower() == "x-batchsender-ref":
                        refs[header["Value"]] += 1
            return refs

        yield Fake(account, sent_refs, state)


FAKES = {"sendgrid": fake_sendgrid, "mailgun": fake_mailgun, "postmark": fake_postmark,
         "resend": fake_resend, "ses": fake_ses}  # fmt: skip


def people(n: int) -> list[dict[str, Any]]:
    return [{"email": f"person{i}@example.com", "name": f"P{i}"} for i in range(n)]


async def new_account(
    services: Services, tenant_id: str, provider: str, fake: Fake, **fields: Any
) -> dict[str, Any]:
    body = {"name": f"{provider}-main", "provider": provider, "rate_per_second": 5000,
            "burst": 2000, **fake.account, **fields}  # fmt: skip
    return await accounts.create(
        services.pool, sealer(services), tenant_id, body, allow_private=True
    )


def sealer(services: Services) -> Sealer:
    return Sealer(services.settings.credentials_keys)


async def new_batch(services: Services, tenant_id: str, n: int, **fields: Any) -> str:
    spec = parse_batch_fields(FIELDS | fields)
    created = await create_batch(services, tenant_id, spec, list_rows(people(n)))
    assert created.status == "queued", created
    return created.id


async def batch_row(services: Services, batch_id: str) -> Any:
    return await services.pool.fetchrow(
        "SELECT status, provider, provider_account_id, pause_reason, resume_at FROM batches"
        " WHERE id = $1",
        uuid.UUID(batch_id),
    )


async def until_status(services: Services, batch_id: str, status: str) -> None:
    async def reached() -> bool:
        return await batch_status(services, batch_id) == status

    await eventually(reached, 60, f"the batch {status}")


@pytest.mark.parametrize("provider", list(FAKES))
async def test_a_batch_goes_through_the_account_to_the_provider_exactly_once(
    own: Services, tenant: tuple[str, str], provider: str
) -> None:
    tenant_id, _ = tenant
    n = 230  # several provider calls for every batch limit below 1,000 (SES 50, Resend 100)
    async with FAKES[provider]() as fake:
        account = await new_account(own, tenant_id, provider, fake)
        batch_id = await new_batch(own, tenant_id, n, provider_account=account["name"])
        row = await batch_row(own, batch_id)
        assert (row["provider"], str(row["provider_account_id"])) == (provider, account["id"])
        sender = Sender(own, {})  # no default account at all: only the tenant's
        try:
            async with worker_loops(own, sender):
                await until_status(own, batch_id, "completed")
        finally:
            await sender.routes.close()
        refs = fake.sent_refs()
    assert refs == Counter({f"{batch_id}:{seq}": 1 for seq in range(1, n + 1)})
    stored = await recipients(own, batch_id)
    assert {r["status"] for r in stored.values()} == {"sent"}
    ids = await own.pool.fetch(
        "SELECT provider_message_id FROM recipient_statuses WHERE batch_id = $1",
        uuid.UUID(batch_id),
    )
    assert all(r["provider_message_id"] for r in ids)  # for matching its webhooks
    # The account's own bucket paced it (shared by every worker and pod through Dragonfly).
    assert await own.redis.exists(own.key("rl", "account", account["id"]))
    assert not await own.redis.exists(own.key("rl", "provider", provider))


async def test_the_daily_quota_holds_the_rest_until_the_window_reopens(
    own: Services, tenant: tuple[str, str]
) -> None:
    tenant_id, _ = tenant
    async with fake_resend() as fake:
        account = await new_account(own, tenant_id, "resend", fake, daily_quota=250)
        batch_id = await new_batch(own, tenant_id, 400, provider_account=account["id"])
        sender = Sender(own, {})
        try:
            async with worker_loops(own, sender):
                await until_status(own, batch_id, "paused")
                row = await batch_row(own, batch_id)
                assert "daily quota of 250" in row["pause_reason"]
                assert row["resume_at"] == quota_window()[1]  # the next UTC day
                assert sum(fake.sent_refs().values()) == 250
                counts = Counter(r["status"] for r in (await recipients(own, batch_id)).values())
                assert counts == {"sent": 250, "queued": 150}  # held, not failed
                # The window reopens: a new day's counter, and the resume time has come.
                day, _ = quota_window()
                await own.redis.delete(own.key("quota", account["id"]) + f":{day}")
                await own.pool.execute(
                    "UPDATE batches SET resume_at = $2 WHERE id = $1",
                    uuid.UUID(batch_id),
                    datetime(2000, 1, 1, tzinfo=UTC),
                )
                assert await leader.resume_due(own) == 1
                await until_status(own, batch_id, "completed")
        finally:
            await sender.routes.close()
        refs = fake.sent_refs()
    assert refs == Counter({f"{batch_id}:{seq}": 1 for seq in range(1, 401)})
    row = await batch_row(own, batch_id)
    assert row["pause_reason"] is None and row["resume_at"] is None


@pytest.mark.parametrize(
    ("provider", "refuse", "reason"),
    [
        ("ses", lambda fake: fake.fail("suspended"), "AccountSuspended"),
        ("resend", lambda fake: fake.fail(403, "invalid_api_key", times=-1), "invalid_api_key"),
    ],
)
async def test_a_provider_that_refuses_the_account_pauses_the_batch(
    own: Services, tenant: tuple[str, str], provider: str, refuse: Callable, reason: str
) -> None:
    """No retry budget is burnt: the batch pauses with the provider's reason at once and
    every recipient stays ``queued`` for a resume once the account is fixed."""
    tenant_id, _ = tenant
    async with FAKES[provider]() as fake:
        refuse(fake.state)
        account = await new_account(own, tenant_id, provider, fake)
        batch_id = await new_batch(own, tenant_id, 120, provider_account=account["name"])
        sender = Sender(own, {})
        try:
            async with worker_loops(own, sender):
                await until_status(own, batch_id, "paused")
        finally:
            await sender.routes.close()
    row = await batch_row(own, batch_id)
    assert reason in row["pause_reason"] and row["resume_at"] is None
    counts = Counter(r["status"] for r in (await recipients(own, batch_id)).values())
    assert counts == {"queued": 120}


async def test_a_provider_saying_its_quota_is_used_up_holds_the_batch(
    own: Services, tenant: tuple[str, str]
) -> None:
    tenant_id, _ = tenant
    async with fake_resend() as fake:
        fake.state.fail(429, "daily_quota_exceeded", times=-1)
        account = await new_account(own, tenant_id, "resend", fake)
        batch_id = await new_batch(own, tenant_id, 50, provider_account=account["name"])
        sender = Sender(own, {})
        try:
            async with worker_loops(own, sender):
                await until_status(own, batch_id, "paused")
        finally:
            await sender.routes.close()
    row = await batch_row(own, batch_id)
    assert "quota" in row["pause_reason"] and row["resume_at"] > datetime.now(UTC)
    assert Counter(r["status"] for r in (await recipients(own, batch_id)).values()) == {
        "queued": 50
    }


async def test_intake_refuses_an_account_it_cannot_use(
    own: Services, tenant: tuple[str, str]
) -> None:
    tenant_id, _ = tenant
    other_tenant = f"t{uuid.uuid4().hex[:10]}"
    async with fake_resend() as fake:
        mine = await new_account(own, tenant_id, "resend", fake)
        theirs = await new_account(own, other_tenant, "resend", fake, name="theirs")
    cases = [
        ({"provider_account": "nope"}, "provider_account", "no such provider account"),
        ({"provider_account": theirs["id"]}, "provider_account", "no such provider account"),
        ({"provider_account": "theirs"}, "provider_account", "no such provider account"),
        (
            {"provider_account": mine["name"], "provider": "sendgrid"},
            "provider_account",
            "is a resend account, not sendgrid",
        ),
        ({"provider": "sendgrid"}, "provider", "no default account for it on this server"),
    ]
    for fields, field, message in cases:
        with pytest.raises(ValidationError) as caught:
            await new_batch(own, tenant_id, 3, **fields)
        [error] = caught.value.details["errors"]
        assert error["field"] == field and error["message"].startswith(message), error
    stored = await own.pool.fetchval("SELECT count(*) FROM batches WHERE tenant_id = $1", tenant_id)
    assert stored == 0  # nothing half-created


async def test_an_account_in_use_cannot_be_deleted(own: Services, tenant: tuple[str, str]) -> None:
    tenant_id, _ = tenant
    async with fake_postmark() as fake:
        account = await new_account(own, tenant_id, "postmark", fake)
        batch_id = await new_batch(own, tenant_id, 5, provider_account=account["name"])
        with pytest.raises(Conflict) as caught:
            await accounts.delete(own.pool, tenant_id, account["name"])
        assert caught.value.code == "account_in_use"
        await own.pool.execute(
            "UPDATE batches SET status = 'cancelled' WHERE id = $1", uuid.UUID(batch_id)
        )
        await accounts.delete(own.pool, tenant_id, account["name"])


async def test_an_account_the_adapter_refuses_is_refused_at_create(
    own: Services, tenant: tuple[str, str]
) -> None:
    tenant_id, _ = tenant
    body = {"name": "no-region", "provider": "ses", "rate_per_second": 10,
            "credentials": dict(ses.TEST_CREDENTIALS)}  # fmt: skip
    with pytest.raises(ValidationError) as caught:
        await accounts.create(own.pool, sealer(own), tenant_id, body)
    assert "region" in str(caught.value)
    smtp = {"name": "smtp", "provider": "smtp", "rate_per_second": 10,
            "credentials": {"username": "u", "password": "p"}, "base_url": "https://x.example"}  # fmt: skip
    with pytest.raises(ValidationError) as caught:
        await accounts.create(own.pool, sealer(own), tenant_id, smtp)
    assert "smtp://host:port" in str(caught.value)


async def test_a_route_follows_its_account(
    own: Services, tenant: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The workers' route of an account is rebuilt when the account changes (its rate, its
    credentials) and dropped when it is deleted, within ``routes.TTL``."""
    tenant_id, _ = tenant
    monkeypatch.setattr(routes, "TTL", 0.0)
    async with fake_postmark() as fake:
        account = await new_account(own, tenant_id, "postmark", fake)
        table = routes.Routes(own, {})
        try:
            first = await table.account(account["id"])
            assert first is not None and first.rate.per_second == 5000
            assert await table.account(account["id"]) is first  # unchanged: the same adapter
            body = {"name": account["name"], "provider": "postmark", "rate_per_second": 7,
                    **fake.account}  # fmt: skip
            await accounts.replace(
                own.pool, sealer(own), tenant_id, account["id"], body, allow_private=True
            )
            second = await table.account(account["id"])
            assert second is not None and second is not first and second.rate.per_second == 7
            await accounts.delete(own.pool, tenant_id, account["id"])
            assert await table.account(account["id"]) is None
        finally:
            await table.close()


async def test_a_throttled_call_holds_the_whole_account_bucket(
    own: Services, tenant: tuple[str, str]
) -> None:
    """Resend answers 429 with ``retry-after: 30``: the account's bucket gives no token for
    that long, so every worker and pod waits, not only the chunk that was told."""
    tenant_id, _ = tenant
    async with fake_resend() as fake:
        fake.state.fail(429, "rate_limit_exceeded", headers={"retry-after": "30"}, times=-1)
        account = await new_account(own, tenant_id, "resend", fake)
        batch_id = await new_batch(own, tenant_id, 20, provider_account=account["name"])
        sender = Sender(own, {})
        try:
            async with worker_loops(own, sender):

                async def throttled() -> bool:
                    return any(r.status == 429 for r in fake.state.received)

                await eventually(throttled, 30, "a throttled call")

                async def held() -> float:
                    bucket = own.key("rl", "account", account["id"])
                    level = await own.redis.hget(bucket, "tokens")
                    return level is not None and float(level) <= -5000 * 25  # 25 s of tokens

                await eventually(held, 10, "the account's bucket held")
                assert len(fake.state.requests()) == 1  # nobody else called meanwhile
                # Paused, the chunk stops waiting within a second: the loops can stop.
                assert await lifecycle.pause(own.pool, tenant_id, uuid.UUID(batch_id))
        finally:
            await sender.routes.close()


async def test_a_provider_spec_bounds_its_calls_in_flight(own: Services) -> None:
    """Mailgun's calls are large and not idempotent: at most ``max_in_flight`` at once per
    account and worker process, however many chunks are in flight."""
    assert PROVIDERS["mailgun"].max_in_flight == 4

    class Slow:
        name, max_per_call = "mailgun", 1000
        now = peak = 0

        async def send(self, messages: list) -> list:
            Slow.now += 1
            Slow.peak = max(Slow.peak, Slow.now)
            await asyncio.sleep(0.05)
            Slow.now -= 1
            return []

        async def close(self) -> None:
            pass

    table = routes.Routes(own, {"mailgun": Slow()})
    route = table.default("mailgun")
    await asyncio.gather(*(route.send([]) for _ in range(30)))
    assert Slow.peak == 4
