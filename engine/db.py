"""PostgreSQL connections: one asyncpg pool per process, JSON through orjson."""

from __future__ import annotations

import asyncpg
import orjson

from engine.config import Settings


async def _init_connection(conn: asyncpg.Connection) -> None:
    # Binary format, so COPY (binary) can carry jsonb too: a version byte, then the text.
    await conn.set_type_codec(
        "jsonb",
        encoder=lambda value: b"\x01" + orjson.dumps(value),
        decoder=lambda data: orjson.loads(data[1:]),
        schema="pg_catalog",
        format="binary",
    )


async def create_pool(settings: Settings, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        settings.database_url,
        min_size=min_size,
        max_size=max_size,
        init=_init_connection,
        command_timeout=120,
    )
