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
from clickhouse_connect.driver import httputil
from clickhouse_connect.driver import options as _options

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

# We insert plain Python columns. Without this, the first insert imports pandas, numpy and
# pyarrow when they happen to be installed (~100 MB and a second of CPU per process).
for _name in ("pd", "pd_time_test", "np", "arrow", "pl"):
    setattr(_options, _name, None)
_EVENT_TYPES = [get_from_name(kind) for _, kind in EVENT_COLUMNS]


class ClickHouse:
    """A synchronous client; callers on an event loop run it in a thread."""

    def __init__(self, settings: Settings, *, timeout: float = 30.0):
        url = urlsplit(settings.clickhouse_url)
        self.database = settings.clickhouse_database
        # A connection pool of its own: the library's shared default pool would carry open
        # sockets from the supervisor (which migrates) into every forked worker, where two
        # processes then read each other's answers.
        self._pool = httputil.get_pool_manager(maxsize=2, num_pools=1)
        self._client = clickhouse_connect.get_client(
            pool_mgr=self._pool,
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

    def insert_events(self, columns: Sequence[Sequence[Any]]) -> None:
        """Insert event rows given column by column, in ``EVENT_COLUMNS`` order."""
        self._client.insert(
            f"{self.database}.events",
            columns,
            column_names=_EVENT_NAMES,
            column_types=_EVENT_TYPES,
            column_oriented=True,
        )

    def ping(self) -> bool:
        return bool(self._client.ping())

    def close(self) -> None:
        self._client.close()
        self._pool.clear()
