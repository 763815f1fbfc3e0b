"""Batches published to NATS (``{prefix}.intake.{tenant}``): the ``intake`` consumer.

One batch is recorded per message id (``Nats-Msg-Id``; a replayed dead letter keeps its
original id in ``ORIGINAL_ID``), so a publisher may always publish again. A message that
can never become a batch (malformed, refused by validation or by PostgreSQL) is
dead-lettered at once; one over the tenant's active-batch limit waits; other failures
come back (``engine.deadletters.retry_or_give_up``).

A large batch's message has its recipients in the object store instead (``recipients_object``:
``engine.publisher``). They are read a few chunks at a time straight into the batch's COPY,
never held whole, and checked on the way against the message (size, SHA-256 digest, number
of recipients). A missing object, or one that does not match, is dead-lettered with the
reason; the last check is made inside the batch's transaction, so nothing of it stays. The
object is deleted once the batch is recorded (or found recorded before: a redelivery or a
publish again); that of a dead-lettered message stays, for a replay, until the bucket's TTL
(``engine.topology.RECIPIENTS_TTL``).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import asyncpg
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, ObjectInfo
from nats.js.errors import NotFoundError, ObjectNotFoundError
from nats.js.object_store import OBJ_CHUNKS_PRE_TEMPLATE, OBJ_DIGEST_TYPE, OBJ_STREAM_TEMPLATE

from engine import deadletters
from engine.errors import BadRequest, BatchSenderError, NotFound, TooManyRequests, ValidationError
from engine.intake.decoders import json_body, json_request, ndjson_rows
from engine.intake.fields import BatchSpec, parse_batch_fields
from engine.intake.store import Created, create_batch
from engine.publisher import RECIPIENTS_OBJECT, RecipientsObject
from engine.services import Services
from engine.topology import ORIGINAL_ID

log = logging.getLogger(__name__)

# Chunks of a recipients object read at a time (128 KiB each as nats-py and Go write them):
# about 1 MB of a batch in memory, whatever its size.
_FETCH_CHUNKS = 8
_FETCH_TIMEOUT = 10.0  # seconds for the next chunks; then the message is retried


async def create_from_nats(services: Services, subject: str, data: bytes, msg_id: str) -> Created:
    """A batch published to ``{prefix}.intake.{tenant}``: recorded once per ``msg_id``.

    Raises ``ValidationError``/``BadRequest``/``NotFound`` for a message that can never
    succeed (the caller dead-letters it); other errors are worth a retry.
    """
    tenant_id = subject.rsplit(".", 1)[-1]
    if not await services.pool.fetchval("SELECT 1 FROM tenants WHERE id = $1", tenant_id):
        raise NotFound(
            f"unknown tenant {tenant_id!r} in subject {subject!r}", code="unknown_tenant"
        )
    spec, recipients = await asyncio.to_thread(parse_intake, data)  # compiles templates
    if not isinstance(recipients, RecipientsObject):
        return await create_batch(services, tenant_id, spec, recipients, external_id=msg_id)
    async with aclosing(object_rows(services, recipients)) as rows:
        created = await create_batch(services, tenant_id, spec, rows, external_id=msg_id)
    # Recorded, now or before: the recipients are in PostgreSQL. Should deleting fail, the
    # message comes back, finds its batch and deletes the object then.
    await _delete(services, recipients)
    return created


def parse_intake(data: bytes) -> tuple[BatchSpec, AsyncIterator[Any] | RecipientsObject]:
    """An intake message: its batch fields and its recipients, inline (as blocks of rows)
    or in the object store."""
    body = json_body(data)
    if not isinstance(body, dict) or RECIPIENTS_OBJECT not in body:
        return json_request(body, data)
    if "recipients" in body:
        raise ValidationError(
            f"recipients: not with {RECIPIENTS_OBJECT} (the recipients are inline or there)",
            {"field": "recipients"},
        )
    reference = _reference(body.pop(RECIPIENTS_OBJECT))
    return parse_batch_fields(body, allow_recipients=False), reference


_REFERENCE_FIELDS = {"bucket": str, "name": str, "size": int, "digest": str, "count": int}


def _reference(value: Any) -> RecipientsObject:
    if not (
        isinstance(value, dict)
        and value.keys() == _REFERENCE_FIELDS.keys()
        and all(type(value[k]) is kind for k, kind in _REFERENCE_FIELDS.items())
        and value["size"] >= 0
        and value["count"] >= 0
    ):
        raise ValidationError(
            f"{RECIPIENTS_OBJECT}: must be an object of bucket, name and digest (strings),"
            " size and count (whole numbers, not negative), as engine.publisher writes it",
            {"field": RECIPIENTS_OBJECT},
            code="invalid_recipients_object",
        )
    return RecipientsObject(**value)


def _object_error(ref: RecipientsObject, problem: str, code: str) -> BadRequest:
    return BadRequest(
        f"{RECIPIENTS_OBJECT} {ref.name!r} in bucket {ref.bucket!r}: {problem}",
        {"bucket": ref.bucket, "name": ref.name},
        code=code,
    )


async def object_rows(services: Services, ref: RecipientsObject) -> AsyncIterator[list[Any]]:
    """Blocks of rows of a recipients object, checked against ``ref`` as they are read:
    ``BadRequest`` (the message is dead-lettered) when the object is missing, is not what
    ``ref`` says or holds other than ``ref.count`` recipients. Read only when the batch is
    recorded now (a message whose batch is recorded already reads nothing)."""
    bucket = services.topology.recipients_bucket
    if ref.bucket != bucket:
        raise _object_error(
            ref,
            f"this engine reads its recipients from bucket {bucket!r}",
            "invalid_recipients_object",
        )
    store = await services.js.object_store(bucket)
    try:
        info = await store.get_info(ref.name)
    except ObjectNotFoundError:
        raise _object_error(
            ref,
            "no such object (never uploaded, deleted, or expired with the bucket's TTL)",
            "recipients_object_missing",
        ) from None
    if (info.size, info.digest) != (ref.size, ref.digest):
        raise _object_error(
            ref,
            f"the object holds {info.size} bytes of digest {info.digest},"
            f" the message says {ref.size} bytes of digest {ref.digest}",
            "recipients_object_mismatch",
        )
    count = 0
    async with aclosing(
        _chunks(services.js, OBJ_STREAM_TEMPLATE.format(bucket=bucket), info, ref)
    ) as chunks:
        async for block in ndjson_rows(chunks):
            count += len(block)
            if count > ref.count:
                break
            yield block
    if count != ref.count:
        held = f"more than {ref.count}" if count > ref.count else str(count)
        raise _object_error(
            ref,
            f"the object holds {held} recipients, the message says {ref.count}",
            "recipients_object_mismatch",
        )


async def _chunks(
    js: JetStreamContext, stream: str, info: ObjectInfo, ref: RecipientsObject
) -> AsyncIterator[bytes]:
    """The bytes of the object ``info``, ``_FETCH_CHUNKS`` chunks at a time through a
    short-lived pull consumer (nats-py's ``ObjectStore.get`` would hold them all), checked
    at the end against the object's size and digest."""
    name = f"obj-read-{uuid.uuid4().hex}"
    reader = ConsumerConfig(
        name=name,
        filter_subject=OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=info.bucket, obj=info.nuid),
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.NONE,
        mem_storage=True,
        inactive_threshold=60.0,
    )
    chunks = info.chunks or 0
    found = await js.add_consumer(stream, reader)
    try:
        if found.num_pending != chunks:
            raise _object_error(
                ref,
                f"the object has {found.num_pending} of its {chunks} chunks",
                "recipients_object_incomplete",
            )
        digest, size, left = hashlib.sha256(), 0, chunks
        subscription = await js.pull_subscribe_bind(name=name, stream=stream)
        try:
            while left > 0:
                for msg in await subscription.fetch(min(_FETCH_CHUNKS, left), _FETCH_TIMEOUT):
                    left -= 1
                    digest.update(msg.data)
                    size += len(msg.data)
                    yield msg.data
        finally:
            await subscription.unsubscribe()
    finally:
        try:
            await js.delete_consumer(stream, name)
        except NotFoundError:
            pass
    read = OBJ_DIGEST_TYPE + base64.urlsafe_b64encode(digest.digest()).decode()
    if (size, read) != (info.size, info.digest):
        raise _object_error(
            ref,
            f"its chunks are {size} bytes of digest {read}, not what the object says",
            "recipients_object_mismatch",
        )


async def _delete(services: Services, ref: RecipientsObject) -> None:
    """Delete a recorded batch's recipients object (one of this engine's bucket only)."""
    if ref.bucket != services.topology.recipients_bucket:
        return
    store = await services.js.object_store(ref.bucket)
    try:
        await store.delete(ref.name)
    except ObjectNotFoundError:
        pass


async def handle(services: Services, msgs: list[Msg]) -> None:
    """Record the batches of a fetch of intake messages, settling each message."""
    for msg in msgs:
        msg_id = msg_id_of(msg)
        try:
            created = await create_from_nats(services, msg.subject, msg.data, msg_id)
        except BatchSenderError as exc:
            if isinstance(exc, TooManyRequests) and exc.code == "too_many_active_batches":
                log.info("intake message waits: %s", exc.message)  # later, not never
                await msg.nak(delay=exc.retry_after)
                continue
            log.warning("intake message dead-lettered: %s", exc.message)
            await deadletters.intake(services, msg, msg_id, exc.message, exc.code, exc.details)
            await msg.ack()
            continue
        except asyncpg.DataError as exc:  # a value PostgreSQL cannot store: every time
            reason = f"PostgreSQL refused its values: {deadletters.reason_of(exc)}"
            # The reason quotes the refused value (a recipient's, a body): the dead letter
            # keeps it for the tenant, the log only names the error.
            log.warning(
                "intake message dead-lettered: PostgreSQL refused its values (%s)",
                type(exc).__name__,
                extra={"tenant_id": msg.subject.rsplit(".", 1)[-1], "msg_id": msg_id},
            )
            await deadletters.intake(services, msg, msg_id, reason, "refused_by_database", None)
            await msg.ack()
            continue
        tenant_id = msg.subject.rsplit(".", 1)[-1]
        log.info(
            "intake batch recorded",
            extra={"batch_id": created.id, "tenant_id": tenant_id, "msg_id": msg_id},
        )
        await msg.ack()


async def give_up(services: Services, msg: Msg, reason: str) -> None:
    """Dead-letter an intake message that kept failing (raises, keeping it, while
    PostgreSQL is down)."""
    await services.pool.fetchval("SELECT 1")
    await deadletters.intake(services, msg, msg_id_of(msg), reason, "processing_failed", None)
    await msg.term()


def msg_id_of(msg: Msg) -> str:
    """The batch's external id: the message's original id, else its stream sequence."""
    headers = msg.headers or {}
    return (
        headers.get(ORIGINAL_ID)
        or headers.get("Nats-Msg-Id")
        or f"seq:{msg.metadata.sequence.stream}"
    )
