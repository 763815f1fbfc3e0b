"""A tenant's suppression list and the one-click unsubscribe links (RFC 8058).

Every message carries ``List-Unsubscribe: <PUBLIC_URL/unsubscribe/TOKEN>`` and
``List-Unsubscribe-Post: List-Unsubscribe=One-Click``. The token names the tenant and the
address and is signed with ``UNSUBSCRIBE_SECRET`` (HMAC-SHA256), so the link needs no
lookup and cannot be forged for another address. Using it suppresses the address.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

import asyncpg

from engine.errors import NotFound, ValidationError
from engine.intake import valid_email

_SIG_BYTES = 16


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def unsubscribe_token(secret: str, tenant_id: str, email: str) -> str:
    payload = f"{tenant_id}\n{email.lower()}".encode()
    signature = hmac.new(secret.encode(), payload, hashlib.sha256).digest()[:_SIG_BYTES]
    return f"{_b64(payload)}.{_b64(signature)}"


def unsubscribe_headers(public_url: str, secret: str, tenant_id: str, email: str) -> dict[str, str]:
    link = f"{public_url}/unsubscribe/{unsubscribe_token(secret, tenant_id, email)}"
    return {"List-Unsubscribe": f"<{link}>", "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}


def read_token(secret: str, token: str) -> tuple[str, str]:
    """(tenant id, address) of a token this server signed; ``NotFound`` otherwise."""
    try:
        payload_text, signature_text = token.split(".", 1)
        payload, signature = _unb64(payload_text), _unb64(signature_text)
        tenant_id, email = payload.decode().split("\n", 1)
    except ValueError:
        raise NotFound("this unsubscribe link is not valid") from None
    expected = hmac.new(secret.encode(), payload, hashlib.sha256).digest()[:_SIG_BYTES]
    if not hmac.compare_digest(signature, expected):
        raise NotFound("this unsubscribe link is not valid")
    return tenant_id, email


async def unsubscribe(pool: asyncpg.Pool, secret: str, token: str) -> str:
    """Suppress the address of a valid link (idempotent); return the address."""
    tenant_id, email = read_token(secret, token)
    await pool.execute(
        """INSERT INTO suppressions (tenant_id, email, reason) VALUES ($1, $2, 'unsubscribed')
           ON CONFLICT (tenant_id, email) DO NOTHING""",
        tenant_id, email,
    )  # fmt: skip
    return email


async def list_suppressions(
    pool: asyncpg.Pool, tenant_id: str, *, limit: int = 100, after: str | None = None
) -> dict[str, Any]:
    if not 1 <= limit <= 1000:
        raise ValidationError("limit: must be between 1 and 1000", {"field": "limit"})
    rows = await pool.fetch(
        """SELECT email, reason, created_at FROM suppressions
            WHERE tenant_id = $1 AND email > $2 ORDER BY email LIMIT $3""",
        tenant_id, (after or "").lower(), limit + 1,
    )  # fmt: skip
    page = rows[:limit]
    return {
        "data": [
            {"email": r["email"], "reason": r["reason"], "created_at": r["created_at"].isoformat()}
            for r in page
        ],
        "next_cursor": page[-1]["email"] if len(rows) > limit else None,
    }


async def add_suppressions(pool: asyncpg.Pool, tenant_id: str, body: Any) -> int:
    """Add ``{"emails": [...], "reason"?}``; return how many were new. All or nothing."""
    if not isinstance(body, dict) or not isinstance(body.get("emails"), list) or not body["emails"]:
        raise ValidationError(
            "emails: a non-empty list of addresses is required", {"field": "emails"}
        )
    reason = body.get("reason", "manual")
    if not isinstance(reason, str) or not 1 <= len(reason) <= 200:
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
        tenant_id, emails, reason,
    )  # fmt: skip
    return int(result.split()[-1])


async def remove_suppression(pool: asyncpg.Pool, tenant_id: str, email: str) -> None:
    result = await pool.execute(
        "DELETE FROM suppressions WHERE tenant_id = $1 AND email = $2", tenant_id, email.lower()
    )
    if result.endswith(" 0"):
        raise NotFound(f"{email!r} is not on the suppression list")
