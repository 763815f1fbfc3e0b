"""The ClickHouse event writer: results messages become event rows, many per insert.

Rows are buffered and inserted when ``CLICKHOUSE_FLUSH_ROWS`` rows are waiting or
``CLICKHOUSE_FLUSH_SECONDS`` have passed. The NATS messages behind a buffer are
acknowledged only after their insert succeeded; when ClickHouse is slow or down they are
handed back to NATS (nak with a delay) and written later, and sending never waits for it.

One bad message never holds the others back: a message whose values cannot become rows is
dead-lettered when it is added, and when the client refuses the rows of an insert (a value
of the wrong type or out of its column's range), the buffer is inserted by halves to find
the messages at fault; the others are written. Any other failure is ClickHouse's, and
everything waits for it. A malformed message is only terminated here: ``results-pg``
dead-letters it (one dead letter per message, not one per consumer).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from clickhouse_connect.driver.exceptions import ClickHouseError
from clickhouse_connect.driver.exceptions import DataError as ClickHouseDataError
from nats.aio.msg import Msg

from engine import deadletters, metrics
from engine.clickhouse import EVENT_COLUMNS, ClickHouse
from engine.deadletters import reason_of, retry_or_give_up
from engine.results import ResultMessage, decode
from engine.services import Services
from engine.topology import REDELIVERY, Redelivery

log = logging.getLogger(__name__)
_TENANT_CACHE_SIZE = 10_000


def append_event_rows(
    columns: list[list[Any]], result: ResultMessage, tenants: Mapping[str, str]
) -> None:
    """Add a results message's rows to ClickHouse columns (``EVENT_COLUMNS`` order).

    Webhook results carry no tenant: it is looked up by batch id in ``tenants``.
    """
    ts, tenant, batch, seq, event, provider, domain, latency, attempts, error, pmid = columns
    c, n = result.columns, len(result.columns)
    ts.extend([int(result.ts)] * n)  # epoch seconds: written as they are, no per-row conversion
    if result.tenant_id is not None:
        tenant.extend([result.tenant_id] * n)
    else:
        tenant.extend([tenants.get(b, "") for b in c.batch_id])
    batch.extend(c.batch_id)
    seq.extend(c.seq)
    event.extend(c.status)
    provider.extend([result.provider] * n)
    domain.extend(c.domain)
    latency.extend(c.latency_ms)
    attempts.extend([min(a, 255) for a in c.attempts])
    error.extend([e or "" for e in c.error])
    pmid.extend([p or "" for p in c.provider_message_id])


def refused(exc: BaseException) -> bool:
    """Whether the client refused the rows themselves while encoding them (a value of the
    wrong type, or outside its column's range): nothing was sent, and sending the same
    rows again fails the same way. Server and connection errors are ClickHouse's."""
    return isinstance(exc, ClickHouseDataError) or not isinstance(
        exc, ClickHouseError | OSError | TimeoutError
    )


class EventWriter:
    def __init__(self, services: Services, redelivery: Redelivery = REDELIVERY):
        self.services = services
        self.settings = services.settings
        self.redelivery = redelivery
        self._clickhouse: ClickHouse | None = None
        self._columns: list[list[Any]] = [[] for _ in EVENT_COLUMNS]
        self._messages: list[Msg] = []
        self._sizes: list[int] = []  # rows per buffered message
        self._oldest = 0.0
        self._tenants: OrderedDict[str, str] = OrderedDict()
        self.failures = 0

    def _client(self) -> ClickHouse:
        if self._clickhouse is None:
            self._clickhouse = ClickHouse(self.settings)
        return self._clickhouse

    @property
    def buffered(self) -> int:
        return len(self._columns[0])

    @property
    def full(self) -> bool:
        return self.buffered >= self.settings.clickhouse_flush_rows

    @property
    def due(self) -> bool:
        return bool(self._messages) and (
            self.full or time.monotonic() - self._oldest >= self.settings.clickhouse_flush_seconds
        )

    async def add(self, msgs: list[Msg]) -> None:
        """Turn messages into rows (tenant ids resolved for webhook results) and buffer them."""
        decoded: list[tuple[Msg, ResultMessage]] = []
        for msg in msgs:
            try:
                decoded.append((msg, decode(msg.data)))
            except ValueError as exc:
                log.error("malformed results message (results-pg dead-letters it): %s", exc)
                await msg.term()
        unknown: set[str] = set()
        for _, m in decoded:
            if m.tenant_id is None:
                with contextlib.suppress(TypeError):  # unhashable ids: refused below
                    unknown.update(b for b in m.columns.batch_id if b not in self._tenants)
        if unknown:
            await self._load_tenants(unknown)
        if not self._messages:
            self._oldest = time.monotonic()
        columns = self._columns
        for msg, result in decoded:
            size = len(columns[0])
            try:
                append_event_rows(columns, result, self._tenants)
            except Exception as exc:  # its values cannot become rows
                for column in columns:
                    del column[size:]
                await self._give_up_refused(msg, exc)
                continue
            self._messages.append(msg)
            self._sizes.append(len(columns[0]) - size)
        metrics.CLICKHOUSE_BUFFER.set(len(columns[0]))

    async def add_or_retry(self, msgs: list[Msg]) -> None:
        """``add``; when that fails (PostgreSQL down: nothing was added), each message is
        retried or given up."""
        try:
            await self.add(msgs)
        except Exception as exc:
            for msg in msgs:
                await retry_or_give_up("results-ch", msg, exc, self.give_up, self.redelivery)

    async def _load_tenants(self, batch_ids: set[str]) -> None:
        ids = []
        for batch_id in batch_ids:
            with contextlib.suppress(ValueError, TypeError, AttributeError):  # not a uuid
                ids.append(uuid.UUID(batch_id))
        rows = await self.services.pool.fetch(
            "SELECT id, tenant_id FROM batches WHERE id = ANY($1::uuid[])", ids
        )
        for row in rows:
            self._tenants[str(row["id"])] = row["tenant_id"]
        while len(self._tenants) > _TENANT_CACHE_SIZE:
            self._tenants.popitem(last=False)

    async def flush(self) -> bool:
        """Insert what is buffered; True when it was written (or there was nothing, or
        the messages at fault were found and the others written)."""
        if not self._messages:
            return True
        columns, msgs, sizes = self._columns, self._messages, self._sizes
        self._columns, self._messages, self._sizes = [[] for _ in EVENT_COLUMNS], [], []
        metrics.CLICKHOUSE_BUFFER.set(0)
        rows = len(columns[0])
        started = time.perf_counter()
        try:
            await asyncio.to_thread(self._insert, columns)
        except Exception as exc:
            self.failures += 1
            metrics.CLICKHOUSE_FAILURES.inc()
            if refused(exc):
                log.warning(
                    "clickhouse client refused an insert of %d rows (%r); inserting it by halves",
                    rows,
                    exc,
                )
                try:
                    await self._isolate(columns, msgs, sizes)
                except Exception as outage:  # ClickHouse went away meanwhile
                    exc = outage
                else:
                    self.failures = 0
                    return True
            delay = min(60.0, 2.0 ** min(self.failures, 6))
            log.warning(
                "clickhouse insert of %d rows failed (%r); retry in %.0fs", rows, exc, delay
            )
            for msg in msgs:  # (the ones already acknowledged ignore it)
                await msg.nak(delay=delay)
            return False
        self.failures = 0
        metrics.CLICKHOUSE_INSERT_SECONDS.observe(time.perf_counter() - started)
        metrics.CLICKHOUSE_ROWS.inc(rows)
        for msg in msgs:
            await msg.ack()
        return True

    async def _isolate(self, columns: list[list[Any]], msgs: list[Msg], sizes: list[int]) -> None:
        """Insert the buffer by halves: what can be written is (and acknowledged), each
        message whose rows are refused on their own is dead-lettered. Raises on any other
        failure (ClickHouse's own): the caller hands the rest back to NATS."""
        offsets = list(itertools.accumulate(sizes, initial=0))

        async def attempt(first: int, end: int) -> None:
            part = [column[offsets[first] : offsets[end]] for column in columns]
            try:
                await asyncio.to_thread(self._insert, part)
            except Exception as exc:
                if not refused(exc):
                    raise
                if end - first == 1:
                    await self._give_up_refused(msgs[first], exc)
                    return
                middle = (first + end) // 2
                await attempt(first, middle)
                await attempt(middle, end)
                return
            metrics.CLICKHOUSE_ROWS.inc(offsets[end] - offsets[first])
            for msg in msgs[first:end]:
                await msg.ack()

        await attempt(0, len(msgs))

    async def _answers(self) -> bool:
        """Whether ClickHouse answers a ping."""
        try:
            return bool(await asyncio.to_thread(self._client().ping))
        except Exception:
            self._clickhouse = None
            return False

    async def give_up(self, msg: Msg, reason: str) -> None:
        """Dead-letter a message that kept failing; raises while PostgreSQL (the tenant
        lookup) or ClickHouse is down, so an outage never sends events to the DLQ."""
        await self.services.pool.fetchval("SELECT 1")
        if not await self._answers():
            raise ConnectionError("clickhouse does not answer")
        await deadletters.results(self.services, "results-ch", msg.data, reason)
        await msg.term()

    async def _give_up_refused(self, msg: Msg, exc: Exception) -> None:
        """Dead-letter a message whose values cannot be written; when that fails (NATS),
        it comes back later."""
        reason = f"its rows cannot be written to ClickHouse: {reason_of(exc)}"
        log.error("results-ch: dead-lettering a results message: %s", reason)
        try:
            await deadletters.results(self.services, "results-ch", msg.data, reason)
            await msg.term()
        except Exception:
            log.exception("results-ch: dead-lettering failed; the message comes back")
            with contextlib.suppress(Exception):
                await msg.nak(delay=self.redelivery.delay(1))

    def _insert(self, columns: list[list[Any]]) -> None:
        try:
            self._client().insert_events(columns)
        except Exception:
            client, self._clickhouse = self._clickhouse, None
            if client is not None:
                client.close()
            raise

    def close(self) -> None:
        if self._clickhouse is not None:
            self._clickhouse.close()
