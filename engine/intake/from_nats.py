"""Batches published to NATS (``{prefix}.intake.{tenant}``): the ``intake`` consumer.

One batch is recorded per message id (``Nats-Msg-Id``; a replayed dead letter keeps its
original id in ``ORIGINAL_ID``), so a publisher may always publish again. A message that
can never become a batch (malformed, refused by validation or by PostgreSQL) is
dead-lettered at once; one over the tenant's active-batch limit waits; other failures
come back (``engine.deadletters.retry_or_give_up``).
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg
from nats.aio.msg import Msg

from engine import deadletters
from engine.errors import BatchSenderError, NotFound, TooManyRequests
from engine.intake.decoders import parse_json_request
from engine.intake.store import Created, create_batch
from engine.services import Services
from engine.topology import ORIGINAL_ID

log = logging.getLogger(__name__)


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
    spec, rows = await asyncio.to_thread(parse_json_request, data)  # compiles templates
    return await create_batch(services, tenant_id, spec, rows, external_id=msg_id)


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
