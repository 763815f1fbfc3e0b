"""Recipient results: one NATS message per chunk (or webhook post), applied in bulk.

A worker publishes the results of a chunk to the RESULTS stream before it acknowledges
the chunk, so a result is durable the moment a send is done. Two consumers read that
stream in large batches: ``results-pg`` (this module: recipient statuses, batch
completion; one transaction of set-based statements per flush) and ``results-ch``
(``engine.events``: one ClickHouse insert per flush).

Status rules. Sending yields a final status from ``queued`` (``sent``,
``failed``, ``cancelled``, ...); each such transition counts once toward the batch's
``final_count``, and the batch is ``completed`` exactly when that count reaches
``total_recipients`` (a cancelled batch stays ``cancelled``, a paused one ``paused``).
Provider events move ``sent`` forward by rank (delivered < bounced < complained); an
event that arrives before its send was recorded is itself the final transition, and the
later ``sent`` is then ignored. Applying the same result twice changes nothing.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

from engine import deadletters
from engine.services import Services

log = logging.getLogger(__name__)

FINAL_STATUSES = frozenset(
    {"sent", "delivered", "bounced", "complained", "failed", "suppressed", "cancelled"}
)
AFTER_SEND = ("sent", "delivered", "bounced", "complained")  # ranked, lowest first
SUPPRESSING = frozenset({"bounced", "complained"})
_AFTER_SEND_EVENTS = frozenset(AFTER_SEND[1:])
_RANK = {status: rank for rank, status in enumerate(AFTER_SEND)}


@dataclass(slots=True)
class ResultRow:
    """One recipient's result (a convenience; the hot path works on ``Columns``)."""

    batch_id: str
    seq: int
    status: str
    provider_message_id: str | None = None
    error: str | None = None
    attempts: int = 1
    latency_ms: int = 0
    domain: str = ""


_FIELDS = (
    "batch_id",
    "seq",
    "status",
    "provider_message_id",
    "error",
    "attempts",
    "latency_ms",
    "domain",
)
_WIRE = ("b", "s", "st", "pm", "er", "at", "ms", "d")


@dataclass(slots=True)
class Columns:
    """Many results, one list per field: the wire format and what the writers consume.

    No object per recipient: a chunk of 100 results is eight lists, encoded by orjson in
    one call and handed to PostgreSQL and ClickHouse as arrays/columns.
    """

    batch_id: list[str] = field(default_factory=list)
    seq: list[int] = field(default_factory=list)
    status: list[str] = field(default_factory=list)
    provider_message_id: list[str | None] = field(default_factory=list)
    error: list[str | None] = field(default_factory=list)
    attempts: list[int] = field(default_factory=list)
    latency_ms: list[int] = field(default_factory=list)
    domain: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seq)

    def append(self, batch_id: str, seq: int, status: str, provider_message_id: str | None = None,
               error: str | None = None, attempts: int = 1, latency_ms: int = 0, domain: str = "") -> None:  # fmt: skip
        self.batch_id.append(batch_id)
        self.seq.append(seq)
        self.status.append(status)
        self.provider_message_id.append(provider_message_id)
        self.error.append(error)
        self.attempts.append(attempts)
        self.latency_ms.append(latency_ms)
        self.domain.append(domain)

    def extend(self, other: Columns) -> None:
        for name in _FIELDS:
            getattr(self, name).extend(getattr(other, name))

    @classmethod
    def from_rows(cls, rows: list[ResultRow]) -> Columns:
        columns = cls()
        for row in rows:
            columns.append(*(getattr(row, name) for name in _FIELDS))
        return columns

    def rows(self) -> list[ResultRow]:
        return [
            ResultRow(*values) for values in zip(*(getattr(self, n) for n in _FIELDS), strict=True)
        ]

    def select(self, keep: list[int]) -> Columns:
        """The results at the given positions."""
        return Columns(*([getattr(self, n)[i] for i in keep] for n in _FIELDS))


@dataclass(slots=True)
class ResultMessage:
    tenant_id: str | None
    provider: str
    ts: float
    columns: Columns

    @property
    def rows(self) -> list[ResultRow]:
        return self.columns.rows()


def encode(tenant_id: str | None, provider: str, columns: Columns) -> bytes:
    """One results message. A single batch id is sent once rather than per row."""
    body: dict[str, Any] = {"t": tenant_id, "p": provider, "ts": time.time()}
    for name, key in zip(_FIELDS, _WIRE, strict=True):
        body[key] = getattr(columns, name)
    if columns.batch_id and columns.batch_id.count(columns.batch_id[0]) == len(columns.batch_id):
        body["b"] = columns.batch_id[0]
    return orjson.dumps(body)


def decode(data: bytes) -> ResultMessage:
    """Parse a results message; ``ValueError`` when it is not one."""
    try:
        body = orjson.loads(data)
        lists = [body[key] for key in _WIRE]
        size = len(lists[1])
        if isinstance(lists[0], str):
            lists[0] = [lists[0]] * size
        if any(not isinstance(values, list) or len(values) != size for values in lists):
            raise TypeError("columns of different lengths")
        return ResultMessage(body.get("t"), body["p"], float(body["ts"]), Columns(*lists))
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"not a results message: {exc!r}") from None


async def dead_letter(services: Services, consumer: str, data: bytes, reason: str) -> None:
    """Dead-letter a results message that ``consumer`` gave up on (``engine.deadletters``),
    under the tenant it names or, for webhook results, the tenant of its first batch."""
    await deadletters.publish(services, "results", await _tenant_of(services, data), reason,
                              consumer=consumer, data=deadletters.text_of(data))  # fmt: skip


async def _tenant_of(services: Services, data: bytes) -> str | None:
    try:
        body = orjson.loads(data)
        if isinstance(body.get("t"), str):
            return body["t"]
        batch = body["b"] if isinstance(body["b"], str) else body["b"][0]
        return await services.pool.fetchval(
            "SELECT tenant_id FROM batches WHERE id = $1", uuid.UUID(batch)
        )
    except Exception as exc:  # a poison message may name nothing usable
        log.info("dead-lettered results message without a tenant (%r)", exc)
        return None


async def publish(services: Services, tenant_id: str | None, provider: str,
                  columns: Columns, msg_id: str | None = None) -> None:  # fmt: skip
    """Make results durable in NATS (waits for the stream's acknowledgement)."""
    headers = {"Nats-Msg-Id": msg_id} if msg_id else None
    await services.js.publish(
        services.topology.results_subject, encode(tenant_id, provider, columns), headers=headers
    )


_FINAL_TRANSITION = """
WITH v AS (  -- per recipient only its first result of this flush can be the final transition
    SELECT DISTINCT ON (batch_id, seq) batch_id, seq, status, pmid, error, attempts
      FROM unnest($1::uuid[], $2::int[], $3::text[], $4::text[], $5::text[], $6::int2[])
           WITH ORDINALITY AS v(batch_id, seq, status, pmid, error, attempts, position)
     ORDER BY batch_id, seq, position
), u AS (
    UPDATE recipients r
       SET status = v.status,
           provider_message_id = coalesce(v.pmid, r.provider_message_id),
           error = v.error,
           attempts = greatest(r.attempts, v.attempts),
           updated_at = now()
      FROM v
     WHERE r.batch_id = v.batch_id AND r.seq = v.seq AND r.status = 'queued'
 RETURNING r.batch_id, r.status
), c AS (
    SELECT batch_id, status, count(*)::int AS n FROM u GROUP BY batch_id, status
), counted AS (
    INSERT INTO batch_counts (batch_id, status, n)
    SELECT batch_id, status, n FROM c
     UNION ALL
    SELECT batch_id, 'queued', -sum(n)::int FROM c GROUP BY batch_id
    ON CONFLICT (batch_id, status) DO UPDATE SET n = batch_counts.n + excluded.n
), t AS (
    SELECT batch_id, sum(n)::int AS n FROM c GROUP BY batch_id
)
UPDATE batches b
   SET final_count = b.final_count + t.n,
       started_at = coalesce(b.started_at, now()),
       progress_at = now(),
       status = CASE
           WHEN b.final_count + t.n >= b.total_recipients
                AND b.status IN ('queued', 'processing') THEN 'completed'
           WHEN b.status = 'queued' THEN 'processing'
           ELSE b.status END,  -- a paused batch stays paused, a cancelled one cancelled
       completed_at = CASE
           WHEN b.final_count + t.n >= b.total_recipients AND b.status <> 'paused'
           THEN coalesce(b.completed_at, now())
           ELSE b.completed_at END
  FROM t
 WHERE b.id = t.batch_id
RETURNING b.id, b.status
"""

# Rows are locked and read first (FOR UPDATE), so the counts move from the status each
# recipient really had, also when another writer changed it a moment before.
_AFTER_SEND_TRANSITION = """
WITH v AS (
    SELECT * FROM unnest($1::uuid[], $2::int[], $3::text[], $4::text[]) AS v(batch_id, seq, status, pmid)
), old AS (
    SELECT r.batch_id, r.seq, r.status AS old_status, v.status AS new_status, v.pmid
      FROM recipients r JOIN v ON r.batch_id = v.batch_id AND r.seq = v.seq
     WHERE array_position($5::text[], r.status) < array_position($5::text[], v.status)
       FOR UPDATE OF r
), u AS (
    UPDATE recipients r
       SET status = old.new_status,
           provider_message_id = coalesce(r.provider_message_id, old.pmid),
           updated_at = now()
      FROM old
     WHERE r.batch_id = old.batch_id AND r.seq = old.seq
 RETURNING r.batch_id, old.old_status, old.new_status
), moves AS (
    SELECT batch_id, old_status, new_status, count(*)::int AS n FROM u GROUP BY 1, 2, 3
)
INSERT INTO batch_counts (batch_id, status, n)
SELECT batch_id, status, sum(n)::int FROM (
    SELECT batch_id, new_status AS status, n FROM moves
     UNION ALL
    SELECT batch_id, old_status, -n FROM moves
) m GROUP BY batch_id, status
ON CONFLICT (batch_id, status) DO UPDATE SET n = batch_counts.n + excluded.n
"""

_SUPPRESS = """
INSERT INTO suppressions (tenant_id, email, reason)
SELECT b.tenant_id, lower(r.email), v.status
  FROM unnest($1::uuid[], $2::int[], $3::text[]) AS v(batch_id, seq, status)
  JOIN recipients r ON r.batch_id = v.batch_id AND r.seq = v.seq
  JOIN batches b ON b.id = v.batch_id
ON CONFLICT (tenant_id, email) DO NOTHING
"""


def _arrays(columns: Columns, with_details: bool) -> list[list[Any]]:
    arrays: list[list[Any]] = [
        columns.batch_id,
        columns.seq,
        columns.status,
        columns.provider_message_id,
    ]
    if with_details:
        arrays += [columns.error, [min(a, 32767) for a in columns.attempts]]
    return arrays


# Errors that mean PostgreSQL (or asyncpg, encoding the arrays) refused the values of a
# results message: a seq outside int4, a batch id that is no uuid, a status the schema
# does not allow, a value of the wrong type. Applying it again would fail the same way.
REFUSED = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError, TypeError, ValueError)


@dataclass(slots=True)
class Flush:
    """What ``apply_flush`` did: (batch id, status) of the batches touched, and the parts
    that failed on their own, with their errors, by position."""

    touched: list[tuple[str, str]]
    failed: dict[int, Exception]


async def apply_flush(pool: asyncpg.Pool, parts: list[Columns]) -> Flush:
    """Apply the results of many messages (``parts``) in one transaction.

    When that fails while PostgreSQL answers, one part is at fault (or a few): the parts
    are applied by halves, recursively, so that every part that can be applied is, and
    each part that fails on its own is returned in ``failed`` (``REFUSED`` errors: its
    values; others: worth a retry). When PostgreSQL does not answer, the error propagates:
    no part is at fault. Applying a part twice changes nothing, so a half that is applied
    again after a later failure does no harm.
    """
    flush = Flush([], {})

    async def attempt(first: int, end: int) -> None:
        if end - first == 1:
            columns = parts[first]
        else:
            columns = Columns()
            for part in parts[first:end]:
                columns.extend(part)
        try:
            async with pool.acquire() as conn:
                flush.touched.extend(await apply_results(conn, columns))
        except Exception as exc:
            if end - first == 1:
                flush.failed[first] = exc
                return
            await pool.fetchval("SELECT 1")  # raises while PostgreSQL is down
            log.warning("a flush of %d results messages failed (%r); applying it by halves",
                        end - first, exc)  # fmt: skip
            middle = (first + end) // 2
            await attempt(first, middle)
            await attempt(middle, end)

    if parts:
        await attempt(0, len(parts))
    return flush


async def apply_results(conn: asyncpg.Connection, columns: Columns) -> list[tuple[str, str]]:
    """Write many results in one transaction; return (batch id, status) of batches touched.

    Per recipient only the first result of this flush can be its final transition; events
    after the send are applied after that, in rank order, so a ``sent`` and a ``delivered``
    of one recipient in the same flush both land.
    """
    later = [i for i, status in enumerate(columns.status) if status in _AFTER_SEND_EVENTS]
    async with conn.transaction():
        # Every statement here looks up given (batch_id, seq) keys: one primary-key probe per
        # result is always right. Left to itself the planner may hash-join a large flush
        # against the whole table (a full scan of a 1,000,000-recipient batch per flush).
        await conn.execute("SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off")
        touched = await conn.fetch(_FINAL_TRANSITION, *_arrays(columns, True))
        if later:
            # The highest-ranked event per recipient, applied over whatever it has now.
            best: dict[tuple[str, int], int] = {}
            for i in later:
                key = (columns.batch_id[i], columns.seq[i])
                known = best.get(key)
                if known is None or _RANK[columns.status[i]] > _RANK[columns.status[known]]:
                    best[key] = i
            events = columns.select(list(best.values()))
            await conn.execute(_AFTER_SEND_TRANSITION, *_arrays(events, False), list(AFTER_SEND))
            suppress = [i for i, status in enumerate(events.status) if status in SUPPRESSING]
            if suppress:
                await conn.execute(_SUPPRESS, *_arrays(events.select(suppress), False)[:3])
    return [(str(r["id"]), r["status"]) for r in touched]
