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
from datetime import UTC, datetime
from typing import Any

from nats.aio.msg import Msg

from engine import metrics
from engine.clickhouse import ClickHouse
from engine.results import ResultMessage, decode
from engine.services import Services

log = logging.getLogger(__name__)
_TENANT_CACHE_SIZE = 10_000


class EventWriter:
    def __init__(self, services: Services):
        self.services = services
        self.settings = services.settings
        self._clickhouse: ClickHouse | None = None
        self._rows: list[list[Any]] = []
        self._messages: list[Msg] = []
        self._oldest = 0.0
        self._tenants: OrderedDict[str, str] = OrderedDict()
        self.failures = 0

    def _client(self) -> ClickHouse:
        if self._clickhouse is None:
            self._clickhouse = ClickHouse(self.settings)
        return self._clickhouse

    @property
    def full(self) -> bool:
        return len(self._rows) >= self.settings.clickhouse_flush_rows

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
            r.batch_id
            for _, m in decoded
            if m.tenant_id is None
            for r in m.rows
            if r.batch_id not in self._tenants
        }
        if unknown:
            await self._load_tenants(unknown)
        if not self._messages:
            self._oldest = time.monotonic()
        for msg, result in decoded:
            when = datetime.fromtimestamp(int(result.ts), UTC)
            for r in result.rows:
                tenant = result.tenant_id or self._tenants.get(r.batch_id, "")
                self._rows.append([
                    when, tenant, r.batch_id, r.seq, r.status, result.provider, r.domain,
                    r.latency_ms, min(r.attempts, 255), r.error or "", r.provider_message_id or "",
                ])  # fmt: skip
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
        rows, msgs = self._rows, self._messages
        self._rows, self._messages = [], []
        started = time.perf_counter()
        try:
            await asyncio.to_thread(self._insert, rows)
        except Exception as exc:
            self.failures += 1
            metrics.CLICKHOUSE_FAILURES.inc()
            delay = min(60.0, 2.0 ** min(self.failures, 6))
            log.warning(
                "clickhouse insert of %d rows failed (%r); retry in %.0fs", len(rows), exc, delay
            )
            self._clickhouse = None
            for msg in msgs:
                await msg.nak(delay=delay)
            return False
        self.failures = 0
        metrics.CLICKHOUSE_INSERT_SECONDS.observe(time.perf_counter() - started)
        metrics.CLICKHOUSE_ROWS.inc(len(rows))
        for msg in msgs:
            await msg.ack()
        return True

    def _insert(self, rows: list[list[Any]]) -> None:
        try:
            self._client().insert_events(rows)
        except Exception:
            client, self._clickhouse = self._clickhouse, None
            if client is not None:
                client.close()
            raise

    def close(self) -> None:
        if self._clickhouse is not None:
            self._clickhouse.close()
