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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import nats
import orjson
from nats.aio.client import Client as NATS
from nats.js.api import PubAck

from engine.topology import Topology


@dataclass(slots=True)
class Recipient:
    email: str
    name: str | None = None
    vars: dict[str, Any] | None = None


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

    def to_json(self) -> bytes:
        body = {k: v for k, v in asdict(self).items() if v is not None}
        body["recipients"] = [
            {k: v for k, v in asdict(r).items() if v is not None} for r in self.recipients
        ]
        return orjson.dumps(body)


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
        """Publish one send request; ``ack.duplicate`` is true when NATS already had this id."""
        if not msg_id:
            raise ValueError("msg_id is required: it is the batch's idempotency key")
        body = request.to_json()
        if len(body) > self._nc.max_payload:
            raise ValueError(
                f"the batch is {len(body):,} bytes; NATS takes at most {self._nc.max_payload:,}"
                " per message: send large batches over REST (streamed) or split them"
            )
        return await self._js.publish(
            Topology(self.prefix).intake_subject(tenant_id),
            body,
            timeout=ack_wait,
            headers={"Nats-Msg-Id": msg_id},
        )

    async def close(self) -> None:
        await self._nc.drain()
