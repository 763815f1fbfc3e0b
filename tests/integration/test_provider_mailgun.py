"""MailgunProvider against the fake Mailgun server (devkit.fakes.mailgun) on 127.0.0.1:
batch requests as Mailgun documents them, recipients kept apart by recipient variables,
every recipient receiving exactly its own rendered message, the limits, and every answer
mapped to results."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from email.utils import getaddresses
from typing import Any

import aiohttp
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import providers.mailgun as mailgun_module
from devkit.fakes.mailgun import (
    TEST_API_KEY,
    TEST_DOMAIN,
    Delivered,
    FakeMailgun,
    Received,
    check,
    render,
)
from providers.base import Account, Message, SendResult
from providers.mailgun import EU_API, US_API, MailgunProvider, plan
from tests.provider_support import assert_delivered_exactly as delivered_exactly
from tests.provider_support import checked, closed_port, closing


def account(fake: FakeMailgun, *, api_key: str | None = None, domain: str = TEST_DOMAIN) -> Account:
    return Account(
        "mailgun", {"api_key": api_key or fake.api_key}, base_url=fake.url, domain=domain
    )


@asynccontextmanager
async def mailgun(
    *, client_key: str | None = None, domain: str = TEST_DOMAIN, **options: Any
) -> AsyncIterator[tuple[FakeMailgun, MailgunProvider]]:
    async with FakeMailgun(**options) as fake:
        async with closing(
            MailgunProvider(account(fake, api_key=client_key, domain=domain))
        ) as provider:
            yield fake, provider


def make(
    count: int,
    *,
    address: Callable[[int], str] = lambda i: f"user{i}@example.com",
    prefix: str = "6f9619ff-8b86-4011-b42d-00c04fc964ff",
) -> list[Message]:
    return [
        Message(
            ref=f"{prefix}:{i}",
            to_email=address(i),
            to_name=f"User, {i}" if i % 3 else None,  # a comma the To field must quote
            from_email="news@mg.example.test",
            from_name="Sender",
            subject=f"Hello User {i} – 50% off",
            html=f"<p>Hi <b>User {i}</b>, 100% yours</p>",
            text=f"Hi User {i}, 100% yours",
            headers={
                "List-Unsubscribe": f"<https://u.test/unsubscribe/tok{i}>",
                "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
                "X-BatchSender-Ref": f"{prefix}:{i}",
            },
        )
        for i in range(count)
    ]


def assert_delivered_exactly(
    fake: FakeMailgun, messages: list[Message], results: list[SendResult]
) -> None:
    """Every accepted message reached its recipient once, alone, exactly as rendered."""

    def check(message: Message, result: SendResult, got: Delivered) -> None:
        assert getaddresses([got.to]) == [(message.to_name or "", message.to_email)]
        assert got.subject == message.subject
        assert (got.text, got.html) == (message.text or None, message.html or None)
        assert got.headers == message.headers
        assert got.user_variables == {"ref": message.ref}
        assert got.message_id == result.provider_message_id

    delivered_exactly(
        fake.delivered, messages, results, lambda got: got.user_variables["ref"], check
    )


async def test_one_batch_request_with_every_recipient_apart() -> None:
    async with mailgun() as (fake, provider):
        messages = make(5)
        results = await provider.send(messages)
        assert_delivered_exactly(fake, messages, results)
        (request,) = fake.received
        assert request.domain == TEST_DOMAIN
        auth = base64.b64encode(f"api:{TEST_API_KEY}".encode()).decode()
        assert request.headers["Authorization"] == f"Basic {auth}"
        assert request.headers["Content-Type"].startswith("multipart/form-data")
        assert request.value("from") == "Sender <news@mg.example.test>"
        assert request.value("subject") == "%recipient.subject%"
        assert request.value("text") == "%recipient.text%"
        assert request.value("html") == "%recipient.html%"
        assert request.value("v:ref") == "%recipient.ref%"
        assert request.value("h:List-Unsubscribe").startswith("%recipient.h")
        ids = {r.provider_message_id for r in results}
        assert len(ids) == 1 and None not in ids and "<" not in ids.pop()


async def test_privacy_each_to_is_one_recipient_and_recipient_variables_cover_them_all() -> None:
    async with mailgun() as (fake, provider):
        messages = make(40)
        await provider.send(messages)
        (request,) = fake.received
        to = request.values("to")
        assert len(to) == 40
        parsed = [getaddresses([value]) for value in to]
        assert all(len(one) == 1 for one in parsed)  # never a list in one field
        addresses = [one[0][1] for one in parsed]
        assert addresses == [m.to_email for m in messages]
        variables = orjson.loads(request.value("recipient-variables"))
        assert set(variables) == set(addresses)
        # No recipient's own values leak into what all of them share ...
        shared = " ".join(v for k, v in request.fields if k not in ("to", "recipient-variables"))
        assert not any(
            m.to_email in shared or f"User {i} " in shared for i, m in enumerate(messages)
        )
        # ... and each recipient's message is addressed to it alone.
        for delivered in fake.delivered:
            assert getaddresses([delivered.to])[0][1] == delivered.address
            assert all(
                other.to_email not in delivered.to
                for other in messages
                if other.to_email != delivered.address
            )


async def test_the_fake_refuses_a_batch_without_recipient_variables() -> None:
    """The check the privacy proof rests on is real: a batch whose recipients would all
    see each other is refused by the fake, and so is one whose variables miss someone."""
    async with FakeMailgun() as fake, aiohttp.ClientSession() as session:
        url = f"{fake.url}/v3/{TEST_DOMAIN}/messages"
        auth = {
            "Authorization": "Basic " + base64.b64encode(f"api:{TEST_API_KEY}".encode()).decode()
        }
        base = [("from", "a@mg.example.test"), ("subject", "Hi"), ("text", "Hi")]
        cases = {
            "missing": base + [("to", "x@example.com"), ("to", "y@example.com")],
            "partial": base
            + [
                ("to", "x@example.com"),
                ("to", "y@example.com"),
                ("recipient-variables", '{"x@example.com": {}}'),
            ],
            "list": base + [("to", "x@example.com, y@example.com"), ("recipient-variables", "{}")],
        }
        for fields in cases.values():
            form = aiohttp.FormData(fields, default_to_multipart=True)
            async with session.post(url, data=form, headers=auth) as resp:
                assert resp.status == 400
                assert "recipient" in (await resp.json())["message"]
        assert fake.delivered == []


async def test_an_address_twice_goes_into_separate_requests() -> None:
    addresses = [
        "a@example.com",
        "b@example.com",
        "a@example.com",
        "A@example.com",
        "c@example.com",
    ]
    async with mailgun() as (fake, provider):
        messages = make(5, address=lambda i: addresses[i])
        results = await provider.send(messages)
        assert_delivered_exactly(fake, messages, results)
        assert len(fake.received) == 3
        for request in fake.received:
            emails = [getaddresses([v])[0][1].lower() for v in request.values("to")]
            assert len(emails) == len(set(emails))


async def test_at_most_1000_recipients_and_the_byte_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    async with mailgun() as (fake, provider):
        results = await provider.send(make(2300))
        assert all(r.ok for r in results)
        assert sorted(len(r.values("to")) for r in fake.received) == [300, 1000, 1000]
        assert len(fake.delivered) == 2300
    monkeypatch.setattr(mailgun_module, "MAX_REQUEST_BYTES", 8_000)
    async with mailgun() as (fake, provider):
        messages = make(60)
        results = await provider.send(messages)
        assert_delivered_exactly(fake, messages, results)
        assert len(fake.received) > 1


async def test_messages_of_other_shapes_go_into_their_own_requests() -> None:
    async with mailgun() as (fake, provider):
        messages = make(6)
        messages[1].html = None
        messages[2].from_name = "Other sender"
        messages[3].headers = {"X-Other": "1"}
        results = await provider.send(messages)
        assert_delivered_exactly(fake, messages, results)
        assert len(fake.received) == 4


async def test_a_too_large_request_is_split_in_halves() -> None:
    async with mailgun(max_bytes=4_000) as (fake, provider):
        messages = make(16)
        results = await provider.send(messages)
        assert_delivered_exactly(fake, messages, results)
        statuses = [r.status for r in fake.received]
        assert statuses[0] == 413 and statuses.count(200) >= 2


async def test_a_bad_recipient_is_found_and_fails_alone() -> None:
    async with mailgun(invalid={"user5@example.com"}) as (fake, provider):
        messages = make(16)
        results = await provider.send(messages)
        bad = results[5]
        assert (bad.ok, bad.retryable, bad.pause_reason) == (False, False, None)
        assert "not a valid address" in bad.error and "user5" not in bad.error
        assert_delivered_exactly(fake, messages[:5] + messages[6:], results[:5] + results[6:])
        assert len(fake.received) <= 1 + 2 * 4  # one bisection path


async def test_a_request_refused_as_a_whole_fails_every_message() -> None:
    async with mailgun() as (fake, provider):
        fake.fail(400, message="'from' parameter is not a valid address: news@mg.example.test")
        results = await provider.send(make(4))
        assert len(fake.received) == 1  # nothing to bisect: it is not about a recipient
        for result in results:
            assert (result.ok, result.retryable) == (False, False)
            assert "'from' parameter" in result.error and "news@" not in result.error


async def test_bisecting_spends_a_bounded_budget() -> None:
    async with mailgun() as (fake, provider):
        fake.fail(
            400,
            message="'to' parameter is not a valid address. please check documentation",
            times=1000,
        )
        results = await provider.send(make(300))
        assert all(not r.ok and not r.retryable for r in results)
        assert len(fake.received) <= 1 + mailgun_module.BISECT_BUDGET


@pytest.mark.parametrize(
    ("options", "status", "why"),
    [
        ({"client_key": "key-wrong-0000"}, 401, "refused"),
        ({"forbidden": True}, 403, "may not send"),
        ({"domain": "unknown.example.test"}, 404, "domain"),
    ],
)
async def test_an_account_that_cannot_send_pauses_the_batch(
    options: dict[str, Any], status: int, why: str
) -> None:
    key = options.get("client_key", TEST_API_KEY)
    async with mailgun(**options) as (fake, provider):
        results = await provider.send(make(3))
        for result in results:
            assert not result.ok and not result.retryable
            assert (
                result.pause_reason
                and why in result.pause_reason
                and str(status) in result.pause_reason
            )
            assert key not in result.error and TEST_API_KEY not in result.error
        assert fake.delivered == []


async def test_429_is_throttled() -> None:
    async with mailgun() as (fake, provider):
        fake.rate_limited(retry_after=12)
        results = await provider.send(make(2))
        for result in results:
            assert (result.ok, result.retryable, result.throttled, result.retry_after) == (
                False,
                True,
                True,
                12.0,
            )
        assert all(r.ok for r in await provider.send(make(2)))


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_server_errors_are_retryable(status: int) -> None:
    async with mailgun() as (fake, provider):
        fake.fail(status, message="internal error")
        results = await provider.send(make(2))
        for result in results:
            assert (result.ok, result.retryable, result.throttled) == (False, True, False)
            assert f"HTTP {status}" in result.error


async def test_other_client_errors_are_permanent() -> None:
    async with mailgun() as (fake, provider):
        fake.fail(422, message="unprocessable")
        (result,) = await provider.send(make(1))
        assert (result.ok, result.retryable, result.pause_reason) == (False, False, None)


async def test_a_network_failure_is_retryable_and_names_no_key() -> None:
    key = "key-secret-that-must-not-leak"
    provider = MailgunProvider(
        Account(
            "mailgun",
            {"api_key": key},
            base_url=f"http://127.0.0.1:{closed_port()}",
            domain=TEST_DOMAIN,
        )
    )
    try:
        results = await provider.send(make(3))
    finally:
        await provider.close()
    for result in results:
        assert (result.ok, result.retryable) == (False, True)
        assert key not in result.error and "@" not in result.error


async def test_a_message_without_a_body_fails_alone() -> None:
    async with mailgun() as (fake, provider):
        messages = make(3)
        messages[0].text = messages[0].html = None
        results = await provider.send(messages)
        assert not results[0].ok and "no body" in results[0].error
        assert_delivered_exactly(fake, messages[1:], results[1:])
        assert await provider.send([]) == []


def test_accounts_choose_the_region_and_need_a_domain() -> None:
    us = MailgunProvider(Account("mailgun", {"api_key": "k"}, domain="mg.x.test"))
    eu = MailgunProvider(Account("mailgun", {"api_key": "k"}, region="eu", domain="mg.x.test"))
    assert (us.base_url, eu.base_url) == (US_API, EU_API)
    assert "k" not in repr(us).replace("Mailgun", "").replace("mg.x.test", "")
    assert (us.name, us.max_per_call) == ("mailgun", 1000)
    with pytest.raises(ValueError, match="domain"):
        MailgunProvider(Account("mailgun", {"api_key": "k"}))
    with pytest.raises(ValueError, match="api_key"):
        MailgunProvider(Account("mailgun", {}, domain="mg.x.test"))


@st.composite
def chunks(draw: st.DrawFn) -> list[Message]:
    count = draw(st.integers(1, 30))
    messages = make(count, address=lambda i: f"user{draw(st.integers(0, count))}@example.com")
    for i, message in enumerate(messages):
        message.text = draw(st.sampled_from([None, f"text {i} %recipient.ref% é", "same"]))
        message.html = draw(st.sampled_from([None, f"<p>{i} 100%</p>"])) or (
            None if message.text else "<p>x</p>"
        )
        message.subject = draw(st.sampled_from(["Hi", f"Hi {i}", "%recipient.subject%"]))
        if draw(st.booleans()):
            message.headers = {"List-Unsubscribe": f"<https://u.test/{i}>"}
        message.from_name = draw(st.sampled_from([None, "Sender", 'Quoted "Sender", Inc.']))
    return messages


@settings(max_examples=150, deadline=None)
@given(chunks())
def test_every_plan_is_valid_and_renders_each_message_exactly(messages: list[Message]) -> None:
    delivered: dict[str, Delivered] = {}
    for request in plan(messages, range(len(messages))):
        received = Received(TEST_DOMAIN, {}, request.fields())
        assert check(received) is None
        for got in render(received, "id"):
            assert got.user_variables["ref"] not in delivered
            delivered[got.user_variables["ref"]] = got
    assert len(delivered) == len(messages)
    for message in messages:
        got = delivered[message.ref]
        assert got.address == message.to_email
        assert (got.subject, got.text, got.html, got.headers) == (
            message.subject,
            message.text,
            message.html,
            message.headers,
        )


# --- the credentials check (GET /v3/domains/{domain}) -------------------------------------


async def test_check_a_key_and_an_active_domain() -> None:
    async with mailgun() as (fake, provider):
        result = await provider.check()
        detail = checked(result, True, TEST_API_KEY, call=f"GET /v3/domains/{TEST_DOMAIN}")
        assert detail == f"the API key works and domain {TEST_DOMAIN} is active"
        (request,) = fake.received
        expected = base64.b64encode(f"api:{TEST_API_KEY}".encode()).decode()
        assert request.headers["Authorization"] == f"Basic {expected}"
        assert fake.delivered == []


async def test_check_a_refused_key() -> None:
    async with mailgun(client_key="key-wrong-0123456789") as (_, provider):
        detail = checked(await provider.check(), False, "key-wrong-0123456789")
    assert detail == "the provider refused the API key (HTTP 401): Forbidden"


async def test_check_a_domain_mailgun_does_not_know() -> None:
    async with mailgun(domain="example.com") as (_, provider):
        detail = checked(await provider.check(), False, TEST_API_KEY)
    assert detail.startswith("domain example.com not found at Mailgun (HTTP 404)")


async def test_check_an_unverified_domain_which_cannot_send() -> None:
    async with mailgun(domain="new.example.test", unverified={"new.example.test"}) as (
        _,
        provider,
    ):
        detail = checked(await provider.check(), False, TEST_API_KEY)
        assert "domain new.example.test is unverified" in detail
        (result,) = await provider.send(make(1))
    assert result.pause_reason and "may not send" in result.pause_reason
