"""ClickHouse access through clickhouse-connect, in a form that also works on 18.16.

Old servers need: no compression, and inserts with explicit column types (the client
cannot describe the table through ``system.settings`` features they lack).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import clickhouse_connect
from clickhouse_connect.datatypes.registry import get_from_name

from engine.config import Settings

EVENT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("ts", "DateTime"),
    ("tenant_id", "String"),
    ("batch_id", "String"),
    ("seq", "UInt32"),
    ("event", "String"),
    ("provider", "String"),
    ("email_domain", "String"),
    ("latency_ms", "UInt32"),
    ("attempts", "UInt8"),
    ("error", "String"),
    ("provider_message_id", "String"),
)
_EVENT_NAMES = [name for name, _ in EVENT_COLUMNS]
_EVENT_TYPES = [get_from_name(kind) for _, kind in EVENT_COLUMNS]


class ClickHouse:
    """A synchronous client; callers on an event loop run it in a thread."""

    def __init__(self, settings: Settings, *, timeout: float = 30.0):
        url = urlsplit(settings.clickhouse_url)
        self.database = settings.clickhouse_database
        self._client = clickhouse_connect.get_client(
            host=url.hostname,
            port=url.port or 8123,
            username=url.username or "default",
            password=url.password or "",
            secure=url.scheme == "https",
            compress=False,
            connect_timeout=min(timeout, 10),
            send_receive_timeout=timeout,
        )

    def command(self, sql: str) -> Any:
        return self._client.command(sql)

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple]:
        return self._client.query(sql, parameters=parameters).result_rows

    def insert_events(self, rows: Sequence[Sequence[Any]]) -> None:
        self._client.insert(
            f"{self.database}.events",
            rows,
            column_names=_EVENT_NAMES,
            column_types=_EVENT_TYPES,
        )

    def ping(self) -> bool:
        return bool(self._client.ping())

    def close(self) -> None:
        self._client.close()
