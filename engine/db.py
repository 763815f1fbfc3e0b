"""PostgreSQL connections: one asyncpg pool per process, JSON through orjson."""

from __future__ import annotations

import asyncpg
import orjson

from engine.config import Settings


async def _init_connection(conn: asyncpg.Connection) -> None:
    # Binary format, so COPY (binary) can carry them too. json's binary form is its text
    # (recipients' vars, migration 016); jsonb's is a version byte, then the text.
    await conn.set_type_codec(
        "json", encoder=orjson.dumps, decoder=orjson.loads, schema="pg_catalog", format="binary"
    )
    await conn.set_type_codec(
        "jsonb",
        encoder=lambda value: b"\x01" + orjson.dumps(value),
        decoder=lambda data: orjson.loads(data[1:]),
        schema="pg_catalog",
        format="binary",
    )


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """Nothing to reset when a connection goes back to the pool: this code keeps no session
    state on pool connections (settings only with SET LOCAL inside a transaction, no
    LISTEN, no cursors outside a transaction, no advisory locks; asyncpg still rolls back
    a transaction left open). asyncpg's default reset is a round trip of four statements
    on every release (bench/RESULTS.md)."""


async def create_pool(settings: Settings, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        settings.database_url,
        min_size=min_size,
        max_size=max_size,
        init=_init_connection,
        reset=_keep_session,
        command_timeout=120,
        # No JIT: every statement here is short, and a cost estimate above jit_above_cost
        # (a view's per-row subqueries over a large batch) compiled for 0.3 s a listing
        # that runs in 1 ms (bench/RESULTS.md).
        server_settings={"jit": "off"},
    )
