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
  recipients ``cancelled`` and the leader settles every other cell (``engine.leader``);
- **send** (``draft``): queues the draft, or schedules it when its ``scheduled_at`` is
  still ahead; **start** queues a draft or a due scheduled batch (the leader starts those).

The status changes themselves are ``engine.lifecycle``'s; this module adds what follows
them (chunks published) and the answer for an action that does not apply.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime
from typing import Any

from engine import batches, chunks, lifecycle
from engine.errors import Conflict, NotFound
from engine.services import Services

log = logging.getLogger(__name__)


async def _conflict(services: Services, tenant_id: str, batch_id: str, action: str) -> Conflict:
    """The error for an action that did not apply: 404 for no such batch, else 409."""
    status = await services.pool.fetchval(
        "SELECT status FROM batches WHERE id = $1 AND tenant_id = $2 AND status <> 'creating'",
        batches.batch_uuid(batch_id),
        tenant_id,
    )
    if status is None:
        raise NotFound(f"batch {batch_id!r} not found")
    return Conflict(
        f"a {status} batch cannot be {action}", {"status": status}, code="invalid_state"
    )


async def pause(services: Services, tenant_id: str, batch_id: str) -> dict[str, Any]:
    if not await lifecycle.pause(services.pool, tenant_id, batches.batch_uuid(batch_id)):
        raise await _conflict(services, tenant_id, batch_id, "paused")
    log.info("batch paused", extra={"batch_id": batch_id})
    return await batches.get_batch(services.pool, tenant_id, batch_id)


async def resume(services: Services, tenant_id: str, batch_id: str) -> dict[str, Any]:
    bid = batches.batch_uuid(batch_id)
    row = await lifecycle.resume(services.pool, tenant_id, bid)
    if row is None:
        raise await _conflict(services, tenant_id, batch_id, "resumed")
    if row["status"] != "completed":
        queued = await chunks.queue_unfinished(services, bid, tag=f"g{row['generation']}")
        log.info("batch resumed", extra={"batch_id": batch_id, "chunks": queued})
    return await batches.get_batch(services.pool, tenant_id, batch_id)


async def cancel(services: Services, tenant_id: str, batch_id: str) -> dict[str, Any]:
    before = await lifecycle.cancel(services.pool, tenant_id, batches.batch_uuid(batch_id))
    if before is None:
        raise await _conflict(services, tenant_id, batch_id, "cancelled")
    log.info("batch cancelled", extra={"batch_id": batch_id, "was": before})
    return await batches.get_batch(services.pool, tenant_id, batch_id)


async def send(services: Services, tenant_id: str, batch_id: str) -> dict[str, Any]:
    """Queue a draft now, or schedule it when its ``scheduled_at`` is still ahead."""
    bid = batches.batch_uuid(batch_id)
    when = await services.pool.fetchrow(
        "SELECT scheduled_at FROM batches WHERE id = $1 AND tenant_id = $2 AND status = 'draft'",
        bid,
        tenant_id,
    )
    if when is None:
        raise await _conflict(services, tenant_id, batch_id, "sent (only a draft can)")
    if when["scheduled_at"] is not None and when["scheduled_at"] > datetime.now(UTC):
        changed = await lifecycle.schedule(services.pool, bid)
    else:
        changed = await start(services, bid, from_status="draft") is not None
    if not changed:  # a concurrent send or cancel came first
        raise await _conflict(services, tenant_id, batch_id, "sent (only a draft can)")
    return await batches.get_batch(services.pool, tenant_id, batch_id)


async def start(services: Services, batch_id: uuid.UUID, *, from_status: str) -> str | None:
    """Queue a ``draft`` (its send) or a due ``scheduled`` batch and publish its chunks.
    Returns the new status, or None when the batch was not in ``from_status``. If the
    process dies before the chunks are out, the leader queues them (``engine.leader``)."""
    batch = await lifecycle.start(services.pool, batch_id, from_status)
    if batch is None:
        return None
    if batch["status"] == "queued":
        await chunks.queue_batch(
            services,
            batch_id,
            batch["provider"],
            batch["tenant_id"],
            batch["total_recipients"],
            batch["chunk_size"],
        )
    return batch["status"]
