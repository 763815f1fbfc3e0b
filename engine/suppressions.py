"""A tenant's suppression list and the one-click unsubscribe links (RFC 8058).

Every message carries ``List-Unsubscribe: <PUBLIC_URL/unsubscribe/TOKEN>`` and
``List-Unsubscribe-Post: List-Unsubscribe=One-Click``. The token is opaque: the tenant and
the address sealed with AES-SIV (a key derived from ``UNSUBSCRIBE_SECRET`` with HKDF),
with the day it expires (``LINK_DAYS`` after the send) authenticated beside them. So the
link needs no lookup, shows no address to whoever sees the URL, cannot be made for
another address, and stops working after ``LINK_DAYS`` (410). AES-SIV is deterministic
and needs no nonce, so billions of links under one key are safe; equal links only tell
that one address got two messages on the same day. A broken or forged token is 404, and
so is one for a tenant that no longer exists.
"""

from __future__ import annotations

import base64
import binascii
import functools
import time
from typing import Any

import asyncpg
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from engine.errors import Gone, NotFound, ValidationError
from engine.intake.fields import valid_email

LINK_DAYS = 90
_VERSION = 1
_DAY = 86_400
_MAX_TOKEN = 1024  # characters; a tenant id and an address fit in far fewer


_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _b64(data: bytes) -> str:
    """base64url without padding (``base64.urlsafe_b64encode`` without its Python layers:
    this runs once per message)."""
    return binascii.b2a_base64(data, newline=False).translate(_URLSAFE).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@functools.lru_cache(maxsize=4)
def _cipher(secret: str) -> AESSIV:
    key = HKDF(SHA256(), 64, salt=None, info=b"batchsender unsubscribe v1").derive(secret.encode())
    return AESSIV(key)


class UnsubscribeLinks:
    """Tokens and headers of one tenant's addresses, expiring on one day: what is the same
    for every recipient is made once (``links``), only the sealing is per address."""

    __slots__ = ("_aad", "_cipher", "_header", "_prefix", "_tenant")

    def __init__(self, public_url: str, secret: str, tenant_id: str, expires: int) -> None:
        self._header = bytes([_VERSION]) + expires.to_bytes(3, "big")
        self._aad = [self._header]
        self._cipher = _cipher(secret)
        self._tenant = f"{tenant_id}\n".encode()
        self._prefix = f"<{public_url}/unsubscribe/"

    def token(self, email: str) -> str:
        sealed = self._cipher.encrypt(self._tenant + email.lower().encode(), self._aad)
        return _b64(self._header + sealed)

    def headers(self, email: str, ref: str) -> dict[str, str]:
        """A message's custom headers: its one-click unsubscribe link and its ``ref``."""
        return {
            "List-Unsubscribe": f"{self._prefix}{self.token(email)}>",
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
            "X-BatchSender-Ref": ref,
        }


@functools.lru_cache(maxsize=1024)
def _links(public_url: str, secret: str, tenant_id: str, expires: int) -> UnsubscribeLinks:
    return UnsubscribeLinks(public_url, secret, tenant_id, expires)


def _expires(now: float | None) -> int:
    """The day a link made at ``now`` expires (days since the epoch)."""
    return int((time.time() if now is None else now) // _DAY) + LINK_DAYS


def unsubscribe_token(secret: str, tenant_id: str, email: str, *, now: float | None = None) -> str:
    """The opaque token of one address, valid for ``LINK_DAYS`` from ``now``."""
    return _links("", secret, tenant_id, _expires(now)).token(email)


def links(public_url: str, secret: str, tenant_id: str) -> UnsubscribeLinks:
    """The links of a tenant's messages sent now (made once per provider call)."""
    return _links(public_url, secret, tenant_id, _expires(None))


def read_token(secret: str, token: str, *, now: float | None = None) -> tuple[str, str]:
    """(tenant id, address) of a token this server made; ``NotFound`` for any other,
    ``Gone`` once it has expired."""
    invalid = NotFound("this unsubscribe link is not valid")
    if len(token) > _MAX_TOKEN:
        raise invalid
    try:
        raw = _unb64(token)
        header, sealed = raw[:4], raw[4:]
        if len(header) < 4 or header[0] != _VERSION:
            raise invalid
        tenant_id, email = _cipher(secret).decrypt(sealed, [header]).decode().split("\n", 1)
    except (ValueError, InvalidTag):  # not base64, too short, not ours
        raise invalid from None
    expires = int.from_bytes(header[1:4], "big")
    if (time.time() if now is None else now) // _DAY > expires:
        raise Gone("this unsubscribe link has expired", code="link_expired")
    return tenant_id, email


async def unsubscribe(pool: asyncpg.Pool, secret: str, token: str) -> str:
    """Suppress the address of a valid link (idempotent); return the address."""
    tenant_id, email = read_token(secret, token)
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
