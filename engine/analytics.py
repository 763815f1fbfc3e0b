"""Analytics from ClickHouse for one tenant: overview, one batch, time series.

Every answer except latency comes from ``events_per_minute`` (SummingMergeTree, one row
per minute, tenant, batch, provider and event, filled by ClickHouse on every insert into
``events``). Its rows are summed by background merges that happen whenever ClickHouse
gets to them, so a query always adds up ``sum(events)`` and never counts rows. Latency
percentiles need the single values: they come from the raw ``events`` table, filtered by
tenant and batch (the leading columns of its ORDER BY) and ``event = 'sent'``.

Counts are at least once. The event writer may write a results message twice after a
crash (before its acknowledgement reached NATS). ``events`` is a ReplacingMergeTree and
folds such a duplicate when its parts merge, but until then queries of the raw table
(the latency percentiles) see both rows; and the per-minute aggregate counted both when
they were inserted and keeps counting both, merges or not. Such duplicates are rare
(messages in flight in a crashed writer), so counts can only be slightly too high, never
too low.

Every query is tenant-scoped in its own WHERE clause. The SQL is a constant text per
query shape with ``%(name)s`` placeholders (ClickHouse 18.16 has no server-side query
parameters); the values are bound in one place, ``bind``, by clickhouse-connect's
client-side binding (quoted and escaped literals). The query builders return ``Query``
(SQL and parameters), so the same text runs on the server and, in the tests, on a
current ClickHouse in-process (chdb).

All times are UTC: ranges are bound as epoch seconds and buckets are computed from epoch
seconds, whatever the server's time zone.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from clickhouse_connect.driver.binding import finalize_query, quote_identifier
from clickhouse_connect.driver.exceptions import OperationalError

from engine import batches
from engine.clickhouse import ClickHouse
from engine.config import Settings
from engine.errors import BadRequest, BatchSenderError
from engine.intake.fields import SCHEDULED_AT
from engine.lifecycle import PROVIDER_EVENTS
from providers.registry import KNOWN

log = logging.getLogger(__name__)

# The event types a results message records: the worker's sends and failures, and the
# provider events (``engine.lifecycle.PROVIDER_EVENTS``: delivered, opened, deferred, ...).
EVENT_TYPES = ("sent", "failed", *PROVIDER_EVENTS)
PROVIDER_NAMES = KNOWN
# Allowed ``interval`` values of the time series: names and their seconds.
INTERVALS = {
    "minute": 60,
    "hour": 3600,
    "day": 86400,
    "60": 60,
    "300": 300,
    "900": 900,
    "3600": 3600,
    "86400": 86400,
}
DEFAULT_INTERVAL = "hour"
DEFAULT_RANGE = timedelta(hours=24)
MAX_RANGE = timedelta(days=400)
MAX_BUCKETS = 1500
MAX_SERIES_ROWS = 10_000  # the per-minute rows of one batch's answer
BATCH_CLOCK_MARGIN = 86400  # seconds: how much older than its batch an event may look
# The instants a range may start or end at (DateTime is an unsigned 32-bit epoch).
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(2100, 1, 1, tzinfo=UTC)
TIME_PATTERN = SCHEDULED_AT  # ISO 8601, as for a batch's scheduled_at
_TIME = re.compile(TIME_PATTERN)
QUANTILES = (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))

# Rates: name -> (numerator, denominators). Null when the denominator is 0.
RATES: dict[str, tuple[str, tuple[str, ...]]] = {
    "delivery_rate": ("delivered", ("sent",)),
    "bounce_rate": ("bounced", ("sent",)),
    "complaint_rate": ("complained", ("delivered",)),
    "open_rate": ("opened", ("delivered",)),
    "click_rate": ("clicked", ("delivered",)),
    "failure_rate": ("failed", ("sent", "failed")),
}
RATE_DEFINITIONS = {
    name: f"{numerator} / {' + '.join(denominators)}"
    for name, (numerator, denominators) in RATES.items()
}


class AnalyticsUnavailable(BatchSenderError):
    """ClickHouse does not answer (the rest of the API works without it)."""

    status = 503
    code = "analytics_unavailable"


# --- queries: SQL text and parameters ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Query:
    """One SELECT: SQL with ``%(name)s`` placeholders and their values."""

    sql: str
    params: dict[str, Any] = field(default_factory=dict)


def bind(query: Query) -> str:
    """The query's text with its values bound: the only place values enter SQL
    (clickhouse-connect's client-side binding: strings quoted and escaped, tuples as
    ``(a, b)``, integers as they are)."""
    return finalize_query(query.sql, query.params, UTC)


def _table(database: str, name: str) -> str:
    return f"{quote_identifier(database)}.{name}"


@dataclass(frozen=True, slots=True)
class Window:
    """A range of whole buckets: ``start`` (inclusive) and ``end`` (exclusive) are epoch
    seconds, multiples of ``step``."""

    start: int
    end: int
    step: int

    @property
    def buckets(self) -> int:
        return (self.end - self.start) // self.step


def _where(window: Window | None, provider: str | None, events: bool = False) -> str:
    where = "tenant_id = %(tenant)s"
    if window is not None:
        where += " AND minute >= toDateTime(%(start)s) AND minute < toDateTime(%(end)s)"
    if events:
        where += " AND event IN %(events)s"
    if provider is not None:
        where += " AND provider = %(provider)s"
    return where


def _window_params(window: Window) -> dict[str, int]:
    return {"start": window.start, "end": window.end}


def overview_query(
    database: str, tenant_id: str, window: Window, provider: str | None = None
) -> Query:
    """Counts per event of a tenant's minutes in the window (rows: event, count)."""
    sql = f"""SELECT event, sum(events) AS n
FROM {_table(database, "events_per_minute")}
WHERE {_where(window, provider)}
GROUP BY event
ORDER BY event
LIMIT 1000"""
    params: dict[str, Any] = {"tenant": tenant_id, **_window_params(window)}
    if provider is not None:
        params["provider"] = provider
    return Query(sql, params)


def timeseries_query(
    database: str,
    tenant_id: str,
    window: Window,
    events: Sequence[str],
    provider: str | None = None,
) -> Query:
    """Counts per bucket and event (rows: bucket start in epoch seconds, event, count)."""
    sql = f"""SELECT intDiv(toUInt32(minute), %(step)s) * %(step)s AS bucket, event, sum(events) AS n
FROM {_table(database, "events_per_minute")}
WHERE {_where(window, provider, events=True)}
GROUP BY bucket, event
ORDER BY bucket, event
LIMIT %(limit)s"""
    params: dict[str, Any] = {
        "tenant": tenant_id,
        **_window_params(window),
        "step": window.step,
        "events": tuple(events),
        "limit": window.buckets * len(events),
    }
    if provider is not None:
        params["provider"] = provider
    return Query(sql, params)


def batch_counts_query(database: str, tenant_id: str, batch_id: str, since: int = 0) -> Query:
    """Counts per event of one batch (rows: event, count). ``since`` (epoch seconds): no
    event of the batch is older (its creation, less a margin), which spares ClickHouse
    the older partitions."""
    sql = f"""SELECT event, sum(events) AS n
FROM {_table(database, "events_per_minute")}
WHERE tenant_id = %(tenant)s AND batch_id = %(batch)s AND minute >= toDateTime(%(since)s)
GROUP BY event
ORDER BY event
LIMIT 1000"""
    return Query(sql, {"tenant": tenant_id, "batch": batch_id, "since": since})


def batch_series_query(database: str, tenant_id: str, batch_id: str, since: int = 0) -> Query:
    """One batch's counts per minute and event, oldest first, at most one row more than
    ``MAX_SERIES_ROWS`` (rows: minute in epoch seconds, event, count)."""
    sql = f"""SELECT toUInt32(minute) AS at, event, sum(events) AS n
FROM {_table(database, "events_per_minute")}
WHERE tenant_id = %(tenant)s AND batch_id = %(batch)s AND minute >= toDateTime(%(since)s)
GROUP BY at, event
ORDER BY at, event
LIMIT %(limit)s"""
    params = {"tenant": tenant_id, "batch": batch_id, "since": since, "limit": MAX_SERIES_ROWS + 1}
    return Query(sql, params)


def batch_latency_query(database: str, tenant_id: str, batch_id: str, since: int = 0) -> Query:
    """Provider latency of one batch's sent events (one row: count, [p50, p95, p99],
    max), from the raw table, whose ORDER BY starts with tenant, batch and event: exact
    quantiles (the value at index ``floor(level * n)`` of the sorted values)."""
    levels = ", ".join(str(level) for _, level in QUANTILES)
    sql = f"""SELECT count() AS n, quantilesExact({levels})(latency_ms) AS q, max(latency_ms) AS top
FROM {_table(database, "events")}
WHERE tenant_id = %(tenant)s AND batch_id = %(batch)s AND event = 'sent'
  AND ts >= toDateTime(%(since)s)"""
    return Query(sql, {"tenant": tenant_id, "batch": batch_id, "since": since})


def batch_since(created_at: str | None) -> int:
    """Epoch seconds no event of a batch created at ``created_at`` (ISO 8601) precedes:
    a day earlier, for clocks that disagree (events carry the workers' clocks)."""
    if not created_at:
        return 0
    since = int(datetime.fromisoformat(created_at).timestamp()) - BATCH_CLOCK_MARGIN
    return max(0, since - since % 60)


# --- answers from rows -------------------------------------------------------------------


def iso(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


def counts_of(rows: Sequence[Sequence[Any]]) -> dict[str, int]:
    """Every event type (0 when absent), plus any other event found."""
    counts = dict.fromkeys(EVENT_TYPES, 0)
    for event, n in rows:
        counts[str(event)] = counts.get(str(event), 0) + int(n)
    return counts


def rates_of(counts: Mapping[str, int]) -> dict[str, float | None]:
    """``RATES``, rounded to 6 places; None when the denominator is 0."""
    rates: dict[str, float | None] = {}
    for name, (numerator, denominators) in RATES.items():
        total = sum(counts.get(d, 0) for d in denominators)
        rates[name] = round(counts.get(numerator, 0) / total, 6) if total else None
    return rates


def timeseries_of(
    rows: Sequence[Sequence[Any]], window: Window, events: Sequence[str]
) -> list[dict[str, Any]]:
    """Every bucket of the window, oldest first, with a count for every event asked for."""
    found = {(int(at), str(event)): int(n) for at, event, n in rows}
    return [
        {"start": iso(at), "counts": {e: found.get((at, e), 0) for e in events}}
        for at in range(window.start, window.end, window.step)
    ]


def series_of(rows: Sequence[Sequence[Any]]) -> tuple[list[dict[str, Any]], bool]:
    """(rows of (minute, event, count), whether there were more than ``MAX_SERIES_ROWS``)."""
    series = [
        {"minute": iso(int(at)), "event": str(event), "count": int(n)}
        for at, event, n in rows[:MAX_SERIES_ROWS]
    ]
    return series, len(rows) > MAX_SERIES_ROWS


def latency_of(rows: Sequence[Sequence[Any]]) -> dict[str, Any]:
    n, quantiles, top = rows[0] if rows else (0, [], 0)
    samples = int(n)
    result: dict[str, Any] = {"samples": samples}
    for (name, _), value in zip(QUANTILES, quantiles or [None] * len(QUANTILES), strict=True):
        result[name] = int(value) if samples and value is not None else None
    result["max"] = int(top) if samples else None
    return result


# --- request parameters -------------------------------------------------------------------


def _bad(message: str, code: str, details: Any) -> BadRequest:
    return BadRequest(message, details, code=code)


def parse_time(name: str, raw: str | None) -> datetime | None:
    """An ISO 8601 date-time (UTC when it has no offset), in [1970-01-01, 2100-01-01)."""
    if raw is None:
        return None
    try:
        if not _TIME.fullmatch(raw):
            raise ValueError("not ISO 8601")
        when = datetime.fromisoformat(raw.upper().replace("Z", "+00:00"))
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        when = when.astimezone(UTC)
        if not EARLIEST <= when < LATEST:
            raise ValueError("out of range")
    except (ValueError, OverflowError):
        raise _bad(
            f"{name}: an ISO 8601 date-time (e.g. 2024-05-01T12:00:00Z; UTC without an "
            f"offset) from {EARLIEST.date()} to before {LATEST.date()}",
            "invalid_time",
            {"field": name},
        ) from None
    return when


def window_of(
    query: Mapping[str, str],
    step: int,
    *,
    max_buckets: int | None = MAX_BUCKETS,
    now: datetime | None = None,
) -> Window:
    """``from``/``to`` (defaults: the 24 hours before now) as whole buckets of ``step``
    seconds: ``from`` rounded down, ``to`` rounded up; at most ``max_buckets`` of them."""
    start, end = parse_time("from", query.get("from")), parse_time("to", query.get("to"))
    if end is None:
        end = now or datetime.now(UTC)
    if start is None:
        start = end - DEFAULT_RANGE
    if start >= end:
        raise _bad(
            "from: must be before to",
            "invalid_range",
            {"field": "from", "from": iso_of(start), "to": iso_of(end)},
        )
    if end - start > MAX_RANGE:
        raise _bad(
            f"from, to: at most {MAX_RANGE.days} days apart",
            "range_too_long",
            {"field": "to", "max_days": MAX_RANGE.days},
        )
    first, last = int(start.timestamp()), int(end.timestamp())
    window = Window(first - first % step, -(-last // step) * step, step)
    if max_buckets is not None and window.buckets > max_buckets:
        raise _bad(
            f"from, to: {window.buckets} buckets of {step} s; at most {max_buckets} "
            "(a shorter range or a longer interval)",
            "too_many_buckets",
            {"field": "interval", "buckets": window.buckets, "max_buckets": max_buckets},
        )
    return window


def iso_of(when: datetime) -> str:
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


def provider_of(query: Mapping[str, str]) -> str | None:
    provider = query.get("provider")
    if provider is not None and provider not in PROVIDER_NAMES:
        raise _bad(
            f"provider: one of {', '.join(PROVIDER_NAMES)}",
            "unknown_provider",
            {"field": "provider"},
        )
    return provider


def events_of(query: Mapping[str, str]) -> list[str]:
    """``events``: a comma list of event types (default: all of them)."""
    raw = query.get("events")
    if raw is None:
        return list(EVENT_TYPES)
    events = raw.split(",")
    unknown = [e for e in events if e not in EVENT_TYPES]
    if unknown:
        raise _bad(
            f"events: a comma list of {', '.join(EVENT_TYPES)}",
            "unknown_event",
            {"field": "events", "unknown": unknown[:10]},
        )
    return list(dict.fromkeys(events))


def interval_of(query: Mapping[str, str]) -> int:
    raw = query.get("interval", DEFAULT_INTERVAL)
    if raw not in INTERVALS:
        raise _bad(
            f"interval: one of {', '.join(INTERVALS)} (seconds or their names)",
            "invalid_interval",
            {"field": "interval"},
        )
    return INTERVALS[raw]


# --- running them ------------------------------------------------------------------------


class Reader:
    """Runs analytics queries in threads on a few ClickHouse clients of its own, one
    query at a time each (a clickhouse-connect client keeps one HTTP session, which the
    server locks while a query runs). At most ``size`` queries at once."""

    def __init__(self, settings: Settings, *, size: int = 4, timeout: float = 30.0):
        self.settings = settings
        self.database = settings.clickhouse_database
        self.timeout = timeout
        self._slots = asyncio.Semaphore(size)
        self._idle: list[ClickHouse] = []

    async def run(self, *queries: Query) -> list[list[tuple]]:
        """The rows of each query, in order (one client, one thread)."""
        async with self._slots:
            return await asyncio.to_thread(self._run, queries)

    def _run(self, queries: Sequence[Query]) -> list[list[tuple]]:
        try:
            client = self._idle.pop()
        except IndexError:
            try:
                client = ClickHouse(self.settings, timeout=self.timeout)
            except (OperationalError, OSError) as exc:
                raise _unavailable(exc) from None
        try:
            rows = [client.query(bind(q)) for q in queries]
        except BaseException as exc:
            client.close()
            if isinstance(exc, OperationalError | OSError):
                raise _unavailable(exc) from None
            raise
        self._idle.append(client)
        return rows

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()


def _unavailable(exc: BaseException) -> AnalyticsUnavailable:
    """The answer names no address or message of ClickHouse's: those go to the log."""
    log.warning("analytics query failed: %s", f"{type(exc).__name__}: {exc}"[:300])
    return AnalyticsUnavailable("analytics are unavailable: ClickHouse does not answer")


async def overview(reader: Reader, tenant_id: str, query: Mapping[str, str]) -> dict[str, Any]:
    """Counts per event type and rates over ``from``/``to`` (whole minutes), optionally
    of one ``provider``."""
    window, provider = window_of(query, 60, max_buckets=None), provider_of(query)
    (rows,) = await reader.run(overview_query(reader.database, tenant_id, window, provider))
    counts = counts_of(rows)
    return {
        "from": iso(window.start),
        "to": iso(window.end),
        "provider": provider,
        "counts": counts,
        "rates": rates_of(counts),
    }


async def timeseries(reader: Reader, tenant_id: str, query: Mapping[str, str]) -> dict[str, Any]:
    """Counts per bucket of ``interval`` and event type over ``from``/``to``."""
    step = interval_of(query)
    window, events, provider = window_of(query, step), events_of(query), provider_of(query)
    (rows,) = await reader.run(
        timeseries_query(reader.database, tenant_id, window, events, provider)
    )
    return {
        "from": iso(window.start),
        "to": iso(window.end),
        "interval": step,
        "provider": provider,
        "events": events,
        "buckets": timeseries_of(rows, window, events),
    }


async def batch_report(
    reader: Reader, pool: asyncpg.Pool, tenant_id: str, batch_id: str
) -> dict[str, Any]:
    """One of the tenant's batches (``engine.batches.get_batch``: another tenant's or an
    unknown batch is NotFound): counts, rates, per-minute series, latency percentiles."""
    found = await batches.get_batch(pool, tenant_id, batch_id)
    bid, db, since = found["id"], reader.database, batch_since(found["created_at"])
    counts_rows, series_rows, latency_rows = await reader.run(
        batch_counts_query(db, tenant_id, bid, since),
        batch_series_query(db, tenant_id, bid, since),
        batch_latency_query(db, tenant_id, bid, since),
    )
    counts = counts_of(counts_rows)
    series, truncated = series_of(series_rows)
    return {
        "batch_id": bid,
        "counts": counts,
        "rates": rates_of(counts),
        "series": series,
        "series_truncated": truncated,
        "latency_ms": latency_of(latency_rows),
    }
