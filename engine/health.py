"""Dependency checks for ``/health``: each one answers "ok" or what went wrong."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from engine.clickhouse import ClickHouse
from engine.services import Services

_TIMEOUT = 3.0


class HealthChecker:
    def __init__(self, services: Services):
        self.services = services
        self._clickhouse: ClickHouse | None = None

    def _clickhouse_ping(self) -> None:
        if self._clickhouse is None:
            self._clickhouse = ClickHouse(self.services.settings, timeout=_TIMEOUT)
        try:
            self._clickhouse.ping() or _raise("ping failed")
        except Exception:
            self._clickhouse = None
            raise

    async def _postgres(self) -> None:
        await self.services.pool.fetchval("SELECT 1")

    async def _nats(self) -> None:
        if not self.services.nc.is_connected:
            raise ConnectionError("not connected")
        await self.services.js.account_info()

    async def _dragonfly(self) -> None:
        await self.services.redis.ping()

    async def _clickhouse_check(self) -> None:
        await asyncio.to_thread(self._clickhouse_ping)

    async def check(self) -> dict[str, str]:
        checks: dict[str, Callable[[], Awaitable[None]]] = {
            "postgres": self._postgres,
            "nats": self._nats,
            "dragonfly": self._dragonfly,
            "clickhouse": self._clickhouse_check,
        }

        async def run(check: Callable[[], Awaitable[None]]) -> str:
            try:
                await asyncio.wait_for(check(), _TIMEOUT)
                return "ok"
            except TimeoutError:
                return "timed out"
            except Exception as exc:
                return f"error: {type(exc).__name__}: {exc}"[:300]

        results = await asyncio.gather(*(run(c) for c in checks.values()))
        return dict(zip(checks, results, strict=True))


def _raise(message: str) -> None:
    raise ConnectionError(message)
