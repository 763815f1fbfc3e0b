"""Tenants and their API keys. Keys are random, shown once, stored as sha256 hashes."""

from __future__ import annotations

import hashlib
import hmac
import secrets

import asyncpg

from engine.errors import Unauthorized, ValidationError

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
