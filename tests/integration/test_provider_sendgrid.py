"""SendGridProvider against the fake SendGrid server (devkit.fakes.sendgrid) on 127.0.0.1:
requests as SendGrid documents them, every recipient receiving exactly its own rendered
message, the limits, and every answer mapped to results."""

from __future__ import annotations

import random
import string
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import providers.sendgrid as sendgrid_module
from devkit.fakes.sendgrid import TEST_API_KEY, Delivered, FakeSendGrid, check, render
from providers.base import Account, Message, SendResult
from providers.sendgrid import EU_API, MAX_SUBSTITUTION_BYTES, US_API, SendGridProvider, plan
from tests.provider_support import assert_delivered_exactly as delivered_exactly
from tests.provider_support import checked, closed_port, closing


def account(fake: FakeSendGrid, *, api_key: str | None = None) -> Account:
    return Account("sendgrid", {"api_key": api_key or fake.api_key}, base_url=fake.url)


@asynccontextmanager
async def sendgrid(**options: Any) -> AsyncIterator[tuple[FakeSendGrid, SendGridProvider]]:
    api_key = options.pop("client_key", None)
    async with FakeSendGrid(**options) as fake:
        async with closing(SendGridProvider(account(fake, api_key=api_key))) as provider:
            yield fake, provider


def greeting(i: int) -> tuple[str, str]:
    return (
        f"Hi User {i},\nyour order has shipped.",
        f"<p>Hi <b>User {i}</b>,</p><p>your order has shipped.</p>",
    )


def make(
    count: int,
    *,
    body: Callable[[int], tuple[str | None, str | None]] = greeting,
    address: Callable[[int], str] = lambda i: f"user{i}@example.com",
    prefix: str = "6f9619ff-8b86-4011-b42d-00c04fc964ff",
) -> list[Message]:
    messages = []
    for i in range(count):
        text, html = body(i)
        messages.append(
            Message(
                ref=f"{prefix}:{i}",
                to_email=address(i),
                to_name=f"User {i}" if i % 3 else None,
                from_email="news@sender.test",
                from_name="Sender",
                subject=f"Hello User {i}",
                html=html,
                text=text,
                headers={
                    "List-Unsubscribe": f"<https://u.test/unsubscribe/tok{i}>",
                    "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
                    "X-BatchSender-Ref": f"{prefix}:{i}",
                },
            )
        )
    return messages


def assert_delivered_exactly(
    fake: FakeSendGrid, messages: list[Message], results: list[SendResult]
) -> None:
    """Every accepted message reached its recipient once, exactly as rendered."""

    def check(message: Message, result: SendResult, got: Delivered) -> None:
        assert (got.to, got.name) == (message.to_email, message.to_name)
        assert got.subject == message.subject
        assert got.text == (message.text or None)
        assert got.html == (message.html or None)
        assert got.headers == message.headers
        assert got.custom_args == {"ref": message.ref}
        assert got.message_id.startswith(f"{result.provider_message_id}.")

    delivered_exactly(fake.delivered, messages, results, lambda got: got.custom_args["ref"], check)


def personalizations(fake: FakeSendGrid) -> list[list[dict[str, Any]]]:
    return [body["personalizations"] for body in fake.requests]


def noise(rng: random.Random, size: int) -> str:
    return "".join(rng.choices(string.ascii_letters + " <>&\"'\n", k=size))


async def test_distinct_bodies_go_in_one_request_and_each_recipient_gets_its_own() -> None:
    async with sendgrid() as (fake, provider):
        messages = make(5)
        results = await provider.send(messages)
        assert_delivered_exactly(fake, messages, results)
        (request,) = fake.received
        assert request.headers["Authorization"] == f"Bearer {TEST_API_KEY}"
        assert request.headers["Content-Type"] == "application/json"
        body = request.json
        assert body["from"] == {"email": "news@sender.test", "name": "Sender"}
        assert [part["type"] for part in body["content"]] == ["text/plain", "text/html"]
        for item, message in zip(body["personalizations"], messages, strict=True):
            assert item["to"] == [
                {
                    "email": message.to_email,
                    **({"name": message.to_name} if message.to_name else {}),
                }
            ]
            assert item["subject"] == message.subject
            assert item["custom_args"] == {"ref": message.ref}
            assert item["headers"]["List-Unsubscribe"] == message.headers["List-Unsubscribe"]
            assert 0 < len(item["substitutions"]) <= 2
        assert len({r.provider_message_id for r in results}) == 1


async def test_identical_bodies_are_sent_as_they_are() -> None:
    async with sendgrid() as (fake, provider):
        messages = make(4, body=lambda i: ("Same for all", "<p>Same for all</p>"))
        results = await provider.send(messages)
        assert_delivered_exactly(fake, messages, results)
        (body,) = fake.requests
        assert body["content"] == [
            {"type": "text/plain", "value": "Same for all"},
            {"type": "text/html", "value": "<p>Same for all</p>"},
        ]
        assert not any("substitutions" in item for item in body["personalizations"])


async def test_large_bodies_that_differ_a_little_share_their_common_parts() -> None:
    footer = "<p>" + "A long newsletter paragraph. " * 1500 + "</p>"  # about 44 KB

    def body(i: int) -> tuple[str, str]:
        return (
            f"Dear {i}\n{footer}\nUnsubscribe: https://u.test/{i}",
            f"<h1>Dear {i}</h1>{footer}<a href='https://u.test/{i}'>x</a>",
        )

    async with sendgrid() as (fake, provider):
        messages = make(50, body=body)
        results = await provider.send(messages)
        assert_delivered_exactly(fake, messages, results)
        (request,) = fake.received
        assert len(request.body) < 150_000  # not 50 copies of the body
        for item in request.json["personalizations"]:
            size = sum(len(k.encode()) + len(v.encode()) for k, v in item["substitutions"].items())
            assert size <= MAX_SUBSTITUTION_BYTES


async def test_bodies_too_different_to_substitute_are_sent_alone() -> None:
    rng = random.Random(7)
    big = {i: (noise(rng, 6000), noise(rng, 6000)) for i in range(3)}  # 12 KB apart each

    def body(i: int) -> tuple[str | None, str | None]:
        if i in big:
            return big[i]
        if i in (3, 4):
            return "shared text", None  # identical: one literal request
        return f"small text {i}", None

    async with sendgrid() as (fake, provider):
        messages = make(8, body=body)
        results = await provider.send(messages)
        assert_delivered_exactly(fake, messages, results)
        sizes = sorted(len(p) for p in personalizations(fake))
        # 3 alone; the two identical ones; the three small distinct ones substituted
        assert sizes == [1, 1, 1, 2, 3]
        for request in fake.requests:
            if len(request["personalizations"]) == 1:
                assert "substitutions" not in request["personalizations"][0]


async def test_text_that_looks_like_a_tag_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = iter(["feedface00000000", "0123456789abcdef"])
    monkeypatch.setattr(sendgrid_module.secrets, "token_hex", lambda n: next(tokens))
    messages = make(
        3, body=lambda i: (f"-name- %name% -bs{i}-", f"<p>{i} {{{{ x }}}} %recipient.name%</p>")
    )
    messages[1].subject = "About -bsfeedface000000000x0- and -bsfeedface000000001x0-"  # tags
    async with sendgrid() as (fake, provider):
        results = await provider.send(messages)
        assert_delivered_exactly(fake, messages, results)
        (item, *_rest) = fake.requests[0]["personalizations"]
        assert all("0123456789abcdef" in tag for tag in item["substitutions"])


async def test_a_chunk_with_an_address_twice_is_split_so_no_request_repeats_one() -> None:
    addresses = [
        "a@example.com",
        "b@example.com",
        "a@example.com",
        "c@example.com",
        "A@example.com",
        "B@Example.com",
    ]
    async with sendgrid() as (fake, provider):
        messages = make(6, address=lambda i: addresses[i])
        results = await provider.send(messages)
        assert_delivered_exactly(fake, messages, results)
        assert len(fake.requests) == 3
        for items in personalizations(fake):
            emails = [to["email"].lower() for item in items for to in item["to"]]
            assert len(emails) == len(set(emails))
        assert all(r.status == 202 for r in fake.received)


async def test_at_most_1000_personalizations_and_one_recipient_each() -> None:
    async with sendgrid() as (fake, provider):
        messages = make(2500)
        results = await provider.send(messages)
        assert all(r.ok for r in results)
        assert sorted(len(p) for p in personalizations(fake)) == [500, 1000, 1000]
        assert all(len(item["to"]) == 1 for items in personalizations(fake) for item in items)
        assert len(fake.delivered) == 2500


async def test_requests_stay_under_the_byte_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sendgrid_module, "MAX_REQUEST_BYTES", 20_000)
    async with sendgrid() as (fake, provider):
        messages = make(100)
        results = await provider.send(messages)
        assert_delivered_exactly(fake, messages, results)
        assert len(fake.received) > 1
        assert all(len(r.body) <= 20_000 for r in fake.received)


async def test_too_large_requests_are_split_in_halves() -> None:
    rng = random.Random(3)
    bodies = {i: (noise(rng, 900), None) for i in range(8)}
    async with sendgrid(max_bytes=6_000) as (fake, provider):
        messages = make(8, body=bodies.__getitem__)
        results = await provider.send(messages)
        assert_delivered_exactly(fake, messages, results)
        statuses = [r.status for r in fake.received]
        assert statuses[0] == 413 and statuses.count(202) >= 2


async def test_a_single_message_too_large_fails_permanently() -> None:
    async with sendgrid(max_bytes=300) as (fake, provider):
        (result,) = await provider.send(make(1))
        assert (result.ok, result.retryable) == (False, False)
        assert "413" in (result.error or "")


async def test_a_rejected_personalization_fails_alone_and_the_others_are_sent() -> None:
    async with sendgrid(invalid={"user2@example.com"}) as (fake, provider):
        messages = make(5)
        results = await provider.send(messages)
        bad = results[2]
        assert (bad.ok, bad.retryable, bad.pause_reason) == (False, False, None)
        assert "to.0.email" in bad.error and "valid address" in bad.error
        assert "user2" not in bad.error
        assert [r.status for r in fake.received] == [400, 202]
        good = messages[:2] + messages[3:]
        assert_delivered_exactly(fake, good, results[:2] + results[3:])


async def test_a_request_rejected_as_a_whole_fails_every_message_naming_the_field() -> None:
    async with sendgrid() as (fake, provider):
        fake.fail(
            400,
            errors=[
                {
                    "field": "from",
                    "message": "The from address does not match a verified Sender Identity.",
                },
                {
                    "field": None,
                    "message": "We found the first duplicate instance of [user1@example.com].",
                },
            ],
        )
        results = await provider.send(make(3))
        for result in results:
            assert (result.ok, result.retryable) == (False, False)
            assert result.error.startswith("sendgrid: HTTP 400: from: The from address")
            assert "user1@example.com" not in result.error and "<address>" in result.error


@pytest.mark.parametrize(
    ("options", "status", "why"),
    [
        ({"client_key": "SG.wrong-key.abcdef"}, 401, "refused"),
        ({"forbidden": True}, 403, "may not send"),
    ],
)
async def test_a_refused_key_pauses_the_batch(
    options: dict[str, Any], status: int, why: str
) -> None:
    key = options.get("client_key", TEST_API_KEY)
    async with sendgrid(**options) as (fake, provider):
        results = await provider.send(make(3))
        for result in results:
            assert not result.ok and not result.retryable
            assert (
                result.pause_reason
                and why in result.pause_reason
                and str(status) in result.pause_reason
            )
            assert key not in result.error and key not in result.pause_reason
            assert TEST_API_KEY not in result.error


async def test_429_is_throttled_until_the_rate_limit_resets() -> None:
    async with sendgrid() as (fake, provider):
        fake.rate_limited(reset_in=30)
        results = await provider.send(make(2))
        for result in results:
            assert (result.ok, result.retryable, result.throttled) == (False, True, True)
            assert 25 <= (result.retry_after or 0) <= 31
        assert await provider.send(make(2)) and len(fake.delivered) == 2  # then it goes through


@pytest.mark.parametrize(
    ("status", "headers", "retry_after"), [(500, {}, None), (503, {"Retry-After": "7"}, 7.0)]
)
async def test_server_errors_are_retryable(
    status: int, headers: dict[str, str], retry_after: float | None
) -> None:
    async with sendgrid() as (fake, provider):
        fake.fail(status, headers=headers)
        results = await provider.send(make(2))
        for result in results:
            assert (result.ok, result.retryable, result.throttled, result.retry_after) == (
                False,
                True,
                False,
                retry_after,
            )
            assert f"HTTP {status}" in result.error


async def test_other_client_errors_are_permanent() -> None:
    async with sendgrid() as (fake, provider):
        fake.fail(404, errors=[{"field": None, "message": "not found"}])
        (result,) = await provider.send(make(1))
        assert (result.ok, result.retryable, result.pause_reason) == (False, False, None)


async def test_a_network_failure_is_retryable_and_names_no_key() -> None:
    key = "SG.secret-key-that-must-not-leak"
    provider = SendGridProvider(
        Account("sendgrid", {"api_key": key}, base_url=f"http://127.0.0.1:{closed_port()}")
    )
    try:
        started = time.monotonic()
        results = await provider.send(make(3))
        assert time.monotonic() - started < 10
    finally:
        await provider.close()
    for result in results:
        assert (result.ok, result.retryable) == (False, True)
        assert key not in result.error and "@" not in result.error


async def test_a_message_without_a_body_fails_alone() -> None:
    async with sendgrid() as (fake, provider):
        messages = make(3)
        messages[1].text = messages[1].html = ""
        results = await provider.send(messages)
        assert not results[1].ok and not results[1].retryable and "no body" in results[1].error
        assert_delivered_exactly(fake, [messages[0], messages[2]], [results[0], results[2]])
        assert await provider.send([]) == []


def test_accounts_choose_the_region_and_keep_their_key_private() -> None:
    us = SendGridProvider(Account("sendgrid", {"api_key": "SG.k"}))
    eu = SendGridProvider(Account("sendgrid", {"api_key": "SG.k"}, region="eu"))
    custom = SendGridProvider(
        Account("sendgrid", {"api_key": "SG.k"}, base_url="http://127.0.0.1:9/")
    )
    assert (us.base_url, eu.base_url, custom.base_url) == (US_API, EU_API, "http://127.0.0.1:9")
    assert "SG.k" not in repr(us)
    assert (us.name, us.max_per_call) == ("sendgrid", 1000)
    with pytest.raises(ValueError, match="api_key"):
        SendGridProvider(Account("sendgrid", {}))


SEGMENTS = [
    "<p>",
    "Hello ",
    "-bs",
    "%name% ",
    "é€𝄞",
    "\n",
    "x" * 300,
    "shared paragraph " * 40,
    "<a href='https://u.test/",
    "'>unsubscribe</a>",
]


@st.composite
def chunks(draw: st.DrawFn) -> list[Message]:
    count = draw(st.integers(1, 14))
    skeleton = draw(st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=8))
    messages = make(count, address=lambda i: f"user{draw(st.integers(0, count))}@example.com")
    for i, message in enumerate(messages):
        text = [draw(st.sampled_from([s, f"{s}{i}", ""])) for s in skeleton]
        if draw(st.integers(0, 9)) == 0:
            text.insert(draw(st.integers(0, len(text))), noise(random.Random(i), 11_000))
        html = "".join(text) if draw(st.booleans()) else None
        message.text = "".join(reversed(text)) or None
        message.html = html if html or message.text else "<p>only html</p>"
        message.subject = draw(st.sampled_from(["Hi", f"Hi {i}", "-bs -name-"]))
    return messages


@settings(max_examples=150, deadline=None)
@given(chunks())
def test_every_plan_is_valid_and_renders_each_message_exactly(messages: list[Message]) -> None:
    delivered: dict[str, Delivered] = {}
    for request in plan(messages, range(len(messages))):
        body = orjson.loads(request.body())
        assert check(body) == []
        for got in render(body, "id"):
            assert got.custom_args["ref"] not in delivered
            delivered[got.custom_args["ref"]] = got
    assert len(delivered) == len(messages)
    for message in messages:
        got = delivered[message.ref]
        assert (got.to, got.subject, got.headers) == (
            message.to_email,
            message.subject,
            message.headers,
        )
        assert (got.text, got.html) == (message.text or None, message.html or None)


# --- the credentials check (GET /v3/scopes) ----------------------------------------------


async def test_check_a_key_that_may_send() -> None:
    async with sendgrid() as (fake, provider):
        result = await provider.check()
        detail = checked(result, True, TEST_API_KEY, call="GET /v3/scopes")
        assert "mail.send" in detail
        (request,) = fake.received
        assert request.headers["Authorization"] == f"Bearer {TEST_API_KEY}"
        assert fake.delivered == []  # nothing sent


async def test_check_a_refused_key() -> None:
    async with sendgrid(client_key="SG.wrong-key-0123456789") as (_, provider):
        result = await provider.check()
    detail = checked(result, False, "SG.wrong-key-0123456789")
    assert detail == "the provider refused the API key (HTTP 401): authorization required"


async def test_check_a_key_without_mail_send() -> None:
    async with sendgrid(forbidden=True) as (_, provider):
        detail = checked(await provider.check(), False, TEST_API_KEY)
    assert "lacks the mail.send scope" in detail


async def test_check_answers_for_an_unreachable_or_failing_sendgrid() -> None:
    key = "SG.unreachable-key-0123456789"
    down = SendGridProvider(
        Account("sendgrid", {"api_key": key}, base_url=f"http://127.0.0.1:{closed_port()}")
    )
    async with closing(down):
        detail = checked(await down.check(), False, key)
    assert detail.endswith(": connection refused")
    async with sendgrid() as (fake, provider):
        fake.fail(503)
        detail = checked(await provider.check(), False, TEST_API_KEY)
    assert detail.startswith("the provider had an error; try again later (HTTP 503)")
