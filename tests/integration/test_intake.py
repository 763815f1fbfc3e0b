"""engine.intake.create_batch against the real PostgreSQL and NATS JetStream."""

from __future__ import annotations

import dataclasses
import math
import uuid
from typing import Any

import orjson
import pytest

from engine.chunks import cell_size
from engine.errors import Conflict, PayloadTooLarge, ValidationError
from engine.intake.decoders import list_rows
from engine.intake.fields import parse_batch_fields
from engine.intake.store import create_batch, request_digest
from engine.services import Services
from providers.registry import PROVIDERS

FIELDS = {
    "name": "Intake test",
    "from_email": "news@shop.example",
    "subject": "Hello {{ name }}",
    "html": "<p>Your code: {{ code }}</p>",
    "provider": "mock",
}


CELL = cell_size(PROVIDERS["mock"].max_per_call)  # recipients per chunk message


def spec(**overrides: Any):
    return parse_batch_fields({**FIELDS, **overrides})


def recipients(count: int, *, domain: str = "example.com") -> list[dict[str, Any]]:
    return [
        {"email": f"user{i}@{domain}", "name": f"User {i}", "vars": {"code": f"C{i}"}}
        for i in range(1, count + 1)
    ]


async def last_seq(services: Services) -> int:
    info = await services.js.stream_info(services.topology.send_stream)
    return info.state.last_seq


async def chunks_since(services: Services, seq: int, batch_id: str | None = None) -> list[dict]:
    """The SEND messages published after ``seq`` (for one batch, when given)."""
    stream = services.topology.send_stream
    end = await last_seq(services)
    found = []
    for number in range(seq + 1, end + 1):
        msg = await services.js.get_msg(stream, number)
        body = orjson.loads(msg.data)
        if batch_id is None or body["b"] == batch_id:
            found.append({**body, "_subject": msg.subject, "_id": msg.headers["Nats-Msg-Id"]})
    return found


async def tenant_rows(services: Services, tenant_id: str) -> tuple[int, int]:
    """(batches of any status, recipients) stored for a tenant."""
    batches = await services.pool.fetchval(
        "SELECT count(*) FROM batches WHERE tenant_id = $1", tenant_id
    )
    rows = await services.pool.fetchval(
        "SELECT count(*) FROM recipients r JOIN batches b ON b.id = r.batch_id"
        " WHERE b.tenant_id = $1",
        tenant_id,
    )
    return batches, rows


async def test_create_stores_recipients_and_queues_one_message_per_chunk(
    services: Services, tenant: tuple[str, str]
) -> None:
    tenant_id, _ = tenant
    total = 2 * CELL + 543
    before = await last_seq(services)
    created = await create_batch(services, tenant_id, spec(), list_rows(recipients(total)))

    assert (created.status, created.total_recipients, created.suppressed) == ("queued", total, 0)
    assert created.replayed is False
    batch_id = uuid.UUID(created.id)

    batch = await services.pool.fetchrow("SELECT * FROM batches WHERE id = $1", batch_id)
    assert batch["tenant_id"] == tenant_id
    assert batch["status"] == "queued"
    assert batch["total_recipients"] == total
    assert batch["final_count"] == 0
    assert batch["chunk_size"] == CELL == 1000
    assert batch["queued_at"] is not None

    stats = await services.pool.fetchrow(
        "SELECT count(*) AS n, min(seq) AS lo, max(seq) AS hi, count(DISTINCT seq) AS distinct_seq,"
        " count(*) FILTER (WHERE status = 'queued') AS queued FROM recipients WHERE batch_id = $1",
        batch_id,
    )
    assert dict(stats) == {"n": total, "lo": 1, "hi": total, "distinct_seq": total, "queued": total}
    row = await services.pool.fetchrow(
        "SELECT email, name, vars, status FROM recipients WHERE batch_id = $1 AND seq = 2000",
        batch_id,
    )
    assert dict(row) == {
        "email": "user2000@example.com", "name": "User 2000",
        "vars": {"code": "C2000"}, "status": "queued",
    }  # fmt: skip

    chunks = await chunks_since(services, before)
    assert len(chunks) == math.ceil(total / CELL)  # nothing else was published meanwhile
    assert all(c["b"] == created.id and c["t"] == tenant_id and c["p"] == "mock" for c in chunks)
    assert [c["f"] for c in chunks] == list(range(1, total + 1, CELL))
    assert sum(c["n"] for c in chunks) == total
    assert chunks[-1]["n"] == total % CELL
    assert {c["_subject"] for c in chunks} == {services.topology.send_subject("mock")}
    assert [c["_id"] for c in chunks] == [f"{created.id}:{c['f']}" for c in chunks]


async def test_bad_rows_anywhere_reject_everything(
    services: Services, tenant: tuple[str, str]
) -> None:
    tenant_id, _ = tenant
    rows = recipients(2_100)
    rows[2]["email"] = "not-an-address"  # row 3
    rows[1999]["email"] = "user2000@@example.com"  # row 2000
    del rows[1499]["vars"]  # row 1500: no value for {{ code }}
    rows[2049] = "just a string"  # row 2050
    rows[2099]["colour"] = "red"  # row 2100
    before = await last_seq(services)

    with pytest.raises(ValidationError) as caught:
        await create_batch(services, tenant_id, spec(), list_rows(rows))

    error = caught.value
    assert error.code == "invalid_recipients"
    assert error.status == 422
    assert error.details["invalid_rows"] == 5
    assert [(e["row"], e["field"]) for e in error.details["errors"]] == [
        (3, "email"), (1500, "vars"), (2000, "email"), (2050, "row"), (2100, "colour"),
    ]  # fmt: skip
    assert "code" in error.details["errors"][1]["message"]
    assert error.message.startswith("recipient 3 email:")
    assert await tenant_rows(services, tenant_id) == (0, 0)
    assert await chunks_since(services, before) == []


async def test_many_bad_rows_are_counted_and_reporting_is_capped(
    services: Services, tenant: tuple[str, str]
) -> None:
    tenant_id, _ = tenant
    rows = [{"email": f"bad{i}"} for i in range(250)]
    with pytest.raises(ValidationError) as caught:
        await create_batch(services, tenant_id, spec(html="x"), list_rows(rows))
    assert caught.value.details["invalid_rows"] == 250
    assert len(caught.value.details["errors"]) == 100
    assert await tenant_rows(services, tenant_id) == (0, 0)


async def test_empty_recipient_list(services: Services, tenant: tuple[str, str]) -> None:
    tenant_id, _ = tenant
    with pytest.raises(ValidationError) as caught:
        await create_batch(services, tenant_id, spec(), list_rows([]))
    assert caught.value.code == "no_recipients"
    assert await tenant_rows(services, tenant_id) == (0, 0)


async def test_suppressed_addresses_are_skipped_and_counted(
    services: Services, tenant: tuple[str, str]
) -> None:
    tenant_id, _ = tenant
    await services.pool.executemany(
        "INSERT INTO suppressions (tenant_id, email, reason) VALUES ($1, $2, $3)",
        [(tenant_id, "user2@example.com", "bounced"), (tenant_id, "user4@example.com", "manual")],
    )
    rows = recipients(5)
    rows[3]["email"] = "User4@Example.COM"  # matched without regard to case
    before = await last_seq(services)

    created = await create_batch(services, tenant_id, spec(), list_rows(rows))

    assert (created.status, created.total_recipients, created.suppressed) == ("queued", 5, 2)
    statuses = await services.pool.fetch(
        "SELECT seq, status, error FROM recipients WHERE batch_id = $1 ORDER BY seq",
        uuid.UUID(created.id),
    )
    assert [(r["seq"], r["status"], r["error"]) for r in statuses] == [
        (1, "queued", None), (2, "suppressed", "bounced"), (3, "queued", None),
        (4, "suppressed", "manual"), (5, "queued", None),
    ]  # fmt: skip
    batch = await services.pool.fetchrow(
        "SELECT suppressed_count, final_count FROM batches WHERE id = $1", uuid.UUID(created.id)
    )
    assert dict(batch) == {"suppressed_count": 2, "final_count": 2}
    assert len(await chunks_since(services, before, created.id)) == 1


async def test_suppressions_of_another_tenant_do_not_apply(
    services: Services, tenant: tuple[str, str]
) -> None:
    tenant_id, _ = tenant
    other_id = f"o{uuid.uuid4().hex[:10]}"
    await services.pool.execute("INSERT INTO tenants (id, name) VALUES ($1, $1)", other_id)
    await services.pool.execute(
        "INSERT INTO suppressions (tenant_id, email, reason) VALUES ($1, 'user1@example.com', 'x')",
        other_id,
    )
    created = await create_batch(services, tenant_id, spec(), list_rows(recipients(2)))
    assert created.suppressed == 0


async def test_all_suppressed_completes_without_queuing(
    services: Services, tenant: tuple[str, str]
) -> None:
    tenant_id, _ = tenant
    await services.pool.execute(
        "INSERT INTO suppressions (tenant_id, email, reason) VALUES ($1, 'user1@example.com', 'x')",
        tenant_id,
    )
    before = await last_seq(services)
    created = await create_batch(services, tenant_id, spec(), list_rows(recipients(1)))
    assert (created.status, created.total_recipients, created.suppressed) == ("completed", 1, 1)
    completed_at = await services.pool.fetchval(
        "SELECT completed_at FROM batches WHERE id = $1", uuid.UUID(created.id)
    )
    assert completed_at is not None
    assert await chunks_since(services, before) == []


async def test_draft_and_scheduled_are_not_queued(
    services: Services, tenant: tuple[str, str]
) -> None:
    tenant_id, _ = tenant
    before = await last_seq(services)
    draft = await create_batch(services, tenant_id, spec(draft=True), list_rows(recipients(3)))
    later = await create_batch(
        services, tenant_id, spec(scheduled_at="2999-01-01T00:00:00Z"), list_rows(recipients(3))
    )
    assert (draft.status, later.status) == ("draft", "scheduled")
    statuses = await services.pool.fetch(
        "SELECT DISTINCT status FROM recipients WHERE batch_id = ANY($1::uuid[])",
        [uuid.UUID(draft.id), uuid.UUID(later.id)],
    )
    assert [r["status"] for r in statuses] == ["pending"]
    assert await chunks_since(services, before) == []


async def test_idempotency_key(services: Services, tenant: tuple[str, str]) -> None:
    tenant_id, _ = tenant
    body = b'{"the": "request"}'
    before = await last_seq(services)
    first = await create_batch(
        services, tenant_id, spec(), list_rows(recipients(CELL + 50)),
        idempotency_key="key-1", request_hash=request_digest(body),
    )  # fmt: skip
    again = await create_batch(
        services, tenant_id, spec(), list_rows(recipients(CELL + 50)),
        idempotency_key="key-1", request_hash=request_digest(body),
    )  # fmt: skip
    assert first.replayed is False
    assert again.replayed is True
    assert (again.id, again.status, again.total_recipients) == (first.id, "queued", CELL + 50)
    assert await tenant_rows(services, tenant_id) == (1, CELL + 50)
    assert len(await chunks_since(services, before)) == 2  # queued once

    with pytest.raises(Conflict) as caught:
        await create_batch(
            services, tenant_id, spec(), list_rows(recipients(CELL + 50)),
            idempotency_key="key-1", request_hash=request_digest(b'{"another": "request"}'),
        )  # fmt: skip
    assert caught.value.status == 409
    assert caught.value.code == "idempotency_conflict"
    assert caught.value.details == {"batch_id": first.id}
    assert await tenant_rows(services, tenant_id) == (1, CELL + 50)

    # A different key is a different batch.
    other = await create_batch(
        services, tenant_id, spec(), list_rows(recipients(1)),
        idempotency_key="key-2", request_hash=request_digest(body),
    )  # fmt: skip
    assert other.id != first.id and other.replayed is False


async def test_idempotency_keys_are_per_tenant(services: Services, tenant: tuple[str, str]) -> None:
    tenant_id, _ = tenant
    other_id = f"o{uuid.uuid4().hex[:10]}"
    await services.pool.execute("INSERT INTO tenants (id, name) VALUES ($1, $1)", other_id)
    digest = request_digest(b"x")
    mine = await create_batch(services, tenant_id, spec(), list_rows(recipients(1)),
                              idempotency_key="shared", request_hash=digest)  # fmt: skip
    theirs = await create_batch(services, other_id, spec(), list_rows(recipients(1)),
                                idempotency_key="shared", request_hash=digest)  # fmt: skip
    assert mine.id != theirs.id
    assert not theirs.replayed


async def test_external_id_replay(services: Services, tenant: tuple[str, str]) -> None:
    tenant_id, _ = tenant
    msg_id = f"msg-{uuid.uuid4()}"
    before = await last_seq(services)
    first = await create_batch(
        services, tenant_id, spec(), list_rows(recipients(CELL + 20)), external_id=msg_id
    )
    # A redelivered NATS message: even a different body returns the first batch.
    again = await create_batch(
        services, tenant_id, spec(name="changed"), list_rows(recipients(3)), external_id=msg_id
    )
    assert again.replayed is True
    assert (again.id, again.total_recipients) == (first.id, CELL + 20)
    rows = await services.pool.fetch(
        "SELECT id, name FROM batches WHERE tenant_id = $1 AND external_id = $2", tenant_id, msg_id
    )
    assert [(str(r["id"]), r["name"]) for r in rows] == [(first.id, "Intake test")]
    assert len(await chunks_since(services, before)) == 2


async def test_max_recipients(services: Services, tenant: tuple[str, str]) -> None:
    tenant_id, _ = tenant
    small = dataclasses.replace(
        services, settings=dataclasses.replace(services.settings, max_recipients=10)
    )
    exact = await create_batch(small, tenant_id, spec(), list_rows(recipients(10)))
    assert exact.total_recipients == 10
    before = await last_seq(services)

    with pytest.raises(PayloadTooLarge) as caught:
        await create_batch(small, tenant_id, spec(), list_rows(recipients(11)))

    assert caught.value.status == 413
    assert caught.value.details == {"max_recipients": 10}
    assert await tenant_rows(services, tenant_id) == (1, 10)  # only the first batch
    assert await chunks_since(services, before) == []
