"""A tenant's event webhook endpoints (``/api/webhook-endpoints``): where BatchSender posts
the events of the tenant's batches, and which.

An endpoint is a URL, the event types it takes (``EVENT_TYPES``: the recipient statuses and
provider events of the results stream under their own names, and ``batch.completed``) and
an optional description. What is posted, and how, is ``engine.webhook_outbox`` and
``engine.webhook_deliveries``.

The signing secret is made here (``whsec_`` and 24 random bytes in base64, the Standard
Webhooks format), answered once by ``create`` and never again: it is stored sealed
(``engine.accounts.Sealer``, under ``CREDENTIALS_KEYS``, rotated with the provider accounts'
keys' procedure) and shown afterwards as a masked hint.

Which URLs (``check_url``): https only, no credentials in them, no fragment, and no host
that is a loopback, private, link-local or otherwise non-public address (SSRF: the
workers would post from inside the cluster). A host name is checked again each time it is
resolved for a post (``engine.outbound.PublicResolver``), so a name that later
resolves inside is refused then. ``WEBHOOK_ALLOW_PRIVATE_URLS`` (on outside prod) lifts
both rules, for receivers on a developer's machine (http://127.0.0.1:...).
"""

from __future__ import annotations

import base64
import secrets
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import orjson

from engine.accounts import Sealer, hint
from engine.errors import Conflict, NotFound, ValidationError
from engine.lifecycle import PROVIDER_EVENTS
from engine.outbound import check_host

BATCH_COMPLETED = "batch.completed"
# The results stream's events under the names the stream uses: the workers' own results
# and the provider events (``engine.lifecycle.PROVIDER_EVENTS``).
RECIPIENT_EVENTS: tuple[str, ...] = ("sent", "failed", "cancelled", *PROVIDER_EVENTS)
EVENT_TYPES: tuple[str, ...] = (*RECIPIENT_EVENTS, BATCH_COMPLETED)
SECRET_PREFIX = "whsec_"
MAX_ENDPOINTS = 20  # per tenant
MAX_PAGE = 100
MAX_URL_CHARS = 2048
MAX_DESCRIPTION_CHARS = 500
_FIELDS = {"url", "event_types", "description"}
_COLUMNS = (
    "id, url, event_types, description, secret_hint, disabled_at, disabled_reason, created_at"
)


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


# --- which URLs -------------------------------------------------------------------------


def check_url(url: Any, allow_private: bool) -> str:
    """``url`` when an endpoint may have it, else ``ValueError`` saying why."""
    if not isinstance(url, str) or not url:
        raise ValueError("must be a non-empty string")
    if len(url) > MAX_URL_CHARS:
        raise ValueError(f"at most {MAX_URL_CHARS} characters")
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        raise ValueError("must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        raise ValueError("is not a valid URL") from None
    schemes = ("https", "http") if allow_private else ("https",)
    if parts.scheme.lower() not in schemes:
        raise ValueError(f"must be an {' or '.join(s + '://' for s in schemes)} URL")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not hold credentials (user:password@)")
    host = parts.hostname
    if not host:
        raise ValueError("must name a host")
    if parts.fragment:
        raise ValueError("must not have a #fragment")
    try:
        host.encode("idna")
    except UnicodeError:
        raise ValueError("has a host name that is not valid") from None
    if not allow_private:
        check_host(host)
    return url


# --- the resource -----------------------------------------------------------------------


def _invalid(field: str, problem: str) -> ValidationError:
    return ValidationError(f"{field}: {problem}", {"field": field}, code="invalid_webhook_endpoint")


def _event_types(value: Any) -> list[str]:
    if not isinstance(value, list) or not value:
        raise _invalid("event_types", f"must be a non-empty list of {', '.join(EVENT_TYPES)}")
    for item in value:
        if not isinstance(item, str) or item not in EVENT_TYPES:
            shown = item if isinstance(item, str) else type(item).__name__
            raise _invalid("event_types", f"{shown[:100]!r} is not one of {', '.join(EVENT_TYPES)}")
    chosen = set(value)
    return [name for name in EVENT_TYPES if name in chosen]  # in one order, once each


def validate(body: Any, allow_private: bool) -> dict[str, Any]:
    """The columns of a new endpoint from a request body, or ``ValidationError`` naming the
    field."""
    if not isinstance(body, dict):
        raise ValidationError("the body must be a JSON object", code="invalid_webhook_endpoint")
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise _invalid(unknown[0], "unknown field")
    if "url" not in body:
        raise _invalid("url", "required")
    try:
        url = check_url(body["url"], allow_private)
    except ValueError as exc:
        raise _invalid("url", str(exc)) from None
    if "event_types" not in body:
        raise _invalid("event_types", "required")
    description = body.get("description")
    if description is not None and (
        not isinstance(description, str)
        or len(description) > MAX_DESCRIPTION_CHARS
        or "\x00" in description
    ):
        raise _invalid("description", f"must be text of at most {MAX_DESCRIPTION_CHARS} characters")
    return {
        "url": url,
        "event_types": _event_types(body["event_types"]),
        "description": description,
    }


def _view(row: asyncpg.Record) -> dict[str, Any]:
    view = dict(row)
    view["id"] = str(row["id"])
    view["event_types"] = list(row["event_types"])
    view["enabled"] = row["disabled_at"] is None
    for name in ("disabled_at", "created_at"):
        view[name] = row[name].isoformat() if row[name] else None
    return view


def endpoint_uuid(endpoint_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(endpoint_id)
    except ValueError:
        raise NotFound("no such webhook endpoint", code="webhook_endpoint_not_found") from None


async def create(
    pool: asyncpg.Pool, sealer: Sealer, tenant_id: str, body: Any, *, allow_private: bool
) -> dict[str, Any]:
    """A new endpoint; the answer holds its ``secret``, the only time it is shown."""
    fields = validate(body, allow_private)
    secret = new_secret()
    row = await pool.fetchrow(
        f"""INSERT INTO webhook_endpoints
                (id, tenant_id, url, event_types, description, secret, secret_hint)
            SELECT $1, $2, $3, $4, $5, $6, $7
             WHERE (SELECT count(*) FROM webhook_endpoints WHERE tenant_id = $2) < $8
         RETURNING {_COLUMNS}""",
        uuid.uuid4(),
        tenant_id,
        fields["url"],
        fields["event_types"],
        fields["description"],
        sealer.seal(secret),
        SECRET_PREFIX + hint(secret),
        MAX_ENDPOINTS,
    )
    if row is None:
        raise Conflict(
            f"this tenant has {MAX_ENDPOINTS} webhook endpoints already; delete one first",
            {"limit": "max_endpoints", "value": MAX_ENDPOINTS},
            code="too_many_webhook_endpoints",
        )
    return {**_view(row), "secret": secret}


def encode_cursor(created_at: datetime, row_id: uuid.UUID) -> str:
    """A page's ``next_cursor``: the (created_at, id) of its last row."""
    return base64.urlsafe_b64encode(orjson.dumps([created_at.isoformat(), str(row_id)])).decode()


def page_of(rows: list[Any], limit: int, view: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    """A page of ``limit`` of ``rows`` (fetched ``limit + 1``: one more says there is a next
    page), its cursor the last row's (created_at, id)."""
    page = rows[:limit]
    more = len(rows) > limit
    return {
        "data": [view(row) for row in page],
        "next_cursor": encode_cursor(page[-1]["created_at"], page[-1]["id"]) if more else None,
    }


def decode_cursor(cursor: str | None) -> tuple[datetime, uuid.UUID] | None:
    if cursor is None:
        return None
    try:
        created_at, row_id = orjson.loads(base64.urlsafe_b64decode(cursor.encode()))
        return datetime.fromisoformat(created_at), uuid.UUID(row_id)
    except (ValueError, TypeError, UnicodeError):
        raise ValidationError(
            "cursor: not a cursor this API returned", {"field": "cursor"}
        ) from None


def check_limit(limit: int | None) -> int:
    if limit is None:
        return MAX_PAGE
    if not 1 <= limit <= MAX_PAGE:
        raise ValidationError(f"limit: must be between 1 and {MAX_PAGE}", {"field": "limit"})
    return limit


async def list_endpoints(
    pool: asyncpg.Pool, tenant_id: str, *, limit: int | None = None, cursor: str | None = None
) -> dict[str, Any]:
    """A page of the tenant's endpoints, oldest first."""
    limit = check_limit(limit)
    after = decode_cursor(cursor)
    rows = await pool.fetch(
        f"""SELECT {_COLUMNS} FROM webhook_endpoints
             WHERE tenant_id = $1 AND ($2::timestamptz IS NULL OR (created_at, id) > ($2, $3))
             ORDER BY created_at, id LIMIT $4""",
        tenant_id,
        after[0] if after else None,
        after[1] if after else None,
        limit + 1,
    )
    return page_of(rows, limit, _view)


async def get(pool: asyncpg.Pool, tenant_id: str, endpoint_id: str) -> dict[str, Any]:
    row = await pool.fetchrow(
        f"SELECT {_COLUMNS} FROM webhook_endpoints WHERE tenant_id = $1 AND id = $2",
        tenant_id,
        endpoint_uuid(endpoint_id),
    )
    if row is None:
        raise NotFound("no such webhook endpoint", code="webhook_endpoint_not_found")
    return _view(row)


async def delete(pool: asyncpg.Pool, tenant_id: str, endpoint_id: str) -> None:
    """Delete an endpoint with its delivery log; nothing more is posted to it."""
    deleted = await pool.fetchval(
        "DELETE FROM webhook_endpoints WHERE tenant_id = $1 AND id = $2 RETURNING id",
        tenant_id,
        endpoint_uuid(endpoint_id),
    )
    if deleted is None:
        raise NotFound("no such webhook endpoint", code="webhook_endpoint_not_found")
