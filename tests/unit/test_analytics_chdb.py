"""The analytics SQL on a current ClickHouse, in-process (chdb): the same tables as the
migration creates (``engine/migrations/clickhouse/*.sql``), the same query texts as
``engine.analytics`` builds and binds, the same code turning rows into answers. The
integration tests run them on the server (18.16); together they keep the SQL valid on
both."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from chdb import session
from clickhouse_connect.driver.binding import format_query_value

from engine import analytics
from engine.analytics import EVENT_TYPES, Query, Window
from engine.clickhouse import EVENT_COLUMNS
from engine.migrate import clickhouse_statements

DB = "bs_chdb"
MIGRATIONS = sorted((Path(analytics.__file__).parent / "migrations" / "clickhouse").glob("*.sql"))
T0 = 1_714_557_600  # 2024-05-01T10:00:00Z
# Sorted, indexes 0-11 are 10 ms, 12-17 20 ms, 18-19 50 ms: p50 10, p95 and p99 50 by any
# quantile definition.
LATENCIES = [10] * 12 + [20] * 6 + [50] * 2


def event_rows() -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = []

    def add(at: int, tenant: str, batch: str, event: str, provider: str, seqs, latency=None):
        latency = latency or [0] * len(seqs)
        for i, (seq, ms) in enumerate(zip(seqs, latency, strict=True)):
            rows.append((at + i, tenant, batch, seq, event, provider, "example.com", ms, 1, "", ""))

    add(T0, "ta", "a1", "sent", "mock", range(20), LATENCIES)
    add(T0 + 60, "ta", "a1", "failed", "mock", range(20, 22))
    add(T0 + 120, "ta", "a1", "delivered", "mock", range(8))
    add(T0 + 120, "ta", "a1", "bounced", "mock", range(8, 9))
    add(T0 + 120, "ta", "a1", "opened", "mock", range(4))
    add(T0 + 3660, "ta", "a2", "sent", "smtp", range(5), [7] * 5)
    add(T0, "tb", "b1", "sent", "mock", range(3), [1000] * 3)
    return rows


@pytest.fixture(scope="module")
def chdb_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[session.Session]:
    sess = session.Session(str(tmp_path_factory.mktemp("chdb")))
    try:
        sess.query(f"CREATE DATABASE IF NOT EXISTS {DB}")
        for path in MIGRATIONS:
            for statement in clickhouse_statements(path, DB):
                sess.query(statement)
        rows = event_rows()
        assert len(rows[0]) == len(EVENT_COLUMNS)
        columns = ", ".join(name for name, _ in EVENT_COLUMNS)
        for part in (rows[: len(rows) // 2], rows[len(rows) // 2 :]):  # two parts in the view
            values = ", ".join(str(format_query_value(row)) for row in part)
            sess.query(f"INSERT INTO {DB}.events ({columns}) VALUES {values}")
        yield sess
    finally:
        sess.close()


def run(sess: session.Session, query: Query) -> list[tuple[Any, ...]]:
    result = sess.query(analytics.bind(query), "JSONCompact")
    return [tuple(row) for row in json.loads(result.data())["data"]]


def counts(**found: int) -> dict[str, int]:
    return dict.fromkeys(EVENT_TYPES, 0) | found


def test_the_view_sums_what_was_inserted(chdb_session: session.Session) -> None:
    rows = run(chdb_session, Query(f"SELECT sum(events) FROM {DB}.events_per_minute"))
    assert int(rows[0][0]) == len(event_rows())


def test_overview(chdb_session: session.Session) -> None:
    window = Window(T0, T0 + 7200, 60)
    rows = run(chdb_session, analytics.overview_query(DB, "ta", window))
    found = analytics.counts_of(rows)
    assert found == counts(sent=25, failed=2, delivered=8, bounced=1, opened=4)
    assert analytics.rates_of(found)["delivery_rate"] == round(8 / 25, 6)
    assert analytics.rates_of(found)["complaint_rate"] == 0.0
    mock = analytics.counts_of(
        run(chdb_session, analytics.overview_query(DB, "ta", window, "mock"))
    )
    assert mock == counts(sent=20, failed=2, delivered=8, bounced=1, opened=4)
    first_hour = Window(T0, T0 + 3600, 60)
    assert (
        analytics.counts_of(
            run(chdb_session, analytics.overview_query(DB, "ta", first_hour, "smtp"))
        )
        == counts()
    )
    assert analytics.counts_of(
        run(chdb_session, analytics.overview_query(DB, "tb", window))
    ) == counts(sent=3)
    assert (
        analytics.counts_of(run(chdb_session, analytics.overview_query(DB, "t'; DROP", window)))
        == counts()
    )


def test_timeseries(chdb_session: session.Session) -> None:
    window = Window(T0, T0 + 7200, 3600)
    rows = run(chdb_session, analytics.timeseries_query(DB, "ta", window, ["sent", "failed"]))
    assert analytics.timeseries_of(rows, window, ["sent", "failed"]) == [
        {"start": "2024-05-01T10:00:00Z", "counts": {"sent": 20, "failed": 2}},
        {"start": "2024-05-01T11:00:00Z", "counts": {"sent": 5, "failed": 0}},
    ]
    minutes = Window(T0, T0 + 180, 60)
    rows = run(chdb_session, analytics.timeseries_query(DB, "ta", minutes, ["delivered"], "mock"))
    assert [
        b["counts"]["delivered"] for b in analytics.timeseries_of(rows, minutes, ["delivered"])
    ] == [0, 0, 8]
    day = Window(T0 - T0 % 86400, T0 - T0 % 86400 + 86400, 86400)
    rows = run(chdb_session, analytics.timeseries_query(DB, "ta", day, list(EVENT_TYPES)))
    assert analytics.timeseries_of(rows, day, list(EVENT_TYPES)) == [
        {
            "start": "2024-05-01T00:00:00Z",
            "counts": counts(sent=25, failed=2, delivered=8, bounced=1, opened=4),
        },
    ]


def test_batch(chdb_session: session.Session) -> None:
    found = analytics.counts_of(run(chdb_session, analytics.batch_counts_query(DB, "ta", "a1")))
    assert found == counts(sent=20, failed=2, delivered=8, bounced=1, opened=4)
    series, truncated = analytics.series_of(
        run(chdb_session, analytics.batch_series_query(DB, "ta", "a1"))
    )
    assert not truncated
    assert series == [
        {"minute": "2024-05-01T10:00:00Z", "event": "sent", "count": 20},
        {"minute": "2024-05-01T10:01:00Z", "event": "failed", "count": 2},
        {"minute": "2024-05-01T10:02:00Z", "event": "bounced", "count": 1},
        {"minute": "2024-05-01T10:02:00Z", "event": "delivered", "count": 8},
        {"minute": "2024-05-01T10:02:00Z", "event": "opened", "count": 4},
    ]
    later = analytics.batch_counts_query(DB, "ta", "a1", since=T0 + 60)  # the sent ones are older
    assert analytics.counts_of(run(chdb_session, later)) == counts(
        failed=2, delivered=8, bounced=1, opened=4
    )
    latency = analytics.latency_of(run(chdb_session, analytics.batch_latency_query(DB, "ta", "a1")))
    assert latency == {"samples": 20, "p50": 10, "p95": 50, "p99": 50, "max": 50}
    other = analytics.latency_of(run(chdb_session, analytics.batch_latency_query(DB, "ta", "b1")))
    assert other == {"samples": 0, "p50": None, "p95": None, "p99": None, "max": None}
    assert (
        analytics.counts_of(run(chdb_session, analytics.batch_counts_query(DB, "tb", "a1")))
        == counts()
    )


def test_buckets_are_utc_whatever_the_server_time_zone(chdb_session: session.Session) -> None:
    window = Window(T0, T0 + 7200, 3600)
    query = analytics.timeseries_query(DB, "ta", window, ["sent"])
    local = Query(query.sql + "\nSETTINGS session_timezone = 'Asia/Kolkata'", query.params)
    assert analytics.timeseries_of(run(chdb_session, local), window, ["sent"]) == [
        {"start": "2024-05-01T10:00:00Z", "counts": {"sent": 20}},
        {"start": "2024-05-01T11:00:00Z", "counts": {"sent": 5}},
    ]
    overview = analytics.overview_query(DB, "ta", Window(T0 + 3600, T0 + 7200, 60))
    local = Query(overview.sql + "\nSETTINGS session_timezone = 'Asia/Kolkata'", overview.params)
    assert analytics.counts_of(run(chdb_session, local)) == counts(sent=5)


def test_a_batch_is_looked_up_from_a_day_before_its_creation() -> None:
    assert analytics.batch_since("2024-05-02T10:00:30.5+00:00") == T0  # a day less, whole minute
    assert analytics.batch_since("2024-05-02T12:00:30+02:00") == T0
    assert analytics.batch_since("1970-01-01T10:00:00+00:00") == 0
    assert analytics.batch_since(None) == 0
