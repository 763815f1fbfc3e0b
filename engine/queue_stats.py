"""Queue state for a tenant (``GET /api/queue/stats``): the shared consumers and its own
intake.

The consumers' figures (pending, ack-pending, redelivered, oldest age) describe the
pipeline every tenant shares, not anyone's data, so they are shown as they are; counts
that belong to tenants are shown only for the caller's own messages (its intake messages
waiting, counted by subject). Dead letters are ``engine.deadletters``'.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from nats.js.api import ConsumerInfo
from nats.js.errors import NotFoundError

from engine.services import Services


async def _oldest_age(services: Services, stream: str, seq: int) -> float | None:
    try:
        msg = await services.js.get_msg(stream, seq)
    except NotFoundError:
        return None
    when = msg.time if isinstance(msg.time, datetime) else None
    return round((datetime.now(UTC) - when).total_seconds(), 3) if when else None


async def oldest_waiting(services: Services, stream: str, info: ConsumerInfo) -> float | None:
    """Age in seconds of the oldest message the consumer has not acknowledged (the one after
    its ack floor); None when nothing waits."""
    if not info.num_pending + info.num_ack_pending:
        return None
    state = (await services.js.stream_info(stream)).state
    return await _oldest_age(services, stream, max(info.ack_floor.stream_seq + 1, state.first_seq))


async def queue_stats(services: Services, tenant_id: str) -> dict[str, Any]:
    """Pending, ack-pending, redelivered and the oldest waiting message's age, per consumer
    (shared by every tenant), and the tenant's own intake messages not yet recorded."""

    async def one(stream: str, consumer: str) -> dict[str, Any]:
        info = await services.js.consumer_info(stream, consumer)
        oldest = await oldest_waiting(services, stream, info)
        return {
            "stream": stream,
            "consumer": consumer,
            "pending": info.num_pending,
            "ack_pending": info.num_ack_pending,
            "redelivered": info.num_redelivered,
            "oldest_age_seconds": oldest,
        }

    consumers = await asyncio.gather(*(one(s, c) for s, c in services.topology.consumers()))
    subject = services.topology.intake_subject(tenant_id)
    intake = await services.js.stream_info(services.topology.intake_stream, subject)
    waiting = (intake.state.subjects or {}).get(subject, 0)
    return {"consumers": list(consumers), "intake": {"waiting": waiting}}
