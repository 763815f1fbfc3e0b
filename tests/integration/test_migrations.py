"""Schema migrations on the real PostgreSQL and ClickHouse, and on a current ClickHouse (chdb)."""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from datetime import UTC, datetime

import asyncpg
import pytest

from engine.clickhouse import ClickHouse
from engine.config import Settings
from engine.migrate import MIGRATIONS, clickhouse_statements, migrate_all

PG_TABLES = {"schema_migrations", "tenants", "api_keys", "batches", "recipients", "suppressions"}
CH_TABLES = {"schema_migrations", "events", "events_per_minute"}


async def pg_state(settings: Settings) -> tuple[list[tuple], set[str]]:
    conn = await asyncpg.connect(settings.database_url)
    try:
        versions = [
            tuple(r)
            for r in await conn.fetch(
                "SELECT version, applied_at FROM schema_migrations ORDER BY version"
            )
        ]
        tables = {
            r["table_name"]
            for r in await conn.fetch(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
            )
        }
    finally:
        await conn.close()
    return versions, tables


def ch_state(settings: Settings) -> tuple[list[tuple], set[str]]:
    clickhouse = ClickHouse(settings)
    try:
        db = settings.clickhouse_database
        versions = sorted(
            clickhouse.query(f"SELECT version, applied_at FROM {db}.schema_migrations")
        )
        tables = {row[0] for row in clickhouse.query(f"SHOW TABLES FROM {db}")}
    finally:
        clickhouse.close()
    return versions, tables


async def test_migrate_all_twice_is_harmless(migrated: Settings) -> None:
    pg_versions, pg_tables = await pg_state(migrated)
    ch_versions, ch_tables = await asyncio.to_thread(ch_state, migrated)
    expected_pg = [p.stem for p in sorted((MIGRATIONS / "postgres").glob("*.sql"))]
    expected_ch = [p.stem for p in sorted((MIGRATIONS / "clickhouse").glob("*.sql"))]
    assert [v[0] for v in pg_versions] == expected_pg
    assert [v[0] for v in ch_versions] == expected_ch

    await migrate_all(migrated)
    await migrate_all(migrated)

    assert await pg_state(migrated) == (pg_versions, pg_tables)
    assert await asyncio.to_thread(ch_state, migrated) == (ch_versions, ch_tables)


async def test_postgres_tables_exist(migrated: Settings) -> None:
    _, tables = await pg_state(migrated)
    assert PG_TABLES <= tables


async def test_clickhouse_tables_exist(migrated: Settings) -> None:
    _, tables = await asyncio.to_thread(ch_state, migrated)
    assert CH_TABLES <= tables


def _insert_and_aggregate(settings: Settings, tenant: str) -> list[tuple]:
    clickhouse = ClickHouse(settings)
    db = settings.clickhouse_database
    minute = datetime(2030, 1, 1, 10, 0, tzinfo=UTC).replace(tzinfo=None)
    rows = [
        [when, tenant, "b1", seq, event, "mock", domain, latency, attempts, "", ""]
        for when, seq, event, domain, latency, attempts in (
            (minute.replace(second=5), 1, "sent", "example.com", 10, 1),
            (minute.replace(second=55), 2, "sent", "example.com", 30, 1),
            (minute.replace(second=20), 1, "delivered", "example.com", 0, 0),
            (minute.replace(minute=1), 3, "sent", "example.org", 5, 2),
        )
    ]
    try:
        clickhouse.insert_events([list(column) for column in zip(*rows, strict=True)])
        return sorted(
            clickhouse.query(
                f"SELECT toString(minute), event, sum(events), sum(latency_ms_sum)"
                f" FROM {db}.events_per_minute WHERE tenant_id = '{tenant}'"
                f" GROUP BY minute, event"
            )
        )
    finally:
        clickhouse.close()


EXPECTED_MINUTES = [
    ("2030-01-01 10:00:00", "delivered", 1, 0),
    ("2030-01-01 10:00:00", "sent", 2, 40),
    ("2030-01-01 10:01:00", "sent", 1, 5),
]


async def test_events_aggregate_per_minute_on_this_clickhouse(migrated: Settings) -> None:
    tenant = f"t{uuid.uuid4().hex[:8]}"
    assert await asyncio.to_thread(_insert_and_aggregate, migrated, tenant) == EXPECTED_MINUTES


def test_clickhouse_schema_on_current_clickhouse() -> None:
    session_module = pytest.importorskip("chdb.session")
    files = sorted((MIGRATIONS / "clickhouse").glob("*.sql"))
    assert files
    db = f"bst_chdb_{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="bst-chdb-") as path:
        session = session_module.Session(path)
        try:
            version = str(session.query("SELECT version()", "CSV")).strip().strip('"')
            assert int(version.split(".")[0]) >= 23  # a current release, unlike 18.16
            session.query(f"CREATE DATABASE {db}")
            for file in files:
                for statement in clickhouse_statements(file, db):
                    session.query(statement)
                # Idempotent: a second run of the same file must not fail.
                for statement in clickhouse_statements(file, db):
                    session.query(statement)
            session.query(
                f"INSERT INTO {db}.events VALUES"
                " ('2030-01-01 10:00:05', 'ta', 'b1', 1, 'sent', 'mock', 'example.com', 10, 1, '', 'm1'),"
                " ('2030-01-01 10:00:55', 'ta', 'b1', 2, 'sent', 'mock', 'example.com', 30, 1, '', ''),"
                " ('2030-01-01 10:00:20', 'ta', 'b1', 1, 'delivered', 'mock', 'example.com', 0, 0, '', ''),"
                " ('2030-01-01 10:01:00', 'ta', 'b1', 3, 'sent', 'mock', 'example.org', 5, 2, '', '')"
            )
            result = str(
                session.query(
                    f"SELECT toString(minute), event, sum(events), sum(latency_ms_sum)"
                    f" FROM {db}.events_per_minute GROUP BY minute, event ORDER BY minute, event",
                    "TabSeparated",
                )
            )
            tables = str(session.query(f"SHOW TABLES FROM {db}", "TabSeparated")).split()
        finally:
            session.close()
    parsed = [
        (minute, event, int(events), int(latency))
        for minute, event, events, latency in (line.split("\t") for line in result.splitlines())
    ]
    assert parsed == EXPECTED_MINUTES
    assert {"events", "events_per_minute"} <= set(tables)


async def _database_at(settings: Settings, suffix: str, before: str) -> str:
    """A fresh database with the PostgreSQL migrations before ``before`` applied; its URL."""
    name = f"{settings.database_url.rsplit('/', 1)[1]}_{suffix}"
    url = f"{settings.database_url.rsplit('/', 1)[0]}/{name}"
    admin = await asyncpg.connect(url.rsplit("/", 1)[0] + "/postgres")
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "CREATE TABLE schema_migrations (version text PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for path in sorted((MIGRATIONS / "postgres").glob("*.sql")):  # the old schema
            if path.stem < before:
                await conn.execute(path.read_text())
                await conn.execute("INSERT INTO schema_migrations VALUES ($1)", path.stem)
    finally:
        await conn.close()
    return url


def _from(version: str) -> list[str]:
    """The PostgreSQL migrations from ``version`` on, in the order they apply."""
    return [p.stem for p in sorted((MIGRATIONS / "postgres").glob("*.sql")) if p.stem >= version]


async def _old_batch(conn: asyncpg.Connection, total: int, final: int) -> uuid.UUID:
    """A processing batch of tenant 'old' in a database of an earlier schema; its id."""
    batch = uuid.uuid4()
    await conn.execute("INSERT INTO tenants (id, name) VALUES ('old', 'old')")
    await conn.execute(
        """INSERT INTO batches (id, tenant_id, name, from_email, subject, provider,
               status, chunk_size, total_recipients, final_count)
           VALUES ($1, 'old', 'old', 'a@b.example', 's', 'mock', 'processing', 1000, $2, $3)""",
        batch,
        total,
        final,
    )
    return batch


async def _drop(url: str) -> None:
    admin = await asyncpg.connect(url.rsplit("/", 1)[0] + "/postgres")
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}"')
    finally:
        await admin.close()


async def test_sends_of_the_011_shape_are_read_after_012(settings: Settings) -> None:
    """recipient_sends rows written under 011 (recipients named by bits) keep their provider
    message ids and attempts after 012 (recipients named by seqs)."""
    from engine.migrate import migrate_postgres

    url = await _database_at(settings, "m012", "012")
    try:
        conn = await asyncpg.connect(url)
        try:
            batch = uuid.uuid4()
            await conn.execute(
                """INSERT INTO recipients (batch_id, seq, email, status)
                   SELECT $1, seq, 'r' || seq || '@x.example', 'queued'
                     FROM generate_series(1025, 1030) AS seq""",
                batch,
            )
            bits = asyncpg.BitString("".join("1" if i in (0, 3) else "0" for i in range(1024)))
            await conn.execute(
                "INSERT INTO recipient_finals VALUES ($1, 1, $2, $2)", batch, bits
            )  # seqs 1025 and 1028 final, and sent:
            await conn.execute(
                """INSERT INTO recipient_sends (batch_id, block, first_seq, mask, pmids, attempts)
                   VALUES ($1, 1, 1025, $2, '{pm-a,pm-b}', '{1,3}')""",
                batch,
                bits,
            )
        finally:
            await conn.close()
        assert await migrate_postgres(url) == _from("012")
        conn = await asyncpg.connect(url)
        try:
            rows = await conn.fetch(
                """SELECT seq, status, provider_message_id, attempts FROM recipient_statuses
                    WHERE batch_id = $1 ORDER BY seq""",
                batch,
            )
        finally:
            await conn.close()
        assert [tuple(r) for r in rows] == [
            (1025, "sent", "pm-a", 1), (1026, "queued", None, 0), (1027, "queued", None, 0),
            (1028, "sent", "pm-b", 3), (1029, "queued", None, 0), (1030, "queued", None, 0),
        ]  # fmt: skip
    finally:
        await _drop(url)


async def test_recipients_final_before_migration_011_stay_final_once(settings: Settings) -> None:
    """A batch sent under the schema before 011 (each recipient's status in its row): after
    the migration a redelivered send and a late delivered event count nothing again."""
    from engine import lifecycle
    from engine.migrate import migrate_postgres

    url = await _database_at(settings, "m011", "011")
    try:
        conn = await asyncpg.connect(url)
        try:
            batch = await _old_batch(conn, 3, 2)
            await conn.execute(
                """INSERT INTO recipients (batch_id, seq, email, status, provider_message_id)
                   VALUES ($1, 1, 'a@x.example', 'sent', 'pm-1'),
                          ($1, 2, 'b@x.example', 'failed', NULL),
                          ($1, 1500, 'c@x.example', 'queued', NULL)""",
                batch,
            )
            await conn.execute(
                """INSERT INTO batch_counts VALUES ($1, 'sent', 1), ($1, 'failed', 1),
                   ($1, 'queued', 1)""",
                batch,
            )
        finally:
            await conn.close()
        assert await migrate_postgres(url) == _from("011")
        conn = await asyncpg.connect(url)
        try:
            b = str(batch)
            async with conn.transaction():
                await lifecycle.record_final(
                    conn, [b] * 3, [1, 2, 1500], ["sent", "sent", "sent"], ["pm-1", None, "pm-3"],
                    [None] * 3, [1] * 3,
                )  # fmt: skip
                await lifecycle.record_after_send(conn, [b], [1], ["delivered"], ["pm-1"], [None])
            final = await conn.fetchval("SELECT final_count FROM batches WHERE id = $1", batch)
            counts = dict(
                await conn.fetch("SELECT status, n FROM batch_counts WHERE batch_id = $1", batch)
            )
            statuses = dict(
                await conn.fetch(
                    "SELECT seq, status FROM recipient_statuses WHERE batch_id = $1", batch
                )
            )
        finally:
            await conn.close()
        assert final == 3  # only seq 1500 became final now
        assert statuses == {1: "delivered", 2: "failed", 1500: "sent"}
        assert counts == {"sent": 1, "failed": 1, "queued": 0, "delivered": 1}
    finally:
        await _drop(url)


async def test_statuses_of_the_013_shape_move_on_once_after_014(settings: Settings) -> None:
    """Recipients written under 013 (a delivered event wrote the row): after 014 a sent one
    is delivered by its bit, and one delivered, failed or sent before 011 counts nothing
    again."""
    from engine.migrate import migrate_postgres
    from engine.results import Columns, apply_results

    url = await _database_at(settings, "m014", "014")
    try:
        conn = await asyncpg.connect(url)
        try:
            batch = await _old_batch(conn, 5, 4)
            await conn.execute(  # 1 sent, 2 sent then delivered, 3 failed, 4 sent before 011
                """INSERT INTO recipients (batch_id, seq, email, status, provider_message_id)
                   VALUES ($1, 1, 'a@x.example', 'queued', NULL),
                          ($1, 2, 'b@x.example', 'delivered', NULL),
                          ($1, 3, 'c@x.example', 'failed', NULL),
                          ($1, 4, 'd@x.example', 'sent', 'pm-4'),
                          ($1, 5, 'e@x.example', 'queued', NULL)""",
                batch,
            )
            bits = asyncpg.BitString("1111" + "0" * 1020)
            await conn.execute("INSERT INTO recipient_finals VALUES ($1, 0, $2, $2)", batch, bits)
            await conn.execute(
                """INSERT INTO recipient_sends (batch_id, block, first_seq, seqs, pmids, attempts)
                   VALUES ($1, 0, 1, '{1,2}', '{pm-1,pm-2}', '{1,1}')""",
                batch,
            )
            await conn.execute(
                """INSERT INTO batch_counts VALUES ($1, 'sent', 2), ($1, 'delivered', 1),
                   ($1, 'failed', 1), ($1, 'queued', 1)""",
                batch,
            )
        finally:
            await conn.close()
        assert await migrate_postgres(url) == _from("014")
        conn = await asyncpg.connect(url)
        try:
            events = Columns()
            for seq in (1, 2, 3, 4, 5):
                events.append(str(batch), seq, "delivered")
            await apply_results(conn, events)
            await apply_results(conn, events)  # the same webhooks once more
            final = await conn.fetchval("SELECT final_count FROM batches WHERE id = $1", batch)
            counts = dict(
                await conn.fetch(
                    "SELECT status, n FROM batch_counts WHERE batch_id = $1 AND n <> 0", batch
                )
            )
            statuses = await conn.fetch(
                """SELECT seq, status, provider_message_id FROM recipient_statuses
                    WHERE batch_id = $1 ORDER BY seq""",
                batch,
            )
        finally:
            await conn.close()
        assert final == 5  # only seq 5 became final now
        assert [tuple(r) for r in statuses] == [
            (1, "delivered", "pm-1"), (2, "delivered", "pm-2"), (3, "failed", None),
            (4, "delivered", "pm-4"), (5, "delivered", None),
        ]  # fmt: skip
        assert counts == {"delivered": 4, "failed": 1}
    finally:
        await _drop(url)


async def test_vars_written_as_jsonb_read_the_same_after_016(settings: Settings) -> None:
    """Recipients COPYed under 015 (vars as jsonb) are read by the sender with the same vars
    after 016 (vars as json), and new ones are written and read through the same codec."""
    from engine import lifecycle
    from engine.db import _init_connection
    from engine.migrate import migrate_postgres

    old_vars = {"name": "Zoë", "n": 3, "nested": {"list": [1, 2.5, None, True]}, "": "x"}
    url = await _database_at(settings, "m016", "016")
    try:
        conn = await asyncpg.connect(url)
        try:
            await _init_connection(conn)
            batch = await _old_batch(conn, 3, 0)
            await conn.copy_records_to_table(
                "recipients",
                records=[
                    (batch, 1, "a@x.example", None, old_vars, "queued"),
                    (batch, 2, "b@x.example", "B", None, "queued"),
                ],
                columns=["batch_id", "seq", "email", "name", "vars", "status"],
            )
        finally:
            await conn.close()
        assert await migrate_postgres(url) == _from("016")
        conn = await asyncpg.connect(url)
        try:
            await _init_connection(conn)
            kind = await conn.fetchval(
                "SELECT data_type FROM information_schema.columns"
                " WHERE table_name = 'recipients' AND column_name = 'vars'"
            )
            await conn.copy_records_to_table(
                "recipients",
                records=[(batch, 3, "c@x.example", None, {"code": "0042", "é": [{}]}, "queued")],
                columns=["batch_id", "seq", "email", "name", "vars", "status"],
            )
            rows = await conn.fetch(lifecycle.TO_SEND, batch, 1, 1001)
        finally:
            await conn.close()
        assert kind == "json"
        assert [(r["seq"], r["vars"]) for r in rows] == [
            (1, old_vars), (2, None), (3, {"code": "0042", "é": [{}]}),
        ]  # fmt: skip
    finally:
        await _drop(url)
