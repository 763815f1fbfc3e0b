"""MockProvider against the real mock provider server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

import devkit.mock_provider
from devkit.mock_provider import build_app
from engine.sender import BatchInfo, build_message
from engine.suppressions import links
from engine.templates import BatchTemplate
from providers.base import Message
from providers.mock import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    MockProvider,
    parse_retry_after,
    parse_webhook,
    sign,
    signed_headers,
    verify_signature,
)
from tests.integration.test_poison import capturing_provider


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """Run ``app`` on a free loopback port; yield its base URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def mock_provider(**options: Any) -> AsyncIterator[tuple[str, MockProvider]]:
    """A mock server built with ``options`` and a MockProvider pointed at it."""
    async with serving(build_app(**options)) as base_url:
        provider = MockProvider(base_url)
        try:
            yield base_url, provider
        finally:
            await provider.close()


def make_messages(count: int, *, prefix: str = "b1", domain: str = "example.com") -> list[Message]:
    return [
        Message(
            ref=f"{prefix}:{i}",
            to_email=f"user{i}@{domain}",
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


async def get_json(url: str) -> Any:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        assert resp.status == 200
        return orjson.loads(await resp.read())


async def post_json(url: str, data: bytes) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.post(url, data=data) as resp:
        return resp.status, orjson.loads(await resp.read())


async def webhooks_sent(base_url: str, count: int) -> dict[str, Any]:
    """Poll the mock's stats until ``count`` webhook events were delivered (5 s at most)."""
    for _ in range(250):
        stats = await get_json(f"{base_url}/v1/stats")
        if stats["webhooks_sent"] >= count:
            return stats
        await asyncio.sleep(0.02)
    pytest.fail(f"{count} webhook events were not delivered in time")


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_all_accepted_and_counted_once() -> None:
    async with mock_provider() as (base_url, provider):
        messages = make_messages(250)
        chunks = [
            messages[i : i + provider.max_per_call] for i in range(0, 250, provider.max_per_call)
        ]
        answers = await asyncio.gather(*(provider.send(chunk) for chunk in chunks))
        results = [result for answer in answers for result in answer]

        assert [r.ref for r in results] == [m.ref for m in messages]
        assert all(r.ok and r.error is None for r in results)
        ids = {r.provider_message_id for r in results}
        assert len(ids) == 250 and None not in ids

        stats = await get_json(f"{base_url}/v1/stats")
        assert stats["requests"] == 3
        assert (stats["accepted"], stats["unique"], stats["duplicates"]) == (250, 250, 0)
        assert sum(stats["per_second"].values()) == 250
        received = await get_json(f"{base_url}/v1/received")
        assert received["refs"] == {m.ref: 1 for m in messages}

        samples = await get_json(f"{base_url}/v1/samples")
        by_ref = {s["ref"]: s for s in samples}
        assert by_ref["b1:7"]["subject"] == "Hello 7"
        assert by_ref["b1:7"]["to"] == "user7@example.com"
        assert by_ref["b1:7"]["headers"] == {"List-Unsubscribe": "<https://u.test/7>"}


async def test_invalid_domain_rejected_permanently() -> None:
    async with mock_provider() as (base_url, provider):
        good = make_messages(2, prefix="ok")
        bad = make_messages(2, prefix="bad", domain="invalid.test")
        results = await provider.send([good[0], bad[0], good[1], bad[1]])

        assert [r.ref for r in results] == ["ok:0", "bad:0", "ok:1", "bad:1"]
        assert [r.ok for r in results] == [True, False, True, False]
        for rejected in (results[1], results[3]):
            assert rejected.retryable is False
            assert rejected.error == "mailbox does not exist"
        stats = await get_json(f"{base_url}/v1/stats")
        assert (stats["accepted"], stats["rejected"]) == (2, 2)


async def test_failure_rate_one_gives_retryable_results() -> None:
    async with mock_provider(failure_rate=1.0, seed=7) as (base_url, provider):
        answers = [await provider.send(make_messages(3, prefix=f"f{i}")) for i in range(5)]

        for answer in answers:
            assert all(not r.ok and r.retryable for r in answer)
        assert all(r.retry_after is None for answer in answers[:4] for r in answer)
        assert all(r.retry_after == 1.0 for r in answers[4])  # every 5th failure is a 429
        stats = await get_json(f"{base_url}/v1/stats")
        assert (stats["failed_requests"], stats["accepted"], stats["unique"]) == (5, 0, 0)


async def test_latency_is_honoured() -> None:
    async with mock_provider(latency_ms=100) as (_, provider):
        started = time.monotonic()
        results = await provider.send(make_messages(2))
        assert time.monotonic() - started >= 0.095
        assert all(r.ok for r in results)


async def test_duplicates_counted_when_ref_sent_twice() -> None:
    async with mock_provider() as (base_url, provider):
        messages = make_messages(10)
        await provider.send(messages)
        await provider.send(messages[:4])

        stats = await get_json(f"{base_url}/v1/stats")
        assert (stats["accepted"], stats["unique"], stats["duplicates"]) == (14, 10, 4)
        refs = (await get_json(f"{base_url}/v1/received"))["refs"]
        assert [refs[m.ref] for m in messages] == [2] * 4 + [1] * 6


async def test_reset_clears_recording() -> None:
    async with mock_provider() as (base_url, provider):
        await provider.send(make_messages(5))
        status, _ = await post_json(f"{base_url}/v1/reset", b"")
        assert status == 200

        stats = await get_json(f"{base_url}/v1/stats")
        assert stats["requests"] == stats["accepted"] == stats["unique"] == 0
        assert stats["per_second"] == {}
        assert (await get_json(f"{base_url}/v1/received"))["refs"] == {}
        assert await get_json(f"{base_url}/v1/samples") == []


async def test_config_changes_behaviour_at_runtime() -> None:
    async with mock_provider() as (base_url, provider):
        status, body = await post_json(f"{base_url}/v1/config", b'{"failure_rate": 1.0}')
        assert status == 200 and body["failure_rate"] == 1.0
        assert all(r.retryable and not r.ok for r in await provider.send(make_messages(2)))

        await post_json(f"{base_url}/v1/config", b'{"failure_rate": 0, "latency_ms": 0}')
        assert all(r.ok for r in await provider.send(make_messages(2)))

        status, body = await post_json(f"{base_url}/v1/config", b'{"failure_rate": 2}')
        assert status == 400 and "failure_rate" in body["error"]


async def test_health() -> None:
    async with mock_provider() as (base_url, _):
        assert (await get_json(f"{base_url}/health"))["status"] == "ok"


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"messages": {}}',
        b'{"messages": [1]}',
        b'{"messages": [{"ref": "a"}]}',
        b'{"messages": [{"ref": "", "to": "a@b.test"}]}',
        b'{"messages": [{"ref": "a", "to": "a@b.test", "headers": []}]}',
    ],
)
async def test_malformed_send_body_is_400(body: bytes) -> None:
    async with mock_provider() as (base_url, _):
        status, answer = await post_json(f"{base_url}/v1/send", body)
        assert status == 400 and answer["error"]
        stats = await get_json(f"{base_url}/v1/stats")
        assert (stats["bad_requests"], stats["accepted"]) == (1, 0)


async def test_other_4xx_is_permanent() -> None:
    async with mock_provider() as (base_url, _):
        provider = MockProvider(f"{base_url}/no-such-prefix")
        try:
            results = await provider.send(make_messages(2))
        finally:
            await provider.close()
        assert all(not r.ok and not r.retryable and "404" in (r.error or "") for r in results)


async def test_connection_refused_is_retryable() -> None:
    provider = MockProvider(f"http://127.0.0.1:{closed_port()}")
    try:
        results = await provider.send(make_messages(3))
    finally:
        await provider.close()
    assert all(not r.ok and r.retryable and r.error for r in results)


async def test_timeout_is_retryable() -> None:
    async with serving(build_app(latency_ms=300)) as base_url:
        provider = MockProvider(base_url, timeout=0.05)
        try:
            results = await provider.send(make_messages(2))
        finally:
            await provider.close()
    assert all(not r.ok and r.retryable for r in results)


async def test_empty_batch_sends_nothing() -> None:
    async with mock_provider() as (base_url, provider):
        assert await provider.send([]) == []
        assert (await get_json(f"{base_url}/v1/stats"))["requests"] == 0


async def test_header_values_on_the_wire_are_safe() -> None:
    """Issue 8, defect 1, for a provider that takes JSON: the header values of a message
    the engine builds (``engine.sender.build_message``) are one line on the wire, no
    encoded word hiding CR LF, so the provider cannot be made to write another header."""
    injection = "=?utf-8?q?Ann=0D=0AX-Injected:_x?="
    template = BatchTemplate("Hi {{ first }}", None, "a\nb")
    info = BatchInfo("0b0e6a52-5c4c-4f7e-9d8c-5f3c1e2a9b10", "acme", "mock", "news@sender.test",
                     "Shop", template, False, "queued", 0, None, 0.0)  # fmt: skip
    row = {"seq": 1, "email": "ann@example.com", "name": f"Ann\r\n{injection}",
           "vars": {"first": injection}}  # fmt: skip
    message = build_message(info, row, links("https://bs.example", "s" * 32, info.id))
    async with capturing_provider() as (base_url, wire):
        provider = MockProvider(base_url)
        try:
            [result] = await provider.send([message])
        finally:
            await provider.close()
    assert result.ok
    [sent] = wire
    assert sent["subject"] == "Hi Ann X-Injected: x"
    assert sent["to_name"] == "Ann Ann X-Injected: x"
    assert sent["text"] == "a\nb"  # bodies are not headers
    assert all(v.isprintable() and "=?" not in v for v in sent["headers"].values())


def test_parse_retry_after() -> None:
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


class WebhookReceiver:
    """A loopback HTTP endpoint recording webhook posts; the first ``fail_first`` get 500."""

    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.attempts = 0
        self.posts: list[tuple[bytes, dict[str, str]]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        body = await request.read()
        if self.attempts <= self.fail_first:
            return web.Response(status=500)
        signed = {h: request.headers[h] for h in (SIGNATURE_HEADER, TIMESTAMP_HEADER)
                  if h in request.headers}  # fmt: skip
        self.posts.append((body, signed))
        return web.Response(status=204)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/hooks", self.handle)
        return app

    def event_count(self) -> int:
        return sum(len(parse_webhook(body)) for body, _ in self.posts)


async def test_webhooks_are_signed_and_verify() -> None:
    receiver = WebhookReceiver()
    async with serving(receiver.app()) as hook_url:
        options = {"webhook_url": f"{hook_url}/hooks", "webhook_secret": "s3cret"}
        async with mock_provider(**options) as (base_url, provider):
            messages = make_messages(3)
            messages[1].to_email = "bounce-7@example.com"
            messages[2].to_email = "Complaint@example.com"
            results = await provider.send(messages)
            stats = await webhooks_sent(base_url, 3)

    assert stats["webhooks_sent"] == receiver.event_count() == 3
    body, headers = receiver.posts[0]
    signed = verify_signature(body, headers, "s3cret")
    assert signed is not None and abs(signed.timestamp - time.time()) < 60
    assert signed.signature == headers[SIGNATURE_HEADER]
    assert verify_signature(body + b" ", headers, "s3cret") is None
    assert verify_signature(body.replace(b"delivered", b"bounced"), headers, "s3cret") is None
    assert verify_signature(body, headers, "other-secret") is None
    assert verify_signature(body, {SIGNATURE_HEADER: headers[SIGNATURE_HEADER]}, "s3cret") is None
    later = {**headers, TIMESTAMP_HEADER: str(int(headers[TIMESTAMP_HEADER]) + 1)}
    assert verify_signature(body, later, "s3cret") is None  # the timestamp is signed too

    events = {e.ref: e for e in parse_webhook(body)}
    assert {ref: e.event for ref, e in events.items()} == {
        "b1:0": "delivered",
        "b1:1": "bounced",
        "b1:2": "complained",
    }
    for result in results:
        event = events[result.ref]
        assert event.provider_message_id == result.provider_message_id
        assert event.event_id and event.timestamp > 0
    assert events["b1:1"].email == "bounce-7@example.com"


async def test_webhooks_retried_after_receiver_failure() -> None:
    receiver = WebhookReceiver(fail_first=2)
    async with serving(receiver.app()) as hook_url:
        async with mock_provider(webhook_url=f"{hook_url}/hooks") as (base_url, provider):
            await provider.send(make_messages(4))
            stats = await webhooks_sent(base_url, 4)
    assert receiver.attempts >= 3 and receiver.event_count() == 4
    assert (stats["webhooks_sent"], stats["webhooks_dropped"]) == (4, 0)
    body, headers = receiver.posts[0]
    assert verify_signature(body, headers, "mock-secret")  # signed again for the retry


async def test_webhooks_beyond_cap_are_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devkit.mock_provider, "MAX_PENDING_WEBHOOKS", 5)
    unreachable = f"http://127.0.0.1:{closed_port()}/hooks"
    async with mock_provider(webhook_url=unreachable) as (base_url, provider):
        await provider.send(make_messages(12))
        stats = await get_json(f"{base_url}/v1/stats")
    assert stats["webhooks_dropped"] == 7
    assert stats["webhooks_pending"] == 5
    assert stats["webhooks_sent"] == 0


def test_sign_format() -> None:
    signature = sign(b"[]", "k", 1700000000)
    assert signature.startswith("sha256=") and len(signature) == 7 + 64
    assert signature != sign(b"[]", "k", 1700000001)
    headers = signed_headers(b"[]", "k", 1700000000)
    assert headers == {TIMESTAMP_HEADER: "1700000000", SIGNATURE_HEADER: signature}
    assert verify_signature(b"[]", headers, "k") is not None
    assert abs(int(signed_headers(b"[]", "k")[TIMESTAMP_HEADER]) - time.time()) < 5


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {SIGNATURE_HEADER: "", TIMESTAMP_HEADER: "1700000000"},
        {SIGNATURE_HEADER: "sha256=\u00e9", TIMESTAMP_HEADER: "1700000000"},
        # non-UTF-8 bytes as aiohttp hands them over (surrogate escapes): refused, no error
        {
            SIGNATURE_HEADER: b"sha256=\xff".decode("utf-8", "surrogateescape"),
            TIMESTAMP_HEADER: "1700000000",
        },
        {SIGNATURE_HEADER: "sha256=00", TIMESTAMP_HEADER: "1700000000"},
        {TIMESTAMP_HEADER: "1700000000"},
        {**signed_headers(b"[]", "k", 1700000000), TIMESTAMP_HEADER: "soon"},
        {**signed_headers(b"[]", "k", 1700000000), TIMESTAMP_HEADER: "\u0661\u0667"},
        {**signed_headers(b"[]", "k", 1700000000), TIMESTAMP_HEADER: "1" * 40},
    ],
)
def test_verify_signature_refuses_missing_or_malformed_headers(headers: dict[str, str]) -> None:
    assert verify_signature(b"[]", headers, "k") is None


def test_parse_webhook_accepts_valid_events() -> None:
    body = orjson.dumps(
        [
            {
                "event_id": "e1",
                "event": "delivered",
                "ref": "b:1",
                "message_id": "m1",
                "email": "a@b.test",
                "timestamp": 1700000000,
            },
            {"event_id": "e2", "event": "bounced", "ref": "b:2", "timestamp": 1.5},
        ]
    )
    first, second = parse_webhook(body)
    assert (first.ref, first.event, first.provider_message_id) == ("b:1", "delivered", "m1")
    assert first.timestamp == 1700000000.0 and first.event_id == "e1"
    assert (second.provider_message_id, second.email) == (None, None)


_VALID_EVENT = {"event_id": "e", "event": "delivered", "ref": "r", "timestamp": 1.0}


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"event": "delivered"}', "array"),
        (b"[1]", "object"),
        (orjson.dumps([{**_VALID_EVENT, "ref": None}]), "'ref'"),
        (orjson.dumps([{k: v for k, v in _VALID_EVENT.items() if k != "event_id"}]), "event_id"),
        (orjson.dumps([{**_VALID_EVENT, "event": "exploded"}]), "unknown event type"),
        (orjson.dumps([{**_VALID_EVENT, "timestamp": "now"}]), "timestamp"),
        (orjson.dumps([{**_VALID_EVENT, "timestamp": True}]), "timestamp"),
        (orjson.dumps([_VALID_EVENT, {**_VALID_EVENT, "email": 5}]), "event 1: 'email'"),
    ],
)
def test_parse_webhook_rejects_malformed_input(body: bytes, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_webhook(body)


async def test_check_is_the_servers_health() -> None:
    async with mock_provider() as (_, provider):
        result = await provider.check()
    assert result.ok and result.call == "GET /health", result
    assert "needs no credentials" in result.detail
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    down = MockProvider(f"http://127.0.0.1:{port}")
    try:
        result = await down.check()
    finally:
        await down.close()
    assert not result.ok and result.detail == f"127.0.0.1:{port}: connection refused"


async def test_check_reads_no_more_than_a_mebibyte() -> None:
    async def huge(_: web.Request) -> web.Response:
        return web.Response(body=b"x" * (3 << 20))

    app = web.Application()
    app.router.add_get("/health", huge)
    async with serving(app) as base_url:
        provider = MockProvider(base_url)
        try:
            result = await provider.check()
        finally:
            await provider.close()
    assert not result.ok and result.detail == "the answer is larger than 1048576 bytes"
