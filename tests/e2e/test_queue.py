"""Malformed NATS intake is dead-lettered with its reason (not retried forever) and shows
in the tenant's ``/api/queue/dlq``; ``/api/queue/stats`` describes every consumer and the
tenant's own intake, without other tenants' totals."""

from __future__ import annotations

import nats
import orjson

from tests.e2e.conftest import Client, eventually


async def test_malformed_nats_intake_is_dead_lettered_with_its_reason(stack, tenant):
    tenant_id, key = tenant
    client = Client(stack, key)
    nc = await nats.connect(stack.settings.nats_url)
    js = nc.jetstream()
    subject = f"{stack.settings.nats_prefix}.intake.{tenant_id}"
    await js.publish(subject, b"{not json", headers={"Nats-Msg-Id": f"bad-json-{tenant_id}"})
    fields_bad = {"name": "x", "from_email": "nope", "subject": "s", "text": "t", "provider": "mock",
                  "recipients": [{"email": "a@example.com"}]}  # fmt: skip
    await js.publish(
        subject, orjson.dumps(fields_bad), headers={"Nats-Msg-Id": f"bad-from-{tenant_id}"}
    )
    await nc.close()

    async def both_dead_lettered():
        _, page = await client.request("GET", f"{stack.api}/api/queue/dlq")
        return page["data"] if len(page["data"]) == 2 else None

    entries = await eventually(both_dead_lettered, 30, what="two dead letters")
    assert {e["msg_id"] for e in entries} == {f"bad-json-{tenant_id}", f"bad-from-{tenant_id}"}
    assert {e["code"] for e in entries} == {"invalid_json", "validation_error"}
    assert all(e["kind"] == "intake" and e["reason"] for e in entries)
    _, batches = await client.request("GET", f"{stack.api}/api/batches")
    assert batches["data"] == []  # nothing was created

    assert await _other_tenant_sees(stack) == []  # another tenant sees none of them

    # Replayed, they are read again under their own ids, fail again, and come back.
    status, answer = await client.request("POST", f"{stack.api}/api/queue/dlq/replay",
                                          data=b'{"all": true}', headers={"Content-Type": "application/json"})  # fmt: skip
    assert status == 200 and answer == {"replayed": 2}

    async def back_again():
        _, page = await client.request("GET", f"{stack.api}/api/queue/dlq")
        seqs = {e["seq"] for e in page["data"]}
        return page["data"] if len(seqs) == 2 and not seqs & {e["seq"] for e in entries} else None

    again = await eventually(back_again, 30, what="the replayed messages dead-lettered again")
    assert {e["msg_id"] for e in again} == {e["msg_id"] for e in entries}

    async def intake_drained():
        _, stats = await client.request("GET", f"{stack.api}/api/queue/stats")
        intake = next(c for c in stats["consumers"] if c["consumer"] == "intake")
        return stats if intake["pending"] == intake["ack_pending"] == 0 else None

    stats = await eventually(intake_drained, 30, what="the intake consumer drained")
    assert {c["consumer"] for c in stats["consumers"]} == {
        "intake",
        "send",
        "results-pg",
        "results-ch",
        "results-hooks",
    }
    assert "dlq" not in stats  # the dead-letter stream holds every tenant's: no totals
    assert stats["intake"] == {"waiting": 0}  # this tenant's own, all read again


async def _other_tenant_sees(stack):
    from engine.db import create_pool
    from engine.tenants import create_key

    pool = await create_pool(stack.settings, max_size=1)
    try:
        key = await create_key(pool, "dlq-other")
    finally:
        await pool.close()
    _, page = await Client(stack, key).request("GET", f"{stack.api}/api/queue/dlq")
    return page["data"]


async def test_recipients_failed_past_their_retries_are_replayed_from_the_dlq(stack, tenant):
    _, key = tenant
    client = Client(stack, key)
    await client.mock_config(failure_rate=1.0)  # every call 503 (or 429): retries run out
    body = {"name": "doomed", "from_email": "a@example.com", "subject": "Hi", "text": "x",
            "provider": "mock", "recipients": [{"email": f"d{i}@example.com"} for i in range(150)]}  # fmt: skip
    try:
        status, created = await client.request("POST", f"{stack.api}/api/batches", data=orjson.dumps(body),
                                               headers={"Content-Type": "application/json"})  # fmt: skip
        assert status == 201

        async def failed():
            _, batch = await client.request("GET", f"{stack.api}/api/batches/{created['id']}")
            return batch if batch["status"] == "completed" else None

        batch = await eventually(failed, 60, what="every recipient failed")
        assert batch["counts"]["failed"] == 150
    finally:
        await client.mock_config(failure_rate=0.0)
    _, page = await client.request("GET", f"{stack.api}/api/queue/dlq")
    mine = [e for e in page["data"] if e.get("batch_id") == created["id"]]
    assert mine and sum(len(e["failed"]) for e in mine) == 150
    assert all(
        e["reason"] and e["failed"][0]["attempts"] == stack.settings.send_max_attempts for e in mine
    )

    status, answer = await client.request("POST", f"{stack.api}/api/queue/dlq/replay",
                                          data=orjson.dumps({"seqs": [e["seq"] for e in mine]}),
                                          headers={"Content-Type": "application/json"})  # fmt: skip
    assert status == 200 and answer == {"replayed": len(mine)}

    async def sent_now():
        _, batch = await client.request("GET", f"{stack.api}/api/batches/{created['id']}")
        done = batch["status"] == "completed" and batch["counts"]["failed"] == 0
        return batch if done else None

    batch = await eventually(sent_now, 60, what="the replayed recipients sent")
    assert batch["counts"]["sent"] + batch["counts"]["delivered"] == 150
    _, page = await client.request("GET", f"{stack.api}/api/queue/dlq")
    assert not [e for e in page["data"] if e.get("batch_id") == created["id"]]  # left the DLQ
    status, _ = await client.request("POST", f"{stack.api}/api/queue/dlq/replay", data=b'{"seqs": []}',
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    assert status == 422
