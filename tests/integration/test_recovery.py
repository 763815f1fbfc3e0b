"""The leader lease and the re-queuing of interrupted batches, on real Redis/PostgreSQL/NATS."""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime, timedelta

from engine.intake.decoders import list_rows
from engine.intake.store import create_batch
from engine.leader import Lease, requeue_interrupted
from engine.services import Services
from tests.integration.test_intake import CELL, chunks_since, last_seq, recipients, spec


async def test_one_leader_and_takeover_when_it_is_gone(services: Services):
    key = services.key("leader-test", uuid.uuid4().hex)
    first, second = Lease(services.redis, key, ttl=30), Lease(services.redis, key, ttl=30)
    assert await first.hold()
    assert not await second.hold()
    assert await first.hold()  # renewing
    await services.redis.delete(key)  # the lease expired: its holder died
    assert await second.hold()
    assert not await first.hold()


async def test_a_batch_whose_queuing_was_interrupted_is_queued_by_the_leader(services, tenant):
    total = 2 * CELL + 500
    later = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    created = await create_batch(
        services, tenant[0], spec(scheduled_at=later), list_rows(recipients(total))
    )
    assert created.status == "scheduled"  # stored, nothing published: as if the API died there
    await services.pool.execute(
        """UPDATE batches SET status = 'queued', created_at = now() - interval '1 minute'
            WHERE id = $1""",
        uuid.UUID(created.id),
    )
    await services.pool.execute(
        "UPDATE recipients SET status = 'queued' WHERE batch_id = $1", uuid.UUID(created.id)
    )
    before = await last_seq(services)
    assert await requeue_interrupted(services) >= 1
    chunks = await chunks_since(services, before, created.id)
    assert len(chunks) == math.ceil(total / CELL)
    assert sum(c["n"] for c in chunks) == total
    queued_at = await services.pool.fetchval(
        "SELECT queued_at FROM batches WHERE id = $1", uuid.UUID(created.id)
    )
    assert queued_at is not None
    await requeue_interrupted(services)  # a second pass queues nothing again
    assert len(await chunks_since(services, before, created.id)) == len(chunks)
