"""Dead letters: the messages a consumer gave up on, each with its reason.

A dead letter is one JSON object published to the DLQ stream (``{prefix}.dlq.{kind}``),
read and replayed by ``engine.queues``. Every entry has ``kind``, ``tenant_id`` (who may
see and replay it; None when no tenant can be told) and ``reason``:

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
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from nats.aio.msg import Msg

from engine.services import Services
from engine.topology import Redelivery

log = logging.getLogger(__name__)

MAX_REASON_CHARS = 1000


def reason_of(exc: BaseException) -> str:
    """The reason text for an exception (type and message, capped)."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text[:MAX_REASON_CHARS]


async def publish(
    services: Services, kind: str, tenant_id: str | None, reason: str, **fields: Any
) -> None:
    """Publish one dead letter (waits for the stream's acknowledgement)."""
    body = {"kind": kind, "tenant_id": tenant_id, "reason": reason[:MAX_REASON_CHARS], **fields}
    await services.js.publish(services.topology.dlq_subject(kind), orjson.dumps(body))


def text_of(data: bytes) -> str:
    """A message body as text for a dead letter (invalid UTF-8 replaced)."""
    return data.decode("utf-8", "replace")


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
            log.error("%s: message dead-lettered after %d deliveries: %s", consumer, delivered,
                      reason)  # fmt: skip
            return
    else:
        log.warning("%s: delivery %d of a message failed; it comes back", consumer, delivered,
                    exc_info=exc)  # fmt: skip
    with contextlib.suppress(Exception):  # NATS down: it comes back after the ack wait
        await msg.nak(delay=redelivery.delay(delivered))


def _delivered(msg: Msg) -> int:
    try:
        return int(msg.metadata.num_delivered or 1)
    except Exception:  # not a JetStream message (never in the consumers)
        return 1
