"""A newcomer's path, end to end on the real processes: 10,000 recipients over REST and
10,000 over NATS reach a final status, each handed to the provider exactly once, one
``sent`` event per recipient in ClickHouse, and the metrics show the queues."""

from __future__ import annotations

import uuid

import orjson

from engine.clickhouse import ClickHouse
from engine.publisher import BatchRequest, Publisher, Recipient
from tests.e2e.conftest import Client, eventually

N = 10_000
FINAL = {"sent", "delivered", "bounced", "complained", "failed", "suppressed", "cancelled"}


async def _completed(client: Client, batch_id: str) -> dict:
    async def check():
        status, batch = await client.request("GET", f"{client.stack.api}/api/batches/{batch_id}")
        assert status == 200, batch
        return batch if batch["status"] == "completed" else None

    return await eventually(check, 180, what=f"batch {batch_id} completed")


async def _assert_delivered_once(client: Client, batch_id: str, total: int) -> None:
    batch = await _completed(client, batch_id)
    assert batch["total_recipients"] == total
    assert sum(batch["counts"][s] for s in FINAL) == total
    assert batch["counts"]["queued"] == batch["counts"]["pending"] == 0
    _, received = await client.request("GET", f"{client.stack.mock}/v1/received")
    mine = {ref: n for ref, n in received["refs"].items() if ref.startswith(batch_id)}
    assert len(mine) == total, "every recipient reached the provider"
    assert set(mine.values()) == {1}, "no recipient reached it twice"
    assert mine.keys() == {f"{batch_id}:{seq}" for seq in range(1, total + 1)}
    clickhouse = ClickHouse(client.stack.settings)

    async def events_written():
        rows = clickhouse.query(
            f"SELECT count(), uniqExact(seq) FROM {clickhouse.database}.events"
            " WHERE batch_id = %(b)s AND event = 'sent'",
            {"b": batch_id},
        )
        return rows[0] if rows[0][0] >= total else None

    count, unique = await eventually(events_written, 60, what="ClickHouse sent events")
    assert (count, unique) == (total, total)
    clickhouse.close()


async def test_rest_batch_reaches_every_recipient_once(stack, tenant):
    client = Client(stack, tenant[1])
    await client.request("POST", f"{stack.mock}/v1/reset")  # so the samples are this batch's
    body = {
        "name": "e2e rest", "from_email": "news@example.com", "subject": "Hello {{ name }}",
        "text": "Your code is {{ code }}", "provider": "mock",
        "recipients": [{"email": f"r{i}@example.com", "name": f"R{i}", "vars": {"code": str(i)}}
                       for i in range(N)],
    }  # fmt: skip
    status, created = await client.request("POST", f"{stack.api}/api/batches", data=orjson.dumps(body),
                                           headers={"Content-Type": "application/json"})  # fmt: skip
    assert status == 201, created
    assert created["total_recipients"] == N
    await _assert_delivered_once(client, created["id"], N)
    _, samples = await client.request("GET", f"{stack.mock}/v1/samples")
    mine = [s for s in samples if s["ref"].startswith(created["id"])]
    assert mine and all(
        s["headers"]["List-Unsubscribe"].startswith(f"<{stack.settings.public_url}/unsubscribe/")
        and s["headers"]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        for s in mine
    )
    assert mine and all(s["subject"] == f"Hello R{int(s['ref'].split(':')[1]) - 1}" for s in mine)


async def test_nats_batch_is_recorded_once_and_sent(stack, tenant):
    client = Client(stack, tenant[1])
    publisher = await Publisher.connect(stack.settings.nats_url, stack.settings.nats_prefix)
    msg_id = f"e2e-{uuid.uuid4()}"
    request = BatchRequest(
        name="e2e nats", from_email="news@example.com", subject="Hi {{ name }}",
        text="Hello", provider="mock",
        recipients=[Recipient(f"n{i}@example.com", f"N{i}") for i in range(N)],
    )  # fmt: skip
    first = await publisher.publish(tenant[0], request, msg_id)
    again = await publisher.publish(tenant[0], request, msg_id)
    await publisher.close()
    assert not first.duplicate and again.duplicate

    async def recorded():
        _, page = await client.request(
            "GET", f"{stack.api}/api/batches", params={"external_id": msg_id}
        )
        return page["data"]

    batches = await eventually(recorded, 60, what="the NATS batch in the API")
    assert len(batches) == 1
    await _assert_delivered_once(client, batches[0]["id"], N)


async def test_metrics_cover_queues_and_every_worker(stack, tenant):
    client = Client(stack, tenant[1])
    status, text = await client.request("GET", f"{stack.api}/api/metrics")
    assert status == 200
    prefix = stack.settings.nats_prefix.upper()
    assert f'nats_queue_depth{{consumer="send",stream="{prefix}_SEND"}}' in text
    assert "batchsender_worker_processes 2.0" in text  # both worker processes, not just one
    assert 'batchsender_emails_total{provider="mock",status="sent"}' in text
    assert "@" not in "".join(line for line in text.splitlines() if not line.startswith("#"))
