"""Dependency checks for ``/health``: each one answers "ok" or "down".

``/health`` is public, so it names what is down, never how: the error itself (addresses,
versions, messages of the services) goes to the log, one warning line per failed check.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from engine.clickhouse import ClickHouse
from engine.services import Services

log = logging.getLogger(__name__)

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

        async def run(name: str, check: Callable[[], Awaitable[None]]) -> str:
            try:
                await asyncio.wait_for(check(), _TIMEOUT)
                return "ok"
            except TimeoutError:
                log.warning("health check failed", extra={"check": name, "error": "timed out"})
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"[:300]
                log.warning("health check failed", extra={"check": name, "error": error})
            return "down"

        results = await asyncio.gather(*(run(n, c) for n, c in checks.items()))
        return dict(zip(checks, results, strict=True))


def _raise(message: str) -> None:
    raise ConnectionError(message)
