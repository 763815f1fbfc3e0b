"""Queue state for operators: per stream and consumer, and the dead-letter stream."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
from nats.js.errors import NotFoundError

from engine.batches import move_recipients
from engine.cells import Cells
from engine.errors import ValidationError
from engine.intake import queue_cells
from engine.services import Services

# A replayed intake message is published under a new Nats-Msg-Id (the first one is still
# in JetStream's duplicate window) and carries its original id here.
EXTERNAL_ID_HEADER = "BatchSender-External-Id"


async def _oldest_age(services: Services, stream: str, seq: int) -> float | None:
    try:
        msg = await services.js.get_msg(stream, seq)
    except NotFoundError:
        return None
    when = msg.time if isinstance(msg.time, datetime) else None
    return round((datetime.now(UTC) - when).total_seconds(), 3) if when else None


async def queue_stats(services: Services) -> dict[str, Any]:
    """Pending, ack-pending, redelivered and the oldest waiting message's age, per consumer."""

    async def one(stream: str, consumer: str) -> dict[str, Any]:
        info = await services.js.consumer_info(stream, consumer)
        state = (await services.js.stream_info(stream)).state
        waiting = info.num_pending + info.num_ack_pending
        oldest = None
        if waiting:
            seq = max(info.ack_floor.stream_seq + 1, state.first_seq)
            oldest = await _oldest_age(services, stream, seq)
        return {
            "stream": stream, "consumer": consumer, "pending": info.num_pending,
            "ack_pending": info.num_ack_pending, "redelivered": info.num_redelivered,
            "oldest_age_seconds": oldest,
        }  # fmt: skip

    consumers = await asyncio.gather(*(one(s, c) for s, c in services.topology.consumers()))
    dlq = (await services.js.stream_info(services.topology.dlq_stream)).state
    return {"consumers": list(consumers), "dlq": {"messages": dlq.messages}}


async def dead_letters(
    services: Services, tenant_id: str, *, limit: int = 50, after: int = 0
) -> dict[str, Any]:
    """The tenant's dead-lettered messages, oldest first, with their reasons."""
    if not 1 <= limit <= 500:
        raise ValidationError("limit: must be between 1 and 500", {"field": "limit"})
    stream = services.topology.dlq_stream
    state = (await services.js.stream_info(stream)).state
    found: list[dict[str, Any]] = []
    seq = max(after + 1, state.first_seq)
    while seq <= state.last_seq and len(found) <= limit:
        try:
            msg = await services.js.get_msg(stream, seq)
        except NotFoundError:
            seq += 1
            continue
        entry = orjson.loads(msg.data)
        if entry.get("tenant_id") == tenant_id:
            found.append({"seq": seq, "time": msg.time.isoformat() if msg.time else None, **entry})
        seq += 1
    page = found[:limit]
    return {"data": page, "next_cursor": str(page[-1]["seq"]) if len(found) > limit else None}


async def replay(services: Services, tenant_id: str, seqs: list[int] | None) -> int:
    """Queue the tenant's chosen dead letters (all when ``seqs`` is None) again; return how
    many. Intake messages are published again; recipients that failed after their retries
    are set back to ``queued`` and their chunks queued. A replayed entry leaves the DLQ."""
    stream = services.topology.dlq_stream
    state = (await services.js.stream_info(stream)).state
    wanted = range(state.first_seq, state.last_seq + 1) if seqs is None else sorted(set(seqs))
    replayed = 0
    for seq in wanted:
        try:
            msg = await services.js.get_msg(stream, seq)
        except NotFoundError:
            continue
        entry = orjson.loads(msg.data)
        if entry.get("tenant_id") != tenant_id:
            continue
        if entry["kind"] == "intake":
            await services.js.publish(
                entry["subject"], entry["data"].encode(),
                headers={"Nats-Msg-Id": f"replay:{stream}:{seq}", EXTERNAL_ID_HEADER: entry["msg_id"]},
            )  # fmt: skip
        elif entry["kind"] == "send":
            await _requeue_failed(services, entry, tag=f"replay{seq}")
        await services.js.delete_msg(stream, seq)
        replayed += 1
    return replayed


async def _requeue_failed(services: Services, entry: dict[str, Any], tag: str) -> None:
    batch_id = uuid.UUID(entry["batch_id"])
    async with services.pool.acquire() as conn, conn.transaction():
        seqs = await move_recipients(conn, batch_id, "failed", "queued",
                                     [f["seq"] for f in entry["failed"]], clear_error=True)  # fmt: skip
        chunk_size = await conn.fetchval(
            """UPDATE batches SET final_count = final_count - $2,
                      status = CASE WHEN status = 'completed' AND $2 > 0 THEN 'processing'
                                    ELSE status END,
                      completed_at = CASE WHEN $2 > 0 THEN NULL ELSE completed_at END
                WHERE id = $1 RETURNING chunk_size""",
            batch_id, len(seqs),
        )  # fmt: skip
    await Cells(services).clear_done(entry["batch_id"], seqs)  # their results are void now
    await queue_cells(services, batch_id, entry["provider"], entry["tenant_id"],
                      seqs, chunk_size, tag)  # fmt: skip
