"""The ClickHouse event writer: results messages become event rows, many per insert.

Rows are buffered and inserted when ``CLICKHOUSE_FLUSH_ROWS`` rows are waiting or
``CLICKHOUSE_FLUSH_SECONDS`` have passed. The NATS messages behind a buffer are
acknowledged only after their insert succeeded; when ClickHouse is slow or down they are
handed back to NATS (nak with a delay) and written later, and sending never waits for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from nats.aio.msg import Msg

from engine import metrics
from engine.clickhouse import EVENT_COLUMNS, ClickHouse
from engine.results import ResultMessage, decode
from engine.services import Services

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
    ts.extend([datetime.fromtimestamp(int(result.ts), UTC)] * n)
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


class EventWriter:
    def __init__(self, services: Services):
        self.services = services
        self.settings = services.settings
        self._clickhouse: ClickHouse | None = None
        self._columns: list[list[Any]] = [[] for _ in EVENT_COLUMNS]
        self._messages: list[Msg] = []
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
                log.error("dropping malformed results message: %s", exc)
                await msg.term()
        unknown = {
            b for _, m in decoded if m.tenant_id is None for b in set(m.columns.batch_id)
            if b not in self._tenants
        }  # fmt: skip
        if unknown:
            await self._load_tenants(unknown)
        if not self._messages:
            self._oldest = time.monotonic()
        for msg, result in decoded:
            append_event_rows(self._columns, result, self._tenants)
            self._messages.append(msg)

    async def _load_tenants(self, batch_ids: set[str]) -> None:
        rows = await self.services.pool.fetch(
            "SELECT id, tenant_id FROM batches WHERE id = ANY($1::uuid[])",
            [uuid.UUID(b) for b in batch_ids],
        )
        for row in rows:
            self._tenants[str(row["id"])] = row["tenant_id"]
        while len(self._tenants) > _TENANT_CACHE_SIZE:
            self._tenants.popitem(last=False)

    async def flush(self) -> bool:
        """Insert what is buffered; True when it was written (or there was nothing)."""
        if not self._messages:
            return True
        columns, msgs = self._columns, self._messages
        self._columns, self._messages = [[] for _ in EVENT_COLUMNS], []
        rows = len(columns[0])
        started = time.perf_counter()
        try:
            await asyncio.to_thread(self._insert, columns)
        except Exception as exc:
            self.failures += 1
            metrics.CLICKHOUSE_FAILURES.inc()
            delay = min(60.0, 2.0 ** min(self.failures, 6))
            log.warning(
                "clickhouse insert of %d rows failed (%r); retry in %.0fs", rows, exc, delay
            )
            self._clickhouse = None
            for msg in msgs:
                await msg.nak(delay=delay)
            return False
        self.failures = 0
        metrics.CLICKHOUSE_INSERT_SECONDS.observe(time.perf_counter() - started)
        metrics.CLICKHOUSE_ROWS.inc(rows)
        for msg in msgs:
            await msg.ack()
        return True

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
