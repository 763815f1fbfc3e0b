"""The connections one process holds: PostgreSQL pool, NATS/JetStream, Dragonfly.

Both the API and each worker process open one ``Services`` and pass it to engine
functions; nothing else opens connections of its own.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import asyncpg
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from engine.config import Settings
from engine.db import create_pool
from engine.topology import Topology, ensure_topology

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Services:
    settings: Settings
    pool: asyncpg.Pool
    nc: NATS
    js: JetStreamContext
    redis: aioredis.Redis
    topology: Topology

    @classmethod
    async def open(cls, settings: Settings, *, pool_size: int = 10) -> Services:
        pool = await create_pool(settings, max_size=pool_size)
        nc = NATS()

        async def disconnected() -> None:
            if not nc.is_draining and not nc.is_closed:
                log.warning("nats disconnected; reconnecting")

        await nc.connect(
            settings.nats_url,
            name="batchsender",
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            error_cb=_log_nats_error,
            disconnected_cb=disconnected,
        )
        js = nc.jetstream(timeout=10)
        topology = Topology(settings.nats_prefix)
        await ensure_topology(js, topology)
        client = aioredis.Redis.from_url(settings.dragonfly_url, socket_timeout=5)
        return cls(settings, pool, nc, js, client, topology)

    def key(self, *parts: str) -> str:
        """A Dragonfly key under this deployment's ``KEY_PREFIX``."""
        return self.settings.key_prefix + ":".join(parts)

    async def close(self) -> None:
        for closing in (self.nc.drain(), self.redis.aclose(), self.pool.close()):
            try:
                await asyncio.wait_for(closing, 10)
            except Exception as exc:  # closing must go on for the others
                log.warning("error while closing: %r", exc)


async def _log_nats_error(exc: Exception) -> None:
    log.warning("nats error: %r", exc)
