"""The publisher helper for internal services: send a batch straight to NATS JetStream.

    from engine.publisher import BatchRequest, Publisher, Recipient

    publisher = await Publisher.connect("nats://nats:4222")
    ack = await publisher.publish(
        "acme",
        BatchRequest(name="welcome", from_email="hi@acme.test", subject="Hi {{ name }}",
                     text="Welcome, {{ name }}!", provider="ses",
                     recipients=[Recipient("ann@example.com", "Ann")]),
        msg_id="welcome-2026-11-30",  # the idempotency key: publish again safely
    )
    await publisher.close()

The engine records one batch per ``msg_id`` (also after the JetStream duplicate window),
so retrying a publish is always safe. The batch then shows in the REST API as
``GET /api/batches?external_id=<msg_id>``. Needs only nats-py and orjson.

A batch too large for one NATS message (``max_payload``, 1 MB by default: about 10,000
recipients) goes in two steps, under the same API: its recipients are uploaded as NDJSON
(one recipient a line) to the JetStream Object Store bucket ``{PREFIX}_RECIPIENTS``, under
a name of this upload alone, then the intake message is published with the batch fields
and, instead of ``recipients``, a ``recipients_object`` (``RecipientsObject``: where the
upload is and what the intake checks it against). An upload is never replaced, so a
message already published keeps its recipients whatever a retry does: a retry that
finds the message published (``ack.duplicate``) deletes its own upload, and one from a
publisher that died before publishing expires with the bucket's TTL
(``engine.topology.RECIPIENTS_TTL``).
"""

from __future__ import annotations

import hashlib
import io
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import nats
import orjson
from nats.aio.client import Client as NATS
from nats.js.api import PubAck

from engine.topology import Topology

# What the headers of an intake message take of max_payload (the server counts them in
# it, and closes the connection of a client that sends more): besides the msg id itself.
_HEADERS_ROOM = 512
# Recipients encoded at a time while uploading a large batch (about 1 MB of NDJSON).
_UPLOAD_BLOCK = 10_000
# The field of an intake message that refers to its recipients in the object store.
RECIPIENTS_OBJECT = "recipients_object"


@dataclass(slots=True)
class Recipient:
    email: str
    name: str | None = None
    vars: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        """The recipient as the intake reads it (fields that are None left out)."""
        found: dict[str, Any] = {"email": self.email}
        if self.name is not None:
            found["name"] = self.name
        if self.vars is not None:
            found["vars"] = self.vars
        return found


@dataclass(frozen=True, slots=True)
class RecipientsObject:
    """Where a large batch's recipients are (one object of the recipients bucket: NDJSON,
    one recipient a line) and what the intake checks before the batch is recorded: the
    object's ``size`` in bytes, its ``digest`` (``SHA-256=`` and the URL-safe base64 of
    its SHA-256, as the object store writes it) and ``count``, its number of recipients."""

    bucket: str
    name: str
    size: int
    digest: str
    count: int


@dataclass(slots=True)
class BatchRequest:
    """The fields of ``POST /api/batches``, recipients inline."""

    name: str
    from_email: str
    subject: str
    provider: str
    recipients: list[Recipient] = field(default_factory=list)
    text: str | None = None
    html: str | None = None
    from_name: str | None = None
    scheduled_at: datetime | None = None
    dry_run: bool = False
    metadata: dict[str, Any] | None = None

    def to_json(self, recipients_object: RecipientsObject | None = None) -> bytes:
        """The intake message: recipients inline, or the object that holds them."""
        body = {
            k: getattr(self, k)
            for k in self.__dataclass_fields__
            if k != "recipients" and getattr(self, k) is not None
        }
        if recipients_object is None:
            body["recipients"] = [r.as_dict() for r in self.recipients]
        else:
            body[RECIPIENTS_OBJECT] = asdict(recipients_object)
        return orjson.dumps(body)


class _Ndjson(io.RawIOBase):
    """The recipients as NDJSON, encoded a block at a time as the object store reads them
    (so an upload never holds the whole encoded batch)."""

    def __init__(self, recipients: Sequence[Recipient]):
        self._recipients = recipients
        self._next = 0
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending and self._next < len(self._recipients):
            block = self._recipients[self._next : self._next + _UPLOAD_BLOCK]
            self._next += len(block)
            self._pending = memoryview(b"".join(orjson.dumps(r.as_dict()) + b"\n" for r in block))
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size


def object_name(tenant_id: str, msg_id: str) -> str:
    """A new object name for one upload of the recipients of ``msg_id``: the same start
    for every upload of a message (an operator can tell whose it is), then its own part."""
    start = hashlib.sha256(f"{tenant_id}\n{msg_id}".encode()).hexdigest()[:32]
    return f"{start}.{uuid.uuid4().hex}"


class Publisher:
    def __init__(self, nc: NATS, prefix: str = "batchsender"):
        self._nc = nc
        self._js = nc.jetstream()
        self.prefix = prefix

    @classmethod
    async def connect(cls, url: str, prefix: str = "batchsender") -> Publisher:
        return cls(await nats.connect(url), prefix)

    async def publish(
        self, tenant_id: str, request: BatchRequest, msg_id: str, *, ack_wait: float = 10.0
    ) -> PubAck:
        """Publish one send request; ``ack.duplicate`` is true when NATS already had this id.

        A request too large for one message has its recipients uploaded first (see the
        module's docstring).
        """
        if not msg_id:
            raise ValueError("msg_id is required: it is the batch's idempotency key")
        room = self._nc.max_payload - len(msg_id.encode()) - _HEADERS_ROOM
        if body := self._inline(request, room):
            return await self._publish(tenant_id, body, msg_id, ack_wait)
        topology = Topology(self.prefix)
        name = object_name(tenant_id, msg_id)
        largest = RecipientsObject(topology.recipients_bucket, name, 1 << 62, "=" * 52, 1 << 62)
        if len(request.to_json(largest)) > room:
            raise ValueError(
                f"the batch's fields alone take over {room:,} bytes, more than one NATS"
                " message holds with its headers: send it over REST"
            )
        store = await self._js.object_store(topology.recipients_bucket)
        info = await store.put(name, _Ndjson(request.recipients))
        uploaded = RecipientsObject(
            topology.recipients_bucket, name, info.size or 0, info.digest or "",
            len(request.recipients),
        )  # fmt: skip
        ack = await self._publish(tenant_id, request.to_json(uploaded), msg_id, ack_wait)
        if ack.duplicate:  # the message published before refers to an upload of its own
            await store.delete(name)
        return ack

    @staticmethod
    def _inline(request: BatchRequest, room: int) -> bytes | None:
        """The intake message with the recipients inline, or None when it is over ``room``
        bytes (found out after about 10,000 recipients, not by encoding them all)."""
        size = 0
        for recipient in request.recipients:
            size += len(orjson.dumps(recipient.as_dict())) + 1
            if size > room:
                return None
        body = request.to_json()
        return body if len(body) <= room else None

    async def _publish(self, tenant_id: str, body: bytes, msg_id: str, ack_wait: float) -> PubAck:
        return await self._js.publish(
            Topology(self.prefix).intake_subject(tenant_id),
            body,
            timeout=ack_wait,
            headers={"Nats-Msg-Id": msg_id},
        )

    async def close(self) -> None:
        await self._nc.drain()
