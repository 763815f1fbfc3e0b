"""Batches too large for one NATS message (issue 13): the publisher uploads the recipients to
the object store and the intake reads them from there, exactly once per msg id, against the
real NATS and PostgreSQL. The worker's send loop is not run: the batch and its recipients
are read from PostgreSQL."""

from __future__ import annotations

import base64
import uuid
from typing import Any

import orjson
import pytest
from nats.aio.msg import Msg
from nats.js.api import ObjectInfo
from nats.js.errors import ObjectNotFoundError
from nats.js.object_store import (
    OBJ_CHUNKS_PRE_TEMPLATE,
    OBJ_META_PRE_TEMPLATE,
    OBJ_STREAM_TEMPLATE,
    ObjectStore,
)

from engine.intake import from_nats
from engine.publisher import (
    RECIPIENTS_OBJECT,
    BatchRequest,
    Publisher,
    Recipient,
    RecipientsObject,
    object_name,
)
from engine.services import Services
from tests.worker_support import dead_letters

LARGE = 120_000  # about 5 MB of JSON: five times what one message may hold


def request(count: int, first: int = 0) -> BatchRequest:
    return BatchRequest(
        name="large", from_email="p@example.com", subject="Hi {{ name }}", text="x",
        provider="mock",
        recipients=[Recipient(f"u{i}@example.com", f"User {i}") for i in range(first, first + count)],
    )  # fmt: skip


async def publisher_of(services: Services) -> Publisher:
    return await Publisher.connect(services.settings.nats_url, services.settings.nats_prefix)


async def store_of(services: Services) -> ObjectStore:
    return await services.js.object_store(services.topology.recipients_bucket)


async def intake_messages(services: Services, expected: int) -> list[Msg]:
    """The messages waiting in the intake stream, fetched from the ``intake`` consumer."""
    subscription = await services.js.pull_subscribe_bind("intake", services.topology.intake_stream)
    try:
        return await subscription.fetch(expected, timeout=5)
    finally:
        await subscription.unsubscribe()


async def intake(services: Services, expected: int = 1) -> list[Msg]:
    """What the worker's intake loop does with the waiting messages (one at a time)."""
    msgs = await intake_messages(services, expected)
    assert len(msgs) == expected
    for msg in msgs:
        await from_nats.handle(services, [msg])
    return msgs


async def batches(services: Services, tenant_id: str, msg_id: str) -> list[dict[str, Any]]:
    rows = await services.pool.fetch(
        "SELECT id, status, total_recipients FROM batches WHERE tenant_id = $1"
        " AND external_id = $2",
        tenant_id,
        msg_id,
    )
    return [dict(r) for r in rows]


async def live_objects(services: Services) -> list[ObjectInfo]:
    store = await store_of(services)
    try:
        return [info for info in await store.list() if not info.deleted]
    except ObjectNotFoundError:  # nats-py: an empty bucket
        return []


async def test_a_large_batch_is_uploaded_recorded_once_and_its_object_deleted(
    own: Services, tenant: tuple[str, str]
) -> None:
    tenant_id, _ = tenant
    publisher = await publisher_of(own)
    try:
        ack = await publisher.publish(tenant_id, request(LARGE), "large-1")
    finally:
        await publisher.close()
    assert not ack.duplicate
    (uploaded,) = await live_objects(own)

    (msg,) = await intake(own)
    body = orjson.loads(msg.data)
    assert len(msg.data) < 1024 and "recipients" not in body
    assert body[RECIPIENTS_OBJECT] == {
        "bucket": own.topology.recipients_bucket,
        "name": uploaded.name,
        "size": uploaded.size,
        "digest": uploaded.digest,
        "count": LARGE,
    }
    (batch,) = await batches(own, tenant_id, "large-1")
    assert batch["total_recipients"] == LARGE and batch["status"] == "queued"
    stored = await own.pool.fetchrow(
        "SELECT count(*) AS n, count(DISTINCT email) AS emails, min(seq) AS first,"
        " max(seq) AS last FROM recipients WHERE batch_id = $1",
        batch["id"],
    )
    assert dict(stored) == {"n": LARGE, "emails": LARGE, "first": 1, "last": LARGE}
    last = await own.pool.fetchrow(
        "SELECT email, name FROM recipients WHERE batch_id = $1 AND seq = $2", batch["id"], LARGE
    )
    assert dict(last) == {"email": f"u{LARGE - 1}@example.com", "name": f"User {LARGE - 1}"}
    assert await live_objects(own) == []  # deleted once the batch was recorded
    assert await dead_letters(own) == []

    # The same message again (redelivered: the ack was lost) finds its batch and reads no
    # object (there is none any more).
    again = await from_nats.create_from_nats(own, msg.subject, msg.data, "large-1")
    assert again.replayed and again.id == str(batch["id"])
    assert len(await batches(own, tenant_id, "large-1")) == 1


async def test_publishing_a_large_batch_again_records_one_batch(
    own: Services, tenant: tuple[str, str]
) -> None:
    tenant_id, _ = tenant
    store = await store_of(own)
    # A publisher that died between its upload and its publish left an object behind ...
    orphan = await store.put(object_name(tenant_id, "again"), b'{"email": "x@example.com"}\n')
    publisher = await publisher_of(own)
    try:
        first = await publisher.publish(tenant_id, request(LARGE), "again")  # ... and retries
        second = await publisher.publish(tenant_id, request(LARGE), "again")
    finally:
        await publisher.close()
    assert not first.duplicate and second.duplicate and first.seq == second.seq
    # The repeat deleted its own upload: the first message keeps its own.
    names = {o.name for o in await live_objects(own)}
    assert orphan.name in names and len(names) == 2
    (first_name,) = names - {orphan.name}

    (msg,) = await intake(own)
    assert orjson.loads(msg.data)[RECIPIENTS_OBJECT]["name"] == first_name
    (batch,) = await batches(own, tenant_id, "again")
    assert batch["total_recipients"] == LARGE

    # Published again after JetStream's duplicate window (a new message, a new upload):
    # the batch is found recorded, and the new upload is deleted unread.
    late = await _upload(own, tenant_id, "again", request(LARGE))
    created = await from_nats.create_from_nats(own, msg.subject, late, "again")
    assert created.replayed and created.id == str(batch["id"])
    assert len(await batches(own, tenant_id, "again")) == 1
    assert {o.name for o in await live_objects(own)} == {orphan.name}  # left to the TTL


async def _upload(
    services: Services,
    tenant_id: str,
    msg_id: str,
    batch: BatchRequest,
    content: bytes | None = None,
    **changes: Any,
) -> bytes:
    """An intake message as the publisher writes it, its object uploaded (``content``
    instead of the recipients' NDJSON, and the reference's fields changed by ``changes``)."""
    if content is None:
        content = b"".join(orjson.dumps(r.as_dict()) + b"\n" for r in batch.recipients)
    name = object_name(tenant_id, msg_id)
    info = await (await store_of(services)).put(name, content)
    reference = {
        "bucket": services.topology.recipients_bucket,
        "name": name,
        "size": info.size,
        "digest": info.digest,
        "count": len(batch.recipients),
        **changes,
    }
    return batch.to_json(RecipientsObject(**reference))


def _lines(*rows: Any) -> bytes:
    return b"".join((r if isinstance(r, bytes) else orjson.dumps(r)) + b"\n" for r in rows)


OTHER_DIGEST = "SHA-256=" + "A" * 43 + "="
BAD_UPLOADS = {
    "missing object": (
        {"name": "nosuchobject.0"}, None, "recipients_object_missing", "no such object",
    ),
    "bad digest": (
        {"digest": OTHER_DIGEST}, None, "recipients_object_mismatch", "the message says",
    ),
    "bad size": ({"size": 5}, None, "recipients_object_mismatch", "the message says 5 bytes"),
    "fewer recipients": (
        {"count": 4}, None, "recipients_object_mismatch",
        "holds 3 recipients, the message says 4",
    ),
    "more recipients": (
        {"count": 2}, None, "recipients_object_mismatch",
        "holds more than 2 recipients, the message says 2",
    ),
    "another bucket": (
        {"bucket": "SOMEONE_ELSES"}, None, "invalid_recipients_object", "reads its recipients from",
    ),
    "malformed reference": (
        {"size": "12"}, None, "invalid_recipients_object", "must be an object of bucket",
    ),
    "a row that is not JSON": (
        {}, _lines({"email": "a@example.com"}, b"{not json", {"email": "c@example.com"}),
        "invalid_recipients", "recipient 2 row: not valid JSON",
    ),
    "a row that is no recipient": (
        {}, _lines({"email": "a@example.com"}, {"email": "nope"}, {"email": "c@example.com"}),
        "invalid_recipients", "e-mail",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
async def test_a_bad_upload_is_dead_lettered_with_the_reason_and_no_batch(
    own: Services, tenant: tuple[str, str], case: str
) -> None:
    tenant_id, _ = tenant
    changes, content, code, reason = BAD_UPLOADS[case]
    msg_id = f"bad-{uuid.uuid4().hex[:8]}"
    data = await _upload(own, tenant_id, msg_id, request(3), content, **changes)
    await own.js.publish(
        own.topology.intake_subject(tenant_id), data, headers={"Nats-Msg-Id": msg_id}
    )

    await intake(own)
    (dead,) = await dead_letters(own)
    assert dead["kind"] == "intake" and dead["tenant_id"] == tenant_id
    assert dead["code"] == code, dead
    assert reason in dead["reason"], dead["reason"]
    assert dead["msg_id"] == msg_id and orjson.loads(dead["data"]) == orjson.loads(data)
    assert await batches(own, tenant_id, msg_id) == []
    assert await own.pool.fetchval(
        "SELECT count(*) FROM batches WHERE tenant_id = $1", tenant_id
    ) == 0  # fmt: skip
    assert (await own.js.consumer_info(own.topology.intake_stream, "intake")).num_ack_pending == 0


async def test_an_incomplete_object_is_dead_lettered(
    own: Services, tenant: tuple[str, str]
) -> None:
    """An object whose chunks are not all there (the meta says more than the stream has)."""
    tenant_id, _ = tenant
    batch = request(20_000)  # several chunks
    data = await _upload(own, tenant_id, "holes", batch)
    info = await (await store_of(own)).get_info(orjson.loads(data)[RECIPIENTS_OBJECT]["name"])
    stream = OBJ_STREAM_TEMPLATE.format(bucket=own.topology.recipients_bucket)
    chunk = await own.js.get_last_msg(
        stream, OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=info.bucket, obj=info.nuid)
    )
    await own.js.delete_msg(stream, chunk.seq)
    await own.js.publish(
        own.topology.intake_subject(tenant_id), data, headers={"Nats-Msg-Id": "holes"}
    )

    await intake(own)
    (dead,) = await dead_letters(own)
    assert dead["code"] == "recipients_object_incomplete"
    assert f"has {info.chunks - 1} of its {info.chunks} chunks" in dead["reason"]
    assert await batches(own, tenant_id, "holes") == []


async def test_a_dead_lettered_large_batch_is_recorded_when_replayed(
    own: Services, tenant: tuple[str, str]
) -> None:
    """The object of a dead-lettered message stays (until the TTL), so a replay can work:
    here the tenant did not exist yet."""
    from engine.deadletters import replay
    from engine.tenants import create_key

    tenant_id = f"{tenant[0]}late"
    publisher = await publisher_of(own)
    try:
        await publisher.publish(tenant_id, request(LARGE), "early")
    finally:
        await publisher.close()
    await intake(own)
    (dead,) = await dead_letters(own)
    assert dead["code"] == "unknown_tenant"
    assert len(await live_objects(own)) == 1

    await create_key(own.pool, tenant_id)
    assert await replay(own, tenant_id, None) == 1
    await intake(own)
    (batch,) = await batches(own, tenant_id, "early")
    assert batch["total_recipients"] == LARGE
    assert await live_objects(own) == []


async def test_chunks_that_do_not_match_the_digest_leave_nothing_behind(
    own: Services, tenant: tuple[str, str]
) -> None:
    """Bytes that differ from the object's own digest are found only once all are read,
    after recipients were COPYed: the batch's transaction takes them back."""
    tenant_id, _ = tenant
    batch = request(30_000)  # several COPYs before the last chunk
    data = await _upload(own, tenant_id, "tampered", batch)
    body = orjson.loads(data)
    info = await (await store_of(own)).get_info(body[RECIPIENTS_OBJECT]["name"])
    info.digest = body[RECIPIENTS_OBJECT]["digest"] = OTHER_DIGEST  # the meta says otherwise
    await own.js.publish(
        OBJ_META_PRE_TEMPLATE.format(
            bucket=info.bucket, obj=base64.urlsafe_b64encode(info.name.encode()).decode()
        ),
        orjson.dumps(info.as_dict()),
        headers={"Nats-Rollup": "sub"},
    )
    await own.js.publish(
        own.topology.intake_subject(tenant_id),
        orjson.dumps(body),
        headers={"Nats-Msg-Id": "tampered"},
    )

    await intake(own)
    (dead,) = await dead_letters(own)
    assert dead["code"] == "recipients_object_mismatch"
    assert "its chunks are" in dead["reason"] and "not what the object says" in dead["reason"]
    assert await batches(own, tenant_id, "tampered") == []
    assert await own.pool.fetchval(
        "SELECT count(*) FROM recipients r JOIN batches b ON b.id = r.batch_id"
        " WHERE b.tenant_id = $1",
        tenant_id,
    ) == 0  # fmt: skip
