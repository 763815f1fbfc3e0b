"""``POST /webhooks/{provider}`` on the real API, NATS and Dragonfly: signatures over a
timestamp and the body, a ±5 minute window, replays refused, the mock's route only where
the mock provider is enabled."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid

import orjson
from aiohttp.test_utils import TestClient, TestServer

from api.app import create_app
from engine import results, webhooks
from engine.config import Settings
from engine.services import Services
from providers.mock import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign, signed_headers
from tests.integration.conftest import bearer
from tests.integration.test_api import create_json, error_body


async def results_last_seq(services: Services) -> int:
    return (await services.js.stream_info(services.topology.results_stream)).state.last_seq


def webhook_events(batch_id: str, *events: tuple[int, str]) -> bytes:
    return orjson.dumps(
        [
            {"event": event, "ref": f"{batch_id}:{seq}", "message_id": f"pm-{seq}",
             "email": f"P{seq}@Example.com", "timestamp": time.time(),
             "event_id": str(uuid.uuid4())}
            for seq, event in events
        ]
    )  # fmt: skip


async def raw_post(client: TestClient, path: str, header_lines: bytes, body: bytes) -> bytes:
    """Post with header bytes exactly as given (a client library would refuse non-UTF-8)."""
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(
        b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        + header_lines + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )  # fmt: skip
    await writer.drain()
    answer = await reader.read()
    writer.close()
    return answer


async def test_webhook_with_valid_signature_lands_on_results(
    client: TestClient, services: Services, migrated: Settings, tenant: tuple[str, str]
) -> None:
    _, key = tenant
    created = await create_json(client, key)
    body = webhook_events(created["id"], (1, "delivered"), (3, "bounced"))
    before = await results_last_seq(services)

    response = await client.post(
        "/webhooks/mock",
        data=body,
        headers={**signed_headers(body, migrated.mock_webhook_secret),
                 "Content-Type": "application/json"},
    )  # fmt: skip
    assert response.status == 200, await response.text()
    assert await response.json() == {"accepted": 2, "ignored": 0}

    assert await results_last_seq(services) == before + 1
    message = await services.js.get_msg(services.topology.results_stream, before + 1)
    decoded = results.decode(message.data)
    assert decoded.provider == "mock"
    assert [
        (r.batch_id, r.seq, r.status, r.provider_message_id, r.domain) for r in decoded.rows
    ] == [
        (created["id"], 1, "delivered", "pm-1", "example.com"),
        (created["id"], 3, "bounced", "pm-3", "example.com"),
    ]

    # The provider retrying the same events (signed again, a second later) is accepted
    # and de-duplicated by the stream.
    retry = await client.post(
        "/webhooks/mock", data=body,
        headers=signed_headers(body, migrated.mock_webhook_secret, int(time.time()) + 1),
    )  # fmt: skip
    assert retry.status == 200
    assert await results_last_seq(services) == before + 1


async def test_a_replayed_post_is_refused(
    client: TestClient, services: Services, migrated: Settings, tenant: tuple[str, str]
) -> None:
    _, key = tenant
    created = await create_json(client, key)
    body = webhook_events(created["id"], (2, "delivered"))
    headers = signed_headers(body, migrated.mock_webhook_secret)
    assert (await client.post("/webhooks/mock", data=body, headers=headers)).status == 200
    after_first = await results_last_seq(services)
    for _ in range(2):  # the very same post again: signature, timestamp and body
        replay = await client.post("/webhooks/mock", data=body, headers=headers)
        await error_body(replay, 401, "replayed_signature")
    assert await results_last_seq(services) == after_first


async def test_a_timestamp_outside_five_minutes_is_refused(
    client: TestClient, services: Services, migrated: Settings, tenant: tuple[str, str]
) -> None:
    _, key = tenant
    created = await create_json(client, key)
    body = webhook_events(created["id"], (1, "delivered"))
    before = await results_last_seq(services)
    now = int(time.time())
    for at in (now - 301, now + 301, 0):
        response = await client.post(
            "/webhooks/mock", data=body,
            headers=signed_headers(body, migrated.mock_webhook_secret, at),
        )  # fmt: skip
        await error_body(response, 401, "stale_signature")
    assert await results_last_seq(services) == before
    inside = await client.post(
        "/webhooks/mock", data=body,
        headers=signed_headers(body, migrated.mock_webhook_secret, now - 290),
    )  # fmt: skip
    assert inside.status == 200


async def test_webhook_bad_signature(
    client: TestClient, services: Services, migrated: Settings
) -> None:
    body = webhook_events(str(uuid.uuid4()), (1, "delivered"))
    now = int(time.time())
    secret = migrated.mock_webhook_secret
    before = await results_last_seq(services)
    for headers in (
        {},
        signed_headers(body, "wrong-secret"),
        signed_headers(body + b" ", secret),
        {TIMESTAMP_HEADER: str(now), SIGNATURE_HEADER: "sha256=00"},
        {SIGNATURE_HEADER: sign(body, secret, now)},  # no timestamp
        {TIMESTAMP_HEADER: str(now + 1), SIGNATURE_HEADER: sign(body, secret, now)},
        {TIMESTAMP_HEADER: "yesterday", SIGNATURE_HEADER: sign(body, secret, now)},
    ):
        response = await client.post("/webhooks/mock", data=body, headers=headers)
        await error_body(response, 401, "bad_signature")
    assert await results_last_seq(services) == before


async def test_non_utf8_signature_headers_answer_401(
    client: TestClient, services: Services, migrated: Settings
) -> None:
    body = webhook_events(str(uuid.uuid4()), (1, "delivered"))
    now = str(int(time.time())).encode()
    good = sign(body, migrated.mock_webhook_secret, int(now)).encode()
    for lines in (
        b"X-Mock-Timestamp: " + now + b"\r\nX-Mock-Signature: sha256=\xff\xfe\r\n",
        b"X-Mock-Timestamp: \xc3\x28" + now + b"\r\nX-Mock-Signature: " + good + b"\r\n",
    ):
        answer = await raw_post(client, "/webhooks/mock", lines, body)
        assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
        assert b'"code":"bad_signature"' in answer


async def test_webhook_malformed_body(
    client: TestClient, services: Services, migrated: Settings
) -> None:
    before = await results_last_seq(services)
    for body in (
        b"not json",
        b'{"event": "delivered"}',
        b'[{"event": "opened", "ref": "x:1", "timestamp": 1, "event_id": "e"}]',
        b'[{"event": "delivered", "ref": "not-a-batch:1", "timestamp": 1, "event_id": "e"}]',
    ):
        response = await client.post(
            "/webhooks/mock",
            data=body,
            headers=signed_headers(body, migrated.mock_webhook_secret),
        )
        await error_body(response, 400, "invalid_webhook")
    assert await results_last_seq(services) == before


async def test_webhook_unknown_provider(client: TestClient, migrated: Settings) -> None:
    body = b"[]"
    response = await client.post(
        "/webhooks/pigeon", data=body, headers=signed_headers(body, migrated.mock_webhook_secret)
    )
    await error_body(response, 404, "unknown_provider")


async def test_the_mock_route_does_not_exist_unless_the_mock_is_enabled(
    migrated: Settings, services: Services, tenant: tuple[str, str]
) -> None:
    off = dataclasses.replace(migrated, mock_provider_enabled=False)
    body = webhook_events(str(uuid.uuid4()), (1, "delivered"))
    before = await results_last_seq(services)
    async with TestClient(TestServer(create_app(off), host="127.0.0.1")) as off_client:
        response = await off_client.post(
            "/webhooks/mock", data=body, headers=signed_headers(body, off.mock_webhook_secret)
        )
        await error_body(response, 404, "unknown_provider")
        # a key still works: only the mock is gone
        listed = await off_client.get("/api/batches", headers=bearer(tenant[1]))
        assert listed.status == 200
    assert await results_last_seq(services) == before


async def test_posts_arriving_together_are_handed_on_in_one_message(
    client: TestClient, services: Services, migrated: Settings, tenant: tuple[str, str]
) -> None:
    """Under load the events of posts taken in one turn of the event loop share a results
    message (each post answered on its own); every event is in it once. (Through the engine
    directly: over HTTP, which posts share a turn depends on timing.)"""
    _, key = tenant
    created = await create_json(client, key)
    warm = webhook_events(created["id"], (4, "delivered"))  # the batch's owner now cached
    await webhooks.receive(
        services, "mock", warm, signed_headers(warm, migrated.mock_webhook_secret)
    )
    bodies = [webhook_events(created["id"], (seq, "delivered")) for seq in (1, 2, 3)]
    before = await results_last_seq(services)
    answers = await asyncio.gather(
        *(
            webhooks.receive(
                services, "mock", body, signed_headers(body, migrated.mock_webhook_secret)
            )
            for body in bodies
        )
    )
    assert [a.answer() for a in answers] == [{"accepted": 1, "ignored": 0}] * 3
    assert await results_last_seq(services) == before + 1
    message = await services.js.get_msg(services.topology.results_stream, before + 1)
    rows = [(r.seq, r.status) for r in results.decode(message.data).rows]
    assert sorted(rows) == [(1, "delivered"), (2, "delivered"), (3, "delivered")]
