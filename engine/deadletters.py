"""Dead letters: the messages a consumer gave up on, each with its reason.

A dead letter is one JSON object published to the DLQ stream (``{prefix}.dlq.{kind}``),
by one function per kind below. Every entry has ``kind``, ``tenant_id`` (who may see and
replay it; None when no tenant can be told) and ``reason``:

| kind    | given up by             | other fields                                  |
|---------|-------------------------|-----------------------------------------------|
| intake  | intake                  | code, details, subject, msg_id, data          |
| send    | send                    | batch_id, provider, failed: [{seq, error, attempts}] |
| chunk   | send                    | data (a chunk message that names no batch)     |
| results | results-pg, results-ch  | consumer, data (the results message)          |

When to give up (``retry_or_give_up``): a message whose handling failed goes back to NATS
after a growing delay; on its last allowed delivery (``engine.topology.REDELIVERY``) the
consumer dead-letters it itself and terminates it. Giving up needs the services the
consumer works with (each ``give_up`` checks them): while one is down the message stays in
NATS however long the outage lasts, so only a message that fails while everything works is
ever dead-lettered for failing.

Reading: a tenant pages through its own dead letters (``dead_letters``) and replays them
(``replay``). The stream is read in batches through a short-lived pull consumer (no acks,
in memory, deleted after the read), never one request per message; one page scans at
most ``DLQ_SCAN`` messages, so a page can hold fewer entries than asked (even none) with a
``next_cursor`` to go on from. Totals of the stream are not shown to tenants: it holds
every tenant's messages.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from datetime import datetime
from typing import Any

import nats.errors
import orjson
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from engine import chunks, lifecycle, metrics
from engine.cells import Cells
from engine.errors import ValidationError
from engine.services import Services
from engine.topology import ORIGINAL_ID, Redelivery

log = logging.getLogger(__name__)

MAX_REASON_CHARS = 1000
DLQ_SCAN = 5_000  # messages one page of dead letters reads at most
MAX_REPLAY_SEQS = 1_000
_FETCH = 100  # messages per round trip (a dead letter of a chunk can be ~20 KB)
_MAX_SEQ = (1 << 63) - 1


def reason_of(exc: BaseException) -> str:
    """The reason text for an exception (type and message, capped)."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text[:MAX_REASON_CHARS]


# --- publishing, one function per kind ----------------------------------------------

KINDS = ("intake", "send", "chunk", "results")


async def _publish(
    services: Services, kind: str, tenant_id: str | None, reason: str, **fields: Any
) -> None:
    """Publish one dead letter (waits for the stream's acknowledgement)."""
    body = {"kind": kind, "tenant_id": tenant_id, "reason": reason[:MAX_REASON_CHARS], **fields}
    await services.js.publish(services.topology.dlq_subject(kind), orjson.dumps(body))
    metrics.DEAD_LETTERS.labels(kind).inc()


def _text(data: bytes) -> str:
    """A message body as text for a dead letter (invalid UTF-8 replaced)."""
    return data.decode("utf-8", "replace")


async def intake(
    services: Services, msg: Msg, msg_id: str, reason: str, code: str, details: object
) -> None:
    """An intake message that can never become a batch (or kept failing)."""
    await _publish(
        services,
        "intake",
        msg.subject.rsplit(".", 1)[-1],
        reason,
        code=code,
        details=details,
        subject=msg.subject,
        msg_id=msg_id,
        data=_text(msg.data),
    )


async def send(
    services: Services,
    batch_id: str,
    tenant_id: str,
    provider: str,
    reason: str,
    failed: list[tuple[int, str | None, int]],
) -> None:
    """Recipients of one chunk that failed, as (seq, error, attempts): a replay queues them
    again."""
    await _publish(
        services,
        "send",
        tenant_id,
        reason,
        batch_id=batch_id,
        provider=provider,
        failed=[{"seq": seq, "error": error, "attempts": n} for seq, error, n in failed],
    )


async def chunk(services: Services, data: bytes, reason: str) -> None:
    """A chunk message that names no batch (malformed)."""
    await _publish(services, "chunk", chunks.tenant_of(data), reason, data=_text(data))


async def results(services: Services, consumer: str, data: bytes, reason: str) -> None:
    """A results message that ``consumer`` gave up on, under the tenant it names or, for
    webhook results, the tenant of its first batch."""
    tenant = await _results_tenant(services, data)
    await _publish(services, "results", tenant, reason, consumer=consumer, data=_text(data))


async def _results_tenant(services: Services, data: bytes) -> str | None:
    try:
        body = orjson.loads(data)
        if isinstance(body.get("t"), str):
            return body["t"]
        batch = body["b"] if isinstance(body["b"], str) else body["b"][0]
        return await services.pool.fetchval(
            "SELECT tenant_id FROM batches WHERE id = $1", uuid.UUID(batch)
        )
    except Exception as exc:  # a poison message may name nothing usable
        log.info("dead-lettered results message without a tenant (%r)", exc)
        return None


# --- giving up ---------------------------------------------------------------------


async def retry_or_give_up(
    consumer: str,
    msg: Msg,
    exc: BaseException,
    give_up: Callable[[Msg, str], Awaitable[None]],
    redelivery: Redelivery,
) -> None:
    """Handle a message whose handling raised ``exc``: back to NATS after the policy's
    delay, or, on its last allowed delivery, ``give_up(msg, reason)`` (which dead-letters
    and terminates it, or raises when it cannot: then it goes back to NATS too)."""
    delivered = _delivered(msg)
    reason = reason_of(exc)
    if redelivery.last(delivered):
        try:
            await give_up(msg, f"failed on {delivered} deliveries: {reason}")
        except Exception as failure:
            log.warning("%s: cannot give a message up yet (%r); it comes back", consumer, failure)
        else:
            log.error(
                "%s: message dead-lettered after %d deliveries: %s", consumer, delivered, reason
            )
            return
    else:
        log.warning(
            "%s: delivery %d of a message failed; it comes back", consumer, delivered, exc_info=exc
        )
    with contextlib.suppress(Exception):  # NATS down: it comes back after the ack wait
        await msg.nak(delay=redelivery.delay(delivered))


def _delivered(msg: Msg) -> int:
    try:
        return int(msg.metadata.num_delivered or 1)
    except Exception:  # not a JetStream message (never in the consumers)
        return 1


# --- reading and replaying --------------------------------------------------------


async def _dead_letters(
    services: Services, first: int, scan: int | None = None
) -> AsyncIterator[tuple[int, datetime | None, dict[str, Any]]]:
    """(seq, time, entry) of the dead letters from ``first`` on that are there now, in
    order, at most ``scan`` of them, read ``_FETCH`` at a time by an ephemeral consumer.
    Close it (``aclosing``) when leaving early: that deletes the consumer."""
    stream = services.topology.dlq_stream
    name = f"dlq-read-{uuid.uuid4().hex}"
    reader = ConsumerConfig(
        name=name,
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=first,
        ack_policy=AckPolicy.NONE,
        mem_storage=True,
        inactive_threshold=60.0,
    )
    info = await services.js.add_consumer(stream, reader)
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
                headers = {"Nats-Msg-Id": f"replay:{stream}:{seq}", ORIGINAL_ID: entry["msg_id"]}
                await services.js.publish(entry["subject"], entry["data"].encode(), headers=headers)
            elif entry["kind"] == "send":
                await _requeue_failed(services, entry, tag=f"replay{seq}")
            elif entry["kind"] == "results":  # both results consumers read it again
                await services.js.publish(
                    services.topology.results_subject,
                    entry["data"].encode(),
                    headers={"Nats-Msg-Id": f"replay:{stream}:{seq}"},
                )
            else:  # a chunk that names no batch: nothing to queue again, left to read
                continue
            await services.js.delete_msg(stream, seq)
            replayed += 1
    return replayed


async def _requeue_failed(services: Services, entry: dict[str, Any], tag: str) -> None:
    batch_id = uuid.UUID(entry["batch_id"])
    seqs, chunk_size = await lifecycle.reopen_failed(
        services.pool, batch_id, [f["seq"] for f in entry["failed"]]
    )
    await Cells(services).clear_done(entry["batch_id"], seqs)  # their results are void now
    await chunks.queue_cells(
        services, batch_id, entry["provider"], entry["tenant_id"], seqs, chunk_size, tag
    )
