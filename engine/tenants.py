"""Tenants, their API keys and their limits. Keys are random, shown once, stored as sha256
hashes."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

import asyncpg

from engine.config import Settings, parse_rate
from engine.errors import NotFound, TooManyRequests, Unauthorized, ValidationError

KEY_PREFIX = "bsk_"


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


async def ensure_tenant(pool: asyncpg.Pool, tenant_id: str, name: str | None = None) -> None:
    try:
        await pool.execute(
            "INSERT INTO tenants (id, name) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
            tenant_id,
            name or tenant_id,
        )
    except asyncpg.CheckViolationError:
        raise ValidationError(
            f"tenant id {tenant_id!r} must be 1-63 lower-case letters, digits, '-' or '_'"
        ) from None


async def create_key(pool: asyncpg.Pool, tenant_id: str) -> str:
    """Create the tenant when needed and a new API key for it; return the key (shown once)."""
    await ensure_tenant(pool, tenant_id)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    await pool.execute(
        "INSERT INTO api_keys (tenant_id, key_hash, prefix) VALUES ($1, $2, $3)",
        tenant_id,
        hash_key(key),
        key[:10],
    )
    return key


async def authenticate(pool: asyncpg.Pool, key: str | None) -> str:
    """The tenant id of a valid, unrevoked key; ``Unauthorized`` otherwise.

    The lookup is by hash (an index seek on a digest reveals nothing about the key), and
    the stored digest is compared again in constant time.
    """
    if not key:
        raise Unauthorized("an API key is required: send 'Authorization: Bearer <key>'")
    digest = hash_key(key)
    row = await pool.fetchrow(
        "SELECT tenant_id, key_hash FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
        digest,
    )
    if row is None or not hmac.compare_digest(bytes(row["key_hash"]), digest):
        raise Unauthorized("the API key is not valid")
    return row["tenant_id"]


# Batches that count toward a tenant's ``max_active_batches``.
ACTIVE_STATUSES = ("scheduled", "queued", "processing", "paused")
RETRY_ACTIVE_SECONDS = 30


@dataclass(frozen=True, slots=True)
class Limits:
    """A tenant's limits: its own where set, else the server's defaults."""

    max_batch_recipients: int
    max_active_batches: int
    send_rate: str | None  # '<per_second>/<burst>'; None: TENANT_RATE
    own_recipient_limit: bool  # the per-batch limit is the tenant's, not the server's


async def limits(
    conn: asyncpg.Connection | asyncpg.Pool, tenant_id: str, settings: Settings
) -> Limits:
    row = await conn.fetchrow(
        "SELECT max_batch_recipients, max_active_batches, send_rate FROM tenants WHERE id = $1",
        tenant_id,
    )
    if row is None:
        raise NotFound(f"tenant {tenant_id!r} not found", code="unknown_tenant")
    own = row["max_batch_recipients"]
    return Limits(
        min(own, settings.max_recipients) if own else settings.max_recipients,
        row["max_active_batches"] or settings.tenant_max_active_batches,
        row["send_rate"],
        bool(own) and own < settings.max_recipients,
    )


async def check_active_batches(conn: asyncpg.Connection, tenant_id: str, limit: Limits) -> None:
    """``TooManyRequests`` when the tenant already has its maximum of unfinished batches."""
    active = await conn.fetchval(
        "SELECT count(*) FROM batches WHERE tenant_id = $1 AND status = ANY($2::text[])",
        tenant_id, list(ACTIVE_STATUSES),
    )  # fmt: skip
    if active >= limit.max_active_batches:
        raise TooManyRequests(
            f"this tenant already has {active} unfinished batches (its limit is "
            f"{limit.max_active_batches}); try again when one has finished",
            {"limit": "max_active_batches", "value": limit.max_active_batches},
            retry_after=RETRY_ACTIVE_SECONDS,
            code="too_many_active_batches",
        )


async def set_limits(
    pool: asyncpg.Pool, tenant_id: str, *, max_batch_recipients: int | None = None,
    max_active_batches: int | None = None, send_rate: str | None = None,
) -> None:  # fmt: skip
    """Set a tenant's own limits (None leaves a limit as it is; 0 or '' resets it to the
    server's default)."""
    if send_rate:
        try:
            parse_rate(send_rate)
        except ValueError as exc:
            raise ValidationError(f"send rate: {exc}", {"field": "send_rate"}) from None
    for name, value in (("max_batch_recipients", max_batch_recipients),
                        ("max_active_batches", max_active_batches)):  # fmt: skip
        if value is not None and value < 0:
            raise ValidationError(f"{name}: must not be negative", {"field": name})
    done = await pool.execute(
        """UPDATE tenants SET
               max_batch_recipients = CASE WHEN $2::int IS NULL THEN max_batch_recipients
                                           ELSE nullif($2, 0) END,
               max_active_batches = CASE WHEN $3::int IS NULL THEN max_active_batches
                                         ELSE nullif($3, 0) END,
               send_rate = CASE WHEN $4::text IS NULL THEN send_rate ELSE nullif($4, '') END
         WHERE id = $1""",
        tenant_id, max_batch_recipients, max_active_batches, send_rate,
    )  # fmt: skip
    if done.endswith(" 0"):
        raise NotFound(f"tenant {tenant_id!r} not found", code="unknown_tenant")
