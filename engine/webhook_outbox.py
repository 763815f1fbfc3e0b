"""What is to be posted to customers' webhook endpoints: results become deliveries.

The ``results-hooks`` consumer reads the RESULTS stream (its own durable consumer: it never
slows ``results-pg``, ``results-ch`` or sending). Each results message is mapped to its
tenant (provider events carry none: their batch's tenant is looked up, and kept in an
in-process cache, a batch never changes tenant), its rows to the tenant's endpoints that
take their status, and the events are buffered. A flush writes them in one transaction as
``webhook_deliveries`` rows of at most ``Batching.max_events`` events per endpoint (the
body of one POST), then acknowledges the messages: once written, a delivery is posted by
``engine.webhook_deliveries`` apart from this loop, however slow the endpoint. Messages
that concern no endpoint are acknowledged at once.

Exactly once into the outbox: the flush records each results message it turns into
deliveries (``webhook_results_seen``: its stream sequence and publish time) in the same
transaction, so a message redelivered after the flush committed (a crash before the acks)
adds nothing again. A flush that fails is not acknowledged: its messages come back
(``engine.topology.Redelivery``) and nothing of it was written.

``batch.completed`` comes from a sweep (``sweep_completions``, about every second in
every worker process): batches ``completed`` within the last minutes (since a process
started: the last day) for endpoints that take it, not yet recorded in
``webhook_batch_completions``. The record and the delivery are written in one transaction
and the record's key is (endpoint, batch), so concurrent sweeps in several processes
write one event per endpoint and batch. Completion is observed wherever it happens (the
last result, a batch of only suppressed recipients, a resume), at the cost of one indexed
query per sweep; the status writer's transaction is left as it is.

Event format (one POST): ``{"type": "batch.events", "timestamp": ..., "data": [event,
...]}``; a recipient event is ``{type, batch_id, recipient (seq), email, provider,
provider_message_id, timestamp, error?}``, ``batch.completed`` is ``{type, batch_id,
name, status, total_recipients, counts, timestamp}``. Events of one endpoint are not
ordered across deliveries: each carries its time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
from nats.aio.msg import Msg

from engine import metrics
from engine.deadletters import retry_or_give_up
from engine.results import ResultMessage, decode, tenant_of
from engine.services import Services
from engine.topology import REDELIVERY, Redelivery
from engine.webhook_endpoints import BATCH_COMPLETED

log = logging.getLogger(__name__)

CONSUMER = "results-hooks"
BODY_TYPE = "batch.events"
_TENANT_CACHE_SIZE = 10_000
_INT4 = range(-(2**31), 2**31)
# The sweep looks back this far before its last run: a batch's completed_at is the start
# of the transaction that completed it, which commits a moment later.
_LOOKBACK = timedelta(minutes=5)
_FIRST_LOOKBACK = timedelta(days=1)  # a process's first sweep (completions while none ran)

Fetch = Callable[[int, float], Awaitable[list[Msg]]]


@dataclass(frozen=True, slots=True)
class Batching:
    """A delivery carries up to ``max_events`` events; events wait at most about
    ``max_seconds`` for others to join them (and for their acknowledgement)."""

    max_events: int = 200
    max_seconds: float = 1.0
    max_messages: int = 5_000  # results messages buffered at most (memory)
    fetch: int = 500  # results messages per fetch
    sweep_seconds: float = 1.0  # batch.completed


BATCHING = Batching()


@dataclass(slots=True)
class _Buffered:
    msg: Msg
    key: tuple[int, float]  # (stream sequence, publish time): webhook_results_seen
    message: ResultMessage
    picks: dict[uuid.UUID, list[int]]  # endpoint -> the message's rows it takes


@dataclass(slots=True)
class _Endpoint:
    id: uuid.UUID
    types: frozenset[str]


@dataclass(slots=True)
class Outbox:
    services: Services
    batching: Batching = BATCHING
    redelivery: Redelivery = REDELIVERY
    wake: Callable[[], None] = lambda: None  # a delivery was written
    failures: int = 0
    _buffer: list[_Buffered] = field(default_factory=list)
    _counts: dict[uuid.UUID, int] = field(default_factory=dict)  # events buffered per endpoint
    _oldest: float = 0.0
    _tenants: OrderedDict[str, str] = field(default_factory=OrderedDict)
    _since: datetime | None = None  # the last sweep's database time

    # --- the results-hooks consumer ------------------------------------------------------

    @property
    def due(self) -> bool:
        if not self._buffer:
            return False
        return (
            len(self._buffer) >= self.batching.max_messages
            or max(self._counts.values()) >= self.batching.max_events
            or time.monotonic() - self._oldest >= self.batching.max_seconds
        )

    def _wait(self) -> float:
        """How long a fetch may wait: until the buffer is due."""
        if not self._buffer:
            return self.batching.max_seconds
        left = self.batching.max_seconds - (time.monotonic() - self._oldest)
        return min(self.batching.max_seconds, max(0.05, left))

    async def run(self, fetch: Fetch, stopping: asyncio.Event) -> None:
        """Consume until ``stopping`` is set, then flush what is buffered."""
        while not stopping.is_set():
            if not self.due:
                if msgs := await fetch(self.batching.fetch, self._wait()):
                    await self.add_or_retry(msgs)
            if self.due:
                await self.flush()
        await self.flush()

    async def add_or_retry(self, msgs: list[Msg]) -> None:
        """``add``; when that fails (PostgreSQL down: nothing was buffered), each message
        comes back later."""
        try:
            await self.add(msgs)
        except Exception as exc:
            for msg in msgs:
                await retry_or_give_up(CONSUMER, msg, exc, self.give_up, self.redelivery)

    async def add(self, msgs: list[Msg]) -> None:
        """Buffer the events of these results messages for the endpoints that take them;
        acknowledge the messages that concern none."""
        named = [tenant_of(msg.data) for msg in msgs]
        asked = {tenant for tenant in named if tenant is not None}
        endpoints = await self._endpoints(asked) if asked else {}
        decoded: list[tuple[Msg, ResultMessage]] = []
        for msg, tenant in zip(msgs, named, strict=True):
            if tenant is not None and tenant not in endpoints:
                await msg.ack()  # a tenant without endpoints: not even decoded
                continue
            try:
                decoded.append((msg, decode(msg.data)))
            except ValueError as exc:
                log.error(
                    "%s: malformed results message (results-pg dead-letters it): %r", CONSUMER, exc
                )
                await msg.term()
        # Provider events name no tenant: their batches' tenants are looked up.
        untold = {b for _, m in decoded if m.tenant_id is None for b in _texts(m.columns.batch_id)}
        await self._load_tenants(untold)
        tenants = {m.tenant_id for _, m in decoded if isinstance(m.tenant_id, str)}
        tenants.update(self._tenants[b] for b in untold if b in self._tenants)
        if tenants - asked:
            endpoints.update(await self._endpoints(tenants - asked))
        for msg, message in decoded:
            picks = self._pick(message, endpoints)
            if not picks:
                await msg.ack()
                continue
            if not self._buffer:
                self._oldest = time.monotonic()
            key = (msg.metadata.sequence.stream, message.ts)
            self._buffer.append(_Buffered(msg, key, message, picks))
            for endpoint_id, rows in picks.items():
                self._counts[endpoint_id] = self._counts.get(endpoint_id, 0) + len(rows)

    def _pick(
        self, message: ResultMessage, endpoints: dict[str, list[_Endpoint]]
    ) -> dict[uuid.UUID, list[int]]:
        """The rows of a message each endpoint takes (rows whose values are not those of a
        result are left out: ``results-pg`` dead-letters their message)."""
        c = message.columns
        if message.tenant_id is not None and message.tenant_id not in endpoints:
            return {}
        if message.tenant_id is None and not any(  # provider events: their batches' tenants
            self._tenants.get(b) in endpoints for b in _texts(c.batch_id)
        ):
            return {}
        picks: dict[uuid.UUID, list[int]] = {}
        checked: dict[Any, bool] = {}
        for i, status in enumerate(c.status):
            batch_id = c.batch_id[i]
            tenant = message.tenant_id
            if tenant is None:
                tenant = self._tenants.get(batch_id) if isinstance(batch_id, str) else None
            subscribed = [e for e in endpoints.get(tenant or "", ()) if status in e.types]
            if not subscribed:
                continue
            if not _valid_row(message, i, checked):
                continue
            for endpoint in subscribed:
                picks.setdefault(endpoint.id, []).append(i)
        return picks

    async def _load_tenants(self, batch_ids: Iterable[str]) -> None:
        ids = set()
        for batch_id in batch_ids:
            if batch_id not in self._tenants:
                with contextlib.suppress(ValueError, TypeError, AttributeError):
                    ids.add(uuid.UUID(batch_id))
        if not ids:
            return
        rows = await self.services.pool.fetch(
            "SELECT id, tenant_id FROM batches WHERE id = ANY($1::uuid[])", list(ids)
        )
        for row in rows:
            self._tenants[str(row["id"])] = row["tenant_id"]
        while len(self._tenants) > _TENANT_CACHE_SIZE:
            self._tenants.popitem(last=False)

    async def _endpoints(self, tenants: set[str]) -> dict[str, list[_Endpoint]]:
        """The enabled endpoints of these tenants, read afresh for every fetch (one indexed
        query): an endpoint takes events from the moment it is created."""
        rows = await self.services.pool.fetch(
            """SELECT id, tenant_id, event_types FROM webhook_endpoints
                WHERE tenant_id = ANY($1::text[]) AND disabled_at IS NULL""",
            list(tenants),
        )
        found: dict[str, list[_Endpoint]] = {}
        for row in rows:
            endpoint = _Endpoint(row["id"], frozenset(row["event_types"]))
            found.setdefault(row["tenant_id"], []).append(endpoint)
        return found

    async def flush(self) -> bool:
        """Write what is buffered as deliveries and acknowledge it; False when that failed
        (the messages come back later)."""
        if not self._buffer:
            return True
        buffered, self._buffer, self._counts = self._buffer, [], {}
        try:
            written = await self._write(buffered)
        except Exception as exc:
            self.failures += 1
            log.warning(
                "%s: writing %d messages' deliveries failed: %r", CONSUMER, len(buffered), exc
            )
            for item in buffered:
                await retry_or_give_up(CONSUMER, item.msg, exc, self.give_up, self.redelivery)
            return False
        self.failures = 0
        for item in buffered:
            with contextlib.suppress(Exception):  # NATS down: it comes back, seen already
                await item.msg.ack()
        if written:
            self.wake()
        return True

    async def _write(self, buffered: list[_Buffered]) -> int:
        """One transaction: the messages recorded as seen, their events (with the
        recipients' addresses) written as deliveries. Returns the deliveries written."""
        async with self.services.pool.acquire() as conn, conn.transaction():
            # Lookups by given keys: one primary-key probe each (see engine.results).
            await conn.execute("SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off")
            fresh = await conn.fetch(
                """INSERT INTO webhook_results_seen (stream_seq, published)
                   SELECT * FROM unnest($1::bigint[], $2::float8[])
                   ON CONFLICT DO NOTHING RETURNING stream_seq, published""",
                [item.key[0] for item in buffered],
                [item.key[1] for item in buffered],
            )
            new = {(row["stream_seq"], row["published"]) for row in fresh}
            buffered = [item for item in buffered if item.key in new]
            pairs = dict.fromkeys(
                (item.message.columns.batch_id[i], item.message.columns.seq[i])
                for item in buffered
                for rows in item.picks.values()
                for i in rows
            )
            emails = await _emails(conn, list(pairs))
            events: dict[uuid.UUID, list[dict[str, Any]]] = {}
            for item in buffered:
                timestamp = _iso(item.message.ts)
                for endpoint_id, rows in item.picks.items():
                    out = events.setdefault(endpoint_id, [])
                    out.extend(_event(item.message, i, emails, timestamp) for i in rows)
            return await write_deliveries(conn, events, self.batching.max_events)

    async def give_up(self, msg: Msg, reason: str) -> None:
        """A message that kept failing while PostgreSQL answers is dropped here (logged):
        ``results-pg`` has applied it, and a dead letter of it, replayed, would apply it
        again for every consumer. Raises while PostgreSQL is down: it stays in NATS."""
        await self.services.pool.fetchval("SELECT 1")
        log.error("%s: dropping a results message's webhook events: %s", CONSUMER, reason)
        await msg.term()

    # --- batch.completed -----------------------------------------------------------------

    async def sweep_completions(self) -> int:
        """Write a ``batch.completed`` event for each batch completed lately, once per
        endpoint that takes it; returns the deliveries written."""
        async with self.services.pool.acquire() as conn, conn.transaction():
            now = await conn.fetchval("SELECT now()")
            since = (self._since - _LOOKBACK) if self._since else now - _FIRST_LOOKBACK
            found = await conn.fetch(_COMPLETED, since, BATCH_COMPLETED)
            won = await conn.fetch(
                """INSERT INTO webhook_batch_completions (endpoint_id, batch_id)
                   SELECT * FROM unnest($1::uuid[], $2::uuid[])
                   ON CONFLICT DO NOTHING RETURNING endpoint_id, batch_id""",
                [row["endpoint_id"] for row in found],
                [row["batch_id"] for row in found],
            )
            written = 0
            if won:
                winners = {(row["endpoint_id"], row["batch_id"]) for row in won}
                batches = {r["batch_id"]: r for r in found}
                counts = await _counts(conn, list({b for _, b in winners}))
                events: dict[uuid.UUID, list[dict[str, Any]]] = {}
                for row in found:
                    if (row["endpoint_id"], row["batch_id"]) in winners:
                        batch = batches[row["batch_id"]]
                        event = _completed(batch, counts.get(batch["batch_id"], {}))
                        events.setdefault(row["endpoint_id"], []).append(event)
                written = await write_deliveries(conn, events, self.batching.max_events)
        self._since = now if len(found) < _COMPLETED_LIMIT else since + _LOOKBACK
        if written:
            self.wake()
        return written


_COMPLETED_LIMIT = 1000
_COMPLETED = f"""
SELECT e.id AS endpoint_id, b.id AS batch_id, b.name, b.status, b.total_recipients,
       b.completed_at
  FROM webhook_endpoints e
  JOIN batches b ON b.tenant_id = e.tenant_id AND b.completed_at >= greatest(e.created_at, $1)
 WHERE e.disabled_at IS NULL AND $2 = ANY(e.event_types) AND b.status = 'completed'
   AND NOT EXISTS (SELECT 1 FROM webhook_batch_completions c
                    WHERE c.endpoint_id = e.id AND c.batch_id = b.id)
 ORDER BY b.completed_at
 LIMIT {_COMPLETED_LIMIT}
"""


async def write_deliveries(
    conn: asyncpg.Connection, events: dict[uuid.UUID, list[dict[str, Any]]], max_events: int
) -> int:
    """Each endpoint's events as deliveries of at most ``max_events`` (one statement);
    an endpoint deleted or disabled meanwhile gets none. Returns how many were written."""
    ids, endpoints, bodies, sizes = [], [], [], []
    now = datetime.now(UTC).isoformat()
    for endpoint_id, found in events.items():
        for first in range(0, len(found), max_events):
            part = found[first : first + max_events]
            ids.append(uuid.uuid4())
            endpoints.append(endpoint_id)
            bodies.append(orjson.dumps({"type": BODY_TYPE, "timestamp": now, "data": part}))
            sizes.append(len(part))
    if not ids:
        return 0
    rows = await conn.fetch(
        """INSERT INTO webhook_deliveries (id, endpoint_id, status, body, event_count)
           SELECT v.id, v.endpoint_id, 'pending', v.body, v.n
             FROM unnest($1::uuid[], $2::uuid[], $3::bytea[], $4::int[])
                  AS v(id, endpoint_id, body, n)
             JOIN webhook_endpoints e ON e.id = v.endpoint_id AND e.disabled_at IS NULL
        RETURNING event_count""",
        ids,
        endpoints,
        bodies,
        sizes,
    )
    for row in rows:
        metrics.CUSTOMER_WEBHOOK_EVENTS.inc(row["event_count"])
    return len(rows)


async def _emails(conn: asyncpg.Connection, pairs: list[tuple[str, int]]) -> dict[Any, str]:
    if not pairs:
        return {}
    rows = await conn.fetch(
        """SELECT v.batch_id, v.seq, r.email
             FROM unnest($1::uuid[], $2::int[]) AS v(batch_id, seq)
             JOIN recipients r ON r.batch_id = v.batch_id AND r.seq = v.seq""",
        [uuid.UUID(b) for b, _ in pairs],
        [s for _, s in pairs],
    )
    return {(str(row["batch_id"]), row["seq"]): row["email"] for row in rows}


async def _counts(conn: asyncpg.Connection, batch_ids: list[uuid.UUID]) -> dict[Any, dict]:
    rows = await conn.fetch(
        "SELECT batch_id, status, n FROM batch_counts WHERE batch_id = ANY($1::uuid[]) AND n > 0",
        batch_ids,
    )
    counts: dict[Any, dict[str, int]] = {}
    for row in rows:
        counts.setdefault(row["batch_id"], {})[row["status"]] = row["n"]
    return counts


def _event(
    message: ResultMessage, i: int, emails: dict[Any, str], timestamp: str
) -> dict[str, Any]:
    c = message.columns
    event = {
        "type": c.status[i],
        "batch_id": c.batch_id[i],
        "recipient": c.seq[i],
        "email": emails.get((c.batch_id[i], c.seq[i])),
        "provider": message.provider,
        "provider_message_id": c.provider_message_id[i],
        "timestamp": timestamp,
    }
    if c.error[i]:
        event["error"] = c.error[i]
    return event


def _completed(batch: asyncpg.Record, counts: dict[str, int]) -> dict[str, Any]:
    return {
        "type": BATCH_COMPLETED,
        "batch_id": str(batch["batch_id"]),
        "name": batch["name"],
        "status": batch["status"],
        "total_recipients": batch["total_recipients"],
        "counts": counts,
        "timestamp": batch["completed_at"].isoformat(),
    }


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def _texts(values: list[Any]) -> set[str]:
    """The distinct texts among ``values`` (a malformed message may hold anything there)."""
    try:
        distinct = set(values)  # at C speed: a message's rows name a batch or a few
    except TypeError:  # an unhashable value
        return {v for v in values if isinstance(v, str)}
    return {v for v in distinct if isinstance(v, str)}


def _valid_row(message: ResultMessage, i: int, checked: dict[Any, bool]) -> bool:
    """Whether row ``i`` holds values a result can have (a uuid batch id, an int4 seq, text
    where text goes): only such rows become events."""
    c = message.columns
    batch_id, seq = c.batch_id[i], c.seq[i]
    if not isinstance(batch_id, str):
        return False
    if batch_id not in checked:
        try:
            checked[batch_id] = str(uuid.UUID(batch_id)) == batch_id
        except ValueError:
            checked[batch_id] = False
    return (
        checked[batch_id]
        and isinstance(seq, int)
        and not isinstance(seq, bool)
        and seq in _INT4
        and isinstance(c.status[i], str)
        and isinstance(c.provider_message_id[i], str | None)
        and isinstance(c.error[i], str | None)
    )
