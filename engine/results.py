"""Recipient results: one NATS message per chunk (or webhook post), applied in bulk.

A worker publishes the results of a chunk to the RESULTS stream before it acknowledges
the chunk, so a result is durable the moment a send is done. Two consumers read that
stream in large batches: ``results-pg`` (this module: recipient statuses, batch
completion; one transaction of set-based statements per flush) and ``results-ch``
(``engine.events``: one ClickHouse insert per flush).

Status rules. Sending yields a final status from ``queued``/``pending`` (``sent``,
``failed``, ...); each such transition counts once toward the batch's ``final_count``,
and the batch is ``completed`` exactly when that count reaches ``total_recipients``.
Provider events move ``sent`` forward by rank (delivered < bounced < complained); an
event that arrives before its send was recorded is itself the final transition, and the
later ``sent`` is then ignored. Applying the same result twice changes nothing.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from engine.services import Services

log = logging.getLogger(__name__)

FINAL_STATUSES = frozenset(
    {"sent", "delivered", "bounced", "complained", "failed", "suppressed", "cancelled"}
)
AFTER_SEND = ("sent", "delivered", "bounced", "complained")  # ranked, lowest first
SUPPRESSING = frozenset({"bounced", "complained"})


@dataclass(slots=True)
class ResultRow:
    batch_id: str
    seq: int
    status: str
    provider_message_id: str | None = None
    error: str | None = None
    attempts: int = 1
    latency_ms: int = 0
    domain: str = ""

    def as_list(self) -> list[Any]:
        return [
            self.batch_id, self.seq, self.status, self.provider_message_id, self.error,
            self.attempts, self.latency_ms, self.domain,
        ]  # fmt: skip


@dataclass(slots=True)
class ResultMessage:
    tenant_id: str | None
    provider: str
    ts: float
    rows: list[ResultRow]


def encode(tenant_id: str | None, provider: str, rows: list[ResultRow]) -> bytes:
    return orjson.dumps(
        {"t": tenant_id, "p": provider, "ts": time.time(), "r": [r.as_list() for r in rows]}
    )


def decode(data: bytes) -> ResultMessage:
    """Parse a results message; ``ValueError`` when it is not one."""
    try:
        body = orjson.loads(data)
        rows = [ResultRow(*item) for item in body["r"]]
        return ResultMessage(body.get("t"), body["p"], float(body["ts"]), rows)
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"not a results message: {exc!r}") from None


async def publish(services: Services, tenant_id: str | None, provider: str,
                  rows: list[ResultRow], msg_id: str | None = None) -> None:  # fmt: skip
    """Make results durable in NATS (waits for the stream's acknowledgement)."""
    headers = {"Nats-Msg-Id": msg_id} if msg_id else None
    await services.js.publish(
        services.topology.results_subject, encode(tenant_id, provider, rows), headers=headers
    )


_FINAL_TRANSITION = """
WITH v AS (
    SELECT * FROM unnest($1::uuid[], $2::int[], $3::text[], $4::text[], $5::text[], $6::int2[])
        AS v(batch_id, seq, status, pmid, error, attempts)
), u AS (
    UPDATE recipients r
       SET status = v.status,
           provider_message_id = coalesce(v.pmid, r.provider_message_id),
           error = v.error,
           attempts = greatest(r.attempts, v.attempts),
           updated_at = now()
      FROM v
     WHERE r.batch_id = v.batch_id AND r.seq = v.seq AND r.status IN ('pending', 'queued')
 RETURNING r.batch_id
), c AS (
    SELECT batch_id, count(*)::int AS n FROM u GROUP BY batch_id
)
UPDATE batches b
   SET final_count = b.final_count + c.n,
       started_at = coalesce(b.started_at, now()),
       status = CASE
           WHEN b.final_count + c.n >= b.total_recipients
                AND b.status IN ('queued', 'processing') THEN 'completed'
           WHEN b.status = 'queued' THEN 'processing'
           ELSE b.status END,
       completed_at = CASE
           WHEN b.final_count + c.n >= b.total_recipients
                AND b.status IN ('queued', 'processing') THEN now()
           ELSE b.completed_at END
  FROM c
 WHERE b.id = c.batch_id
RETURNING b.id, b.status
"""

_AFTER_SEND_TRANSITION = """
UPDATE recipients r
   SET status = v.status,
       provider_message_id = coalesce(r.provider_message_id, v.pmid),
       updated_at = now()
  FROM unnest($1::uuid[], $2::int[], $3::text[], $4::text[]) AS v(batch_id, seq, status, pmid)
 WHERE r.batch_id = v.batch_id AND r.seq = v.seq
   AND array_position($5::text[], r.status) < array_position($5::text[], v.status)
"""

_SUPPRESS = """
INSERT INTO suppressions (tenant_id, email, reason)
SELECT b.tenant_id, lower(r.email), v.status
  FROM unnest($1::uuid[], $2::int[], $3::text[]) AS v(batch_id, seq, status)
  JOIN recipients r ON r.batch_id = v.batch_id AND r.seq = v.seq
  JOIN batches b ON b.id = v.batch_id
ON CONFLICT (tenant_id, email) DO NOTHING
"""


def _columns(rows: list[ResultRow], with_details: bool) -> list[list[Any]]:
    columns: list[list[Any]] = [
        [uuid.UUID(r.batch_id) for r in rows],
        [r.seq for r in rows],
        [r.status for r in rows],
        [r.provider_message_id for r in rows],
    ]
    if with_details:
        columns += [[r.error for r in rows], [min(r.attempts, 32767) for r in rows]]
    return columns


async def apply_results(conn: asyncpg.Connection, rows: list[ResultRow]) -> list[tuple[str, str]]:
    """Write many results in one transaction; return (batch id, status) of batches touched.

    Per recipient only the first result of this flush can be its final transition; events
    after the send are applied after that, in rank order, so a ``sent`` and a ``delivered``
    of one recipient in the same flush both land.
    """
    first: dict[tuple[str, int], ResultRow] = {}
    later: dict[tuple[str, int], ResultRow] = {}
    for row in rows:
        key = (row.batch_id, row.seq)
        if key not in first:
            first[key] = row
        if row.status in AFTER_SEND[1:]:
            known = later.get(key)
            if known is None or AFTER_SEND.index(row.status) > AFTER_SEND.index(known.status):
                later[key] = row
    async with conn.transaction():
        touched = await conn.fetch(_FINAL_TRANSITION, *_columns(list(first.values()), True))
        if later:
            events = list(later.values())
            await conn.execute(_AFTER_SEND_TRANSITION, *_columns(events, False), list(AFTER_SEND))
            suppress = [r for r in events if r.status in SUPPRESSING]
            if suppress:
                await conn.execute(_SUPPRESS, *_columns(suppress, False)[:3])
    return [(str(r["id"]), r["status"]) for r in touched]
