"""Recipient results: one NATS message per chunk (or webhook post), applied in bulk.

A worker publishes the results of a chunk to the RESULTS stream before it acknowledges
the chunk, so a result is durable the moment a send is done. Three consumers read that
stream in large batches: ``results-pg`` (this module: recipient statuses and batch
completion, through ``engine.lifecycle``; one transaction per flush), ``results-ch``
(``engine.event_writer``: one ClickHouse insert per flush) and ``results-hooks``
(``engine.webhook_outbox``: the events customers' webhook endpoints take). Applying the
same result twice changes nothing.
"""

from __future__ import annotations

import functools
import logging
import operator
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson
from nats.aio.msg import Msg

from engine import deadletters, lifecycle, metrics, suppressions
from engine.lifecycle import EVENT_ONLY, PROVIDER_EVENTS, RANK
from engine.services import Services
from engine.suppressions import SUPPRESSING
from engine.topology import Redelivery

log = logging.getLogger(__name__)


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
    # The worker's result (a recipient status: sent, failed, cancelled) or a provider
    # event's name (``lifecycle.PROVIDER_EVENTS``): what ClickHouse records as the event.
    status: list[str] = field(default_factory=list)
    provider_message_id: list[str | None] = field(default_factory=list)
    error: list[str | None] = field(default_factory=list)
    attempts: list[int] = field(default_factory=list)
    latency_ms: list[int] = field(default_factory=list)
    domain: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seq)

    def append(
        self,
        batch_id: str,
        seq: int,
        status: str,
        *,
        provider_message_id: str | None = None,
        error: str | None = None,
        attempts: int = 1,
        latency_ms: int = 0,
        domain: str = "",
    ) -> None:
        self.batch_id.append(batch_id)
        self.seq.append(seq)
        self.status.append(status)
        self.provider_message_id.append(provider_message_id)
        self.error.append(error)
        self.attempts.append(attempts)
        self.latency_ms.append(latency_ms)
        self.domain.append(domain)

    def extend_sent(
        self,
        batch_id: str,
        seqs: list[int],
        provider_message_ids: list[str | None],
        attempts: int,
        latency_ms: int,
        domains: list[str],
    ) -> None:
        """The results of one provider call that accepted every message: ``append`` of
        each, a list at a time."""
        n = len(seqs)
        self.batch_id += [batch_id] * n
        self.seq += seqs
        self.status += ["sent"] * n
        self.provider_message_id += provider_message_ids
        self.error += [None] * n
        self.attempts += [attempts] * n
        self.latency_ms += [latency_ms] * n
        self.domain += domains

    def extend(self, other: Columns) -> None:
        for name in _FIELDS:
            getattr(self, name).extend(getattr(other, name))

    @classmethod
    def from_rows(cls, rows: list[ResultRow]) -> Columns:
        columns = cls()
        for name in _FIELDS:
            getattr(columns, name).extend(getattr(row, name) for row in rows)
        return columns

    def rows(self) -> list[ResultRow]:
        return [
            ResultRow(*values) for values in zip(*(getattr(self, n) for n in _FIELDS), strict=True)
        ]

    def select(self, keep: list[int]) -> Columns:
        """The results at the given positions (gathered at C speed: a flush of provider
        events selects most of its rows once or twice)."""
        if len(keep) < 2:  # itemgetter of one position gives the item, not a tuple
            return Columns(*([getattr(self, n)[i] for i in keep] for n in _FIELDS))
        pick = operator.itemgetter(*keep)
        return Columns(*(list(pick(getattr(self, n))) for n in _FIELDS))


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
    """One results message. A column whose every value is the same (one batch id; a
    provider call's status, attempts, latency, no error) is sent as that value once: a
    call's results are half the bytes for NATS to store and deliver to three consumers."""
    body: dict[str, Any] = {"t": tenant_id, "p": provider, "ts": time.time()}
    n = len(columns)
    for name, key in zip(_FIELDS, _WIRE, strict=True):
        values = getattr(columns, name)
        body[key] = values[0] if key != "s" and n and values.count(values[0]) == n else values
    return orjson.dumps(body)


def tenant_of(data: bytes) -> str | None:
    """The tenant a results message names, read from its first bytes without decoding it
    (``encode`` writes it first, and a tenant id has no characters JSON escapes); None when
    it names none (provider events) or does not begin as ``encode`` begins it."""
    if data.startswith(b'{"t":"'):
        end = data.find(b'"', 6)
        if end > 6:
            return data[6:end].decode()
    return None


def decode(data: bytes) -> ResultMessage:
    """Parse a results message (a column given once stands for every row; the seqs are
    always a list); ``ValueError`` when it is not one."""
    try:
        body = orjson.loads(data)
        lists = [body[key] for key in _WIRE]
        if type(lists[1]) is not list:
            raise TypeError("the seqs are no list")
        size = len(lists[1])
        lists = [v if type(v) is list else [v] * size for v in lists]
        if any(len(values) != size for values in lists):
            raise TypeError("columns of different lengths")
        return ResultMessage(body.get("t"), body["p"], float(body["ts"]), Columns(*lists))
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"not a results message: {exc!r}") from None


async def publish(
    services: Services,
    tenant_id: str | None,
    provider: str,
    columns: Columns,
    msg_id: str | None = None,
) -> None:
    """Make results durable in NATS (waits for the stream's acknowledgement)."""
    headers = {"Nats-Msg-Id": msg_id} if msg_id else None
    await services.js.publish(
        services.topology.results_subject, encode(tenant_id, provider, columns), headers=headers
    )


def _arrays(columns: Columns) -> list[list[Any]]:
    attempts = columns.attempts  # an int2 column: clamped, in the rare flush that needs it
    if attempts and max(attempts) > 32767:
        attempts = [min(a, 32767) for a in attempts]
    return [
        columns.batch_id,
        columns.seq,
        columns.status,
        columns.provider_message_id,
        columns.error,
        attempts,
    ]


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
    if parts:
        await _attempt(pool, parts, flush, 0, len(parts))
    return flush


async def _attempt(
    pool: asyncpg.Pool, parts: list[Columns], flush: Flush, first: int, end: int
) -> None:
    """``apply_flush`` of ``parts[first:end]``, by halves after a failure. (A function of
    its own, not a closure calling itself: that would make every flush's results a
    reference cycle, garbage only the collector frees.)"""
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
        log.warning("a flush of %d results failed (%r); by halves now", end - first, exc)
        middle = (first + end) // 2
        await _attempt(pool, parts, flush, first, middle)
        await _attempt(pool, parts, flush, middle, end)


# The status each provider event that changes one gives a recipient (``dropped``: failed).
_STATUS_OF = {name: status for name, status in PROVIDER_EVENTS.items() if status is not None}


async def apply_results(conn: asyncpg.Connection, columns: Columns) -> list[tuple[str, str]]:
    """Write many results in one transaction; return (batch id, status) of batches touched.

    The worker's results are statuses. A provider's events (``lifecycle.PROVIDER_EVENTS``)
    are statuses only where they change one, as the status they give; the others change
    no recipient. Per recipient only the first status of this flush can be its final
    transition (so a delivered that came before its send's result is final, an opened
    never), but for a delivered whose send's result is in the same flush: that send is.
    Events after the send are applied after that, the highest-ranked per recipient, so a
    ``sent`` and a ``delivered`` of one recipient in the same flush both land. A flush
    without provider events (the worker's) pays one set lookup per row.
    """
    events = [i for i, name in enumerate(columns.status) if name in PROVIDER_EVENTS]
    async with conn.transaction():
        # Every recipient row written here is found by its given (batch_id, seq) key: one
        # primary-key probe per row is always right. Left to itself the planner may hash-join
        # a large flush against the whole table (a full scan of a 1,000,000-recipient batch
        # per flush). A flush's sorts in memory, not on disk.
        await conn.execute(
            "SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off;"
            " SET LOCAL work_mem = '64MB'"
        )
        if not events:
            touched = await lifecycle.record_final(conn, *_arrays(columns))
        else:
            touched = await _apply_with_events(conn, columns, events)
    return [(str(r["id"]), r["status"]) for r in touched]


async def _apply_with_events(
    conn: asyncpg.Connection, columns: Columns, events: list[int]
) -> list[asyncpg.Record]:
    """``apply_results`` of a flush with provider events (at ``events``).

    The final transitions come first, but for the delivered events: most of those are of a
    recipient already sent (the webhook follows the send, in this flush or an earlier one)
    and go only to ``lifecycle.record_delivered``. The few it does not take (their
    recipient not final yet, or its status in its row) are final transitions after all, or
    go through the rows with the other events.
    """
    delivered = [i for i in events if columns.status[i] == "delivered" and columns.error[i] is None]
    if delivered and len(delivered) < len(columns):  # two statements take blocks: all first
        blocks = {(b, (s - 1) >> 10) for b, s in zip(columns.batch_id, columns.seq, strict=True)}
        await lifecycle.lock_blocks(conn, *map(list, zip(*blocks, strict=True)))
    touched: list[asyncpg.Record] = []
    if final := _as_statuses(columns, set(delivered)):
        touched = await lifecycle.record_final(conn, *_arrays(final))
    done: set[int] = set()
    if delivered:
        done = await _delivered(conn, columns, delivered)
        if len(done) < len(delivered):  # the event came first, or the row decides
            first = _as_statuses(columns.select([i for i in delivered if i not in done]))
            touched += await lifecycle.record_final(conn, *_arrays(first))
    await _after_send(conn, columns, [i for i in events if i not in done])
    return touched


async def _delivered(conn: asyncpg.Connection, columns: Columns, events: list[int]) -> set[int]:
    """``lifecycle.record_delivered`` of the delivered events at ``events``: those applied."""
    given = columns if len(events) == len(columns) else columns.select(events)
    not_sent = await lifecycle.record_delivered(conn, given.batch_id, given.seq)
    return set(events).difference(events[i] for i in not_sent)


def _as_statuses(columns: Columns, skip: set[int] | frozenset[int] = frozenset()) -> Columns:
    """The results that are statuses (but those at ``skip``), each provider event as the
    status it gives."""
    final = columns.select(
        [i for i, name in enumerate(columns.status) if name not in EVENT_ONLY and i not in skip]
    )
    final.status = [_STATUS_OF.get(name, name) for name in final.status]
    return final


async def _after_send(conn: asyncpg.Connection, columns: Columns, events: list[int]) -> None:
    """Apply the provider events at ``events`` through the recipients' rows: per recipient
    the highest-ranked status over whatever it has now, and the addresses they suppress
    onto their tenants' lists."""
    best: dict[tuple[str, int], int] = {}
    suppress: dict[tuple[str, int], int] = {}
    for i in events:
        key = (columns.batch_id[i], columns.seq[i])
        name = columns.status[i]
        status = _STATUS_OF.get(name)
        if status is not None:
            known = best.get(key)
            if known is None or RANK[status] > RANK[_STATUS_OF[columns.status[known]]]:
                best[key] = i
        if name in SUPPRESSING:
            suppress.setdefault(key, i)
    if best:
        moves = columns.select(list(best.values()))
        await lifecycle.record_after_send(
            conn,
            moves.batch_id,
            moves.seq,
            [_STATUS_OF[name] for name in moves.status],
            moves.provider_message_id,
            moves.error,
        )
    if suppress:
        addresses = columns.select(list(suppress.values()))
        await suppressions.suppress_results(
            conn, addresses.batch_id, addresses.seq, addresses.status
        )


# --- the results-pg consumer -------------------------------------------------------


async def apply_messages(services: Services, msgs: list[Msg], redelivery: Redelivery) -> None:
    """Apply a fetch of results messages in one transaction (``apply_flush``) and settle
    each: acknowledged; dead-lettered when it is no results message or PostgreSQL refuses
    its values (the others are applied); back to NATS (bounded) when it fails on its own
    otherwise."""
    parts: list[Columns] = []
    good: list[Msg] = []
    tenants: dict[str, str] = {}  # batch -> tenant, from the messages that name one (logs)
    for msg in msgs:
        try:
            message = decode(msg.data)
        except ValueError as exc:
            await _refuse(services, msg, str(exc))
            continue
        parts.append(message.columns)
        good.append(msg)
        if message.tenant_id and message.columns.batch_id:
            tenants[message.columns.batch_id[0]] = message.tenant_id
    flush = await apply_flush(services.pool, parts)
    metrics.STATUS_ROWS.inc(sum(len(p) for i, p in enumerate(parts) if i not in flush.failed))
    for batch_id, status in flush.touched:
        if status == "completed":
            tenant = tenants.get(batch_id) or await _tenant_of(services, batch_id)
            log.info("batch completed", extra={"batch_id": batch_id, "tenant_id": tenant})
    for index, msg in enumerate(good):
        error = flush.failed.get(index)
        if error is None:
            await msg.ack()
        elif isinstance(error, REFUSED):
            reason = f"PostgreSQL refused its values: {deadletters.reason_of(error)}"
            await _refuse(services, msg, reason)
        else:
            give_up = functools.partial(give_up_message, services)
            await deadletters.retry_or_give_up("results-pg", msg, error, give_up, redelivery)


async def _tenant_of(services: Services, batch_id: str) -> str | None:
    """A batch's tenant, for a log line about a batch completed by webhook results (they
    name no tenant). None when it cannot be read: a log line must not hold up the acks of
    results already applied."""
    try:
        return await services.pool.fetchval(
            "SELECT tenant_id FROM batches WHERE id = $1", uuid.UUID(batch_id)
        )
    except Exception:
        return None


async def give_up_message(services: Services, msg: Msg, reason: str) -> None:
    """Dead-letter a results message that kept failing (raises, keeping it, while
    PostgreSQL is down)."""
    await services.pool.fetchval("SELECT 1")
    await _refuse(services, msg, reason)


async def _refuse(services: Services, msg: Msg, reason: str) -> None:
    log.error("results-pg: dead-lettering a results message: %s", reason)
    await deadletters.results(services, "results-pg", msg.data, reason)
    await msg.term()
