"""Analytics: volume and delivery, bounce, complaint, open and click rates over time, for
all providers or one, and the totals per provider (``engine.analytics``: ClickHouse's
per-minute aggregate, the tenant's rows only). ClickHouse down: an error state, the rest
of the dashboard works."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from engine import analytics
from web import context, render

# range -> (its length, the interval of its buckets)
RANGES: dict[str, tuple[timedelta, str]] = {
    "1h": (timedelta(hours=1), "minute"),
    "24h": (timedelta(hours=24), "900"),
    "7d": (timedelta(days=7), "hour"),
    "30d": (timedelta(days=30), "day"),
}
DEFAULT_RANGE = "24h"
VOLUME = ("sent", "delivered", "failed", "bounced", "complained", "opened", "clicked")
RATES = ("delivery_rate", "bounce_rate", "complaint_rate", "open_rate", "click_rate")
RATE_LABELS = {
    "delivery_rate": "delivered / sent",
    "bounce_rate": "bounced / sent",
    "complaint_rate": "complained / delivered",
    "open_rate": "opened / delivered",
    "click_rate": "clicked / delivered",
    "failure_rate": "failed / (sent + failed)",
}


def _query(request: web.Request) -> tuple[str, str | None, dict[str, str]]:
    chosen = request.query.get("range", DEFAULT_RANGE)
    chosen = chosen if chosen in RANGES else DEFAULT_RANGE
    provider = context.choice(request, "provider", analytics.PROVIDER_NAMES)
    span, interval = RANGES[chosen]
    now = datetime.now(UTC)
    query = {
        "from": analytics.iso_of(now - span),
        "to": analytics.iso_of(now),
        "interval": interval,
    }
    if provider:
        query["provider"] = provider
    return chosen, provider, query


async def page(request: web.Request) -> web.Response:
    chosen, provider, query = _query(request)
    reader, tenant = request.app[context.READER], context.tenant(request)
    error, overview, per_provider = None, None, []
    try:
        overall, *each = await asyncio.gather(
            analytics.overview(reader, tenant, query),
            *(
                analytics.overview(reader, tenant, {**query, "provider": p})
                for p in analytics.PROVIDER_NAMES
            ),
        )
        overview = overall
        per_provider = [
            o
            for o in each
            if o["counts"]["sent"] or o["counts"]["failed"] or o["counts"]["delivered"]
        ]
    except analytics.AnalyticsUnavailable as exc:
        error = exc.message
    return await render.page(
        request,
        "analytics.html",
        active="analytics",
        title="Analytics",
        ranges=list(RANGES),
        chosen=chosen,
        provider=provider,
        providers=analytics.PROVIDER_NAMES,
        overview=overview,
        per_provider=per_provider,
        rates=RATES + ("failure_rate",),
        rate_labels=RATE_LABELS,
        error=error,
        data_url=f"/analytics/data.json?range={chosen}"
        + (f"&provider={provider}" if provider else ""),
    )


def charts_of(result: dict[str, Any]) -> dict[str, Any]:
    buckets = result["buckets"]
    x = [
        int(datetime.fromisoformat(b["start"].replace("Z", "+00:00")).timestamp()) for b in buckets
    ]
    rates = [analytics.rates_of(b["counts"]) for b in buckets]
    return {
        "volume": {
            "x": x,
            "series": [{"label": e, "values": [b["counts"][e] for b in buckets]} for e in VOLUME],
            "unit": f"events per {result['interval'] // 60} min",
        },
        "rates": {
            "x": x,
            "series": [
                {"label": name.removesuffix("_rate"), "values": [r[name] for r in rates]}
                for name in RATES
            ],
            "unit": "ratio",
            "percent": True,
        },
    }


async def data(request: web.Request) -> web.Response:
    _, _, query = _query(request)
    query["events"] = ",".join(VOLUME)
    try:
        result = await analytics.timeseries(
            request.app[context.READER], context.tenant(request), query
        )
    except analytics.AnalyticsUnavailable as exc:
        return web.json_response({"error": exc.message}, status=503)
    return web.json_response(charts_of(result))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/analytics", page)
    app.router.add_get("/analytics/data.json", data)
