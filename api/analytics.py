"""``/api/analytics``: overview, one batch, time series (``engine.analytics``: ClickHouse)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from api import context
from engine import analytics

READER = web.AppKey("analytics_reader", analytics.Reader)


async def overview(request: web.Request) -> web.Response:
    result = await analytics.overview(request.app[READER], request[context.TENANT], request.query)
    return context.json_response(result)


async def batch(request: web.Request) -> web.Response:
    result = await analytics.batch_report(
        request.app[READER],
        request.app[context.SERVICES].pool,
        request[context.TENANT],
        request.match_info["id"],
    )
    return context.json_response(result)


async def timeseries(request: web.Request) -> web.Response:
    result = await analytics.timeseries(request.app[READER], request[context.TENANT], request.query)
    return context.json_response(result)


async def _reader(app: web.Application) -> AsyncIterator[None]:
    """The ClickHouse clients of the analytics routes (opened at the first query)."""
    reader = analytics.Reader(app[context.SETTINGS])
    app[READER] = reader
    yield
    reader.close()


def add_routes(app: web.Application) -> None:
    app.cleanup_ctx.append(_reader)
    app.router.add_get("/api/analytics/overview", overview)
    app.router.add_get("/api/analytics/batches/{id}", batch)
    app.router.add_get("/api/analytics/timeseries", timeseries)
