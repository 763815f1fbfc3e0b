"""Idempotent schema set-up: ordered SQL files for PostgreSQL and ClickHouse.

Each file is applied once and recorded in ``schema_migrations``; the statements are
themselves idempotent, so a half-applied file is finished on the next run. Concurrent
starts (API and workers at once) are serialised by a PostgreSQL advisory lock.
"""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from engine.clickhouse import ClickHouse
from engine.config import Settings

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).parent / "migrations"
_LOCK_ID = 0x62617463  # "batc"


def _files(kind: str) -> list[Path]:
    return sorted((MIGRATIONS / kind).glob("*.sql"))


async def ensure_database(database_url: str) -> None:
    """Create the database named in the URL when it does not exist yet."""
    parts = urlsplit(database_url)
    name = parts.path.lstrip("/")
    admin_url = urlunsplit(parts._replace(path="/postgres"))
    conn = await asyncpg.connect(admin_url)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            try:
                await conn.execute(f'CREATE DATABASE "{name}"')
                log.info("created database %s", name)
            except asyncpg.DuplicateDatabaseError:
                pass
    finally:
        await conn.close()


async def migrate_postgres(database_url: str) -> list[str]:
    await ensure_database(database_url)
    conn = await asyncpg.connect(database_url)
    applied: list[str] = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_ID)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for path in _files("postgres"):
            if path.stem in done:
                continue
            async with conn.transaction():
                await conn.execute(path.read_text())
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", path.stem)
            applied.append(path.stem)
            log.info("postgres migration applied: %s", path.stem)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_ID)
        await conn.close()
    return applied


def clickhouse_statements(path: Path, database: str) -> list[str]:
    """The statements of one ClickHouse migration file, with ``{db}`` filled in."""
    text = "\n".join(
        line for line in path.read_text().splitlines() if not line.strip().startswith("--")
    )
    return [s.strip().replace("{db}", database) for s in text.split(";") if s.strip()]


def migrate_clickhouse(clickhouse: ClickHouse) -> list[str]:
    db = clickhouse.database
    clickhouse.command(f"CREATE DATABASE IF NOT EXISTS {db}")
    clickhouse.command(
        f"CREATE TABLE IF NOT EXISTS {db}.schema_migrations (version String, applied_at DateTime)"
        " ENGINE = TinyLog"
    )
    done = {row[0] for row in clickhouse.query(f"SELECT version FROM {db}.schema_migrations")}
    applied = []
    for path in _files("clickhouse"):
        if path.stem in done:
            continue
        for statement in clickhouse_statements(path, db):
            clickhouse.command(statement)
        clickhouse.command(f"INSERT INTO {db}.schema_migrations VALUES ('{path.stem}', now())")
        applied.append(path.stem)
        log.info("clickhouse migration applied: %s", path.stem)
    return applied


async def migrate_all(settings: Settings) -> None:
    await migrate_postgres(settings.database_url)
    clickhouse = ClickHouse(settings)
    try:
        migrate_clickhouse(clickhouse)
    finally:
        clickhouse.close()
