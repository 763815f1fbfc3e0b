"""Queue state for a tenant: the shared consumers, its own intake, its dead letters.

What a tenant may see: the consumers' figures (pending, ack-pending, redelivered, oldest
age) describe the pipeline every tenant shares, not anyone's data, so they are shown as
they are; counts that belong to tenants are shown only for the caller's own messages (its
intake messages waiting, counted by subject). Totals of the dead-letter stream are not
shown at all: it holds every tenant's messages (operators read it from Prometheus and
``nats stream info``); a tenant pages through its own with ``dead_letters``.

The dead-letter stream is read in batches through a short-lived pull consumer (no acks,
in memory, deleted after the read), never one request per message; one page
scans at most ``DLQ_SCAN`` messages, so a page can hold fewer entries than asked (even
none) with a ``next_cursor`` to go on from.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from datetime import UTC, datetime
from typing import Any

import nats.errors
import orjson
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from engine.batches import move_recipients
from engine.cells import Cells
from engine.errors import ValidationError
from engine.intake import queue_cells
from engine.services import Services

# A replayed intake message is published under a new Nats-Msg-Id (the first one is still
# in JetStream's duplicate window) and carries its original id here.
EXTERNAL_ID_HEADER = "BatchSender-External-Id"
DLQ_SCAN = 5_000  # messages one page of dead letters reads at most
MAX_REPLAY_SEQS = 1_000
_FETCH = 100  # messages per round trip (a dead letter of a chunk can be ~20 KB)
_MAX_SEQ = (1 << 63) - 1


async def _oldest_age(services: Services, stream: str, seq: int) -> float | None:
    try:
        msg = await services.js.get_msg(stream, seq)
    except NotFoundError:
        return None
    when = msg.time if isinstance(msg.time, datetime) else None
    return round((datetime.now(UTC) - when).total_seconds(), 3) if when else None


async def queue_stats(services: Services, tenant_id: str) -> dict[str, Any]:
    """Pending, ack-pending, redelivered and the oldest waiting message's age, per consumer
    (shared by every tenant), and the tenant's own intake messages not yet recorded."""

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
    subject = services.topology.intake_subject(tenant_id)
    intake = await services.js.stream_info(services.topology.intake_stream, subject)
    waiting = (intake.state.subjects or {}).get(subject, 0)
    return {"consumers": list(consumers), "intake": {"waiting": waiting}}


async def _dead_letters(
    services: Services, first: int, scan: int | None = None
) -> AsyncIterator[tuple[int, datetime | None, dict[str, Any]]]:
    """(seq, time, entry) of the dead letters from ``first`` on that are there now, in
    order, at most ``scan`` of them, read ``_FETCH`` at a time by an ephemeral consumer.
    Close it (``aclosing``) when leaving early: that deletes the consumer."""
    stream = services.topology.dlq_stream
    name = f"dlq-read-{uuid.uuid4().hex}"
    info = await services.js.add_consumer(stream, ConsumerConfig(
        name=name, deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=first,
        ack_policy=AckPolicy.NONE, mem_storage=True, inactive_threshold=60.0,
    ))  # fmt: skip
    try:
        left = info.num_pending if scan is None else min(scan, info.num_pending)
        subscription = await services.js.pull_subscribe_bind(name=name, stream=stream)
        try:
            while left > 0:
                try:
                    batch = await subscription.fetch(min(_FETCH, left), timeout=2)
                except nats.errors.TimeoutError:
                    return  # deleted meanwhile (replayed): there is no more
                for msg in batch[:left]:
                    left -= 1
                    yield (
                        msg.metadata.sequence.stream,
                        msg.metadata.timestamp,
                        orjson.loads(msg.data),
                    )
        finally:
            await subscription.unsubscribe()
    finally:
        try:
            await services.js.delete_consumer(stream, name)
        except NotFoundError:
            pass


async def dead_letters(
    services: Services, tenant_id: str, *, limit: int | None = None, after: int | None = None
) -> dict[str, Any]:
    """The tenant's dead-lettered messages, oldest first, with their reasons (see the
    module's docstring for short pages)."""
    limit = 50 if limit is None else limit
    after = 0 if after is None else after
    if not 1 <= limit <= 500:
        raise ValidationError("limit: must be between 1 and 500", {"field": "limit"})
    if not 0 <= after < _MAX_SEQ:
        raise ValidationError("cursor: not a cursor this API returned", {"field": "cursor"})
    last = (await services.js.stream_info(services.topology.dlq_stream)).state.last_seq
    found: list[dict[str, Any]] = []
    scanned = after
    if after < last:
        async with aclosing(_dead_letters(services, after + 1, DLQ_SCAN)) as entries:
            async for seq, when, entry in entries:
                scanned = seq
                if entry.get("tenant_id") == tenant_id:
                    found.append({"seq": seq, "time": when.isoformat() if when else None, **entry})
                    if len(found) > limit:
                        break
    page = found[:limit]
    if len(found) > limit:
        next_cursor: str | None = str(page[-1]["seq"])
    elif after < scanned < last:
        next_cursor = str(scanned)  # the scan budget ran out: go on from there
    else:
        next_cursor = None
    return {"data": page, "next_cursor": next_cursor}


def replay_selection(body: Any) -> list[int] | None:
    """The dead letters a replay body chooses: ``{"seqs": [...]}`` (1 to
    ``MAX_REPLAY_SEQS`` positive whole numbers, from ``dead_letters``) or ``{"all": true}``
    (None); ``ValidationError`` for anything else."""
    seqs = body.get("seqs") if isinstance(body, dict) else None
    everything = isinstance(body, dict) and body.get("all") is True
    valid = (
        isinstance(seqs, list)
        and 1 <= len(seqs) <= MAX_REPLAY_SEQS
        and all(type(s) is int and 0 < s <= _MAX_SEQ for s in seqs)
    )
    one_choice = isinstance(body, dict) and (body.keys() == {"seqs"} or body.keys() == {"all"})
    if not one_choice or everything == valid:
        raise ValidationError(
            f'send {{"seqs": [...]}} (1 to {MAX_REPLAY_SEQS} positive sequence numbers from '
            '/api/queue/dlq) or {"all": true}',
            {"field": "seqs"},
        )
    return None if everything else seqs


async def replay_request(services: Services, tenant_id: str, body: Any) -> int:
    """``replay`` of what the request body chooses (``replay_selection``)."""
    return await replay(services, tenant_id, replay_selection(body))


async def _chosen(
    services: Services, seqs: list[int]
) -> AsyncIterator[tuple[int, datetime | None, dict[str, Any]]]:
    stream = services.topology.dlq_stream
    for seq in sorted(set(seqs)):
        try:
            msg = await services.js.get_msg(stream, seq)
        except NotFoundError:
            continue
        yield seq, msg.time, orjson.loads(msg.data)


async def replay(services: Services, tenant_id: str, seqs: list[int] | None) -> int:
    """Queue the tenant's chosen dead letters (all when ``seqs`` is None) again; return how
    many. Intake and results messages are published again; recipients that failed after
    their retries are set back to ``queued`` and their chunks queued. A replayed entry
    leaves the DLQ; a malformed chunk (kind ``chunk``) cannot be replayed and stays."""
    stream = services.topology.dlq_stream
    chosen = _dead_letters(services, 1) if seqs is None else _chosen(services, seqs)
    replayed = 0
    async with aclosing(chosen) as entries:
        async for seq, _, entry in entries:
            if entry.get("tenant_id") != tenant_id:
                continue
            if entry["kind"] == "intake":
                await services.js.publish(
                    entry["subject"], entry["data"].encode(),
                    headers={"Nats-Msg-Id": f"replay:{stream}:{seq}", EXTERNAL_ID_HEADER: entry["msg_id"]},
                )  # fmt: skip
            elif entry["kind"] == "send":
                await _requeue_failed(services, entry, tag=f"replay{seq}")
            elif entry["kind"] == "results":  # both results consumers read it again
                await services.js.publish(
                    services.topology.results_subject, entry["data"].encode(),
                    headers={"Nats-Msg-Id": f"replay:{stream}:{seq}"},
                )  # fmt: skip
            else:  # a chunk that names no batch: nothing to queue again, left to read
                continue
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
