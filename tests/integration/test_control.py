"""Batch control through the API and the leader's chores, on the real PostgreSQL, NATS and
Redis (no workers run here: what the workers do with it is tested in tests/e2e)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from engine import leader, tenants
from engine.cells import Cells
from engine.errors import ValidationError
from engine.intake.decoders import list_rows
from engine.intake.store import create_batch
from engine.results import decode
from engine.services import Services
from tests.integration.conftest import bearer
from tests.integration.test_intake import CELL, chunks_since, last_seq, recipients, spec

HALF = CELL // 2


async def _create(services: Services, tenant_id: str, total: int, **fields) -> str:
    created = await create_batch(services, tenant_id, spec(**fields), list_rows(recipients(total)))
    return created.id


async def _status(services: Services, batch_id: str) -> str:
    return await services.pool.fetchval(
        "SELECT status FROM batches WHERE id = $1", uuid.UUID(batch_id)
    )


async def _results_since(services: Services, seq: int) -> list:
    stream = services.topology.results_stream
    end = (await services.js.stream_info(stream)).state.last_seq
    return [decode((await services.js.get_msg(stream, n)).data) for n in range(seq + 1, end + 1)]


async def _results_seq(services: Services) -> int:
    return (await services.js.stream_info(services.topology.results_stream)).state.last_seq


async def test_pause_resume_cancel_follow_the_batch_state(client, services, tenant):
    tenant_id, key = tenant
    batch_id = await _create(services, tenant_id, 2 * CELL + HALF)
    url = f"/api/batches/{batch_id}"

    response = await client.post(f"{url}/pause", headers=bearer(key))
    assert response.status == 200 and (await response.json())["status"] == "paused"
    response = await client.post(f"{url}/pause", headers=bearer(key))
    assert response.status == 409
    assert (await response.json())["error"]["code"] == "invalid_state"

    before = await last_seq(services)
    response = await client.post(f"{url}/resume", headers=bearer(key))
    body = await response.json()
    assert response.status == 200 and body["status"] == "queued"  # nothing sent yet
    chunks = await chunks_since(services, before, batch_id)
    # One chunk per cell still holding queued recipients, under a new id (JetStream would
    # drop a re-publish under the first id) and with the batch's new generation.
    assert [(c["f"], c["g"]) for c in chunks] == [(1, 1), (CELL + 1, 1), (2 * CELL + 1, 1)]
    assert all(c["_id"].endswith(":g1") for c in chunks)

    other = await tenants.create_key(services.pool, f"t{uuid.uuid4().hex[:10]}")
    response = await client.post(f"{url}/pause", headers=bearer(other))
    assert response.status == 404  # another tenant's batch does not exist for it

    response = await client.post(f"{url}/cancel", headers=bearer(key))
    assert response.status == 200 and (await response.json())["status"] == "cancelled"
    for action in ("resume", "pause", "cancel", "send"):
        response = await client.post(f"{url}/{action}", headers=bearer(key))
        assert response.status == 409, action


async def test_cancelling_a_scheduled_batch_ends_every_recipient_at_once(client, services, tenant):
    tenant_id, key = tenant
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    batch_id = await _create(services, tenant_id, 120, scheduled_at=later)
    response = await client.post(f"/api/batches/{batch_id}/cancel", headers=bearer(key))
    batch = await response.json()
    assert batch["status"] == "cancelled"
    assert batch["counts"]["cancelled"] == 120 and batch["counts"]["pending"] == 0
    assert batch["progress"]["final"] == 120 and batch["completed_at"]


async def test_a_due_scheduled_batch_is_started_by_the_leader(services, tenant):
    tenant_id, _ = tenant
    soon = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    batch_id = await _create(services, tenant_id, CELL + HALF, scheduled_at=soon)
    await leader.start_due(services)
    assert await _status(services, batch_id) == "scheduled"  # not yet
    # One address was suppressed after the batch was created: skipped at its start.
    await services.pool.execute(
        "INSERT INTO suppressions (tenant_id, email, reason) VALUES ($1, 'user7@example.com', 'manual')",
        tenant_id,
    )
    await services.pool.execute(
        "UPDATE batches SET scheduled_at = now() - interval '1 second' WHERE id = $1",
        uuid.UUID(batch_id),
    )
    before = await last_seq(services)
    assert await leader.start_due(services) >= 1
    assert await _status(services, batch_id) == "queued"
    chunks = await chunks_since(services, before, batch_id)
    assert [(c["f"], c["n"]) for c in chunks] == [(1, CELL), (CELL + 1, HALF)]
    counts = dict(
        await services.pool.fetch(
            "SELECT status, n FROM batch_counts WHERE batch_id = $1", uuid.UUID(batch_id)
        )
    )
    assert counts == {"queued": CELL + HALF - 1, "suppressed": 1}


async def test_sending_a_draft_queues_it(client, services, tenant):
    tenant_id, key = tenant
    batch_id = await _create(services, tenant_id, 30, draft=True)
    before = await last_seq(services)
    response = await client.post(f"/api/batches/{batch_id}/send", headers=bearer(key))
    batch = await response.json()
    assert response.status == 200 and batch["status"] == "queued"
    assert batch["counts"]["queued"] == 30 and batch["counts"]["pending"] == 0
    assert len(await chunks_since(services, before, batch_id)) == 1


async def test_the_leader_settles_a_cancelled_batch_around_cells_in_flight(services, tenant):
    tenant_id, _ = tenant
    await services.redis.set(services.key("state"), "1")
    batch_id = await _create(services, tenant_id, 2 * CELL + HALF)
    cells = Cells(services)
    in_flight = await Cells(services).claim(batch_id, CELL + 1, CELL)  # a worker is in cell 2
    await cells.finish(await cells.claim(batch_id, 1, CELL), [1, 2])  # results on their way
    await services.pool.execute(
        "UPDATE batches SET status = 'cancelled' WHERE id = $1", uuid.UUID(batch_id)
    )
    seq = await _results_seq(services)
    assert await leader.settle_cancelled(services, cells) >= CELL - 2 + HALF
    published = [r for m in await _results_since(services, seq) for r in m.rows]
    mine = sorted(r.seq for r in published if r.batch_id == batch_id)
    assert mine == list(range(3, CELL + 1)) + list(range(2 * CELL + 1, 2 * CELL + HALF + 1))
    assert {r.status for r in published if r.batch_id == batch_id} == {"cancelled"}

    seq = await _results_seq(services)
    await leader.settle_cancelled(services, cells)  # the same recipients are not settled twice
    assert not [
        r for m in await _results_since(services, seq) for r in m.rows if r.batch_id == batch_id
    ]
    await cells.finish(in_flight, [CELL + 1])  # the worker stopped after one recipient
    await leader.settle_cancelled(services, cells)
    published = [r for m in await _results_since(services, seq) for r in m.rows]
    assert sorted(r.seq for r in published if r.batch_id == batch_id) == list(
        range(CELL + 2, 2 * CELL + 1)
    )


async def test_a_stalled_batch_gets_its_unfinished_cells_again(services, tenant):
    tenant_id, _ = tenant
    batch_id = await _create(services, tenant_id, 2 * CELL + HALF)
    await services.pool.execute(  # the second cell is done; nothing moved for ten minutes
        "UPDATE recipients SET status = 'sent' WHERE batch_id = $1 AND seq BETWEEN $2 AND $3",
        uuid.UUID(batch_id),
        CELL + 1,
        2 * CELL,
    )
    await services.pool.execute(
        "UPDATE batches SET queued_at = now() - interval '10 minutes' WHERE id = $1",
        uuid.UUID(batch_id),
    )
    await services.js.purge_stream(services.topology.send_stream)  # its messages were lost
    before = await last_seq(services)
    assert await leader.recover_stalled(services) >= 1
    chunks = await chunks_since(services, before, batch_id)
    assert [(c["f"], c["g"]) for c in chunks] == [(1, 1), (2 * CELL + 1, 1)]
    await leader.recover_stalled(services)  # its progress clock was reset: not again at once
    assert len(await chunks_since(services, before, batch_id)) == len(chunks)


async def test_tenant_limits_answer_429_and_create_nothing(client, services, tenant):
    tenant_id, key = tenant
    await tenants.set_limits(services.pool, tenant_id, max_active_batches=1, max_batch_recipients=5)
    request = {
        "name": "limits", "from_email": "a@example.com", "subject": "Hi", "text": "x",
        "provider": "mock", "recipients": [{"email": f"l{i}@example.com"} for i in range(6)],
    }  # fmt: skip
    response = await client.post("/api/batches", data=orjson.dumps(request), headers=bearer(key))
    assert response.status == 429
    assert (await response.json())["error"]["code"] == "too_many_recipients"
    assert response.headers["Retry-After"].isdigit()

    request["recipients"] = request["recipients"][:5]
    response = await client.post("/api/batches", data=orjson.dumps(request), headers=bearer(key))
    assert response.status == 201
    response = await client.post("/api/batches", data=orjson.dumps(request), headers=bearer(key))
    assert response.status == 429
    error = (await response.json())["error"]
    assert error["code"] == "too_many_active_batches" and "1" in error["message"]
    assert int(response.headers["Retry-After"]) > 0
    count = await services.pool.fetchval(
        "SELECT count(*) FROM batches WHERE tenant_id = $1", tenant_id
    )
    assert count == 1

    with pytest.raises(ValidationError):
        await tenants.set_limits(services.pool, tenant_id, send_rate="fast")
    await tenants.set_limits(services.pool, tenant_id, max_active_batches=0, send_rate="50/5")
    limits = await tenants.limits(services.pool, tenant_id, services.settings)
    assert limits.max_active_batches == services.settings.tenant_max_active_batches
    assert limits.max_batch_recipients == 5 and limits.send_rate == "50/5"


async def test_recipients_are_added_to_a_draft_then_it_is_sent(client, services, tenant):
    tenant_id, key = tenant
    batch_id = await _create(services, tenant_id, 3, draft=True)
    url = f"/api/batches/{batch_id}/recipients"
    more = {
        "recipients": [{"email": f"more{i}@example.com", "vars": {"code": "X"}} for i in range(4)]
    }
    response = await client.post(url, data=orjson.dumps(more), headers=bearer(key))
    assert response.status == 200 and (await response.json())["total_recipients"] == 7
    csv = b"email,code\nc1@example.com,A\nc2@example.com,B\n"
    response = await client.post(url, data=csv, headers={**bearer(key), "Content-Type": "text/csv"})
    assert response.status == 200 and (await response.json())["total_recipients"] == 9
    bad = {"recipients": [{"email": "ok@example.com", "vars": {"code": "Y"}}, {"email": "nope"}]}
    response = await client.post(url, data=orjson.dumps(bad), headers=bearer(key))
    assert response.status == 422  # all or nothing: the good row is not added either
    seqs = [r["seq"] for r in await services.pool.fetch(
        "SELECT seq FROM recipients WHERE batch_id = $1 ORDER BY seq", uuid.UUID(batch_id))]  # fmt: skip
    assert seqs == list(range(1, 10))

    before = await last_seq(services)
    response = await client.post(f"/api/batches/{batch_id}/send", headers=bearer(key))
    batch = await response.json()
    assert batch["status"] == "queued" and batch["counts"]["queued"] == 9
    assert [c["n"] for c in await chunks_since(services, before, batch_id)] == [9]
    response = await client.post(url, data=orjson.dumps(more), headers=bearer(key))
    assert response.status == 409  # not a draft any more


async def test_a_large_cancelled_batch_is_settled_in_pages(services, tenant):
    tenant_id, _ = tenant
    await services.redis.set(services.key("state"), "1")
    batch_id = await _create(services, tenant_id, 12_345)
    await services.pool.execute(
        "UPDATE batches SET status = 'cancelled' WHERE id = $1", uuid.UUID(batch_id)
    )
    seq = await _results_seq(services)
    await leader.settle_cancelled(services, Cells(services))
    messages = [m for m in await _results_since(services, seq) if m.rows[0].batch_id == batch_id]
    assert sorted(r.seq for m in messages for r in m.rows) == list(range(1, 12_346))
    assert len(messages) == 3 and max(len(m.rows) for m in messages) <= 5_000  # NATS's 1 MB
