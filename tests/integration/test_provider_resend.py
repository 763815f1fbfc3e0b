"""ResendProvider against the fake Resend batch API (devkit.fakes.resend) on 127.0.0.1:
the request as Resend documents it, idempotency (a chunk sent twice is sent once),
permissive partial failures, and every documented error mapped."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson
import pytest

from devkit.fakes.resend import TEST_API_KEY, FakeResend, serving
from providers.base import Account, Message
from providers.resend import MAX_PER_CALL, ResendProvider, decode_ref, idempotency_key
from tests import provider_support
from tests.provider_support import closed_port, closing

BATCH = "4f3c2a1e-8b7d-4c6a-9e5f-1a2b3c4d5e6f"


def make_messages(count: int, *, prefix: str = BATCH, bad: set[int] = frozenset()) -> list[Message]:
    """``count`` messages; those in ``bad`` go to an address the fake finds invalid."""
    return [
        Message(
            ref=f"{prefix}:{i}",
            to_email=f"{'invalid' if i in bad else 'user'}{i}@example.com",
            to_name=f"User {i}",
            from_email="news@sender.test",
            from_name="Sender",
            subject=f"Hello {i}",
            html=f"<p>Hi {i}</p>",
            text=f"Hi {i}",
            headers={"List-Unsubscribe": f"<https://u.test/{i}>"},
        )
        for i in range(count)
    ]


@asynccontextmanager
async def resend(
    fake: FakeResend | None = None, **options: Any
) -> AsyncIterator[tuple[FakeResend, ResendProvider]]:
    async with serving(fake) as (base_url, state):
        async with closing(
            ResendProvider(
                Account("resend", {"api_key": TEST_API_KEY}, base_url=base_url), **options
            )
        ) as provider:
            yield state, provider


def assert_no_secrets(results: list[Any], key: str = TEST_API_KEY) -> None:
    provider_support.assert_no_secrets(results, key)


async def test_a_chunk_is_sent_as_resend_documents() -> None:
    async with resend() as (fake, provider):
        messages = make_messages(3)
        results = await provider.send(messages)

        assert [r.ref for r in results] == [m.ref for m in messages]
        assert all(r.ok and r.error is None for r in results)
        assert len({r.provider_message_id for r in results}) == 3
        (request,) = fake.requests()
        assert request.method == "POST" and request.status == 200
        assert request.headers["Authorization"] == f"Bearer {TEST_API_KEY}"
        assert request.headers["Content-Type"] == "application/json"
        assert request.headers["x-batch-validation"] == "permissive"
        assert request.headers["Idempotency-Key"] == idempotency_key([m.ref for m in messages])
        first = request.json()[0]
        assert first == {
            "from": "Sender <news@sender.test>",
            "to": ["user0@example.com"],
            "subject": "Hello 0",
            "tags": [{"name": "ref", "value": f"{BATCH}_0"}],
            "html": "<p>Hi 0</p>",
            "text": "Hi 0",
            "headers": {"List-Unsubscribe": "<https://u.test/0>"},
        }
        assert decode_ref("ref", first["tags"][0]["value"]) == messages[0].ref
        assert fake.sent_refs() == {f"{BATCH}_{i}": 1 for i in range(3)}


async def test_the_same_chunk_twice_is_sent_once() -> None:
    async with resend() as (fake, provider):
        messages = make_messages(5)
        first = await provider.send(messages)
        second = await provider.send(make_messages(5))  # the chunk redelivered

        assert all(r.ok for r in first + second)
        assert [r.provider_message_id for r in second] == [r.provider_message_id for r in first]
        assert len(fake.requests()) == 2
        assert len(fake.sent) == 5
        assert set(fake.sent_refs().values()) == {1}


async def test_another_chunk_or_generation_is_another_key() -> None:
    async with resend() as (fake, provider):
        messages = make_messages(4)
        await provider.send(messages)
        await provider.send(messages[:3])  # the engine retrying part of a chunk
        await provider.send(messages, generation="2")  # sent again on purpose
        keys = [r.headers["Idempotency-Key"] for r in fake.requests()]
        assert len(set(keys)) == 3
        assert len(fake.sent) == 4 + 3 + 4


async def test_the_same_key_with_another_body_fails_permanently() -> None:
    async with resend() as (fake, provider):
        await provider.send(make_messages(2))
        changed = make_messages(2)
        changed[1].subject = "Changed"
        results = await provider.send(changed)
        assert all(not r.ok and not r.retryable for r in results)
        assert results[0].error.startswith("resend: HTTP 409 invalid_idempotent_request")
        assert "already sent" in results[0].error
        assert len(fake.sent) == 2


async def test_concurrent_requests_with_one_key_send_once() -> None:
    async with resend(FakeResend(latency=0.3)) as (fake, provider):
        messages = make_messages(2)
        one, two = await asyncio.gather(provider.send(messages), provider.send(messages))
        answers = sorted([one, two], key=lambda results: results[0].ok)
        refused, sent = answers
        assert all(r.ok for r in sent)
        assert all(not r.ok and r.retryable for r in refused)
        assert refused[0].error.startswith("resend: HTTP 409 concurrent_idempotent_requests")
        assert refused[0].retry_after == 1.0
        assert len(fake.sent) == 2
        # Retried, it gets the first answer.
        again = await provider.send(messages)
        assert [r.provider_message_id for r in again] == [r.provider_message_id for r in sent]


async def test_invalid_emails_fail_alone_in_permissive_mode() -> None:
    async with resend() as (fake, provider):
        messages = make_messages(5, bad={1, 3})
        results = await provider.send(messages)
        assert [r.ok for r in results] == [True, False, True, False, True]
        assert all(not r.retryable for r in results)
        assert results[1].error.startswith("resend: refused: Invalid `to` field")
        assert_no_secrets(results)
        ids = [r.provider_message_id for r in results if r.ok]
        assert len(set(ids)) == 3 and None not in ids
        assert fake.sent_refs() == {f"{BATCH}_{i}": 1 for i in (0, 2, 4)}


@pytest.mark.parametrize(
    ("headers", "retry_after"),
    [({"retry-after": "3"}, 3.0), ({}, 1.0), ({"ratelimit-reset": "5"}, 5.0)],
)
async def test_rate_limited_is_retryable_and_throttled(
    headers: dict[str, str], retry_after: float
) -> None:
    async with resend() as (fake, provider):
        fake.fail(429, "rate_limit_exceeded", headers=headers)
        results = await provider.send(make_messages(2))
        for result in results:
            assert not result.ok and result.retryable and result.throttled
            assert result.retry_after == retry_after
            assert not result.hold and result.pause_reason is None
            assert result.error.startswith("resend: HTTP 429 rate_limit_exceeded")
        assert fake.sent == []
        assert all(r.ok for r in await provider.send(make_messages(2)))  # the retry


async def test_the_daily_quota_holds() -> None:
    async with resend() as (fake, provider):
        fake.fail(429, "daily_quota_exceeded", headers={"retry-after": "3600"})
        results = await provider.send(make_messages(2))
        for result in results:
            assert not result.ok and result.hold
            assert not result.retryable and not result.throttled
            assert result.retry_after == 3600.0
            assert result.error.startswith("resend: HTTP 429 daily_quota_exceeded")


@pytest.mark.parametrize(
    ("status", "name"),
    [
        (429, "monthly_quota_exceeded"),
        (401, "missing_api_key"),
        (401, "restricted_api_key"),
        (403, "invalid_api_key"),
        (403, "validation_error"),  # "You can only send testing emails to ..."
    ],
)
async def test_account_errors_pause(status: int, name: str) -> None:
    async with resend() as (fake, provider):
        fake.fail(status, name, message="You can only send testing emails to me@own.test")
        results = await provider.send(make_messages(2))
        for result in results:
            assert not result.ok and not result.retryable and not result.hold
            assert result.pause_reason == result.error
            assert result.error.startswith(f"resend: HTTP {status} {name}")
        assert_no_secrets(results)


async def test_a_wrong_key_pauses_and_never_shows() -> None:
    async with serving() as (base_url, fake):
        provider = ResendProvider(
            Account("resend", {"api_key": "re_wrong_9999"}, base_url=base_url)
        )
        try:
            results = await provider.send(make_messages(1))
        finally:
            await provider.close()
        assert results[0].pause_reason.startswith("resend: HTTP 403 invalid_api_key")
        assert_no_secrets(results, "re_wrong_9999")
        assert fake.sent == []


@pytest.mark.parametrize(
    ("status", "name", "retryable"),
    [
        (422, "validation_error", False),
        (422, "invalid_from_address", False),
        (400, "invalid_idempotency_key", False),
        (451, "security_error", False),
        (404, "not_found", False),
        (500, "application_error", True),
        (500, "internal_server_error", True),
        (503, "", True),
    ],
)
async def test_other_errors(status: int, name: str, retryable: bool) -> None:
    async with resend() as (fake, provider):
        fake.fail(status, name, message="Invalid `from` field: bad@sender.test")
        results = await provider.send(make_messages(2))
        for result in results:
            assert not result.ok and result.retryable == retryable
            assert not result.throttled and not result.hold and result.pause_reason is None
            assert result.error.startswith(f"resend: HTTP {status}")
        assert_no_secrets(results)


async def test_more_than_100_messages_are_split_with_their_own_keys() -> None:
    async with resend() as (fake, provider):
        messages = make_messages(250)
        results = await provider.send(messages)
        assert [r.ref for r in results] == [m.ref for m in messages]
        assert all(r.ok for r in results)
        requests = fake.requests()
        assert [len(r.json()) for r in requests] == [MAX_PER_CALL, MAX_PER_CALL, 50]
        assert len({r.headers["Idempotency-Key"] for r in requests}) == 3
        assert len(fake.sent) == 250


async def test_an_unencodable_message_fails_alone() -> None:
    async with resend() as (fake, provider):
        messages = make_messages(3)
        messages[1].text = "bad \udc00 surrogate"
        ok, bad, ok_too = await provider.send(messages)
        assert ok.ok and ok_too.ok
        assert not bad.ok and not bad.retryable and bad.error.startswith("resend: cannot encode")
        assert len(fake.requests()[0].json()) == 2


async def test_a_malformed_answer_is_retried_safely() -> None:
    async with resend() as (fake, provider):
        fake.fail(200, "odd")  # {"statusCode", "name", "message"}: no data
        results = await provider.send(make_messages(2))
        assert all(not r.ok and r.retryable and "malformed" in r.error for r in results)


async def test_network_failures_are_retryable_and_never_raise() -> None:
    port = closed_port()
    provider = ResendProvider(
        Account("resend", {"api_key": TEST_API_KEY}, base_url=f"http://127.0.0.1:{port}"),
        timeout=2,
    )
    try:
        results = await provider.send(make_messages(2))
    finally:
        await provider.close()
    assert all(not r.ok and r.retryable and r.error.startswith("resend: ") for r in results)
    assert_no_secrets(results)


async def test_a_timeout_is_retryable_and_the_retry_sends_nothing_twice() -> None:
    fake = FakeResend(latency=0.5)
    async with resend(fake, timeout=0.2) as (_fake, provider):
        messages = make_messages(2)
        results = await provider.send(messages)
        assert all(r.retryable for r in results)
        await asyncio.sleep(0.5)  # the fake finished the first request meanwhile
        fake.latency = 0
        again = await provider.send(messages)
        assert all(r.ok for r in again)
        assert len(fake.sent) == 2


async def test_nothing_to_send_sends_nothing() -> None:
    async with resend() as (fake, provider):
        assert await provider.send([]) == []
        assert fake.requests() == []


def test_an_account_without_a_key_is_refused_and_the_key_never_shows() -> None:
    with pytest.raises(ValueError, match="api_key"):
        ResendProvider(Account("resend", {}))
    provider = ResendProvider(Account("resend", {"api_key": "re_secret_777"}))
    assert "re_secret_777" not in repr(provider)


async def test_the_fake_checks_requests() -> None:
    """What the fake refuses, as Resend would (so the adapter's passing means
    something)."""
    async with serving() as (base_url, fake), aiohttp.ClientSession() as session:
        url = base_url + "/emails/batch"
        good = {"Authorization": f"Bearer {TEST_API_KEY}", "Content-Type": "application/json"}
        good |= {"Idempotency-Key": "k-1"}

        async def post(body: Any, headers: dict[str, str]) -> tuple[int, Any]:
            data = body if isinstance(body, bytes) else orjson.dumps(body)
            async with session.post(url, data=data, headers=headers) as resp:
                assert resp.headers["ratelimit-limit"]
                return resp.status, orjson.loads(await resp.read())

        email = {"from": "a@b.test", "to": ["c@d.test"], "subject": "s", "text": "t"}
        assert (await post([email], {}))[1]["name"] == "missing_api_key"
        assert (await post([email], good | {"Authorization": "Bearer x"}))[1]["name"] == (
            "invalid_api_key"
        )
        no_key = {k: v for k, v in good.items() if k != "Idempotency-Key"}
        assert (await post([email], no_key))[1]["name"] == "invalid_idempotency_key"
        assert (await post([email], good | {"Idempotency-Key": "k" * 257}))[0] == 400
        assert (await post([email] * 101, good | {"Idempotency-Key": "k-2"}))[0] == 422
        assert (await post(b"[", good | {"Idempotency-Key": "k-3"}))[0] == 422
        bad_tag = email | {"tags": [{"name": "ref", "value": "a:b"}]}
        status, answer = await post([bad_tag], good | {"Idempotency-Key": "k-4"})
        assert status == 422 and answer["name"] == "validation_error"  # strict by default
        status, answer = await post([email], good)
        assert status == 200 and len(answer["data"]) == 1 and "errors" not in answer
        assert (await post([email], good))[1] == answer  # replayed, not sent again
        assert (await post([email, email], good))[1]["name"] == "invalid_idempotent_request"
        assert len(fake.sent) == 1


# --- the credentials check (GET /domains) ------------------------------------------------


async def test_check_a_full_access_key() -> None:
    fake = FakeResend(domains={"example.test": "verified", "new.example.test": "pending"})
    async with resend(fake) as (fake, provider):
        result = await provider.check()
        detail = provider_support.checked(result, True, TEST_API_KEY, call="GET /domains")
        assert detail == "the API key works (full access); 1 of 2 domains verified"
        (request,) = fake.received
        assert request.headers["Authorization"] == f"Bearer {TEST_API_KEY}"
        assert fake.sent == []


async def test_check_a_sending_access_key_is_ok_with_a_note() -> None:
    fake = FakeResend(api_key="re_full_access_9876543210", restricted_api_keys={TEST_API_KEY})
    async with resend(fake) as (fake, provider):
        detail = provider_support.checked(await provider.check(), True, TEST_API_KEY)
        assert "sending access only" in detail
        (result,) = await provider.send(make_messages(1))  # and it does send
        assert result.ok, result.error


async def test_check_a_refused_key() -> None:
    async with resend(FakeResend(api_key="re_another_key_0123456789")) as (_, provider):
        detail = provider_support.checked(await provider.check(), False, TEST_API_KEY)
    assert detail == (
        "the provider refused access with the API key (HTTP 403): invalid_api_key: API key "
        "is invalid."
    )


async def test_check_an_unreachable_resend() -> None:
    provider = ResendProvider(
        Account("resend", {"api_key": TEST_API_KEY}, base_url=f"http://127.0.0.1:{closed_port()}")
    )
    async with closing(provider):
        detail = provider_support.checked(await provider.check(), False, TEST_API_KEY)
    assert detail.endswith("connection refused")
