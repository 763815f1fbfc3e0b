"""Every provider event name on the real stores: where it ends in PostgreSQL (recipient
status, exact batch_counts, suppressions) through engine.results.apply_results, and that
it is published as itself for ClickHouse (posted to /webhooks/mock, read back from the
RESULTS stream, made into event rows)."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import TestClient

from engine import results
from engine.batches import get_batch
from engine.clickhouse import EVENT_COLUMNS
from engine.config import Settings
from engine.event_writer import append_event_rows
from engine.results import ResultRow
from engine.services import Services
from engine.webhooks import RESULT_EVENTS
from providers.mock import signed_headers
from tests.integration.test_results import (
    apply,
    batch_state,
    counted,
    new_batch,
    recipient,
    sent,
)
from tests.integration.test_webhooks import results_last_seq, webhook_events

# result name -> the recipient status it leaves a sent recipient in
AFTER_A_SEND = {
    "delivered": "delivered",
    "dropped": "failed",
    "bounced": "bounced",
    "complained": "complained",
    "deferred": "sent",
    "soft_bounced": "sent",
    "opened": "sent",
    "clicked": "sent",
    "unsubscribed": "sent",
    "resubscribed": "sent",
}


async def exact_counts(services: Services, tenant_id: str, batch_id: str) -> dict[str, int]:
    """The kept counts, checked against a fresh count of the recipients."""
    counts = (await get_batch(services.pool, tenant_id, batch_id))["counts"]
    kept = {k: v for k, v in counts.items() if v}
    assert kept == await counted(services, batch_id)
    return kept


async def suppressed(services: Services, tenant_id: str) -> dict[str, str]:
    rows = await services.pool.fetch(
        "SELECT email, reason FROM suppressions WHERE tenant_id = $1", tenant_id
    )
    return {r["email"]: r["reason"] for r in rows}


async def test_each_name_after_the_send(services: Services, tenant: tuple[str, str]) -> None:
    tenant_id, _ = tenant
    names = list(AFTER_A_SEND)
    batch_id = await new_batch(services, tenant_id, len(names))
    await apply(services, [sent(batch_id, seq) for seq in range(1, len(names) + 1)])
    await apply(
        services,
        [
            ResultRow(batch_id, seq, name, None, "sendgrid: dropped" if name == "dropped" else None)
            for seq, name in enumerate(names, 1)
        ],
    )
    for seq, name in enumerate(names, 1):
        assert (await recipient(services, batch_id, seq))["status"] == AFTER_A_SEND[name], name
    assert (await recipient(services, batch_id, 2))["error"] == "sendgrid: dropped"
    assert await exact_counts(services, tenant_id, batch_id) == {
        "sent": 6, "delivered": 1, "failed": 1, "bounced": 1, "complained": 1,
    }  # fmt: skip
    state = await batch_state(services, batch_id)
    assert (state["status"], state["final_count"]) == ("completed", len(names))
    assert await suppressed(services, tenant_id) == {
        "person3@example.com": "bounced",
        "person4@example.com": "complained",
        "person9@example.com": "unsubscribed",  # soft_bounced (6) does not suppress
    }


@pytest.mark.parametrize("name", sorted(AFTER_A_SEND))
async def test_each_name_before_the_send(
    services: Services, tenant: tuple[str, str], name: str
) -> None:
    """An event that comes before its send's result: a status-changing one is the
    recipient's final status (the send's result then changes nothing); an event-only one
    leaves it queued, and the send's result lands."""
    tenant_id, _ = tenant
    batch_id = await new_batch(services, tenant_id, 2)
    await apply(services, [ResultRow(batch_id, 1, name, "pm-early")])
    changes = AFTER_A_SEND[name] != "sent"
    expected = AFTER_A_SEND[name] if changes else "queued"
    assert (await recipient(services, batch_id, 1))["status"] == expected
    assert (await batch_state(services, batch_id))["final_count"] == (1 if changes else 0)
    await apply(services, [sent(batch_id, 1), sent(batch_id, 2)])
    assert (await recipient(services, batch_id, 1))["status"] == AFTER_A_SEND[name]
    state = await batch_state(services, batch_id)
    assert (state["status"], state["final_count"]) == ("completed", 2)
    assert sum((await exact_counts(services, tenant_id, batch_id)).values()) == 2


async def test_an_event_only_name_first_in_a_flush_does_not_make_the_send_final(
    services: Services, tenant: tuple[str, str]
) -> None:
    tenant_id, _ = tenant
    batch_id = await new_batch(services, tenant_id, 1)
    await apply(
        services,
        [ResultRow(batch_id, 1, "opened"), sent(batch_id, 1), ResultRow(batch_id, 1, "clicked")],
    )
    assert (await recipient(services, batch_id, 1))["status"] == "sent"
    assert (await batch_state(services, batch_id))["final_count"] == 1
    assert await exact_counts(services, tenant_id, batch_id) == {"sent": 1}


async def test_a_stray_delivered_does_not_undo_a_drop_and_ranks_hold(
    services: Services, tenant: tuple[str, str]
) -> None:
    tenant_id, _ = tenant
    batch_id = await new_batch(services, tenant_id, 3)
    await apply(services, [sent(batch_id, seq) for seq in (1, 2, 3)])
    await apply(services, [ResultRow(batch_id, 1, "dropped", None, "mailgun: dropped")])
    await apply(services, [ResultRow(batch_id, 1, "delivered")])
    assert (await recipient(services, batch_id, 1))["status"] == "failed"
    # Within one flush the highest rank wins, whatever the order.
    await apply(
        services,
        [ResultRow(batch_id, 2, "delivered"), ResultRow(batch_id, 2, "dropped"),
         ResultRow(batch_id, 2, "opened"), ResultRow(batch_id, 3, "bounced"),
         ResultRow(batch_id, 3, "dropped"), ResultRow(batch_id, 1, "bounced")],
    )  # fmt: skip
    assert [(await recipient(services, batch_id, s))["status"] for s in (1, 2, 3)] == [
        "bounced", "failed", "bounced",
    ]  # fmt: skip
    assert await exact_counts(services, tenant_id, batch_id) == {"failed": 1, "bounced": 2}


async def test_each_name_is_published_as_itself_for_clickhouse(
    client: TestClient, services: Services, migrated: Settings, tenant: tuple[str, str]
) -> None:
    tenant_id, _ = tenant
    batch_id = await new_batch(services, tenant_id, len(RESULT_EVENTS))
    events = [(seq, name) for seq, name in enumerate(sorted(RESULT_EVENTS), 1)]
    body = webhook_events(batch_id, *events)
    before = await results_last_seq(services)
    response = await client.post(
        "/webhooks/mock", data=body, headers=signed_headers(body, migrated.mock_webhook_secret)
    )
    assert response.status == 200, await response.text()
    handed_on = [(seq, RESULT_EVENTS[name]) for seq, name in events if RESULT_EVENTS[name]]
    assert await response.json() == {"accepted": len(handed_on), "ignored": 1}  # "sent"
    assert await results_last_seq(services) == before + 1
    message = results.decode(
        (await services.js.get_msg(services.topology.results_stream, before + 1)).data
    )
    assert list(zip(message.columns.seq, message.columns.status, strict=True)) == handed_on
    columns: list[list] = [[] for _ in EVENT_COLUMNS]
    append_event_rows(columns, message, {batch_id: tenant_id})
    names = [name for name, _ in EVENT_COLUMNS]
    rows = [dict(zip(names, row, strict=True)) for row in zip(*columns, strict=True)]
    assert [(r["seq"], r["event"]) for r in rows] == handed_on
    assert {r["tenant_id"] for r in rows} == {tenant_id}
    errors = {r["seq"]: r["error"] for r in rows if r["error"]}
    assert errors == {
        seq: f"mock: {name}"
        for seq, name in events
        if name in ("dropped", "failed", "rejected", "suppressed")
    }
    # What PostgreSQL makes of the same message: the recipients are still queued (the
    # send's results have not come), the status-changing events are final already.
    await apply(services, message.rows)
    state = await batch_state(services, batch_id)
    finals = sum(1 for _, name in handed_on if AFTER_A_SEND[name] != "sent")
    assert state["final_count"] == finals
    counts = await exact_counts(services, tenant_id, batch_id)
    assert counts == {
        "queued": len(RESULT_EVENTS) - finals, "delivered": 1, "bounced": 1, "complained": 1,
        "failed": 4,
    }  # fmt: skip
