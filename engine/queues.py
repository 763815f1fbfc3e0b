"""Queue state for operators: per stream and consumer, and the dead-letter stream."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import orjson
from nats.js.errors import NotFoundError

from engine.errors import ValidationError
from engine.services import Services


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
