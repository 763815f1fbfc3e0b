"""A tenant's suppression list and the one-click unsubscribe links (RFC 8058).

Every message carries ``List-Unsubscribe: <PUBLIC_URL/unsubscribe/TOKEN>`` and
``List-Unsubscribe-Post: List-Unsubscribe=One-Click``. The token names the recipient (its
batch id and seq) and the day it expires (``LINK_DAYS`` after the send), authenticated by a
keyed BLAKE2b tag (a key derived from ``UNSUBSCRIBE_SECRET`` with HKDF): it shows no
address to whoever sees the URL, cannot be made for another recipient, and stops working
after ``LINK_DAYS`` (410). Following it reads the recipient's address and tenant from
PostgreSQL. A token costs a tag per message (a keyed hash of 24 bytes, half a microsecond),
not a seal of the address.

Tokens of the first version (``_V1``: the tenant and the address sealed with AES-SIV,
needing no lookup) are still read, for the links sent before. A broken or forged token is
404, and so is one whose recipient, or tenant, no longer exists.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import time
import uuid
from typing import Any

import asyncpg
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from engine.errors import Gone, NotFound, ValidationError
from engine.intake.fields import valid_email

LINK_DAYS = 90
_V1, _V2 = 1, 2  # a token's first byte: the tenant and address sealed; the recipient tagged
_DAY = 86_400
_MAX_TOKEN = 1024  # characters; a tenant id and an address fit in far fewer
_TAG = 16  # bytes of a V2 token's tag


_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _b64(data: bytes) -> str:
    """base64url without padding (``base64.urlsafe_b64encode`` without its Python layers:
    this runs once per message)."""
    return binascii.b2a_base64(data, newline=False).translate(_URLSAFE).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@functools.lru_cache(maxsize=4)
def _cipher(secret: str) -> AESSIV:
    """The V1 tokens' key."""
    key = HKDF(SHA256(), 64, salt=None, info=b"batchsender unsubscribe v1").derive(secret.encode())
    return AESSIV(key)


@functools.lru_cache(maxsize=4)
def _mac_key(secret: str) -> bytes:
    """The V2 tokens' key."""
    return HKDF(SHA256(), 32, salt=None, info=b"batchsender unsubscribe v2").derive(secret.encode())


class UnsubscribeLinks:
    """Tokens and headers of one batch's recipients, expiring on one day: what is the same
    for every recipient (the token's first 20 bytes and the hash state after them) is made
    once (``links``); per recipient the seq is hashed and the tag taken."""

    __slots__ = ("_head", "_mac", "_prefix")

    def __init__(self, public_url: str, secret: str, batch_id: str, expires: int) -> None:
        self._head = bytes([_V2]) + expires.to_bytes(3, "big") + uuid.UUID(batch_id).bytes
        self._mac = hashlib.blake2b(self._head, key=_mac_key(secret), digest_size=_TAG)
        self._prefix = f"<{public_url}/unsubscribe/"

    def token(self, seq: int) -> str:
        """The token of recipient ``seq``: version, expiry day, batch id, seq, tag."""
        mac = self._mac.copy()
        named = seq.to_bytes(4, "big")
        mac.update(named)
        return _b64(self._head + named + mac.digest())

    def headers(self, seq: int, ref: str) -> dict[str, str]:
        """A message's custom headers: its one-click unsubscribe link and its ``ref``."""
        return {
            "List-Unsubscribe": f"{self._prefix}{self.token(seq)}>",
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
            "X-BatchSender-Ref": ref,
        }


@functools.lru_cache(maxsize=1024)
def _links(public_url: str, secret: str, batch_id: str, expires: int) -> UnsubscribeLinks:
    return UnsubscribeLinks(public_url, secret, batch_id, expires)


def _expires(now: float | None) -> int:
    """The day a link made at ``now`` expires (days since the epoch)."""
    return int((time.time() if now is None else now) // _DAY) + LINK_DAYS


def unsubscribe_token(secret: str, batch_id: str, seq: int, *, now: float | None = None) -> str:
    """The token of one recipient, valid for ``LINK_DAYS`` from ``now``."""
    return _links("", secret, batch_id, _expires(now)).token(seq)


def links(public_url: str, secret: str, batch_id: str) -> UnsubscribeLinks:
    """The links of a batch's messages sent now (made once per provider call)."""
    return _links(public_url, secret, batch_id, _expires(None))


async def read_token(
    pool: asyncpg.Pool, secret: str, token: str, *, now: float | None = None
) -> tuple[str, str]:
    """(tenant id, address) of a token this server made; ``NotFound`` for any other (and
    for one whose recipient is gone), ``Gone`` once it has expired."""
    invalid = NotFound("this unsubscribe link is not valid")
    if len(token) > _MAX_TOKEN:
        raise invalid
    try:
        raw = _unb64(token)
    except ValueError:  # not base64
        raise invalid from None
    if raw[:1] == bytes([_V2]) and len(raw) == 24 + _TAG:
        mac = hashlib.blake2b(raw[:24], key=_mac_key(secret), digest_size=_TAG)
        if not hmac.compare_digest(mac.digest(), raw[24:]):
            raise invalid
        _check_expiry(raw, now)
        row = await pool.fetchrow(
            """SELECT b.tenant_id, r.email FROM recipients r JOIN batches b ON b.id = r.batch_id
                WHERE r.batch_id = $1 AND r.seq = $2""",
            uuid.UUID(bytes=raw[4:20]),
            int.from_bytes(raw[20:24], "big"),
        )
        if row is None:
            raise invalid
        return row["tenant_id"], row["email"].lower()
    if raw[:1] == bytes([_V1]) and len(raw) > 4:
        try:
            tenant_id, email = _cipher(secret).decrypt(raw[4:], [raw[:4]]).decode().split("\n", 1)
        except (ValueError, InvalidTag):  # too short, not ours
            raise invalid from None
        _check_expiry(raw, now)
        return tenant_id, email
    raise invalid


def _check_expiry(raw: bytes, now: float | None) -> None:
    expires = int.from_bytes(raw[1:4], "big")
    if (time.time() if now is None else now) // _DAY > expires:
        raise Gone("this unsubscribe link has expired", code="link_expired")


async def unsubscribe(pool: asyncpg.Pool, secret: str, token: str) -> str:
    """Suppress the address of a valid link (idempotent); return the address."""
    tenant_id, email = await read_token(pool, secret, token)
    try:
        await pool.execute(
            """INSERT INTO suppressions (tenant_id, email, reason) VALUES ($1, $2, 'unsubscribed')
               ON CONFLICT (tenant_id, email) DO NOTHING""",
            tenant_id,
            email,
        )
    except asyncpg.ForeignKeyViolationError:  # the tenant is gone
        raise NotFound("this unsubscribe link is not valid") from None
    return email


async def list_suppressions(
    pool: asyncpg.Pool, tenant_id: str, *, limit: int = 100, after: str | None = None
) -> dict[str, Any]:
    if not 1 <= limit <= 1000:
        raise ValidationError("limit: must be between 1 and 1000", {"field": "limit"})
    if after is not None and len(after) > 254:
        raise ValidationError("cursor: not a cursor this API returned", {"field": "cursor"})
    rows = await pool.fetch(
        """SELECT email, reason, created_at FROM suppressions
            WHERE tenant_id = $1 AND email > $2 ORDER BY email LIMIT $3""",
        tenant_id,
        (after or "").lower(),
        limit + 1,
    )
    page = rows[:limit]
    return {
        "data": [
            {"email": r["email"], "reason": r["reason"], "created_at": r["created_at"].isoformat()}
            for r in page
        ],
        "next_cursor": page[-1]["email"] if len(rows) > limit else None,
    }


MAX_SUPPRESSIONS = 10_000  # addresses in one request


async def add_suppressions(pool: asyncpg.Pool, tenant_id: str, body: Any) -> int:
    """Add ``{"emails": [...], "reason"?}``; return how many were new. All or nothing."""
    if not isinstance(body, dict) or not isinstance(body.get("emails"), list) or not body["emails"]:
        raise ValidationError(
            "emails: a non-empty list of addresses is required", {"field": "emails"}
        )
    if unknown := sorted(set(body) - {"emails", "reason"}):
        raise ValidationError(f"{unknown[0]}: unknown field", {"field": unknown[0]})
    if len(body["emails"]) > MAX_SUPPRESSIONS:
        raise ValidationError(
            f"emails: at most {MAX_SUPPRESSIONS} addresses per request", {"field": "emails"}
        )
    reason = body.get("reason", "manual")
    if not isinstance(reason, str) or "\x00" in reason or not 1 <= len(reason) <= 200:
        raise ValidationError("reason: a string of 1 to 200 characters", {"field": "reason"})
    bad = [i for i, e in enumerate(body["emails"]) if not valid_email(e)]
    if bad:
        raise ValidationError(
            f"emails: {len(bad)} invalid address(es), the first at index {bad[0]}",
            {"field": "emails", "invalid_indexes": bad[:100]},
        )
    emails = sorted({e.lower() for e in body["emails"]})
    result = await pool.execute(
        """INSERT INTO suppressions (tenant_id, email, reason)
           SELECT $1, e, $3 FROM unnest($2::text[]) AS e
           ON CONFLICT (tenant_id, email) DO NOTHING""",
        tenant_id,
        emails,
        reason,
    )
    return int(result.split()[-1])


async def remove_suppression(pool: asyncpg.Pool, tenant_id: str, email: str) -> None:
    result = await pool.execute(
        "DELETE FROM suppressions WHERE tenant_id = $1 AND email = $2", tenant_id, email.lower()
    )
    if result.endswith(" 0"):
        raise NotFound(f"{email!r} is not on the suppression list")


# The provider events that suppress the address, each the reason it is listed with: a hard
# bounce, a complaint, and an unsubscribe the provider took (the same reason as our own
# unsubscribe link's). A soft bounce does not: the address may work later.
SUPPRESSING = frozenset({"bounced", "complained", "unsubscribed"})


async def suppress_results(
    conn: asyncpg.Connection, batch_ids: list[str], seqs: list[int], statuses: list[str]
) -> None:
    """Put the recipients of these (``SUPPRESSING``) events on their tenants' lists, the
    event as the reason."""
    await conn.execute(
        """INSERT INTO suppressions (tenant_id, email, reason)
           SELECT b.tenant_id, lower(r.email), v.status
             FROM unnest($1::uuid[], $2::int[], $3::text[]) AS v(batch_id, seq, status)
             JOIN recipients r ON r.batch_id = v.batch_id AND r.seq = v.seq
             JOIN batches b ON b.id = v.batch_id
           ON CONFLICT (tenant_id, email) DO NOTHING""",
        batch_ids,
        seqs,
        statuses,
    )
