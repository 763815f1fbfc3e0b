"""engine.results.apply_results on batches created by create_batch (real PostgreSQL)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from engine.intake.decoders import list_rows
from engine.intake.fields import parse_batch_fields
from engine.intake.store import create_batch
from engine.results import Columns, ResultRow, apply_results
from engine.services import Services

FIELDS = {
    "name": "Results test",
    "from_email": "news@shop.example",
    "subject": "Hello",
    "text": "Hi {{ name }}",
    "provider": "mock",
}


async def new_batch(services: Services, tenant_id: str, count: int) -> str:
    rows = [{"email": f"Person{i}@Example.com"} for i in range(1, count + 1)]
    created = await create_batch(services, tenant_id, parse_batch_fields(FIELDS), list_rows(rows))
    assert created.status == "queued"
    return created.id


async def apply(services: Services, rows: list[ResultRow]) -> list[tuple[str, str]]:
    async with services.pool.acquire() as conn:
        return await apply_results(conn, Columns.from_rows(rows))


async def batch_state(services: Services, batch_id: str) -> dict[str, Any]:
    row = await services.pool.fetchrow(
        "SELECT status, final_count, total_recipients, started_at, completed_at"
        " FROM batches WHERE id = $1",
        uuid.UUID(batch_id),
    )
    return dict(row)


async def recipient(services: Services, batch_id: str, seq: int) -> dict[str, Any]:
    row = await services.pool.fetchrow(
        "SELECT status, provider_message_id, error, attempts FROM recipient_statuses"
        " WHERE batch_id = $1 AND seq = $2",
        uuid.UUID(batch_id),
        seq,
    )
    return dict(row)


async def counted(services: Services, batch_id: str) -> dict[str, int]:
    """The batch's recipients per status, counted afresh."""
    rows = await services.pool.fetch(
        "SELECT status, count(*)::int AS n FROM recipient_statuses WHERE batch_id = $1 GROUP BY status",
        uuid.UUID(batch_id),
    )
    return {r["status"]: r["n"] for r in rows}


async def every_page(
    services: Services, tenant_id: str, batch_id: str, status: str, limit: int
) -> list[dict[str, Any]]:
    """The recipients ``list_recipients`` gives for ``status``, page after page."""
    from engine.batches import list_recipients

    seen: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = await list_recipients(
            services.pool, tenant_id, batch_id, status=status, limit=limit, cursor=cursor
        )
        seen.extend(page["data"])
        if not (cursor := page["next_cursor"]):
            return seen


def sent(batch_id: str, seq: int, **kwargs: Any) -> ResultRow:
    return ResultRow(batch_id, seq, "sent", kwargs.pop("pmid", f"pm-{seq}"), **kwargs)


async def test_batch_completes_exactly_when_every_recipient_is_final(
    services: Services, tenant: tuple[str, str]
) -> None:
    tenant_id, _ = tenant
    batch_id = await new_batch(services, tenant_id, 10)

    touched = await apply(services, [sent(batch_id, seq) for seq in range(1, 6)])
    assert touched == [(batch_id, "processing")]
    state = await batch_state(services, batch_id)
    assert (state["status"], state["final_count"]) == ("processing", 5)
    assert state["started_at"] is not None and state["completed_at"] is None

    # Four more, one of them a failure: still not complete.
    await apply(
        services,
        [sent(batch_id, seq) for seq in range(6, 9)]
        + [ResultRow(batch_id, 9, "failed", None, "550 unknown user", 5)],
    )
    state = await batch_state(services, batch_id)
    assert (state["status"], state["final_count"]) == ("processing", 9)
    assert await recipient(services, batch_id, 9) == {
        "status": "failed", "provider_message_id": None, "error": "550 unknown user", "attempts": 5,
    }  # fmt: skip

    touched = await apply(services, [sent(batch_id, 10)])
    assert touched == [(batch_id, "completed")]
    state = await batch_state(services, batch_id)
    assert (state["status"], state["final_count"]) == ("completed", 10)
    assert state["completed_at"] is not None
    assert await recipient(services, batch_id, 10) == {
        "status": "sent", "provider_message_id": "pm-10", "error": None, "attempts": 1,
    }  # fmt: skip


async def test_applying_the_same_results_twice_counts_once(
    services: Services, tenant: tuple[str, str]
) -> None:
    tenant_id, _ = tenant
    batch_id = await new_batch(services, tenant_id, 4)
    half = [sent(batch_id, 1), sent(batch_id, 2)]

    await apply(services, half)
    assert await apply(services, half) == []  # nothing changed, no batch touched
    state = await batch_state(services, batch_id)
    assert (state["status"], state["final_count"]) == ("processing", 2)

    # The same row twice in one flush counts once as well.
    await apply(services, [sent(batch_id, 3), sent(batch_id, 3)])
    assert (await batch_state(services, batch_id))["final_count"] == 3

    rest = [sent(batch_id, 4)]
    await apply(services, rest)
    await apply(services, half + rest)
    state = await batch_state(services, batch_id)
    assert (state["status"], state["final_count"]) == ("completed", 4)


async def test_a_flush_in_any_order_with_some_final_already_lands_once_each(
    services: Services, tenant: tuple[str, str]
) -> None:
    """Results out of seq order, across two blocks, some of their recipients final already,
    failures among sends: each recipient takes its first result once, with its own
    provider message id and attempts."""
    tenant_id, _ = tenant
    batch_id = await new_batch(services, tenant_id, 1100)
    await apply(services, [sent(batch_id, seq, pmid=f"old-{seq}") for seq in (3, 5, 1030)])
    order = [1030, 7, 3, 1029, 1, 5, 2, 1100, 6, 4]
    flush = [
        ResultRow(batch_id, seq, "failed", None, f"no {seq}", 2)
        if seq % 3 == 0
        else sent(batch_id, seq, attempts=seq % 4 + 1)
        for seq in order
    ] + [ResultRow(batch_id, 2, "failed", None, "a second result", 9)]
    await apply(services, flush)

    for seq in (3, 5, 1030):  # final before: unchanged
        assert await recipient(services, batch_id, seq) == {
            "status": "sent", "provider_message_id": f"old-{seq}", "error": None, "attempts": 1,
        }  # fmt: skip
    for seq in set(order) - {3, 5, 1030}:
        expected = (
            {"status": "failed", "provider_message_id": None, "error": f"no {seq}", "attempts": 2}
            if seq % 3 == 0
            else {"status": "sent", "provider_message_id": f"pm-{seq}", "error": None,
                  "attempts": seq % 4 + 1}
        )  # fmt: skip
        assert await recipient(services, batch_id, seq) == expected, seq
    assert await counted(services, batch_id) == {"sent": 8, "failed": 2, "queued": 1090}
    state = await batch_state(services, batch_id)
    assert (state["status"], state["final_count"]) == ("processing", 10)


async def test_provider_message_ids_of_any_text_are_kept_as_given(
    services: Services, tenant: tuple[str, str]
) -> None:
    """A flush's ids are handed to PostgreSQL as one text of lines when they read back the
    same, else as an array: ids with a line break, none at all, a lone empty one, and
    attempts that differ or not all land as given."""
    tenant_id, _ = tenant
    batch_id = await new_batch(services, tenant_id, 8)
    flushes = [
        [sent(batch_id, 1, pmid="a"), sent(batch_id, 2, pmid="b\nc"), sent(batch_id, 3, pmid="d")],
        [sent(batch_id, 4, pmid=None), sent(batch_id, 5, pmid="e", attempts=3)],
        [sent(batch_id, 6, pmid="")],
        [sent(batch_id, 7, pmid="", attempts=2), sent(batch_id, 8, pmid="f", attempts=2)],
    ]
    for flush in flushes:
        await apply(services, flush)
    for row in (r for flush in flushes for r in flush):
        assert await recipient(services, batch_id, row.seq) == {
            "status": "sent", "provider_message_id": row.provider_message_id, "error": None,
            "attempts": row.attempts,
        }, row  # fmt: skip
    assert (await batch_state(services, batch_id))["status"] == "completed"


async def test_attempts_beyond_the_column_are_stored_as_its_largest_value(
    services: Services, tenant: tuple[str, str]
) -> None:
    """``attempts`` is a smallint: a count past it is clamped, not refused."""
    tenant_id, _ = tenant
    batch_id = await new_batch(services, tenant_id, 2)
    await apply(services, [ResultRow(batch_id, 1, "failed", None, "gave up", 100_000),
                           ResultRow(batch_id, 2, "sent", "pm-2", None, 2)])  # fmt: skip
    assert (await recipient(services, batch_id, 1))["attempts"] == 32767
    assert (await recipient(services, batch_id, 2))["attempts"] == 2


async def test_a_later_result_does_not_replace_a_final_one(
    services: Services, tenant: tuple[str, str]
) -> None:
    tenant_id, _ = tenant
    batch_id = await new_batch(services, tenant_id, 2)
    await apply(services, [ResultRow(batch_id, 1, "failed", None, "rejected", 3)])
    await apply(services, [sent(batch_id, 1, pmid="late")])  # e.g. a redelivered chunk
    assert await recipient(services, batch_id, 1) == {
        "status": "failed", "provider_message_id": None, "error": "rejected", "attempts": 3,
    }  # fmt: skip
    assert (await batch_state(services, batch_id))["final_count"] == 1


async def test_delivered_before_sent_is_final_and_sent_does_not_overwrite_it(
    services: Services, tenant: tuple[str, str]
) -> None:
    tenant_id, _ = tenant
    batch_id = await new_batch(services, tenant_id, 2)

    touched = await apply(services, [ResultRow(batch_id, 1, "delivered", "pm-1")])
    assert touched == [(batch_id, "processing")]
    assert (await recipient(services, batch_id, 1))["status"] == "delivered"
    assert (await batch_state(services, batch_id))["final_count"] == 1

    await apply(services, [sent(batch_id, 1)])
    assert (await recipient(services, batch_id, 1))["status"] == "delivered"
    state = await batch_state(services, batch_id)
    assert (state["status"], state["final_count"]) == ("processing", 1)

    await apply(services, [sent(batch_id, 2)])
    state = await batch_state(services, batch_id)
    assert (state["status"], state["final_count"]) == ("completed", 2)


async def test_sent_then_delivered_in_one_call_both_land(
    services: Services, tenant: tuple[str, str]
) -> None:
    """A send and its delivered in one flush, in either order: the send is the final
    transition (its provider message id), the delivered follows in the final bits; a
    delivered without a send in the flush is final itself, in the row."""
    tenant_id, _ = tenant
    batch_id = await new_batch(services, tenant_id, 4)
    await apply(
        services,
        [
            sent(batch_id, 1, pmid="pm-a"),
            ResultRow(batch_id, 2, "delivered", "pm-b"),  # the webhook before the send
            ResultRow(batch_id, 1, "delivered", None),
            sent(batch_id, 2, pmid="pm-b2"),
            ResultRow(batch_id, 3, "delivered", "pm-c"),  # its send comes later
        ],
    )
    await apply(services, [sent(batch_id, 3, pmid="ignored")])
    found = [await recipient(services, batch_id, seq) for seq in (1, 2, 3)]
    assert [(r["status"], r["provider_message_id"]) for r in found] == [
        ("delivered", "pm-a"), ("delivered", "pm-b2"), ("delivered", "pm-c"),
    ]  # fmt: skip
    rows = await services.pool.fetch(
        "SELECT seq, status FROM recipients WHERE batch_id = $1 ORDER BY seq", uuid.UUID(batch_id)
    )  # 1 and 2 sent and delivered in their bits, 3 delivered first: in its row
    assert [tuple(r) for r in rows] == [
        (1, "queued"),
        (2, "queued"),
        (3, "delivered"),
        (4, "queued"),
    ]
    state = await batch_state(services, batch_id)
    assert (state["status"], state["final_count"]) == ("processing", 3)  # each counted once
    assert await counted(services, batch_id) == {"delivered": 3, "queued": 1}


async def test_events_move_forward_by_rank_only(
    services: Services, tenant: tuple[str, str]
) -> None:
    tenant_id, _ = tenant
    batch_id = await new_batch(services, tenant_id, 1)
    await apply(services, [sent(batch_id, 1)])
    await apply(services, [ResultRow(batch_id, 1, "complained", None)])
    await apply(services, [ResultRow(batch_id, 1, "delivered", None)])
    await apply(services, [ResultRow(batch_id, 1, "bounced", None)])
    assert (await recipient(services, batch_id, 1))["status"] == "complained"
    assert (await batch_state(services, batch_id))["final_count"] == 1


async def test_bounce_adds_a_suppression_for_the_tenant(
    services: Services, tenant: tuple[str, str]
) -> None:
    tenant_id, _ = tenant
    batch_id = await new_batch(services, tenant_id, 3)
    await apply(services, [sent(batch_id, seq) for seq in (1, 2, 3)])
    await apply(
        services,
        [
            ResultRow(batch_id, 1, "bounced", None),
            ResultRow(batch_id, 2, "delivered", None),
            ResultRow(batch_id, 3, "complained", None),
        ],
    )
    suppressions = await services.pool.fetch(
        "SELECT email, reason FROM suppressions WHERE tenant_id = $1 ORDER BY email", tenant_id
    )
    assert [(r["email"], r["reason"]) for r in suppressions] == [
        ("person1@example.com", "bounced"),
        ("person3@example.com", "complained"),
    ]
    # Applying the bounce again is harmless.
    await apply(services, [ResultRow(batch_id, 1, "bounced", None)])
    count = await services.pool.fetchval(
        "SELECT count(*) FROM suppressions WHERE tenant_id = $1", tenant_id
    )
    assert count == 2

    # The next batch of this tenant skips the bounced address.
    rows = [{"email": "person1@example.com"}, {"email": "person2@example.com"}]
    created = await create_batch(services, tenant_id, parse_batch_fields(FIELDS), list_rows(rows))
    assert created.suppressed == 1


async def test_results_of_several_batches_in_one_call(
    services: Services, tenant: tuple[str, str]
) -> None:
    tenant_id, _ = tenant
    first = await new_batch(services, tenant_id, 1)
    second = await new_batch(services, tenant_id, 2)
    touched = await apply(services, [sent(first, 1), sent(second, 1)])
    assert sorted(touched) == sorted([(first, "completed"), (second, "processing")])


async def test_counts_per_status_follow_every_transition(
    services: Services, tenant: tuple[str, str]
) -> None:
    """The kept counts equal a fresh count of the recipients after any mix of results."""
    from engine.batches import get_batch

    tenant_id, _ = tenant
    batch_id = await new_batch(services, tenant_id, 8)
    await apply(services, [sent(batch_id, 1), sent(batch_id, 2), sent(batch_id, 2)])  # a repeat
    await apply(services, [ResultRow(batch_id, 3, "delivered", "pm-3"), sent(batch_id, 3)])
    await apply(services, [ResultRow(batch_id, 1, "delivered"), ResultRow(batch_id, 1, "bounced"),
                           ResultRow(batch_id, 4, "failed", None, "550", 1), sent(batch_id, 5)])  # fmt: skip
    await apply(
        services, [ResultRow(batch_id, 5, "complained"), ResultRow(batch_id, 2, "delivered")]
    )
    truth = await counted(services, batch_id)
    counts = (await get_batch(services.pool, tenant_id, batch_id))["counts"]
    assert {k: v for k, v in counts.items() if v} == truth
    assert truth == {"queued": 3, "bounced": 1, "delivered": 2, "failed": 1, "complained": 1}


async def test_counts_stay_exact_when_two_writers_move_the_same_recipients(
    services: Services, tenant: tuple[str, str]
) -> None:
    """Two results-pg writers (two worker processes) apply events for the same recipients at
    once: the second waits for the first, then moves each recipient from the status it
    really has, or not at all when it would go back in rank."""
    import asyncio

    from engine.batches import get_batch

    tenant_id, _ = tenant
    batch_id = await new_batch(services, tenant_id, 40)
    await apply(services, [sent(batch_id, seq) for seq in range(1, 41)])
    first, second = await services.pool.acquire(), await services.pool.acquire()
    try:
        holding = first.transaction()
        await holding.start()
        await apply_results(
            first, Columns.from_rows([ResultRow(batch_id, s, "delivered") for s in range(1, 41)])
        )
        later = [ResultRow(batch_id, s, "bounced") for s in range(1, 21)] + [
            ResultRow(batch_id, s, "delivered") for s in range(21, 41)
        ]
        waiting = asyncio.create_task(apply_results(second, Columns.from_rows(later)))
        await asyncio.sleep(0.5)
        assert not waiting.done()  # the rows are held by the first writer
        await holding.commit()
        await waiting
    finally:
        await services.pool.release(first)
        await services.pool.release(second)
    truth = await counted(services, batch_id)
    counts = (await get_batch(services.pool, tenant_id, batch_id))["counts"]
    assert truth == {"bounced": 20, "delivered": 20}
    assert {k: v for k, v in counts.items() if v} == truth


async def _hold_then_apply(
    services: Services, held: list[ResultRow], waiting_rows: list[ResultRow]
) -> None:
    """``held`` applied in an open transaction, ``waiting_rows`` by a second writer at
    once (it waits for the first), then the first commits."""
    import asyncio

    first, second = await services.pool.acquire(), await services.pool.acquire()
    try:
        holding = first.transaction()
        await holding.start()
        await apply_results(first, Columns.from_rows(held))
        waiting = asyncio.create_task(apply_results(second, Columns.from_rows(waiting_rows)))
        await asyncio.sleep(0.5)
        assert not waiting.done()  # the recipients' block is held by the first writer
        await holding.commit()
        await waiting
    finally:
        await services.pool.release(first)
        await services.pool.release(second)


async def test_a_send_and_an_event_that_came_first_at_once_are_final_once(
    services: Services, tenant: tuple[str, str]
) -> None:
    """One writer applies the sends of 40 recipients while another applies a delivered for
    each (the provider's webhook came first): each recipient is final exactly once, in
    either order, and ends ``delivered``."""
    from engine.batches import get_batch

    tenant_id, _ = tenant
    for sends_first in (True, False):
        batch_id = await new_batch(services, tenant_id, 40)
        sends = [sent(batch_id, seq) for seq in range(1, 41)]
        events = [ResultRow(batch_id, seq, "delivered", f"pm-{seq}") for seq in range(1, 41)]
        held, waiting = (sends, events) if sends_first else (events, sends)
        await _hold_then_apply(services, held, waiting)
        state = await batch_state(services, batch_id)
        assert (state["final_count"], state["status"]) == (40, "completed")
        truth = await counted(services, batch_id)
        counts = (await get_batch(services.pool, tenant_id, batch_id))["counts"]
        assert truth == {"delivered": 40}
        assert {k: v for k, v in counts.items() if v} == truth
        assert (await recipient(services, batch_id, 7))["provider_message_id"] == "pm-7"


async def test_sent_recipients_are_listed_and_filtered_with_their_sends(
    services: Services, tenant: tuple[str, str]
) -> None:
    """A sent recipient's row keeps ``queued``; the listing shows it ``sent`` with its
    provider message id and attempts, and filters and pages by that status."""
    from engine.batches import list_recipients

    tenant_id, _ = tenant
    batch_id = await new_batch(services, tenant_id, 2500)  # three blocks of final bits
    await apply(services, [sent(batch_id, s, attempts=2) for s in range(1, 2501, 2)])
    await apply(services, [ResultRow(batch_id, 1025, "failed", None, "550 no such user", 1)])
    await apply(services, [ResultRow(batch_id, 3, "delivered")])
    seen = await every_page(services, tenant_id, batch_id, "sent", 500)
    assert [r["seq"] for r in seen] == [s for s in range(1, 2501, 2) if s != 3]
    assert {(r["provider_message_id"], r["attempts"]) for r in seen if r["seq"] == 2499} == {
        ("pm-2499", 2)
    }
    assert all(r["updated_at"] for r in seen)
    queued = await list_recipients(services.pool, tenant_id, batch_id, status="queued", limit=5)
    assert [r["seq"] for r in queued["data"]] == [2, 4, 6, 8, 10]
    other = (await list_recipients(services.pool, tenant_id, batch_id, limit=3))["data"]
    assert [(r["seq"], r["status"], r["provider_message_id"]) for r in other] == [
        (1, "sent", "pm-1"),
        (2, "queued", None),
        (3, "delivered", "pm-3"),
    ]
    assert (await recipient(services, batch_id, 1025))["status"] == "sent"  # final already
    for status, seqs in (("delivered", [3]), ("failed", []), ("bounced", [])):
        page = await list_recipients(services.pool, tenant_id, batch_id, status=status)
        assert [r["seq"] for r in page["data"]] == seqs
        assert [(r["status"], r["provider_message_id"]) for r in page["data"]] == [
            ("delivered", "pm-3")
        ] * len(seqs)
    assert await counted(services, batch_id) == {"sent": 1249, "delivered": 1, "queued": 1250}


async def test_delivered_recipients_are_listed_with_their_delivery_and_counted_once(
    services: Services, tenant: tuple[str, str]
) -> None:
    """A sent recipient's delivered event sets only its bit (the row keeps ``queued``): it
    is listed ``delivered`` at the time of its delivery, filtered and paged by that status,
    and counted once however often the event comes; after a bounce a delivered changes
    nothing, and a recipient sent again after a dead-letter replay is delivered again."""
    from engine import lifecycle
    from engine.batches import get_batch, list_recipients

    tenant_id, _ = tenant
    batch_id = await new_batch(services, tenant_id, 2100)  # three blocks of final bits
    odd = list(range(1, 2101, 2))
    await apply(services, [sent(batch_id, s) for s in odd])
    await apply(services, [ResultRow(batch_id, 9, "bounced", None, "550 gone", 1)])
    await apply(services, [ResultRow(batch_id, 4, "failed", None, "451 later", 1)])
    between = await services.pool.fetchval("SELECT clock_timestamp()")
    delivered = [ResultRow(batch_id, s, "delivered") for s in odd]
    await apply(services, delivered)
    await apply(services, delivered[:700])  # redelivered webhooks
    stored = await services.pool.fetchval(
        "SELECT count(*) FROM recipients WHERE batch_id = $1 AND status = 'delivered'",
        uuid.UUID(batch_id),
    )
    assert stored == 0  # all in the bits

    seen = await every_page(services, tenant_id, batch_id, "delivered", 400)
    assert [r["seq"] for r in seen] == [s for s in odd if s != 9]
    assert {r["provider_message_id"] for r in seen if r["seq"] == 2099} == {"pm-2099"}
    assert all(datetime.fromisoformat(r["updated_at"]) > between for r in seen)
    sent_page = await list_recipients(services.pool, tenant_id, batch_id, status="sent")
    assert sent_page["data"] == []
    assert (await recipient(services, batch_id, 9))["status"] == "bounced"

    # The failed one is replayed, sent again and delivered: its bit, not its row.
    moved, _ = await lifecycle.reopen_failed(services.pool, uuid.UUID(batch_id), [4])
    assert moved == [4]
    await apply(services, [sent(batch_id, 4), ResultRow(batch_id, 4, "delivered")])
    assert (await recipient(services, batch_id, 4))["status"] == "delivered"
    await apply(
        services, [ResultRow(batch_id, 9, "delivered"), ResultRow(batch_id, 4, "delivered")]
    )

    truth = await counted(services, batch_id)
    counts = (await get_batch(services.pool, tenant_id, batch_id))["counts"]
    assert truth == {"delivered": 1050, "bounced": 1, "queued": 1049}
    assert {k: v for k, v in counts.items() if v} == truth


async def test_queued_recipients_are_found_past_blocks_where_all_are_final(
    services: Services, tenant: tuple[str, str]
) -> None:
    """The ``queued`` filter starts at the first block that has a recipient not final yet
    (``lifecycle.FIRST_UNFINISHED_BLOCK``) and pages on from there: none is missed before
    it, in it, or in the blocks after it, whether they are full or not."""
    from engine.batches import list_recipients

    tenant_id, _ = tenant
    batch_id = await new_batch(services, tenant_id, 5000)  # five blocks of final bits
    waiting = {1500, 3000, 3001, 4999}
    await apply(services, [sent(batch_id, s) for s in range(1, 5001) if s not in waiting])
    for limit in (1, 2, 100):
        seen = await every_page(services, tenant_id, batch_id, "queued", limit)
        assert [r["seq"] for r in seen] == sorted(waiting)
    await apply(services, [sent(batch_id, s) for s in waiting])
    page = await list_recipients(services.pool, tenant_id, batch_id, status="queued")
    assert page == {"data": [], "next_cursor": None}
