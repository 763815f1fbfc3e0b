"""Creating a batch, and adding recipients to a draft: all or nothing, in one transaction.

The batch row is written ``creating``, its recipients are COPYed (``copier``), then it
takes its first status (``engine.lifecycle``) and, when queued, its chunks are published
(``engine.chunks``). A repeated create with the same ``Idempotency-Key`` or NATS message
id returns the first batch.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from collections.abc import AsyncIterable
from dataclasses import dataclass
from typing import Any

import asyncpg

from engine import accounts, lifecycle, tenants
from engine.batches import batch_uuid
from engine.chunks import cell_size, queue_batch
from engine.errors import Conflict, NotFound, ValidationError
from engine.intake.copier import RecipientCopier
from engine.intake.fields import BatchSpec, summary
from engine.services import Services
from engine.templates import BatchTemplate
from providers.registry import PROVIDERS

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Created:
    id: str
    status: str
    total_recipients: int
    suppressed: int
    replayed: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "total_recipients": self.total_recipients,
            "suppressed": self.suppressed,
        }


async def _existing(
    conn: asyncpg.Connection, tenant_id: str, column: str, value: str
) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"SELECT id, status, total_recipients, suppressed_count, request_hash"
        f" FROM batches WHERE tenant_id = $1 AND {column} = $2",
        tenant_id,
        value,
    )


def _replay(row: asyncpg.Record) -> Created:
    return Created(
        str(row["id"]), row["status"], row["total_recipients"], row["suppressed_count"], True
    )


async def create_batch(
    services: Services,
    tenant_id: str,
    spec: BatchSpec,
    rows: AsyncIterable[Any],
    *,
    external_id: str | None = None,
    idempotency_key: str | None = None,
    request_hash: bytes | None = None,
) -> Created:
    """Store a batch and its recipients in one transaction, then queue its chunks.

    ``external_id`` (a NATS ``Nats-Msg-Id``) and ``idempotency_key`` make a repeated create
    return the first batch instead of a second one.
    """
    batch_id = uuid.uuid4()
    status = lifecycle.first_status(spec.draft, spec.scheduled_at)
    async with services.pool.acquire() as conn:
        account_id = await _account(conn, services, tenant_id, spec)
        chunk_size = cell_size(PROVIDERS[spec.provider].max_per_call)
        tenant_limits = await tenants.limits(conn, tenant_id, services.settings)
        copier = RecipientCopier(
            batch_id, spec.template, "queued" if status == "queued" else "pending", tenant_limits
        )
        for column, value in (("external_id", external_id), ("idempotency_key", idempotency_key)):
            if value is None:
                continue
            found = await _existing(conn, tenant_id, column, value)
            if found is not None:
                if column == "idempotency_key" and found["request_hash"] != request_hash:
                    raise Conflict(
                        "this Idempotency-Key was used with a different request",
                        {"batch_id": str(found["id"])},
                        code="idempotency_conflict",
                    )
                return _replay(found)
        await tenants.check_active_batches(conn, tenant_id, tenant_limits)
        try:
            async with conn.transaction():
                await conn.execute(
                    """INSERT INTO batches (id, tenant_id, name, from_email, from_name, subject,
                           html, text, provider, status, chunk_size, dry_run, metadata,
                           scheduled_at, external_id, idempotency_key, request_hash,
                           provider_account_id)
                       VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'creating', $10, $11, $12,
                               $13, $14, $15, $16, $17)""",
                    batch_id,
                    tenant_id,
                    spec.name,
                    spec.from_email,
                    spec.from_name,
                    spec.subject,
                    spec.html,
                    spec.text,
                    spec.provider,
                    chunk_size,
                    spec.dry_run,
                    spec.metadata,
                    spec.scheduled_at,
                    external_id,
                    idempotency_key,
                    request_hash,
                    account_id,
                )
                await copier.copy(conn, rows)
                total = copier.count
                if total == 0 and not spec.draft:
                    raise ValidationError(
                        "recipients: must not be empty",
                        {"field": "recipients"},
                        code="no_recipients",
                    )
                suppressed = await lifecycle.mark_suppressed(conn, batch_id, tenant_id)
                final_status = await lifecycle.created(
                    conn, batch_id, status, copier.status, total, suppressed
                )
        except asyncpg.UniqueViolationError:
            # A concurrent create with the same external id / idempotency key won the race.
            for column, value in (
                ("external_id", external_id),
                ("idempotency_key", idempotency_key),
            ):
                if value is not None and (found := await _existing(conn, tenant_id, column, value)):
                    return _replay(found)
            raise
    log.info(
        "batch created",
        extra={"batch_id": str(batch_id), "tenant_id": tenant_id, "recipients": total},
    )
    if final_status == "queued":
        await queue_batch(services, batch_id, spec.provider, tenant_id, total, chunk_size)
    return Created(str(batch_id), final_status, total, suppressed)


async def _account(
    conn: asyncpg.Connection, services: Services, tenant_id: str, spec: BatchSpec
) -> uuid.UUID | None:
    """The id of the tenant's provider account the batch names (its provider set on
    ``spec``), or None for the server's default account of ``spec.provider``;
    ``ValidationError`` naming the field when neither can send it."""

    def refuse(field: str, message: str) -> ValidationError:
        error = {"field": field, "message": message}
        return ValidationError(summary([error]), {"errors": [error]})

    if spec.provider_account is None:
        if not services.settings.provider_enabled(spec.provider):
            raise refuse(
                "provider",
                "no default account for it on this server; name one of your provider "
                "accounts in provider_account",
            )
        return None
    found = await accounts.resolve(conn, tenant_id, spec.provider_account)
    if found is None:
        raise refuse("provider_account", "no such provider account")
    account_id, provider = found
    if spec.provider and spec.provider != provider:
        raise refuse("provider_account", f"is a {provider} account, not {spec.provider}")
    spec.provider = provider
    return account_id


async def append_recipients(
    services: Services, tenant_id: str, batch_id: str, rows: AsyncIterable[Any]
) -> Created:
    """Add recipients to a draft (numbered after those it has), all or nothing."""
    bid = batch_uuid(batch_id)
    async with services.pool.acquire() as conn, conn.transaction():
        batch = await conn.fetchrow(
            """SELECT status, subject, html, text, total_recipients FROM batches
                WHERE id = $1 AND tenant_id = $2 AND status <> 'creating' FOR UPDATE""",
            bid,
            tenant_id,
        )
        if batch is None:
            raise NotFound(f"batch {batch_id!r} not found")
        if batch["status"] != "draft":
            raise Conflict(
                f"recipients can only be added to a draft; this batch is {batch['status']}",
                {"status": batch["status"]},
                code="invalid_state",
            )
        before = batch["total_recipients"]
        template = await asyncio.to_thread(
            BatchTemplate, batch["subject"], batch["html"], batch["text"]
        )
        copier = RecipientCopier(
            bid,
            template,
            "pending",
            await tenants.limits(conn, tenant_id, services.settings),
            first=before + 1,
        )
        await copier.copy(conn, rows)
        added = copier.count - before
        if added == 0:
            raise ValidationError(
                "recipients: must not be empty", {"field": "recipients"}, code="no_recipients"
            )
        suppressed = await lifecycle.mark_suppressed(conn, bid, tenant_id)
        total_suppressed = await lifecycle.appended(conn, bid, copier.count, added, suppressed)
    return Created(batch_id, "draft", copier.count, total_suppressed)


def request_digest(*parts: bytes) -> bytes:
    """What an Idempotency-Key is bound to: the request's parameters and body."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.digest()
