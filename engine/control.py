"""What an operator does to a batch: pause, resume, cancel, and send a draft.

Each action is one guarded change of the batch's status (an action that does not apply to
the batch's status answers 409) and returns the batch. The workers act on it within a
second (``engine.sender``):

- **pause** (``queued``/``processing``): no provider call of the batch starts after the
  workers have seen it; chunks in flight stop before their next provider call, their unsent
  recipients stay ``queued``, and chunk messages of the paused batch are dropped;
- **resume** (``paused``): bumps the batch's generation and publishes a chunk for every
  cell that still has ``queued`` recipients; cell leases and the done bitmap
  (``engine.cells``) keep a chunk still in flight from the pause and its new copy from
  sending anyone twice;
- **cancel** (anything unfinished): a draft's or scheduled batch's recipients are
  ``cancelled`` at once; for a batch that was queued, in-flight chunks record their unsent
  recipients ``cancelled`` and the leader settles every other cell (``engine.recovery``);
- **send** (``draft``): queues the draft, or schedules it when its ``scheduled_at`` is
  still ahead.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from engine import batches
from engine.errors import Conflict, NotFound
from engine.intake import queue_unfinished, start_batch
from engine.services import Services

log = logging.getLogger(__name__)

_UNFINISHED = ("draft", "scheduled", "queued", "processing", "paused")


async def _conflict(services: Services, tenant_id: str, batch_id: str, action: str) -> Conflict:
    """The error for an action that did not apply: 404 for no such batch, else 409."""
    status = await services.pool.fetchval(
        "SELECT status FROM batches WHERE id = $1 AND tenant_id = $2 AND status <> 'creating'",
        batches.batch_uuid(batch_id), tenant_id,
    )  # fmt: skip
    if status is None:
        raise NotFound(f"batch {batch_id!r} not found")
    return Conflict(
        f"a {status} batch cannot be {action}", {"status": status}, code="invalid_state"
    )


async def pause(services: Services, tenant_id: str, batch_id: str) -> dict[str, Any]:
    done = await services.pool.fetchval(
        """UPDATE batches SET status = 'paused', paused_at = now()
            WHERE id = $1 AND tenant_id = $2 AND status IN ('queued', 'processing')
        RETURNING true""",
        batches.batch_uuid(batch_id), tenant_id,
    )  # fmt: skip
    if not done:
        raise await _conflict(services, tenant_id, batch_id, "paused")
    log.info("batch paused", extra={"batch_id": batch_id})
    return await batches.get_batch(services.pool, tenant_id, batch_id)


async def resume(services: Services, tenant_id: str, batch_id: str) -> dict[str, Any]:
    bid = batches.batch_uuid(batch_id)
    row = await services.pool.fetchrow(
        """UPDATE batches
              SET status = CASE WHEN final_count >= total_recipients THEN 'completed'
                                WHEN started_at IS NULL THEN 'queued' ELSE 'processing' END,
                  completed_at = CASE WHEN final_count >= total_recipients
                                      THEN coalesce(completed_at, now()) END,
                  generation = generation + 1, paused_at = NULL, progress_at = now()
            WHERE id = $1 AND tenant_id = $2 AND status = 'paused'
        RETURNING status, generation""",
        bid, tenant_id,
    )  # fmt: skip
    if row is None:
        raise await _conflict(services, tenant_id, batch_id, "resumed")
    if row["status"] != "completed":
        chunks = await queue_unfinished(services, bid, tag=f"g{row['generation']}")
        log.info("batch resumed", extra={"batch_id": batch_id, "chunks": chunks})
    return await batches.get_batch(services.pool, tenant_id, batch_id)


async def cancel(services: Services, tenant_id: str, batch_id: str) -> dict[str, Any]:
    bid = batches.batch_uuid(batch_id)
    async with services.pool.acquire() as conn, conn.transaction():
        before = await conn.fetchval(
            """SELECT status FROM batches
                WHERE id = $1 AND tenant_id = $2 AND status = ANY($3::text[]) FOR UPDATE""",
            bid, tenant_id, list(_UNFINISHED),
        )  # fmt: skip
        if before is not None:
            await conn.execute(
                "UPDATE batches SET status = 'cancelled', cancelled_at = now() WHERE id = $1", bid
            )
            if before in ("draft", "scheduled"):  # nothing was ever queued: end it here
                moved = await batches.move_recipients(conn, bid, "pending", "cancelled")
                await conn.execute(
                    """UPDATE batches SET final_count = final_count + $2, completed_at = now()
                        WHERE id = $1""",
                    bid, len(moved),
                )  # fmt: skip
    if before is None:
        raise await _conflict(services, tenant_id, batch_id, "cancelled")
    log.info("batch cancelled", extra={"batch_id": batch_id, "was": before})
    return await batches.get_batch(services.pool, tenant_id, batch_id)


async def send(services: Services, tenant_id: str, batch_id: str) -> dict[str, Any]:
    """Queue a draft now, or schedule it when its ``scheduled_at`` is still ahead."""
    bid = batches.batch_uuid(batch_id)
    when = await services.pool.fetchrow(
        "SELECT scheduled_at FROM batches WHERE id = $1 AND tenant_id = $2 AND status = 'draft'",
        bid, tenant_id,
    )  # fmt: skip
    if when is None:
        raise await _conflict(services, tenant_id, batch_id, "sent (only a draft can)")
    if when["scheduled_at"] is not None and when["scheduled_at"] > datetime.now(UTC):
        changed = await services.pool.fetchval(
            "UPDATE batches SET status = 'scheduled' WHERE id = $1 AND status = 'draft' RETURNING true",
            bid,
        )
    else:
        changed = await start_batch(services, bid, from_status="draft") is not None
    if not changed:  # a concurrent send or cancel came first
        raise await _conflict(services, tenant_id, batch_id, "sent (only a draft can)")
    return await batches.get_batch(services.pool, tenant_id, batch_id)
