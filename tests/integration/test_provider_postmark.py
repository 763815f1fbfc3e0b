"""PostmarkProvider against the fake Postmark batch API (devkit.fakes.postmark) on
127.0.0.1: the request as Postmark documents it, per-message and request-level errors
mapped, splitting by count and size."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest

from devkit.fakes.postmark import TEST_SERVER_TOKEN, FakePostmark, serving
from providers.base import Account, Message
from providers.postmark import (
    DEFAULT_MESSAGE_STREAM,
    MAX_PER_CALL,
    SUPPRESS_PREFIX,
    PostmarkProvider,
    is_suppression,
    mailbox,
)
from tests import provider_support
from tests.provider_support import closed_port, closing

BATCH = "4f3c2a1e-8b7d-4c6a-9e5f-1a2b3c4d5e6f"


def make_messages(count: int, *, locals_: dict[int, str] | None = None) -> list[Message]:
    """``count`` messages; ``locals_`` gives some of them another local part (which the
    fake reads: inactive..., throttled..., invalid...)."""
    chosen = locals_ or {}
    return [
        Message(
            ref=f"{BATCH}:{i}",
            to_email=f"{chosen.get(i, f'user{i}')}@example.com",
            to_name=f"User {i}",
            from_email="news@sender.test",
            from_name="Sender, Inc.",
            subject=f"Hello {i}",
            html=f"<p>Hi {i}</p>",
            text=f"Hi {i}",
            headers={
                "List-Unsubscribe": f"<https://u.test/{i}>",
                "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
            },
        )
        for i in range(count)
    ]


def account(base_url: str, **credentials: str) -> Account:
    creds = {"server_token": TEST_SERVER_TOKEN} | credentials
    return Account("postmark", creds, base_url=base_url)


@asynccontextmanager
async def postmark(
    fake: FakePostmark | None = None, **options: Any
) -> AsyncIterator[tuple[FakePostmark, PostmarkProvider]]:
    credentials = options.pop("credentials", {})
    async with serving(fake) as (base_url, state):
        async with closing(
            PostmarkProvider(account(base_url, **credentials), **options)
        ) as provider:
            yield state, provider


def assert_no_secrets(results: list[Any], token: str = TEST_SERVER_TOKEN) -> None:
    provider_support.assert_no_secrets(results, token)


async def test_a_chunk_is_sent_as_postmark_documents() -> None:
    async with postmark() as (fake, provider):
        messages = make_messages(3)
        results = await provider.send(messages)

        assert [r.ref for r in results] == [m.ref for m in messages]
        assert all(r.ok and r.error is None for r in results)
        assert len({r.provider_message_id for r in results}) == 3
        (request,) = fake.requests()
        assert request.method == "POST" and request.status == 200
        assert request.headers["X-Postmark-Server-Token"] == TEST_SERVER_TOKEN
        assert request.headers["Accept"] == "application/json"
        assert request.headers["Content-Type"] == "application/json"
        first = request.json()[0]
        assert first == {
            "From": '"Sender, Inc." <news@sender.test>',
            "To": "User 0 <user0@example.com>",
            "Subject": "Hello 0",
            "MessageStream": DEFAULT_MESSAGE_STREAM,
            "Metadata": {"ref": f"{BATCH}:0"},
            "HtmlBody": "<p>Hi 0</p>",
            "TextBody": "Hi 0",
            "Headers": [
                {"Name": "List-Unsubscribe", "Value": "<https://u.test/0>"},
                {"Name": "List-Unsubscribe-Post", "Value": "List-Unsubscribe=One-Click"},
            ],
        }
        assert fake.sent_refs() == {m.ref: 1 for m in messages}


async def test_the_message_stream_is_an_account_setting() -> None:
    async with postmark(credentials={"message_stream": "newsletters"}) as (fake, provider):
        assert provider.message_stream == "newsletters"
        await provider.send(make_messages(1))
        assert fake.requests()[0].json()[0]["MessageStream"] == "newsletters"


def test_mailbox_quotes_names_that_need_it() -> None:
    assert mailbox(None, "a@b.test") == "a@b.test"
    assert mailbox("Ann", "a@b.test") == "Ann <a@b.test>"
    assert mailbox('Ann "The" Boss', "a@b.test") == '"Ann \\"The\\" Boss" <a@b.test>'
    assert mailbox("Zoë", "a@b.test") == "Zoë <a@b.test>"
    assert mailbox("Evil\r\nBcc: x@y", "a@b.test") == '"Evil Bcc: x@y" <a@b.test>'


async def test_per_message_failures_are_mapped() -> None:
    chosen = {1: "inactive.one", 2: "throttled.two", 3: "invalid.three"}
    async with postmark() as (fake, provider):
        results = await provider.send(make_messages(5, locals_=chosen))

        ok, inactive, throttled, invalid, ok_too = results
        assert ok.ok and ok_too.ok
        # 406: permanent, marked for suppression
        assert not inactive.ok and not inactive.retryable and is_suppression(inactive)
        assert inactive.error.startswith(SUPPRESS_PREFIX + "postmark: error 406 inactive")
        # 429: retryable, throttled
        assert throttled.retryable and throttled.throttled and not is_suppression(throttled)
        # 300: permanent
        assert not invalid.retryable and not invalid.throttled and not is_suppression(invalid)
        assert invalid.error.startswith("postmark: error 300 invalid email request")
        assert_no_secrets(results)
        assert fake.sent_refs() == {f"{BATCH}:0": 1, f"{BATCH}:4": 1}


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (10, "pause"),
        (400, "pause"),
        (401, "pause"),
        (405, "pause"),
        (412, "pause"),
        (413, "pause"),
        (100, "retry"),
        (429, "throttled"),
        (300, "permanent"),
        (402, "permanent"),
        (406, "suppress"),
        (9999, "permanent"),
    ],
)
async def test_request_level_422_is_mapped_by_its_error_code(code: int, kind: str) -> None:
    async with postmark() as (fake, provider):
        fake.fail(422, error_code=code)
        results = await provider.send(make_messages(2))
        assert len(results) == 2 and not any(r.ok for r in results)
        for result in results:
            assert result.error.startswith(
                (SUPPRESS_PREFIX if kind == "suppress" else "") + f"postmark: error {code} "
            )
            assert (result.pause_reason is not None) == (kind == "pause")
            assert result.pause_reason in (None, result.error)
            assert result.retryable == (kind in ("retry", "throttled"))
            assert result.throttled == (kind == "throttled")
            assert is_suppression(result) == (kind == "suppress")
            assert not result.hold
        assert_no_secrets(results)
        assert fake.sent == []


async def test_a_bad_token_pauses() -> None:
    async with serving() as (base_url, fake):
        provider = PostmarkProvider(account(base_url, server_token="pm-wrong-token-4242"))
        try:
            results = await provider.send(make_messages(2))
        finally:
            await provider.close()
        assert all(
            r.pause_reason and r.pause_reason.startswith("postmark: HTTP 401") for r in results
        )
        assert not any(r.retryable for r in results)
        assert_no_secrets(results, "pm-wrong-token-4242")
        assert fake.requests()[0].status == 401 and fake.sent == []


@pytest.mark.parametrize(
    ("status", "headers", "retry_after", "throttled"),
    [
        (429, {"Retry-After": "2"}, 2.0, True),
        (429, {}, None, True),
        (500, {}, None, False),
        (503, {"Retry-After": "7"}, 7.0, False),
    ],
)
async def test_retryable_request_errors(
    status: int, headers: dict[str, str], retry_after: float | None, throttled: bool
) -> None:
    async with postmark() as (fake, provider):
        fake.fail(status, headers=headers)
        results = await provider.send(make_messages(3))
        for result in results:
            assert not result.ok and result.retryable
            assert result.throttled == throttled
            assert result.retry_after == retry_after
            assert result.pause_reason is None and not result.hold
            assert result.error.startswith(f"postmark: HTTP {status}")
        # Sent again, the chunk goes through.
        assert all(r.ok for r in await provider.send(make_messages(3)))


async def test_other_http_errors_are_permanent() -> None:
    async with postmark() as (fake, provider):
        fake.fail(404)
        results = await provider.send(make_messages(2))
        assert all(not r.retryable and r.error.startswith("postmark: HTTP 404") for r in results)


async def test_payload_too_large_splits_the_request() -> None:
    async with postmark() as (fake, provider):
        fake.fail(413, times=1)
        messages = make_messages(6)
        results = await provider.send(messages)
        assert [r.ref for r in results] == [m.ref for m in messages]
        assert all(r.ok for r in results)
        assert [len(r.json()) if r.status == 200 else r.status for r in fake.requests()] == [
            413,
            3,
            3,
        ]
        assert fake.sent_refs() == {m.ref: 1 for m in messages}


async def test_one_message_too_large_fails_alone_on_413() -> None:
    async with postmark() as (fake, provider):
        fake.fail(413, times=1)
        (result,) = await provider.send(make_messages(1))
        assert not result.ok and not result.retryable
        assert result.error == "postmark: HTTP 413 message too large"


async def test_more_than_500_messages_are_split_in_order() -> None:
    async with postmark() as (fake, provider):
        messages = make_messages(1200)
        results = await provider.send(messages)
        assert [r.ref for r in results] == [m.ref for m in messages]
        assert all(r.ok for r in results)
        assert [len(r.json()) for r in fake.requests()] == [MAX_PER_CALL, MAX_PER_CALL, 200]
        assert fake.sent_refs() == {m.ref: 1 for m in messages}


async def test_requests_are_split_by_size() -> None:
    limit = 5_000
    async with postmark(FakePostmark(max_bytes=limit), max_request_bytes=limit) as (
        fake,
        provider,
    ):
        messages = make_messages(40)
        for message in messages:
            message.html = "<p>" + "x" * 400 + "</p>"
        results = await provider.send(messages)
        assert all(r.ok for r in results)
        requests = fake.requests()
        assert len(requests) > 1
        assert all(len(r.body) <= limit for r in requests)
        sent = [m["Metadata"]["ref"] for r in requests for m in r.json()]
        assert sent == [m.ref for m in messages]


async def test_a_message_too_large_for_any_request_fails_alone() -> None:
    async with postmark(max_request_bytes=4_000) as (fake, provider):
        messages = make_messages(3)
        messages[1].html = "x" * 5_000
        ok, too_large, ok_too = await provider.send(messages)
        assert ok.ok and ok_too.ok
        assert not too_large.ok and not too_large.retryable
        assert "too large" in too_large.error
        assert set(fake.sent_refs()) == {messages[0].ref, messages[2].ref}


async def test_an_unencodable_message_fails_alone() -> None:
    async with postmark() as (fake, provider):
        messages = make_messages(2)
        messages[0].html = "bad \ud800 surrogate"
        bad, good = await provider.send(messages)
        assert not bad.ok and not bad.retryable and bad.error.startswith("postmark: cannot encode")
        assert good.ok


async def test_a_malformed_answer_is_not_retried() -> None:
    async with postmark() as (fake, provider):
        fake.fail(200)  # an object, not the array of results
        results = await provider.send(make_messages(2))
        assert all(not r.ok and not r.retryable for r in results)
        assert "malformed" in results[0].error


async def test_network_failures_are_retryable_and_never_raise() -> None:
    port = closed_port()
    provider = PostmarkProvider(account(f"http://127.0.0.1:{port}"), timeout=2)
    try:
        results = await provider.send(make_messages(2))
    finally:
        await provider.close()
    assert all(not r.ok and r.retryable and r.error.startswith("postmark: ") for r in results)
    assert_no_secrets(results)


async def test_a_timeout_is_retryable() -> None:
    async with postmark(FakePostmark(latency=1.0), timeout=0.2) as (_fake, provider):
        results = await provider.send(make_messages(1))
        assert results[0].retryable and results[0].error.startswith("postmark: ")


async def test_nothing_to_send_sends_nothing_and_the_session_reopens() -> None:
    async with postmark() as (fake, provider):
        assert await provider.send([]) == []
        assert fake.requests() == []
        await provider.close()
        assert (await provider.send(make_messages(1)))[0].ok
        results = await asyncio.gather(*(provider.send(make_messages(2)) for _ in range(3)))
        assert all(r.ok for answer in results for r in answer)


def test_an_account_without_a_token_is_refused_and_the_token_never_shows() -> None:
    with pytest.raises(ValueError, match="server_token"):
        PostmarkProvider(Account("postmark", {}))
    provider = PostmarkProvider(Account("postmark", {"server_token": "pm-secret-777"}))
    assert "pm-secret-777" not in repr(provider)
    assert "api.postmarkapp.com/email/batch" in repr(provider)


async def test_the_fake_checks_requests() -> None:
    """What the fake refuses, as Postmark would (so the adapter's passing means
    something)."""
    import aiohttp

    async with serving() as (base_url, fake), aiohttp.ClientSession() as session:
        url = base_url + "/email/batch"
        good = {"X-Postmark-Server-Token": TEST_SERVER_TOKEN, "Accept": "application/json"}
        good |= {"Content-Type": "application/json"}

        async def post(body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
            async with session.post(url, data=body, headers=headers) as resp:
                return resp.status, orjson.loads(await resp.read())

        message = {"From": "a@b.test", "To": "c@d.test", "Subject": "s", "TextBody": "t"}
        assert (await post(orjson.dumps([message]), {}))[1]["ErrorCode"] == 10
        no_accept = {k: v for k, v in good.items() if k != "Accept"}
        assert (await post(orjson.dumps([message]), no_accept))[1]["ErrorCode"] == 409
        assert (await post(b"[", good))[1]["ErrorCode"] == 402
        assert (await post(b"{}", good))[1]["ErrorCode"] == 403
        assert (await post(orjson.dumps([message] * 501), good))[1]["ErrorCode"] == 410
        bad = [
            {k: v for k, v in message.items() if k != "TextBody"},
            message | {"Metadata": {"x" * 21: "v"}},
            message | {"Metadata": {"ref": "v" * 81}},
            message | {"Headers": {"Name": "X"}},
            message | {"To": "no-at-sign"},
        ]
        status, answer = await post(orjson.dumps(bad), good)
        assert status == 200 and [a["ErrorCode"] for a in answer] == [300] * 5
        assert fake.sent == []
        async with session.get(base_url + "/email") as resp:
            assert resp.status == 404


# --- the credentials check (GET /server) -------------------------------------------------


async def test_check_a_server_token_that_works() -> None:
    async with postmark(FakePostmark(server_name="Production")) as (fake, provider):
        result = await provider.check()
        detail = provider_support.checked(result, True, TEST_SERVER_TOKEN, call="GET /server")
        assert detail == "the server token works (server 'Production')"
        (request,) = fake.received
        assert request.headers["X-Postmark-Server-Token"] == TEST_SERVER_TOKEN
        assert request.headers["Accept"] == "application/json"
        assert fake.sent == []


async def test_check_a_refused_token_and_a_sandbox_server() -> None:
    async with postmark(credentials={"server_token": "pm-wrong-token-0123"}) as (_, provider):
        detail = provider_support.checked(await provider.check(), False, "pm-wrong-token-0123")
    assert detail == "Postmark refused the server token (HTTP 401)"
    async with postmark(FakePostmark(delivery_type="Sandbox")) as (_, provider):
        detail = provider_support.checked(await provider.check(), True, TEST_SERVER_TOKEN)
    assert "Sandbox server" in detail


async def test_check_an_unreachable_postmark() -> None:
    provider = PostmarkProvider(account(f"http://127.0.0.1:{closed_port()}"))
    async with closing(provider):
        detail = provider_support.checked(await provider.check(), False, TEST_SERVER_TOKEN)
    assert detail.endswith("connection refused")
