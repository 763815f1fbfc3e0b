"""Malformed NATS intake is dead-lettered with its reason (not retried forever) and shows
in the tenant's ``/api/queue/dlq``; ``/api/queue/stats`` describes every consumer."""

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
    }
    assert stats["dlq"]["messages"] >= 2


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
