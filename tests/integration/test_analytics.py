"""``/api/analytics``: known events written through the engine's own insert path into the
session's real ClickHouse (so the per-minute view fills), batches of two tenants in the
session's PostgreSQL, answers of the real API checked to the number."""

from __future__ import annotations

import dataclasses
import socket
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from api.app import create_app
from engine.analytics import EVENT_TYPES, RATES
from engine.clickhouse import EVENT_COLUMNS, ClickHouse
from engine.config import Settings
from engine.services import Services
from engine.tenants import create_key
from tests.integration.conftest import bearer

T0 = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)  # a whole hour, long ago: no other events near
MINUTE, HOUR = timedelta(minutes=1), timedelta(hours=1)
# Latencies of batch A1's 100 sent events: sorted, indexes 0-59 are 10 ms, 60-95 20 ms and
# 96-99 50 ms, so p50, p95 and p99 are 10, 20 and 50 by any quantile definition.
A1_LATENCIES = [10] * 60 + [20] * 36 + [50] * 4


def z(when: datetime) -> str:
    return when.isoformat().replace("+00:00", "Z")


@dataclasses.dataclass
class Data:
    key_a: str
    key_b: str
    key_empty: str
    a1: str
    a2: str
    b1: str


def _rows(
    at: datetime,
    tenant: str,
    batch: str,
    event: str,
    provider: str,
    seqs: range,
    latencies: list[int] | None = None,
) -> list[tuple[Any, ...]]:
    latencies = latencies or [0] * len(seqs)
    return [
        (
            int(at.timestamp()) + i % 60,
            tenant,
            batch,
            seq,
            event,
            provider,
            "example.com",
            latency,
            1,
            "",
            "",
        )
        for i, (seq, latency) in enumerate(zip(seqs, latencies, strict=True))
    ]


async def _draft(client: TestClient, key: str, provider: str) -> str:
    body = {
        "name": "analytics",
        "from_email": "news@shop.example",
        "subject": "Hi",
        "text": "Hello",
        "provider": provider,
        "draft": True,
    }
    response = await client.post("/api/batches", json=body, headers=bearer(key))
    assert response.status == 201, await response.text()
    return (await response.json())["id"]


@pytest.fixture(scope="module")
async def data(client: TestClient, services: Services, migrated: Settings) -> Data:
    suffix = uuid.uuid4().hex[:8]
    tenant_a, tenant_b, tenant_empty = f"ana{suffix}", f"anb{suffix}", f"ane{suffix}"
    key_a, key_b = (
        await create_key(services.pool, tenant_a),
        await create_key(services.pool, tenant_b),
    )
    key_empty = await create_key(services.pool, tenant_empty)
    a1, a2 = await _draft(client, key_a, "mock"), await _draft(client, key_a, "smtp")
    b1 = await _draft(client, key_b, "mock")
    # Created before their events (the batch queries look no further back than a day
    # before a batch's creation).
    await services.pool.execute(
        "UPDATE batches SET created_at = $1 WHERE id = ANY($2::uuid[])",
        T0 - timedelta(days=2, hours=1),
        [uuid.UUID(a1), uuid.UUID(a2), uuid.UUID(b1)],
    )
    rows = [
        # A1 (mock): 100 sent at T0, 5 failed a minute later, webhooks two minutes later.
        *_rows(T0, tenant_a, a1, "sent", "mock", range(100), A1_LATENCIES),
        *_rows(T0 + MINUTE, tenant_a, a1, "failed", "mock", range(100, 105)),
        *_rows(T0 + 2 * MINUTE, tenant_a, a1, "delivered", "mock", range(80)),
        *_rows(T0 + 2 * MINUTE, tenant_a, a1, "bounced", "mock", range(80, 83)),
        *_rows(T0 + 2 * MINUTE, tenant_a, a1, "complained", "mock", range(83, 85)),
        *_rows(T0 + 2 * MINUTE, tenant_a, a1, "opened", "mock", range(40)),
        *_rows(T0 + 2 * MINUTE, tenant_a, a1, "clicked", "mock", range(10)),
        # A2 (smtp): 10 sent and 2 failed in the next hour, then 10 delivered; and 3 sent
        # two days before T0 (outside the ranges asked below).
        *_rows(T0 + HOUR + MINUTE, tenant_a, a2, "sent", "smtp", range(10), [7] * 10),
        *_rows(T0 + HOUR + MINUTE, tenant_a, a2, "failed", "smtp", range(10, 12)),
        *_rows(T0 + HOUR + 2 * MINUTE, tenant_a, a2, "delivered", "smtp", range(10)),
        *_rows(T0 - timedelta(days=2), tenant_a, a2, "sent", "smtp", range(12, 15), [7] * 3),
        # B1 (mock), same minutes as A1: 50 sent (1000 ms each) and 50 delivered.
        *_rows(T0, tenant_b, b1, "sent", "mock", range(50), [1000] * 50),
        *_rows(T0 + 2 * MINUTE, tenant_b, b1, "delivered", "mock", range(50)),
    ]
    clickhouse = ClickHouse(migrated)
    try:
        half = len(rows) // 2  # two inserts: the view's parts are summed by queries
        for part in (rows[:half], rows[half:]):
            clickhouse.insert_events([list(column) for column in zip(*part, strict=True)])
    finally:
        clickhouse.close()
    assert len(EVENT_COLUMNS) == len(rows[0])
    return Data(key_a, key_b, key_empty, a1, a2, b1)


async def get(client: TestClient, path: str, key: str, **params: str) -> dict[str, Any]:
    response = await client.get(path, params=params, headers=bearer(key))
    assert response.status == 200, await response.text()
    assert response.content_type == "application/json"
    return await response.json()


async def error(
    client: TestClient, path: str, key: str | None, status: int, code: str, **params: str
) -> dict[str, Any]:
    headers = bearer(key) if key else {}
    response = await client.get(path, params=params, headers=headers)
    assert response.status == status, await response.text()
    body = await response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code and body["error"]["message"]
    return body["error"]


def counts(**found: int) -> dict[str, int]:
    return dict.fromkeys(EVENT_TYPES, 0) | found


def rates(c: dict[str, int]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name, (numerator, denominators) in RATES.items():
        total = sum(c[d] for d in denominators)
        out[name] = round(c[numerator] / total, 6) if total else None
    return out


# --- overview -------------------------------------------------------------------------------

OVERVIEW = "/api/analytics/overview"


async def test_overview_totals_and_rates(client: TestClient, data: Data) -> None:
    body = await get(client, OVERVIEW, data.key_a, **{"from": z(T0), "to": z(T0 + 2 * HOUR)})
    expected = counts(
        sent=110, failed=7, delivered=90, bounced=3, complained=2, opened=40, clicked=10
    )
    assert body == {
        "from": "2024-05-01T10:00:00Z",
        "to": "2024-05-01T12:00:00Z",
        "provider": None,
        "counts": expected,
        "rates": {
            "delivery_rate": 0.818182,  # 90 / 110
            "bounce_rate": 0.027273,  # 3 / 110
            "complaint_rate": 0.022222,  # 2 / 90
            "open_rate": 0.444444,  # 40 / 90
            "click_rate": 0.111111,  # 10 / 90
            "failure_rate": 0.059829,  # 7 / 117
        },
    }
    assert body["rates"] == rates(expected)


async def test_overview_by_provider_and_range(client: TestClient, data: Data) -> None:
    span = {"from": z(T0), "to": z(T0 + 2 * HOUR)}
    mock = await get(client, OVERVIEW, data.key_a, provider="mock", **span)
    assert mock["provider"] == "mock"
    assert mock["counts"] == counts(
        sent=100, failed=5, delivered=80, bounced=3, complained=2, opened=40, clicked=10
    )
    smtp = await get(client, OVERVIEW, data.key_a, provider="smtp", **span)
    assert smtp["counts"] == counts(sent=10, failed=2, delivered=10)
    assert smtp["rates"]["delivery_rate"] == 1.0
    assert smtp["rates"]["complaint_rate"] == 0.0
    none = await get(client, OVERVIEW, data.key_a, provider="ses", **span)
    assert none["counts"] == counts()
    assert set(none["rates"].values()) == {None}  # every denominator is 0
    # the three events two days before; the hour after T0 only; a partial minute rounded
    before = await get(
        client, OVERVIEW, data.key_a, **{"from": z(T0 - timedelta(days=3)), "to": z(T0)}
    )
    assert before["counts"] == counts(sent=3)
    second_hour = await get(
        client, OVERVIEW, data.key_a, **{"from": z(T0 + HOUR), "to": z(T0 + 2 * HOUR)}
    )
    assert second_hour["counts"] == counts(sent=10, failed=2, delivered=10)
    rounded = await get(
        client,
        OVERVIEW,
        data.key_a,
        **{"from": "2024-05-01T10:01:30Z", "to": "2024-05-01T10:01:31"},
    )
    assert (rounded["from"], rounded["to"]) == ("2024-05-01T10:01:00Z", "2024-05-01T10:02:00Z")
    assert rounded["counts"] == counts(failed=5)
    offset = await get(
        client,
        OVERVIEW,
        data.key_a,
        **{"from": "2024-05-01T12:00:00+02:00", "to": "2024-05-01T12:01:00+02:00"},
    )
    assert offset["counts"] == counts(sent=100)  # 10:00 UTC


async def test_overview_default_range_is_the_last_24_hours(client: TestClient, data: Data) -> None:
    body = await get(client, OVERVIEW, data.key_a)
    start = datetime.fromisoformat(body["from"].replace("Z", "+00:00"))
    end = datetime.fromisoformat(body["to"].replace("Z", "+00:00"))
    assert end - start in (timedelta(hours=24), timedelta(hours=24, minutes=1))
    assert abs(end - datetime.now(UTC)) < timedelta(minutes=2)
    assert body["counts"] == counts()  # all of A's events are from 2024


async def test_tenants_see_only_their_own_events(client: TestClient, data: Data) -> None:
    span = {"from": z(T0 - timedelta(days=3)), "to": z(T0 + 2 * HOUR)}
    b = await get(client, OVERVIEW, data.key_b, **span)
    assert b["counts"] == counts(sent=50, delivered=50)
    empty = await get(client, OVERVIEW, data.key_empty, **span)
    assert empty["counts"] == counts()
    series = await get(client, TIMESERIES, data.key_b, interval="day", **span)
    assert sum(sum(bucket["counts"].values()) for bucket in series["buckets"]) == 100


# --- one batch ---------------------------------------------------------------------------------


async def test_batch_counts_series_and_latency(client: TestClient, data: Data) -> None:
    body = await get(client, f"/api/analytics/batches/{data.a1}", data.key_a)
    expected = counts(
        sent=100, failed=5, delivered=80, bounced=3, complained=2, opened=40, clicked=10
    )
    assert body["batch_id"] == data.a1
    assert body["counts"] == expected
    assert body["rates"] == rates(expected)
    at = ["2024-05-01T10:00:00Z", "2024-05-01T10:01:00Z", "2024-05-01T10:02:00Z"]
    assert body["series"] == [
        {"minute": at[0], "event": "sent", "count": 100},
        {"minute": at[1], "event": "failed", "count": 5},
        {"minute": at[2], "event": "bounced", "count": 3},
        {"minute": at[2], "event": "clicked", "count": 10},
        {"minute": at[2], "event": "complained", "count": 2},
        {"minute": at[2], "event": "delivered", "count": 80},
        {"minute": at[2], "event": "opened", "count": 40},
    ]
    assert body["series_truncated"] is False
    assert body["latency_ms"] == {"samples": 100, "p50": 10, "p95": 20, "p99": 50, "max": 50}


async def test_batch_of_other_minutes_and_tenants(client: TestClient, data: Data) -> None:
    a2 = await get(client, f"/api/analytics/batches/{data.a2.upper()}", data.key_a)
    assert a2["batch_id"] == data.a2
    assert a2["counts"] == counts(sent=13, failed=2, delivered=10)
    assert a2["series"][0] == {"minute": "2024-04-29T10:00:00Z", "event": "sent", "count": 3}
    assert a2["latency_ms"] == {"samples": 13, "p50": 7, "p95": 7, "p99": 7, "max": 7}
    b1 = await get(client, f"/api/analytics/batches/{data.b1}", data.key_b)
    assert b1["counts"] == counts(sent=50, delivered=50)
    assert b1["latency_ms"] == {"samples": 50, "p50": 1000, "p95": 1000, "p99": 1000, "max": 1000}


async def test_batch_without_events(client: TestClient, data: Data) -> None:
    fresh = await _draft(client, data.key_empty, "mock")
    body = await get(client, f"/api/analytics/batches/{fresh}", data.key_empty)
    assert body == {
        "batch_id": fresh,
        "counts": counts(),
        "rates": dict.fromkeys(RATES),
        "series": [],
        "series_truncated": False,
        "latency_ms": {"samples": 0, "p50": None, "p95": None, "p99": None, "max": None},
    }


async def test_another_tenants_or_an_unknown_batch_is_not_found(
    client: TestClient, data: Data
) -> None:
    for batch_id in (data.a1, str(uuid.uuid4()), "not-a-uuid"):
        mine = await error(
            client, f"/api/analytics/batches/{batch_id}", data.key_b, 404, "not_found"
        )
        response = await client.get(f"/api/batches/{batch_id}", headers=bearer(data.key_b))
        assert response.status == 404
        assert (await response.json())["error"] == mine  # exactly like GET /api/batches/{id}
    await error(client, f"/api/analytics/batches/{data.b1}", data.key_a, 404, "not_found")


# --- time series ---------------------------------------------------------------------------------

TIMESERIES = "/api/analytics/timeseries"


async def test_hourly_buckets(client: TestClient, data: Data) -> None:
    body = await get(
        client,
        TIMESERIES,
        data.key_a,
        interval="hour",
        events="sent,failed",
        **{"from": z(T0), "to": z(T0 + 2 * HOUR)},
    )
    assert body == {
        "from": "2024-05-01T10:00:00Z",
        "to": "2024-05-01T12:00:00Z",
        "interval": 3600,
        "provider": None,
        "events": ["sent", "failed"],
        "buckets": [
            {"start": "2024-05-01T10:00:00Z", "counts": {"sent": 100, "failed": 5}},
            {"start": "2024-05-01T11:00:00Z", "counts": {"sent": 10, "failed": 2}},
        ],
    }


async def test_minute_day_and_provider_buckets(client: TestClient, data: Data) -> None:
    minutes = await get(
        client,
        TIMESERIES,
        data.key_a,
        interval="60",
        events="delivered,delivered",
        **{"from": z(T0), "to": z(T0 + 3 * MINUTE)},
    )
    assert minutes["events"] == ["delivered"]
    assert [(b["start"], b["counts"]) for b in minutes["buckets"]] == [
        ("2024-05-01T10:00:00Z", {"delivered": 0}),
        ("2024-05-01T10:01:00Z", {"delivered": 0}),
        ("2024-05-01T10:02:00Z", {"delivered": 80}),
    ]
    days = await get(
        client,
        TIMESERIES,
        data.key_a,
        interval="day",
        **{"from": "2024-04-29T00:00:00Z", "to": "2024-05-01T23:00:00Z"},
    )
    assert days["events"] == list(EVENT_TYPES)
    assert [(b["start"], b["counts"]) for b in days["buckets"]] == [
        ("2024-04-29T00:00:00Z", counts(sent=3)),
        ("2024-04-30T00:00:00Z", counts()),
        (
            "2024-05-01T00:00:00Z",
            counts(
                sent=110, failed=7, delivered=90, bounced=3, complained=2, opened=40, clicked=10
            ),
        ),
    ]
    smtp = await get(
        client,
        TIMESERIES,
        data.key_a,
        interval="900",
        events="sent",
        provider="smtp",
        **{"from": z(T0 + HOUR), "to": z(T0 + HOUR + 30 * MINUTE)},
    )
    assert smtp["provider"] == "smtp"
    assert [(b["start"], b["counts"]) for b in smtp["buckets"]] == [
        ("2024-05-01T11:00:00Z", {"sent": 10}),
        ("2024-05-01T11:15:00Z", {"sent": 0}),
    ]


async def test_default_timeseries_is_hourly_over_the_last_day(
    client: TestClient, data: Data
) -> None:
    body = await get(client, TIMESERIES, data.key_a)
    assert body["interval"] == 3600
    assert len(body["buckets"]) in (24, 25)
    assert all(set(b["counts"].values()) == {0} for b in body["buckets"])


# --- validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "params", "code"),
    [
        (OVERVIEW, {"from": "yesterday"}, "invalid_time"),
        (OVERVIEW, {"from": "2024-05-01"}, "invalid_time"),
        (OVERVIEW, {"to": "2024-13-01T00:00:00Z"}, "invalid_time"),
        (OVERVIEW, {"from": "1969-12-31T23:59:59Z"}, "invalid_time"),
        (OVERVIEW, {"to": "2100-01-01T00:00:00Z"}, "invalid_time"),
        (OVERVIEW, {"from": "2024-05-01T11:00:00Z", "to": "2024-05-01T10:00:00Z"}, "invalid_range"),
        (OVERVIEW, {"from": "2024-05-01T10:00:00Z", "to": "2024-05-01T10:00:00Z"}, "invalid_range"),
        (OVERVIEW, {"from": "3000-01-01T00:00:00Z"}, "invalid_time"),
        (OVERVIEW, {"from": "2099-01-01T00:00:00Z"}, "invalid_range"),  # after now (the default to)
        (
            OVERVIEW,
            {"from": "2023-01-01T00:00:00Z", "to": "2024-02-05T00:00:01Z"},
            "range_too_long",
        ),
        (OVERVIEW, {"provider": "nope"}, "unknown_provider"),
        (OVERVIEW, {"provider": ""}, "unknown_provider"),
        (TIMESERIES, {"interval": "week"}, "invalid_interval"),
        (TIMESERIES, {"interval": "61"}, "invalid_interval"),
        (
            TIMESERIES,
            {"interval": "minute", "from": "2024-05-01T00:00:00Z", "to": "2024-05-02T01:00:01Z"},
            "too_many_buckets",
        ),
        (
            TIMESERIES,
            {"interval": "hour", "from": "2024-01-01T00:00:00Z", "to": "2024-03-05T00:00:00Z"},
            "too_many_buckets",
        ),
        (
            TIMESERIES,
            {"interval": "day", "from": "2023-01-01T00:00:00Z", "to": "2024-02-05T00:00:01Z"},
            "range_too_long",
        ),
        (TIMESERIES, {"events": "sent,nope"}, "unknown_event"),
        (TIMESERIES, {"events": ""}, "unknown_event"),
        (TIMESERIES, {"events": "sent, failed"}, "unknown_event"),
        (TIMESERIES, {"provider": "Mock"}, "unknown_provider"),
        (TIMESERIES, {"from": "2024-05-01T10:00:00+25:00"}, "invalid_time"),
    ],
)
async def test_bad_parameters_are_400(
    client: TestClient, data: Data, path: str, params: dict[str, str], code: str
) -> None:
    found = await error(client, path, data.key_a, 400, code, **params)
    assert found["details"]["field"] in ("from", "to", "provider", "interval", "events")


async def test_limits_that_just_fit(client: TestClient, data: Data) -> None:
    span = {"from": "2024-01-01T00:00:00Z", "to": "2025-02-04T00:00:00Z"}  # 400 days
    assert (
        len((await get(client, TIMESERIES, data.key_a, interval="day", **span))["buckets"]) == 400
    )
    assert (await get(client, OVERVIEW, data.key_a, **span))["counts"]["sent"] == 113
    minutes = {"interval": "minute", "from": "2024-05-01T00:00:00Z", "to": "2024-05-02T01:00:00Z"}
    assert len((await get(client, TIMESERIES, data.key_a, **minutes))["buckets"]) == 1500


async def test_analytics_need_a_key(client: TestClient, data: Data) -> None:
    for path in (OVERVIEW, TIMESERIES, f"/api/analytics/batches/{data.a1}"):
        await error(client, path, None, 401, "unauthorized")
        await error(client, path, "bsk_nope", 401, "unauthorized")


async def test_clickhouse_down_is_503(migrated: Settings, data: Data) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    broken = dataclasses.replace(migrated, clickhouse_url=f"http://127.0.0.1:{port}")
    async with TestClient(TestServer(create_app(broken), host="127.0.0.1")) as down:
        for path in (OVERVIEW, TIMESERIES, f"/api/analytics/batches/{data.a1}"):
            await error(down, path, data.key_a, 503, "analytics_unavailable")
        await error(down, OVERVIEW, data.key_a, 400, "unknown_provider", provider="x")
