"""Reading batches and recipients for one tenant (another tenant's batch is 'not found')."""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from engine import lifecycle
from engine.errors import NotFound, ValidationError
from engine.lifecycle import BATCH_STATUSES, RECIPIENT_STATUSES

_BATCH_COLUMNS = """id, name, status, provider, from_email, from_name, subject, total_recipients,
    final_count, suppressed_count, dry_run, metadata, external_id, scheduled_at, created_at,
    queued_at, started_at, completed_at, provider_account_id, pause_reason, resume_at"""


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def _batch(row: asyncpg.Record) -> dict[str, Any]:
    total, final = row["total_recipients"], row["final_count"]
    started, done = row["started_at"], row["completed_at"]
    elapsed = ((done or datetime.now(UTC)) - started).total_seconds() if started else 0.0
    return {
        "id": str(row["id"]),
        "name": row["name"],
        "status": row["status"],
        "provider": row["provider"],
        "provider_account_id": _str(row["provider_account_id"]),
        "pause_reason": row["pause_reason"],  # set when the engine paused it (why)
        "resume_at": _iso(row["resume_at"]),  # when the engine resumes it by itself
        "from_email": row["from_email"],
        "from_name": row["from_name"],
        "subject": row["subject"],
        "total_recipients": total,
        "suppressed": row["suppressed_count"],
        "dry_run": row["dry_run"],
        "metadata": row["metadata"],
        "external_id": row["external_id"],
        "scheduled_at": _iso(row["scheduled_at"]),
        "created_at": _iso(row["created_at"]),
        "queued_at": _iso(row["queued_at"]),
        "started_at": _iso(started),
        "completed_at": _iso(done),
        "progress": {
            "final": final,
            "percent": round(100.0 * final / total, 2) if total else 100.0,
            "per_second": round(final / elapsed, 1) if elapsed > 0 else None,
        },
    }


def _limit(limit: int | None) -> int:
    value = 50 if limit is None else limit
    if not 1 <= value <= 1000:
        raise ValidationError("limit: must be between 1 and 1000", {"field": "limit"})
    return value


def _cursor(value: str | None, kinds: tuple[type, ...]) -> list[Any] | None:
    """A cursor this API returned: a list of values of these types; else a clear 422."""
    if not value:
        return None
    try:
        parts = orjson.loads(base64.urlsafe_b64decode(value.encode()))
        if not isinstance(parts, list) or len(parts) != len(kinds):
            raise ValueError("not a cursor")
        for part, kind in zip(parts, kinds, strict=True):
            if type(part) is not kind:
                raise ValueError("not a cursor")
        return parts
    except (ValueError, UnicodeEncodeError):
        raise ValidationError(
            "cursor: not a cursor this API returned", {"field": "cursor"}
        ) from None


def _batch_cursor(value: str | None) -> tuple[datetime, uuid.UUID] | None:
    parts = _cursor(value, (str, str))
    if parts is None:
        return None
    try:
        return datetime.fromisoformat(parts[0]), uuid.UUID(parts[1])
    except ValueError:
        raise ValidationError(
            "cursor: not a cursor this API returned", {"field": "cursor"}
        ) from None


def _seq_cursor(value: str | None) -> int:
    parts = _cursor(value, (int,))
    if parts is None:
        return 0
    if not 0 <= parts[0] < 2**31:
        raise ValidationError("cursor: not a cursor this API returned", {"field": "cursor"})
    return parts[0]


def _make_cursor(*parts: Any) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(parts)).decode()


def batch_uuid(batch_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(batch_id)
    except ValueError:
        raise NotFound(f"batch {batch_id!r} not found") from None


async def list_batches(
    pool: asyncpg.Pool,
    tenant_id: str,
    *,
    status: str | None = None,
    external_id: str | None = None,
    limit: int | None = None,
    cursor: str | None = None,
) -> dict[str, Any]:
    """Newest first; ``next_cursor`` pages on."""
    size = _limit(limit)
    if status is not None and status not in BATCH_STATUSES:
        raise ValidationError(f"status: one of {', '.join(BATCH_STATUSES)}", {"field": "status"})
    if external_id is not None and not 1 <= len(external_id) <= 255:
        raise ValidationError("external_id: 1 to 255 characters", {"field": "external_id"})
    after = _batch_cursor(cursor)
    rows = await pool.fetch(
        f"""SELECT {_BATCH_COLUMNS} FROM batches
             WHERE tenant_id = $1 AND status <> 'creating'
               AND ($2::text IS NULL OR status = $2)
               AND ($3::text IS NULL OR external_id = $3)
               AND ($4::timestamptz IS NULL OR (created_at, id) < ($4, $5::uuid))
             ORDER BY created_at DESC, id DESC LIMIT $6""",
        tenant_id,
        status,
        external_id,
        after[0] if after else None,
        after[1] if after else None,
        size + 1,
    )
    page = rows[:size]
    next_cursor = (
        _make_cursor(page[-1]["created_at"].isoformat(), str(page[-1]["id"]))
        if len(rows) > size
        else None
    )
    return {"data": [_batch(r) for r in page], "next_cursor": next_cursor}


async def get_batch(pool: asyncpg.Pool, tenant_id: str, batch_id: str) -> dict[str, Any]:
    """The batch with its recipient counts per status."""
    row = await pool.fetchrow(
        f"SELECT {_BATCH_COLUMNS} FROM batches WHERE id = $1 AND tenant_id = $2 AND status <> 'creating'",
        batch_uuid(batch_id),
        tenant_id,
    )
    if row is None:
        raise NotFound(f"batch {batch_id!r} not found")
    counts = await pool.fetch("SELECT status, n FROM batch_counts WHERE batch_id = $1", row["id"])
    result = _batch(row)
    result["counts"] = {s: 0 for s in RECIPIENT_STATUSES} | {c["status"]: c["n"] for c in counts}
    return result


async def list_recipients(
    pool: asyncpg.Pool,
    tenant_id: str,
    batch_id: str,
    *,
    status: str | None = None,
    limit: int | None = None,
    cursor: str | None = None,
) -> dict[str, Any]:
    """In recipient order; ``next_cursor`` pages on."""
    size = _limit(limit)
    if status is not None and status not in RECIPIENT_STATUSES:
        raise ValidationError(
            f"status: one of {', '.join(RECIPIENT_STATUSES)}", {"field": "status"}
        )
    bid = batch_uuid(batch_id)
    batch = await pool.fetchrow(
        """SELECT (SELECT n FROM batch_counts WHERE batch_id = b.id AND status = $3) AS n
             FROM batches b WHERE id = $1 AND tenant_id = $2 AND status <> 'creating'""",
        bid,
        tenant_id,
        status,
    )
    if batch is None:
        raise NotFound(f"batch {batch_id!r} not found")
    after = _seq_cursor(cursor)
    if status is not None and not batch["n"]:  # the counts are exact: nobody has it now
        return {"data": [], "next_cursor": None}
    if status == "queued":  # past the blocks where every recipient is final
        block = await pool.fetchval(lifecycle.FIRST_UNFINISHED_BLOCK, bid, after)
        if block is None:
            return {"data": [], "next_cursor": None}
        after = max(after, block * 1024)
    rows = await pool.fetch(
        """SELECT seq, email, name, status, provider_message_id, error, attempts, updated_at
             FROM recipient_statuses
            WHERE batch_id = $1 AND seq > $2
              AND ($3::text IS NULL OR (stored_status = ANY($5::text[]) AND status = $3))
            ORDER BY seq LIMIT $4""",
        bid,
        after,
        status,
        size + 1,
        lifecycle.stored_as(status) if status else None,
    )
    page = rows[:size]
    data = [
        {
            "seq": r["seq"],
            "email": r["email"],
            "name": r["name"],
            "status": r["status"],
            "provider_message_id": r["provider_message_id"],
            "error": r["error"],
            "attempts": r["attempts"],
            "updated_at": _iso(r["updated_at"]),
        }
        for r in page
    ]
    next_cursor = _make_cursor(page[-1]["seq"]) if len(rows) > size else None
    return {"data": data, "next_cursor": next_cursor}
