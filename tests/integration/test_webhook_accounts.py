"""``POST /webhooks/{provider}/{account_id}`` on the real API, PostgreSQL, NATS and
Dragonfly, for each provider with accounts (SendGrid, Mailgun, Postmark, Resend, SES via
SNS): each account's own secret, the 401/400/404 answers with nothing published, events
about other accounts' batches ignored (on the default route too), the secrets' cache,
each provider's replay policy, and the SNS subscription handshake.

The providers' documented sample payloads (tests/fixtures) carry our ref and are signed
here: SNS with a test RSA key and a self-signed certificate served by a CertCache in
place of providers.ses.CERTS (AWS is out of reach), and the SubscribeURL GET goes to a
recorder in place of engine.webhooks.confirm_subscription.
"""

from __future__ import annotations

import base64
import datetime as dt
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives.asymmetric import rsa

from devkit.fakes.mailgun import TEST_SIGNING_KEY, signed_post
from devkit.fakes.sendgrid import new_signing_key, verification_key
from devkit.fakes.sendgrid import signed_headers as sendgrid_headers
from engine import accounts, results, webhooks
from engine.config import Settings
from engine.services import Services
from engine.tenants import create_key
from providers import ses
from providers.mock import signed_headers as mock_headers
from providers.registry import CREDENTIALS
from providers.resend import encode_ref
from tests.integration.test_api import error_body
from tests.integration.test_results import new_batch
from tests.integration.test_webhooks import results_last_seq, webhook_events
from tests.provider_support import CertFetcher, make_cert, sign_sns, svix_headers

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TOPIC = "arn:aws:sns:us-west-2:123456789012:MyTopic"
Post = tuple[bytes, dict[str, str]]


def fixture(path: str) -> Any:
    return orjson.loads((FIXTURES / path).read_bytes())


# --- signed posts of a "delivered" per provider --------------------------------------------

SENDGRID_KEY, SENDGRID_OTHER = new_signing_key(), new_signing_key()
RESEND_SECRET = "whsec_" + base64.b64encode(b"batchsender-account-route-test!!").decode()
RESEND_OTHER = "whsec_" + base64.b64encode(b"another-tenants-signing-secret!!").decode()
SNS_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
SNS_OTHER = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def sendgrid_post(ref: str, forged: bool = False) -> Post:
    event = next(e for e in fixture("sendgrid/events.json") if e["event"] == "delivered")
    body = orjson.dumps([dict(event, ref=ref)])
    return body, sendgrid_headers(body, SENDGRID_OTHER if forged else SENDGRID_KEY)


def sendgrid_malformed() -> Post:
    body = b'{"not": "an array"}'
    return body, sendgrid_headers(body, SENDGRID_KEY)


def mailgun_post(ref: str, forged: bool = False) -> Post:
    data = dict(fixture("mailgun/delivered.json"), **{"user-variables": {"ref": ref}})
    key = "another-signing-key" if forged else TEST_SIGNING_KEY
    return signed_post(data, key), {"Content-Type": "application/json"}


def mailgun_malformed() -> Post:
    return signed_post("not an object", TEST_SIGNING_KEY), {}  # type: ignore[arg-type]


def postmark_auth(password: str = "s3cret-pa55") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"hooks:{password}".encode()).decode()}


def postmark_post(ref: str, forged: bool = False) -> Post:
    record = fixture("postmark/delivery.json")
    record.update(MessageID=str(uuid.uuid4()), Metadata={"ref": ref})  # one identity each
    return orjson.dumps(record), postmark_auth("wrong" if forged else "s3cret-pa55")


def postmark_malformed() -> Post:
    return b"not json", postmark_auth()


def resend_post(ref: str, forged: bool = False) -> Post:
    event = fixture("resend/email_delivered.json")
    event["data"]["tags"] = {"ref": encode_ref(ref)["value"]}
    body = orjson.dumps(event)
    secret = RESEND_OTHER if forged else RESEND_SECRET
    return body, svix_headers(body, secret, f"msg_{uuid.uuid4().hex}")


def resend_malformed() -> Post:
    body = b'"not an object"'
    return body, svix_headers(body, RESEND_SECRET, f"msg_{uuid.uuid4().hex}")


def sns_time(at: float) -> str:
    return dt.datetime.fromtimestamp(at, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def sns_post(message: dict[str, Any], key: rsa.RSAPrivateKey = SNS_KEY) -> Post:
    signed = sign_sns(message, key)
    headers = {"x-amz-sns-message-type": signed["Type"], "x-amz-sns-topic-arn": signed["TopicArn"]}
    return orjson.dumps(signed), {**headers, "Content-Type": "text/plain; charset=UTF-8"}


def ses_notification(ref: str, *, at: float | None = None, text: str | None = None) -> dict:
    record = fixture("ses/event-delivery.json")
    record["mail"]["headers"].append({"name": ses.REF_HEADER, "value": ref})
    return dict(
        fixture("ses/sns-notification.json"),
        MessageId=str(uuid.uuid4()),
        Message=orjson.dumps(record).decode() if text is None else text,
        Timestamp=sns_time(time.time() if at is None else at),
    )


def ses_post(ref: str, forged: bool = False) -> Post:
    return sns_post(ses_notification(ref), SNS_OTHER if forged else SNS_KEY)


def ses_malformed() -> Post:
    return sns_post(ses_notification("x:1", text="not an SES notification"))


@dataclass(frozen=True)
class Kit:
    """How one provider's account is set up and posted to."""

    provider: str
    secret: str  # the account's webhook secret
    post: Callable[..., Post]  # (ref, forged=False): a signed post of one "delivered"
    malformed: Callable[[], Post]  # a post that verifies and does not parse


KITS = {
    kit.provider: kit
    for kit in (
        Kit("sendgrid", verification_key(SENDGRID_KEY), sendgrid_post, sendgrid_malformed),
        Kit("mailgun", TEST_SIGNING_KEY, mailgun_post, mailgun_malformed),
        Kit("postmark", "hooks:s3cret-pa55", postmark_post, postmark_malformed),
        Kit("resend", RESEND_SECRET, resend_post, resend_malformed),
        Kit("ses", TOPIC, ses_post, ses_malformed),
    )
}


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def sns_certificates(monkeypatch: pytest.MonkeyPatch) -> CertFetcher:
    """The SNS signing certificate of SNS_KEY, from a CertCache (no fetch from AWS)."""
    now = dt.datetime.now(dt.UTC)
    fetcher = CertFetcher(
        make_cert(
            SNS_KEY, not_before=now - dt.timedelta(days=1), not_after=now + dt.timedelta(days=1)
        )
    )
    monkeypatch.setattr(ses, "CERTS", ses.CertCache(fetcher))
    return fetcher


@pytest.fixture
def confirmed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The SubscribeURLs the engine GETs (recorded, not fetched)."""
    urls: list[str] = []

    async def record(url: str) -> None:
        urls.append(url)

    monkeypatch.setattr(webhooks, "confirm_subscription", record)
    return urls


@pytest.fixture
def fresh_caches() -> Iterator[None]:
    """No opened secret kept from before; the clock put back after."""
    webhooks.ACCOUNT_SECRETS.clear()
    yield
    webhooks.ACCOUNT_SECRETS.clock = time.monotonic
    webhooks.ACCOUNT_SECRETS.clear()


ACCOUNT_FIELDS = {"ses": {"region": "us-west-2"}, "mailgun": {"domain": "mg.example.com"}}


async def new_account(
    services: Services, settings: Settings, tenant_id: str, provider: str, secret: str | None
) -> str:
    body = {
        "name": f"{provider}-{uuid.uuid4().hex[:8]}",
        "provider": provider,
        "credentials": {name: "x" * 20 for name in CREDENTIALS[provider]},
        "rate_per_second": 10,
        "webhook_secret": secret,
    }
    body |= ACCOUNT_FIELDS.get(provider, {})
    sealer = accounts.Sealer(settings.credentials_keys)
    created = await accounts.create(services.pool, sealer, tenant_id, body, allow_private=True)
    return created["id"]


async def account_batch(
    services: Services, tenant_id: str, provider: str, account_id: str | None, count: int = 2
) -> str:
    """A batch sent through ``account_id`` (None: the default account) of ``provider``."""
    batch_id = await new_batch(services, tenant_id, count)
    await services.pool.execute(
        "UPDATE batches SET provider = $2, provider_account_id = $3 WHERE id = $1",
        uuid.UUID(batch_id),
        provider,
        None if account_id is None else uuid.UUID(account_id),
    )
    return batch_id


async def published(services: Services, after: int) -> list[tuple[str, str, int, str]]:
    """(provider, batch, seq, event) of every results row published after ``after``."""
    rows = []
    for seq in range(after + 1, await results_last_seq(services) + 1):
        message = results.decode(
            (await services.js.get_msg(services.topology.results_stream, seq)).data
        )
        rows += [(message.provider, r.batch_id, r.seq, r.status) for r in message.rows]
    return rows


async def post(client: TestClient, path: str, sent: Post) -> aiohttp.ClientResponse:
    body, headers = sent
    return await client.post(path, data=body, headers=headers)


# --- each provider's account route --------------------------------------------------------


@pytest.mark.parametrize("provider", sorted(KITS))
async def test_an_accounts_signed_event_lands(
    client: TestClient, services: Services, migrated: Settings, tenant: tuple[str, str],
    provider: str,
) -> None:  # fmt: skip
    kit = KITS[provider]
    account = await new_account(services, migrated, tenant[0], provider, kit.secret)
    batch_id = await account_batch(services, tenant[0], provider, account)
    before = await results_last_seq(services)
    response = await post(client, f"/webhooks/{provider}/{account}", kit.post(f"{batch_id}:2"))
    assert response.status == 200, await response.text()
    assert await response.json() == {"accepted": 1, "ignored": 0}
    assert await published(services, before) == [(provider, batch_id, 2, "delivered")]
    assert webhooks.BATCH_OWNERS.get(batch_id) == (provider, uuid.UUID(account))


@pytest.mark.parametrize("provider", sorted(KITS))
async def test_bad_signature_malformed_body_and_unknown_routes_publish_nothing(
    client: TestClient, services: Services, migrated: Settings, tenant: tuple[str, str],
    provider: str,
) -> None:  # fmt: skip
    kit = KITS[provider]
    tenant_id = tenant[0]
    account = await new_account(services, migrated, tenant_id, provider, kit.secret)
    batch_id = await account_batch(services, tenant_id, provider, account)
    path = f"/webhooks/{provider}/{account}"
    before = await results_last_seq(services)

    forged = await post(client, path, kit.post(f"{batch_id}:1", forged=True))
    await error_body(forged, 401, "bad_signature")
    await error_body(await post(client, path, kit.malformed()), 400, "invalid_webhook")
    # Signed with the account's secret, but posted where that secret is not the one.
    good = kit.post(f"{batch_id}:1")
    await error_body(await post(client, f"/webhooks/{provider}", good), 404, "unknown_provider")
    await error_body(
        await post(client, f"/webhooks/pigeon/{account}", good), 404, "unknown_provider"
    )
    await error_body(await post(client, f"/webhooks/smtp/{account}", good), 404, "unknown_provider")
    other = "mailgun" if provider != "mailgun" else "sendgrid"
    await error_body(
        await post(client, f"/webhooks/{other}/{account}", good), 404, "account_not_found"
    )
    for missing in (str(uuid.uuid4()), "not-an-id"):
        response = await post(client, f"/webhooks/{provider}/{missing}", good)
        await error_body(response, 404, "account_not_found")
    no_secret = await new_account(services, migrated, tenant_id, provider, None)
    response = await post(client, f"/webhooks/{provider}/{no_secret}", good)
    await error_body(response, 404, "account_not_found")
    assert await published(services, before) == []


async def test_events_about_other_accounts_batches_are_ignored(
    client: TestClient, services: Services, migrated: Settings, tenant: tuple[str, str]
) -> None:
    """A tenant holding its own signing key cannot move another tenant's batches, nor the
    default account's: such events are counted, answered 200 and not handed on."""
    kit = KITS["sendgrid"]
    mine = await new_account(services, migrated, tenant[0], "sendgrid", kit.secret)
    other_tenant = f"t{uuid.uuid4().hex[:10]}"
    await create_key(services.pool, other_tenant)
    theirs = await new_account(services, migrated, other_tenant, "sendgrid", kit.secret)
    their_batch = await account_batch(services, other_tenant, "sendgrid", theirs)
    default_batch = await account_batch(services, tenant[0], "sendgrid", None)
    my_batch = await account_batch(services, tenant[0], "sendgrid", mine)
    before = await results_last_seq(services)
    path = f"/webhooks/sendgrid/{mine}"
    for foreign in (their_batch, default_batch, str(uuid.uuid4())):  # the last: no batch
        response = await post(client, path, kit.post(f"{foreign}:1"))
        assert response.status == 200, await response.text()
        assert await response.json() == {"accepted": 0, "ignored": 1}
    assert await published(services, before) == []
    # One post about both: only this account's batch is handed on.
    events = [
        dict(event, ref=ref)
        for event, ref in zip(
            orjson.loads(kit.post(f"{my_batch}:1")[0]) * 2,
            (f"{my_batch}:1", f"{their_batch}:2"),
            strict=True,
        )
    ]
    body = orjson.dumps(events)
    response = await client.post(path, data=body, headers=sendgrid_headers(body, SENDGRID_KEY))
    assert await response.json() == {"accepted": 1, "ignored": 1}
    assert await published(services, before) == [("sendgrid", my_batch, 1, "delivered")]


async def test_the_default_route_applies_only_to_default_account_batches(
    client: TestClient, services: Services, migrated: Settings, tenant: tuple[str, str]
) -> None:
    default_batch = await account_batch(services, tenant[0], "mock", None)
    account_batch_id = await account_batch(services, tenant[0], "mock", str(uuid.uuid4()))
    other_provider = await account_batch(services, tenant[0], "smtp", None)
    body = orjson.dumps(
        orjson.loads(webhook_events(default_batch, (1, "delivered"), (2, "opened")))
        + orjson.loads(webhook_events(account_batch_id, (1, "bounced")))
        + orjson.loads(webhook_events(other_provider, (1, "complained")))
    )
    before = await results_last_seq(services)
    response = await client.post(
        "/webhooks/mock", data=body, headers=mock_headers(body, migrated.mock_webhook_secret)
    )
    assert await response.json() == {"accepted": 2, "ignored": 2}
    assert await published(services, before) == [
        ("mock", default_batch, 1, "delivered"), ("mock", default_batch, 2, "opened"),
    ]  # fmt: skip


async def test_a_deleted_accounts_secret_stops_working_within_the_cache_time(
    client: TestClient, services: Services, migrated: Settings, tenant: tuple[str, str],
    fresh_caches: None, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    kit = KITS["mailgun"]
    account = await new_account(services, migrated, tenant[0], "mailgun", kit.secret)
    batch_id = await account_batch(services, tenant[0], "mailgun", account)
    path = f"/webhooks/mailgun/{account}"
    reads: list[uuid.UUID] = []
    read = accounts.webhook_secret

    async def counted(pool: Any, sealer: accounts.Sealer, account_id: uuid.UUID) -> Any:
        reads.append(account_id)
        return await read(pool, sealer, account_id)

    monkeypatch.setattr(accounts, "webhook_secret", counted)
    for seq in (1, 2):
        assert (await post(client, path, kit.post(f"{batch_id}:{seq}"))).status == 200
    assert reads == [uuid.UUID(account)]  # one read (and decrypt) for both posts
    await services.pool.execute("DELETE FROM provider_accounts WHERE id = $1", uuid.UUID(account))
    assert (await post(client, path, kit.post(f"{batch_id}:1"))).status == 200  # still cached
    webhooks.ACCOUNT_SECRETS.clock = lambda: time.monotonic() + webhooks.SECRET_SECONDS
    await error_body(await post(client, path, kit.post(f"{batch_id}:1")), 404, "account_not_found")
    assert len(reads) == 2


# --- replay policies ----------------------------------------------------------------------


async def test_mailgun_refuses_a_reused_token_resend_and_postmark_answer_retries_200(
    client: TestClient, services: Services, migrated: Settings, tenant: tuple[str, str]
) -> None:
    paths = {}
    batches = {}
    for provider in ("mailgun", "resend", "postmark"):
        account = await new_account(services, migrated, tenant[0], provider, KITS[provider].secret)
        paths[provider] = f"/webhooks/{provider}/{account}"
        batches[provider] = await account_batch(services, tenant[0], provider, account)
    mailgun = KITS["mailgun"].post(f"{batches['mailgun']}:1")
    assert (await post(client, paths["mailgun"], mailgun)).status == 200
    await error_body(await post(client, paths["mailgun"], mailgun), 401, "replayed_signature")

    body, headers = KITS["resend"].post(f"{batches['resend']}:1")
    assert (await post(client, paths["resend"], (body, headers))).status == 200
    later = svix_headers(body, RESEND_SECRET, headers["svix-id"], time.time() + 60)  # re-signed
    retry = await post(client, paths["resend"], (body, later))
    assert await retry.json() == {"accepted": 0, "ignored": 0, "duplicate": True}

    postmark = KITS["postmark"].post(f"{batches['postmark']}:1")
    assert (await post(client, paths["postmark"], postmark)).status == 200
    before = await results_last_seq(services)
    assert (await (await post(client, paths["postmark"], postmark)).json())["duplicate"] is True
    assert await results_last_seq(services) == before


# --- SES via SNS --------------------------------------------------------------------------


async def ses_account(services: Services, settings: Settings, tenant_id: str) -> tuple[str, str]:
    account = await new_account(services, settings, tenant_id, "ses", f"{TOPIC}2, {TOPIC}")
    return account, await account_batch(services, tenant_id, "ses", account)


async def test_sns_retries_and_old_timestamps_are_accepted_within_an_hour(
    client: TestClient, services: Services, migrated: Settings, tenant: tuple[str, str],
    sns_certificates: CertFetcher,
) -> None:  # fmt: skip
    account, batch_id = await ses_account(services, migrated, tenant[0])
    path = f"/webhooks/ses/{account}"
    before = await results_last_seq(services)
    # SNS signed it 50 minutes ago (its first attempts failed): past the usual 5 minutes.
    first = sns_post(ses_notification(f"{batch_id}:1", at=time.time() - 3000))
    response = await post(client, path, first)
    assert await response.json() == {"accepted": 1, "ignored": 0}
    for _ in range(2):  # SNS retries the very same signed message: 200, handed on once
        retry = await post(client, path, first)
        assert retry.status == 200
        assert await retry.json() == {"accepted": 0, "ignored": 0, "duplicate": True}
    assert await published(services, before) == [("ses", batch_id, 1, "delivered")]
    too_old = sns_post(ses_notification(f"{batch_id}:2", at=time.time() - 3700))
    await error_body(await post(client, path, too_old), 401)
    assert sns_certificates.urls == [ses_notification("x:1")["SigningCertURL"]]  # fetched once


async def test_a_signed_subscription_confirmation_is_confirmed_once(
    client: TestClient, services: Services, migrated: Settings, tenant: tuple[str, str],
    confirmed: list[str],
) -> None:  # fmt: skip
    account, _ = await ses_account(services, migrated, tenant[0])
    path = f"/webhooks/ses/{account}"
    sample = dict(
        fixture("ses/sns-subscription-confirmation.json"), Timestamp=sns_time(time.time())
    )
    before = await results_last_seq(services)
    signed = sns_post(sample)
    response = await post(client, path, signed)
    assert response.status == 200, await response.text()
    assert await response.json() == {"accepted": 0, "ignored": 0, "subscribed": True}
    assert confirmed == [sample["SubscribeURL"]]
    assert (await (await post(client, path, signed)).json())["duplicate"] is True
    assert confirmed == [sample["SubscribeURL"]]  # not fetched again
    assert await results_last_seq(services) == before


async def test_unsigned_or_foreign_confirmations_fetch_nothing(
    client: TestClient, services: Services, migrated: Settings, tenant: tuple[str, str],
    confirmed: list[str],
) -> None:  # fmt: skip
    account, _ = await ses_account(services, migrated, tenant[0])
    path = f"/webhooks/ses/{account}"
    now = sns_time(time.time())
    sample = dict(fixture("ses/sns-subscription-confirmation.json"), Timestamp=now)
    unsigned = orjson.dumps(sample)  # its EXAMPLE signature
    await error_body(await client.post(path, data=unsigned), 401, "bad_signature")
    await error_body(await post(client, path, sns_post(sample, SNS_OTHER)), 401, "bad_signature")
    other_topic = "arn:aws:sns:us-west-2:123456789012:TheirTopic"
    foreign = dict(
        sample,
        TopicArn=other_topic,
        SubscribeURL=sample["SubscribeURL"].replace(TOPIC, other_topic),
    )
    await error_body(await post(client, path, sns_post(foreign)), 401, "bad_signature")
    # Signed for our topic, but its SubscribeURL is not SNS's (SSRF): nothing to confirm.
    for url in (
        f"https://169.254.169.254/?Action=ConfirmSubscription&TopicArn={TOPIC}&Token=1",
        f"https://sns.us-west-2.amazonaws.com.evil.com/?Action=ConfirmSubscription&TopicArn={TOPIC}",
    ):
        odd = dict(sample, SubscribeURL=url, MessageId=str(uuid.uuid4()))
        response = await post(client, path, sns_post(odd))
        assert await response.json() == {"accepted": 0, "ignored": 0}
    assert confirmed == []


async def test_a_confirmation_that_fails_can_be_sent_again(
    client: TestClient, services: Services, migrated: Settings, tenant: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    account, _ = await ses_account(services, migrated, tenant[0])
    path = f"/webhooks/ses/{account}"
    sample = dict(
        fixture("ses/sns-subscription-confirmation.json"), Timestamp=sns_time(time.time())
    )
    signed = sns_post(sample)

    async def unreachable(url: str) -> None:
        raise webhooks.SubscriptionNotConfirmed("the subscription could not be confirmed: HTTP 503")

    monkeypatch.setattr(webhooks, "confirm_subscription", unreachable)
    await error_body(await post(client, path, signed), 502, "subscription_not_confirmed")
    urls: list[str] = []

    async def record(url: str) -> None:
        urls.append(url)

    monkeypatch.setattr(webhooks, "confirm_subscription", record)
    assert (await (await post(client, path, signed)).json())["subscribed"] is True
    assert urls == [sample["SubscribeURL"]]
