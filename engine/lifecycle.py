"""A batch's life: its statuses, and every transition that changes them.

A batch is ``creating`` while its recipients are copied (invisible to the API), then:

| from                 | to                                   | by                           |
|----------------------|--------------------------------------|------------------------------|
| creating             | draft, scheduled, queued, completed  | ``created`` (intake)         |
| draft                | scheduled, queued, completed         | ``schedule``, ``start``      |
| scheduled            | queued, completed                    | ``start`` (the leader)       |
| queued               | processing, completed                | ``record_final`` (results)   |
| processing           | completed                            | ``record_final``             |
| queued, processing   | paused                               | ``pause``                    |
| paused               | queued, processing, completed        | ``resume``                   |
| any unfinished       | cancelled                            | ``cancel``                   |
| completed            | processing                           | ``reopen_failed`` (a replay) |

A batch whose recipients are all suppressed is ``completed`` at once. ``failed`` is a
batch status SPEC.md names; no transition sets it yet.

A recipient goes ``pending`` (draft, scheduled) → ``queued`` → one final status (``sent``, ``failed``,
``suppressed``, ``cancelled``, or the status of a provider event that came first); after
that the provider's events move it on by rank (``AFTER_SEND``: sent < delivered < failed <
bounced < complained), never back. A provider event changes a recipient only where
``PROVIDER_EVENTS`` gives it a status; the others (opened, clicked, deferred, ...) are
recorded as events only (ClickHouse), so one never makes a ``queued`` recipient final. Each final
transition counts once toward the batch's ``final_count``; the batch is ``completed``
exactly when that count reaches ``total_recipients`` (a paused batch stays paused, a
cancelled one cancelled). ``batch_counts`` holds the recipients per status, moved in the
same statement as the recipients themselves, so it is always exact.

Where a status is kept: a final transition sets the recipient's bit in
``recipient_finals`` (a bit already set: it was final already — the exactly-once guard);
one to ``sent`` writes only that bit and one ``recipient_sends`` row per block and flush
(provider message ids, attempts), the recipient's own row keeping ``queued``; every other
status is written into the recipient's row, and its ``stored`` bit set. A delivered event of
a sent recipient in turn sets only its ``delivered`` bit (already set: delivered already) and
one ``recipient_deliveries`` row per block and flush; the other events write the row. The
view ``recipient_statuses`` (migrations 011-014) puts these together: read a recipient's
status there, never from ``recipients``.

Every ``UPDATE batches`` and every write of ``batch_counts`` is here; the modules that
act on batches (intake, control, results, the leader, dead-letter replay) call these.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg

from engine import blocks

BATCH_STATUSES = (
    "draft",
    "scheduled",
    "queued",
    "processing",
    "completed",
    "paused",
    "cancelled",
    "failed",
)
RECIPIENT_STATUSES = (
    "pending",
    "queued",
    "sent",
    "delivered",
    "bounced",
    "complained",
    "failed",
    "suppressed",
    "cancelled",
)
SENDING = ("queued", "processing")  # workers send its chunks
ACTIVE = ("scheduled", "queued", "processing", "paused")  # counts toward a tenant's limit
UNFINISHED = ("draft", *ACTIVE)  # can still be cancelled
FINISHED = ("completed", "cancelled", "failed")
# A recipient's statuses after its send, ranked lowest first: a provider's event moves a
# recipient up, never down. ``failed`` (the provider dropped the message) is above
# ``delivered``, so a stray or late delivered cannot undo it; ``bounced`` and
# ``complained`` (the address is suppressed) are above both, the complaint, the
# recipient's own word, highest.
AFTER_SEND = ("sent", "delivered", "failed", "bounced", "complained")
RANK = {status: rank for rank, status in enumerate(AFTER_SEND)}
# The provider events on the results stream (``engine.webhooks`` names them) and the status
# each gives a recipient; None: an event only, recorded in ClickHouse, no recipient changes.
PROVIDER_EVENTS: dict[str, str | None] = {
    "delivered": "delivered",
    "dropped": "failed",
    "bounced": "bounced",
    "complained": "complained",
    "deferred": None,
    "soft_bounced": None,
    "opened": None,
    "clicked": None,
    "unsubscribed": None,
    "resubscribed": None,
}
EVENT_ONLY = frozenset(name for name, status in PROVIDER_EVENTS.items() if status is None)


def stored_as(status: str) -> list[str]:
    """The statuses a recipient's own row can hold while ``recipient_statuses`` shows
    ``status``: a ``sent`` or ``delivered`` recipient's row may keep ``queued`` (migrations
    011 and 014); every other status is its row's. A filter on them reads the final bits of
    no other row."""
    return ["queued", status] if status in ("sent", "delivered") else [status]


# --- recipient counts --------------------------------------------------------------


async def add_counts(conn: asyncpg.Connection, batch_id: uuid.UUID, counts: dict[str, int]) -> None:
    """Add to the batch's recipient counts per status."""
    await conn.execute(
        """INSERT INTO batch_counts (batch_id, status, n)
           SELECT $1, status, n FROM unnest($2::text[], $3::int[]) AS c(status, n) WHERE n > 0
           ON CONFLICT (batch_id, status) DO UPDATE SET n = batch_counts.n + excluded.n""",
        batch_id,
        list(counts),
        list(counts.values()),
    )


_MOVE = """
WITH u AS (
    UPDATE recipients
       SET status = $3, updated_at = now(), error = CASE WHEN $5 THEN NULL ELSE error END
     WHERE batch_id = $1 AND status = $2 AND ($4::int[] IS NULL OR seq = ANY($4::int[]))
 RETURNING seq
), n AS (
    SELECT count(*)::int AS n FROM u
), counted AS (
    INSERT INTO batch_counts (batch_id, status, n)
    SELECT $1, s, d FROM n, LATERAL (VALUES ($2::text, -n.n), ($3::text, n.n)) AS v(s, d)
     WHERE n.n > 0
    ON CONFLICT (batch_id, status) DO UPDATE SET n = batch_counts.n + excluded.n
)
SELECT seq FROM u ORDER BY seq
"""


async def move_recipients(
    conn: asyncpg.Connection,
    batch_id: uuid.UUID,
    from_status: str,
    to_status: str,
    seqs: list[int] | None = None,
    *,
    clear_error: bool = False,
) -> list[int]:
    """Move a batch's recipients (all, or the given ``seqs``) that are in ``from_status``
    to ``to_status``, keeping ``batch_counts`` in step; return the seqs moved."""
    rows = await conn.fetch(_MOVE, batch_id, from_status, to_status, seqs, clear_error)
    return [r["seq"] for r in rows]


# --- intake ------------------------------------------------------------------------


def first_status(draft: bool, scheduled_at: datetime | None) -> str:
    """The status a new batch is created in."""
    if draft:
        return "draft"
    if scheduled_at is not None and scheduled_at > datetime.now(UTC):
        return "scheduled"
    return "queued"


async def mark_suppressed(conn: asyncpg.Connection, batch_id: uuid.UUID, tenant_id: str) -> int:
    """The batch's unsent recipients on the tenant's suppression list become ``suppressed``;
    returns how many (the caller counts them)."""
    if not await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM suppressions WHERE tenant_id = $1)", tenant_id
    ):
        return 0
    result = await conn.execute(
        """UPDATE recipients r SET status = 'suppressed', error = s.reason, updated_at = now()
           FROM suppressions s
           WHERE r.batch_id = $1 AND s.tenant_id = $2 AND s.email = lower(r.email)
             AND r.status IN ('pending', 'queued')""",
        batch_id,
        tenant_id,
    )
    return int(result.split()[-1])


async def created(
    conn: asyncpg.Connection,
    batch_id: uuid.UUID,
    status: str,
    recipient_status: str,
    total: int,
    suppressed: int,
) -> str:
    """A ``creating`` batch whose recipients are copied (in ``recipient_status``) becomes
    ``status`` — ``completed`` instead of ``queued`` when every recipient is suppressed.
    Returns the status it has now."""
    if status == "queued" and suppressed == total:
        status = "completed"
    await conn.execute(
        """UPDATE batches SET status = $2, total_recipients = $3,
               suppressed_count = $4, final_count = $4,
               completed_at = CASE WHEN $2 = 'completed' THEN now() END
           WHERE id = $1""",
        batch_id,
        status,
        total,
        suppressed,
    )
    await add_counts(
        conn, batch_id, {recipient_status: total - suppressed, "suppressed": suppressed}
    )
    return status


async def appended(
    conn: asyncpg.Connection, batch_id: uuid.UUID, total: int, added: int, suppressed: int
) -> int:
    """A draft got ``added`` recipients (``suppressed`` of them suppressed), ``total`` now;
    returns how many of all its recipients are suppressed."""
    total_suppressed = await conn.fetchval(
        """UPDATE batches SET total_recipients = $2, suppressed_count = suppressed_count + $3,
                  final_count = final_count + $3
            WHERE id = $1 RETURNING suppressed_count""",
        batch_id,
        total,
        suppressed,
    )
    await add_counts(conn, batch_id, {"pending": added - suppressed, "suppressed": suppressed})
    return total_suppressed


# A batch's counts from its recipients (at a start, when nothing is being sent yet).
_RECOUNT = """
WITH c AS (
    SELECT status, count(*)::int AS n FROM recipients WHERE batch_id = $1 GROUP BY status
), counted AS (
    INSERT INTO batch_counts (batch_id, status, n) SELECT $1, status, n FROM c
), s AS (
    SELECT coalesce(sum(n) FILTER (WHERE status = 'suppressed'), 0)::int AS suppressed,
           coalesce(sum(n) FILTER (WHERE status = 'queued'), 0)::int AS queued
      FROM c
)
UPDATE batches b
   SET status = CASE WHEN s.queued = 0 THEN 'completed' ELSE 'queued' END,
       suppressed_count = s.suppressed, final_count = s.suppressed, queued_at = NULL,
       completed_at = CASE WHEN s.queued = 0 THEN now() END
  FROM s WHERE b.id = $1
RETURNING b.status
"""


async def start(pool: asyncpg.Pool, batch_id: uuid.UUID, from_status: str) -> dict[str, Any] | None:
    """A ``draft`` or due ``scheduled`` batch (``from_status``) becomes ``queued``: its
    recipients become ``queued``, those suppressed since it was created ``suppressed``
    (``completed`` when nobody is left). Returns (status, tenant_id, provider, chunk_size,
    total_recipients), or None when the batch was not in ``from_status``."""
    async with pool.acquire() as conn, conn.transaction():
        batch = await conn.fetchrow(
            """SELECT tenant_id, provider, chunk_size, total_recipients FROM batches
                WHERE id = $1 AND status = $2 FOR UPDATE""",
            batch_id,
            from_status,
        )
        if batch is None:
            return None
        await mark_suppressed(conn, batch_id, batch["tenant_id"])
        await conn.execute(
            "UPDATE recipients SET status = 'queued' WHERE batch_id = $1 AND status = 'pending'",
            batch_id,
        )
        await conn.execute("DELETE FROM batch_counts WHERE batch_id = $1", batch_id)
        # Nothing was sent yet: final bits here are a stray event's.
        await conn.execute("DELETE FROM recipient_finals WHERE batch_id = $1", batch_id)
        await conn.execute("DELETE FROM recipient_sends WHERE batch_id = $1", batch_id)
        await conn.execute("DELETE FROM recipient_deliveries WHERE batch_id = $1", batch_id)
        status = await conn.fetchval(_RECOUNT, batch_id)
    return {**dict(batch), "status": status}


async def chunks_queued(pool: asyncpg.Pool, batch_id: uuid.UUID) -> None:
    """Every chunk of the batch is published (until then recovery sees it interrupted)."""
    await pool.execute("UPDATE batches SET queued_at = now() WHERE id = $1", batch_id)


# --- control -----------------------------------------------------------------------


async def schedule(pool: asyncpg.Pool, batch_id: uuid.UUID) -> bool:
    """A draft whose ``scheduled_at`` is ahead becomes ``scheduled``; False when it is no
    draft (any more)."""
    return bool(
        await pool.fetchval(
            "UPDATE batches SET status = 'scheduled' WHERE id = $1 AND status = 'draft'"
            " RETURNING true",
            batch_id,
        )
    )


async def pause(
    pool: asyncpg.Pool,
    tenant_id: str,
    batch_id: uuid.UUID,
    reason: str | None = None,
    resume_at: datetime | None = None,
) -> bool:
    """A sending batch becomes ``paused``; False when it was not sending. An operator's
    pause gives no ``reason``; the engine's (``engine.sender``: the provider suspended the
    account, its daily quota is used up) says why, and when it ends by itself
    (``resume_at``: the leader resumes the batch then)."""
    return bool(
        await pool.fetchval(
            """UPDATE batches SET status = 'paused', paused_at = now(), pause_reason = $4,
                                  resume_at = $5
                WHERE id = $1 AND tenant_id = $2 AND status = ANY($3::text[])
            RETURNING true""",
            batch_id,
            tenant_id,
            list(SENDING),
            reason,
            resume_at,
        )
    )


async def resume(pool: asyncpg.Pool, tenant_id: str, batch_id: uuid.UUID) -> asyncpg.Record | None:
    """A paused batch goes back to ``queued``/``processing`` (``completed`` when it has
    nothing left) under a new generation; (status, generation), or None when it was not
    paused."""
    return await pool.fetchrow(
        """UPDATE batches
              SET status = CASE WHEN final_count >= total_recipients THEN 'completed'
                                WHEN started_at IS NULL THEN 'queued' ELSE 'processing' END,
                  completed_at = CASE WHEN final_count >= total_recipients
                                      THEN coalesce(completed_at, now()) END,
                  generation = generation + 1, paused_at = NULL, progress_at = now(),
                  pause_reason = NULL, resume_at = NULL
            WHERE id = $1 AND tenant_id = $2 AND status = 'paused'
        RETURNING status, generation""",
        batch_id,
        tenant_id,
    )


async def cancel(pool: asyncpg.Pool, tenant_id: str, batch_id: uuid.UUID) -> str | None:
    """An unfinished batch becomes ``cancelled``; a draft's or scheduled batch's recipients
    (never queued) are ``cancelled`` at once, the others as their chunks or the leader
    settle them. Returns the status it had, or None when it was finished."""
    async with pool.acquire() as conn, conn.transaction():
        before = await conn.fetchval(
            """SELECT status FROM batches
                WHERE id = $1 AND tenant_id = $2 AND status = ANY($3::text[]) FOR UPDATE""",
            batch_id,
            tenant_id,
            list(UNFINISHED),
        )
        if before is None:
            return None
        await conn.execute(
            "UPDATE batches SET status = 'cancelled', cancelled_at = now() WHERE id = $1",
            batch_id,
        )
        if before in ("draft", "scheduled"):  # nothing was ever queued: end it here
            moved = await move_recipients(conn, batch_id, "pending", "cancelled")
            await conn.execute(
                "UPDATE batches SET final_count = final_count + $2, completed_at = now()"
                " WHERE id = $1",
                batch_id,
                len(moved),
            )
    return before


# --- sending -----------------------------------------------------------------------


# A flush's final transitions, in two statements (``record_final``). The first sets the
# final bits of its blocks (``engine.blocks``: per recipient its first result), in key order
# (writers lock blocks in one order); of those not sent (their rows take their status) also
# in ``stored``. It returns the bits it set: those recipients' final transition is this one.
_FINAL_BITS = """
INSERT INTO recipient_finals AS f (batch_id, block, bits, before, stored)
SELECT batch_id, block, bits, B'0'::bit(1024), stored
  FROM unnest($1::uuid[], $2::int[], $3::bit(1024)[], $4::bit(1024)[])
       AS v(batch_id, block, bits, stored)
 ORDER BY batch_id, block
ON CONFLICT (batch_id, block) DO UPDATE
   SET before = f.bits, bits = f.bits | excluded.bits,
       stored = f.stored | (excluded.stored & ~f.bits)
RETURNING f.batch_id, f.block, f.bits & ~f.before AS new
"""

# The second writes what those transitions are: the sent ones one ``recipient_sends`` row per
# block (its recipients at lo..hi of the flat seqs $5, provider message ids and attempts, by
# seq), their recipients' rows staying as they are; the others (failed, cancelled, a
# provider event that came first) their rows. Then the counts and the batches. The ids come
# as one text of lines ($16) when they can (asyncpg spends ~360 ns per element of a text[],
# ~15 per line of that text), else as $6; the attempts as one value ($17) when they are all
# the same, else as $7.
_FINAL_WRITES = """
WITH p AS MATERIALIZED (
    SELECT coalesce($6::text[], string_to_array($16::text, E'\\n')) AS pmids
), sent AS (
    INSERT INTO recipient_sends (batch_id, block, first_seq, seqs, pmids, attempts)
    SELECT s.batch_id, s.block, ($5::int[])[s.lo], ($5::int[])[s.lo:s.hi], p.pmids[s.lo:s.hi],
           coalesce(($7::int2[])[s.lo:s.hi], array_fill($17::int2, ARRAY[s.hi - s.lo + 1]))
      FROM unnest($1::uuid[], $2::int[], $3::int[], $4::int[]) AS s(batch_id, block, lo, hi), p
), u AS (
    UPDATE recipients r
       SET status = o.status,
           provider_message_id = coalesce(o.pmid, r.provider_message_id),
           error = o.error,
           attempts = greatest(r.attempts, o.attempts),
           updated_at = now()
      FROM unnest($8::uuid[], $9::int[], $10::text[], $11::text[], $12::text[], $13::int2[])
           AS o(batch_id, seq, status, pmid, error, attempts)
     WHERE r.batch_id = o.batch_id AND r.seq = o.seq AND r.status = 'queued'
 RETURNING r.batch_id, r.status
), c AS (
    SELECT batch_id, status, count(*)::int AS n FROM u GROUP BY batch_id, status
     UNION ALL
    SELECT batch_id, 'sent', n FROM unnest($14::uuid[], $15::int[]) AS s(batch_id, n)
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

# The recipients of seqs [$2, $3) of batch $1 still to send: ``queued`` in
# ``recipient_statuses``, the range's one or two blocks of final bits read once.
TO_SEND = """
WITH f AS MATERIALIZED (
    SELECT block, bits FROM recipient_finals
     WHERE batch_id = $1 AND block BETWEEN ($2 - 1) >> 10 AND ($3 - 2) >> 10
)
SELECT r.seq, r.email, r.name, r.vars
  FROM recipients r LEFT JOIN f ON f.block = (r.seq - 1) >> 10
 WHERE r.batch_id = $1 AND r.seq >= $2 AND r.seq < $3 AND r.status = 'queued'
   AND (f.bits IS NULL OR get_bit(f.bits, (r.seq - 1) & 1023) = 0)
 ORDER BY r.seq
"""

# The first block at or after seq $2 + 1 of batch $1 that may hold a ``queued`` recipient:
# one whose bits are not all set (or that has none). None: no such block up to the last seq.
FIRST_UNFINISHED_BLOCK = """
SELECT min(k) FROM generate_series($2 >> 10, (
           SELECT (max(seq) - 1) >> 10 FROM recipients WHERE batch_id = $1)) AS k
 WHERE NOT EXISTS (SELECT 1 FROM recipient_finals f
                    WHERE f.batch_id = $1 AND f.block = k AND bit_count(f.bits) = 1024)
"""

_LOCK_BLOCKS = """
INSERT INTO recipient_finals AS f (batch_id, block, bits, before)
SELECT DISTINCT batch_id, block, B'0'::bit(1024), B'0'::bit(1024)
  FROM unnest($1::uuid[], $2::int[]) AS l(batch_id, block) ORDER BY batch_id, block
ON CONFLICT (batch_id, block) DO UPDATE SET before = f.before
"""

# A delivered event of a sent recipient (final, not ``stored``): its ``delivered`` bit
# (``record_delivered``; per recipient its first event, by block: ``engine.blocks``).
# ``before`` brings the events' bits to a row that is not there (it becomes one with no
# final recipient) and takes the delivered bits as they were. Returns per block the bits it
# set and those of its sent recipients.
_DELIVERED_BITS = """
INSERT INTO recipient_finals AS f (batch_id, block, bits, before)
SELECT batch_id, block, B'0'::bit(1024), events
  FROM unnest($1::uuid[], $2::int[], $3::bit(1024)[]) AS v(batch_id, block, events)
 ORDER BY batch_id, block
ON CONFLICT (batch_id, block) DO UPDATE
   SET before = f.delivered, delivered = f.delivered | (excluded.before & f.bits & ~f.stored)
RETURNING f.batch_id, f.block, f.delivered & ~f.before AS new, f.bits & ~f.stored AS sent
"""

# The recipients that became delivered: one ``recipient_deliveries`` row per block (its
# recipients at lo..hi of $5, by seq), and their batches' counts.
_DELIVERED_WRITES = """
WITH deliveries AS (
    INSERT INTO recipient_deliveries (batch_id, block, first_seq, seqs)
    SELECT d.batch_id, d.block, ($5::int[])[d.lo], ($5::int[])[d.lo:d.hi]
      FROM unnest($1::uuid[], $2::int[], $3::int[], $4::int[]) AS d(batch_id, block, lo, hi)
)
INSERT INTO batch_counts (batch_id, status, n)
SELECT c.batch_id, m.status, m.n
  FROM unnest($6::uuid[], $7::int[]) AS c(batch_id, n),
       LATERAL (VALUES ('sent', -c.n), ('delivered', c.n)) AS m(status, n)
ON CONFLICT (batch_id, status) DO UPDATE SET n = batch_counts.n + excluded.n
"""

# The other events: one write per event (``record_final`` of them ran first in the same
# transaction, so every recipient here is final: its bit is set, and its block's row of
# final bits is held until COMMIT). The rank check and the SET read the row's latest
# version (after a concurrent writer, PostgreSQL re-checks it), and ``previous_status`` keeps
# the status it had, which RETURNING hands back for the counts. A row still ``queued`` is a
# sent recipient: ``sent``, or ``delivered`` by its bit. Every row moved holds its status
# now: its ``stored`` bit is set.
_AFTER_SEND_TRANSITION = """
WITH v AS (
    SELECT v.*, CASE WHEN (
               SELECT get_bit(f.delivered, (v.seq - 1) & 1023) FROM recipient_finals f
                WHERE f.batch_id = v.batch_id AND f.block = (v.seq - 1) >> 10) = 1
               THEN 'delivered' ELSE 'sent' END AS sent_as
      FROM unnest($1::uuid[], $2::int[], $3::text[], $4::text[], $5::text[])
           AS v(batch_id, seq, status, pmid, error)
), u AS (
    UPDATE recipients r
       SET previous_status = CASE WHEN r.status = 'queued' THEN v.sent_as ELSE r.status END,
           status = v.status,
           provider_message_id = coalesce(r.provider_message_id, v.pmid),
           error = coalesce(v.error, r.error),
           updated_at = now()
      FROM v
     WHERE r.batch_id = v.batch_id AND r.seq = v.seq
       AND array_position($6::text[],
                          CASE WHEN r.status = 'queued' THEN v.sent_as ELSE r.status END)
           < array_position($6::text[], v.status)
 RETURNING r.batch_id, r.seq, r.previous_status AS old_status, r.status AS new_status
), stored AS (
    UPDATE recipient_finals f SET stored = f.stored | m.mask
      FROM (SELECT batch_id, (seq - 1) >> 10 AS block,
                   bit_or(B'1'::bit(1024) >> ((seq - 1) & 1023)) AS mask
              FROM u GROUP BY 1, 2) m
     WHERE f.batch_id = m.batch_id AND f.block = m.block
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


async def record_final(
    conn: asyncpg.Connection,
    batch_ids: list[str],
    seqs: list[int],
    statuses: list[str],
    provider_message_ids: list[str | None],
    errors: list[str | None],
    attempts: list[int],
) -> list[asyncpg.Record]:
    """``queued`` recipients take their final status (per recipient the first given; the
    others are not final transitions); their batches' counts and statuses follow. Returns
    (id, status) of the batches touched."""
    if not seqs:
        return []
    flush = blocks.by_block(batch_ids, seqs)
    all_sent = statuses.count("sent") == len(statuses)
    if all_sent:
        stored = [0] * len(flush.bits)
    else:
        stored = [
            flush.mask(start, end, lambda p: statuses[p] != "sent")
            for _, start, end in flush.spans()
        ]
    rows = await conn.fetch(
        _FINAL_BITS,
        flush.batch_ids,
        flush.blocks,
        [blocks.bits(v) for v in flush.bits],
        [blocks.bits(v) for v in stored],
    )
    new = {(str(r["batch_id"]), r["block"]): r["new"].to_int() for r in rows}
    sends: list[list[Any]] = [[], [], [], []]  # batch id, block, lo, hi per block
    flat: list[list[Any]] = [[], [], []]  # seqs, provider message ids, attempts
    others: list[int] = []
    sent_per_batch: dict[str, int] = {}
    for i, start, end in flush.spans():
        key = (flush.batch_ids[i], flush.blocks[i])
        taken = flush.taken(start, end, new[key], flush.bits[i])
        if not all_sent:
            others += [p for p in taken if statuses[p] != "sent"]
            taken = [p for p in taken if statuses[p] == "sent"]
        if not taken:
            continue
        lo = len(flat[0]) + 1
        for column, values in zip(flat, (seqs, provider_message_ids, attempts), strict=True):
            column += [values[p] for p in taken]
        for column, value in zip(sends, (*key, lo, len(flat[0])), strict=True):
            column.append(value)
        sent_per_batch[key[0]] = sent_per_batch.get(key[0], 0) + len(taken)
    if not (sent_per_batch or others):
        return []
    columns = (batch_ids, seqs, statuses, provider_message_ids, errors, attempts)
    sent_seqs, pmids, sent_attempts = flat
    lines = _lines(pmids)
    same = (  # the attempts of every send, when they are the same
        sent_attempts[0]
        if sent_attempts and sent_attempts.count(sent_attempts[0]) == len(sent_attempts)
        else None
    )
    return await conn.fetch(
        _FINAL_WRITES,
        *sends,
        sent_seqs,
        None if lines is not None else pmids,
        None if same is not None else sent_attempts,
        *([values[p] for p in others] for values in columns),
        list(sent_per_batch),
        list(sent_per_batch.values()),
        lines,
        same,
    )


def _lines(texts: list[Any]) -> str | None:
    """``texts`` as one text of lines, when that reads back as the same array: every one a
    text without a line break (no None), and not a single empty one."""
    try:
        joined = "\n".join(texts)
    except TypeError:  # a None, or a value that is no text
        return None
    return joined if joined and joined.count("\n") == len(texts) - 1 else None


async def lock_blocks(conn: asyncpg.Connection, batch_ids: list[str], blocks: list[int]) -> None:
    """Take the rows of final bits of these blocks (made where missing) in key order, the
    order every writer takes them in: for a transaction whose statements each take some of
    them (two writers taking the same blocks in two orders would deadlock)."""
    await conn.execute(_LOCK_BLOCKS, batch_ids, blocks)


async def record_delivered(
    conn: asyncpg.Connection, batch_ids: list[str], seqs: list[int]
) -> list[int]:
    """Delivered events (without an error) of sent recipients: their recipients become
    ``delivered``, counted once. Returns the positions (from 0) of the events that are not
    of a sent recipient (not final yet, or their status is in their row)."""
    if not seqs:
        return []
    flush = blocks.by_block(batch_ids, seqs)
    rows = await conn.fetch(
        _DELIVERED_BITS, flush.batch_ids, flush.blocks, [blocks.bits(v) for v in flush.bits]
    )
    found = {(str(r["batch_id"]), r["block"]): r for r in rows}
    deliveries: list[list[Any]] = [[], [], [], []]  # batch id, block, lo, hi per block
    delivered: list[int] = []  # their seqs, by block
    per_batch: dict[str, int] = {}
    not_sent: list[int] = []
    for i, start, end in flush.spans():
        key = (flush.batch_ids[i], flush.blocks[i])
        row, events = found[key], flush.bits[i]
        if (sent := row["sent"].to_int() & events) != events:
            not_sent += flush.taken(start, end, events & ~sent, events)
        if new := flush.taken(start, end, row["new"].to_int(), events):
            lo = len(delivered) + 1
            delivered += [seqs[p] for p in new]
            for column, value in zip(deliveries, (*key, lo, len(delivered)), strict=True):
                column.append(value)
            per_batch[key[0]] = per_batch.get(key[0], 0) + len(new)
    if per_batch:
        await conn.execute(
            _DELIVERED_WRITES, *deliveries, delivered, list(per_batch), list(per_batch.values())
        )
    return sorted(not_sent)


async def record_after_send(
    conn: asyncpg.Connection,
    batch_ids: list[str],
    seqs: list[int],
    statuses: list[str],
    provider_message_ids: list[str | None],
    errors: list[str | None],
) -> None:
    """The statuses of provider events (one per recipient) move recipients forward by rank
    (``AFTER_SEND``), never back, through their rows; an event's error (why the provider
    dropped it) replaces the recipient's. ``record_final`` of these events comes first, in
    the same transaction (and ``record_delivered`` of a sent recipient's delivered)."""
    await conn.execute(
        _AFTER_SEND_TRANSITION,
        batch_ids,
        seqs,
        statuses,
        provider_message_ids,
        errors,
        list(AFTER_SEND),
    )


# --- recovery and replay -----------------------------------------------------------


async def revive_stalled(pool: asyncpg.Pool, stall_seconds: float) -> list[asyncpg.Record]:
    """Sending batches with unfinished recipients and no progress for ``stall_seconds``
    get a new generation (and count as progressing again); (id, generation) of each."""
    return await pool.fetch(
        """UPDATE batches SET generation = generation + 1, progress_at = now()
            WHERE status = ANY($2::text[]) AND final_count < total_recipients
              AND queued_at IS NOT NULL
              AND coalesce(progress_at, queued_at) < now() - make_interval(secs => $1)
        RETURNING id, generation""",
        stall_seconds,
        list(SENDING),
    )


# Recipients that are queued again lose their final bits (``_FINAL_BITS``).
_NOT_FINAL = """
UPDATE recipient_finals f
   SET before = f.bits, bits = f.bits & ~m.mask, stored = f.stored & ~m.mask
  FROM (SELECT (seq - 1) >> 10 AS block, bit_or(B'1'::bit(1024) >> ((seq - 1) & 1023)) AS mask
          FROM unnest($2::int[]) AS seq GROUP BY 1) m
 WHERE f.batch_id = $1 AND f.block = m.block
"""


async def reopen_failed(
    pool: asyncpg.Pool, batch_id: uuid.UUID, seqs: list[int]
) -> tuple[list[int], int]:
    """Failed recipients (of ``seqs``) go back to ``queued`` (a dead-letter replay): they no
    longer count as final, and a completed batch is ``processing`` again. Returns the seqs
    moved and the batch's chunk size."""
    async with pool.acquire() as conn, conn.transaction():
        moved = await move_recipients(conn, batch_id, "failed", "queued", seqs, clear_error=True)
        await conn.execute(_NOT_FINAL, batch_id, moved)
        chunk_size = await conn.fetchval(
            """UPDATE batches SET final_count = final_count - $2,
                      status = CASE WHEN status = 'completed' AND $2 > 0 THEN 'processing'
                                    ELSE status END,
                      completed_at = CASE WHEN $2 > 0 THEN NULL ELSE completed_at END
                WHERE id = $1 RETURNING chunk_size""",
            batch_id,
            len(moved),
        )
    return moved, chunk_size
