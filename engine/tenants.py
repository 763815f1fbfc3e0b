"""Tenants, their API keys and their limits.

Keys are random, shown once, stored as sha256 hashes (a lookup by digest reveals nothing
about the key; the stored digest is compared again in constant time). A key is listed by
its id and its first characters (``prefix``), never by its hash. Revoking one is for ever;
checking keys per request, with a cache and its revocation across processes, is
``engine.auth``'s.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from engine import lifecycle
from engine.config import Settings, parse_rate
from engine.errors import Conflict, NotFound, TooManyRequests, Unauthorized, ValidationError

API_KEY_PREFIX = "bsk_"
PREFIX_LENGTH = 10  # characters of a key kept in clear (``bsk_`` and six more)
MAX_ACTIVE_KEYS = 100  # unrevoked keys per tenant
_MAX_ID = (1 << 63) - 1


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One API key as it may be shown: no hash, no key."""

    id: int
    tenant_id: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None  # to a minute

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> ApiKey:
        return cls(
            row["id"],
            row["tenant_id"],
            row["prefix"],
            row["created_at"],
            row["revoked_at"],
            row["last_used_at"],
        )

    def as_json(self) -> dict[str, Any]:
        def when(value: datetime | None) -> str | None:
            return value.isoformat() if value else None

        return {
            "id": self.id,
            "prefix": self.prefix,
            "created_at": when(self.created_at),
            "revoked_at": when(self.revoked_at),
            "last_used_at": when(self.last_used_at),
        }


_COLUMNS = "id, tenant_id, prefix, created_at, revoked_at, last_used_at"


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


async def issue_key(pool: asyncpg.Pool, tenant_id: str) -> tuple[ApiKey, str]:
    """Create the tenant when needed and a new API key for it; return the key's record and
    the key itself (shown once). ``Conflict`` when the tenant has ``MAX_ACTIVE_KEYS``."""
    await ensure_tenant(pool, tenant_id)
    key = API_KEY_PREFIX + secrets.token_urlsafe(32)
    row = await pool.fetchrow(
        f"""INSERT INTO api_keys (tenant_id, key_hash, prefix)
            SELECT $1, $2, $3
             WHERE (SELECT count(*) FROM api_keys
                     WHERE tenant_id = $1 AND revoked_at IS NULL) < $4
            RETURNING {_COLUMNS}""",
        tenant_id,
        hash_key(key),
        key[:PREFIX_LENGTH],
        MAX_ACTIVE_KEYS,
    )
    if row is None:
        raise Conflict(
            f"this tenant already has {MAX_ACTIVE_KEYS} keys in use; revoke one first",
            {"limit": "max_active_keys", "value": MAX_ACTIVE_KEYS},
            code="too_many_keys",
        )
    return ApiKey.from_row(row), key


async def create_key(pool: asyncpg.Pool, tenant_id: str) -> str:
    """Create the tenant when needed and a new API key for it; return the key (shown once)."""
    return (await issue_key(pool, tenant_id))[1]


async def find_key(pool: asyncpg.Pool, key: str) -> tuple[int, str]:
    """(key id, tenant id) of a valid, unrevoked key; ``Unauthorized`` otherwise. Marks the
    key used (at most once a minute, in the same statement)."""
    digest = hash_key(key)
    row = await pool.fetchrow(
        """WITH k AS (SELECT id, tenant_id, key_hash, last_used_at FROM api_keys
                       WHERE key_hash = $1 AND revoked_at IS NULL),
                touched AS (UPDATE api_keys SET last_used_at = now() FROM k
                             WHERE api_keys.id = k.id AND (k.last_used_at IS NULL
                                   OR k.last_used_at < now() - interval '1 minute'))
           SELECT id, tenant_id, key_hash FROM k""",
        digest,
    )
    if row is None or not hmac.compare_digest(bytes(row["key_hash"]), digest):
        raise Unauthorized("the API key is not valid")
    return row["id"], row["tenant_id"]


async def key_tenant(pool: asyncpg.Pool, key_id: int) -> str | None:
    """The tenant of the unrevoked key ``key_id``; None when it is revoked or unknown."""
    if not 0 < key_id <= _MAX_ID:
        return None
    return await pool.fetchval(
        "SELECT tenant_id FROM api_keys WHERE id = $1 AND revoked_at IS NULL", key_id
    )


@dataclass(frozen=True, slots=True)
class KeyPage:
    keys: list[ApiKey]
    next_cursor: str | None

    def as_json(self) -> dict[str, Any]:
        return {"data": [k.as_json() for k in self.keys], "next_cursor": self.next_cursor}


async def list_keys(
    pool: asyncpg.Pool, tenant_id: str, *, limit: int | None = None, cursor: str | None = None
) -> KeyPage:
    """The tenant's keys, revoked ones too, newest first; ``next_cursor`` pages on."""
    limit = 100 if limit is None else limit
    if not 1 <= limit <= 1000:
        raise ValidationError("limit: must be between 1 and 1000", {"field": "limit"})
    before = _MAX_ID
    if cursor is not None:
        if not (cursor.isascii() and cursor.isdigit() and 0 < int(cursor) <= _MAX_ID):
            raise ValidationError("cursor: not a cursor this API returned", {"field": "cursor"})
        before = int(cursor)
    rows = await pool.fetch(
        f"""SELECT {_COLUMNS} FROM api_keys WHERE tenant_id = $1 AND id < $2
             ORDER BY id DESC LIMIT $3""",
        tenant_id,
        before,
        limit + 1,
    )
    keys = [ApiKey.from_row(r) for r in rows[:limit]]
    return KeyPage(keys, str(keys[-1].id) if len(rows) > limit else None)


async def revoke_key(pool: asyncpg.Pool, ref: str, tenant_id: str | None = None) -> ApiKey:
    """Revoke one key (again: no change) and return it. ``ref`` is the key's id, its
    ``prefix`` or the key itself; for a tenant (the API) only its own keys, by id.
    ``NotFound`` for no such key, ``Conflict`` for a prefix two keys share."""
    where: str
    value: object
    any_form = tenant_id is None and ref.isascii() and ref.startswith(API_KEY_PREFIX)
    if ref.isascii() and ref.isdigit() and 0 < int(ref) <= _MAX_ID:
        where, value = "id = $1", int(ref)
    elif any_form and len(ref) > PREFIX_LENGTH:
        where, value = "key_hash = $1", hash_key(ref)
    elif any_form and len(ref) == PREFIX_LENGTH:
        where, value = "prefix = $1", ref
    else:
        raise NotFound("no such API key: give its id, its prefix or the key", code="unknown_key")
    ids = await pool.fetch(
        f"SELECT id FROM api_keys WHERE {where} AND ($2::text IS NULL OR tenant_id = $2) LIMIT 2",
        value,
        tenant_id,
    )
    if not ids:
        raise NotFound(f"no API key {ref!r}", code="unknown_key")
    if len(ids) > 1:
        raise Conflict(
            f"more than one key starts with {ref!r}; give the key's id", code="ambiguous_key"
        )
    row = await pool.fetchrow(
        f"""UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1
            RETURNING {_COLUMNS}""",
        ids[0]["id"],
    )
    return ApiKey.from_row(row)


# Batches that count toward a tenant's ``max_active_batches``.
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
        tenant_id,
        list(lifecycle.ACTIVE),
    )
    if active >= limit.max_active_batches:
        raise TooManyRequests(
            f"this tenant already has {active} unfinished batches (its limit is "
            f"{limit.max_active_batches}); try again when one has finished",
            {"limit": "max_active_batches", "value": limit.max_active_batches},
            retry_after=RETRY_ACTIVE_SECONDS,
            code="too_many_active_batches",
        )


async def set_limits(
    pool: asyncpg.Pool,
    tenant_id: str,
    *,
    max_batch_recipients: int | None = None,
    max_active_batches: int | None = None,
    send_rate: str | None = None,
) -> None:
    """Set a tenant's own limits (None leaves a limit as it is; 0 or '' resets it to the
    server's default)."""
    if send_rate:
        try:
            parse_rate(send_rate)
        except ValueError as exc:
            raise ValidationError(f"send rate: {exc}", {"field": "send_rate"}) from None
    for name, value in (
        ("max_batch_recipients", max_batch_recipients),
        ("max_active_batches", max_active_batches),
    ):
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
        tenant_id,
        max_batch_recipients,
        max_active_batches,
        send_rate,
    )
    if done.endswith(" 0"):
        raise NotFound(f"tenant {tenant_id!r} not found", code="unknown_tenant")
