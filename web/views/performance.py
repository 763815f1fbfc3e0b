"""Performance: live throughput, queue depth, worker processes and provider latency from
Prometheus (``web.prometheus``), with a link to the Grafana dashboard. Without
``PROMETHEUS_URL`` the page says so and how to set it."""

from __future__ import annotations

from aiohttp import web

from web import context, prometheus, render

GRAFANA_DASHBOARD = "/d/batchsender/batchsender-monitoring"


async def page(request: web.Request) -> web.Response:
    settings = request.app[context.SETTINGS]
    return await render.page(
        request,
        "performance.html",
        active="performance",
        title="Performance",
        prometheus_url=settings.prometheus_url,
        grafana=settings.grafana_url + GRAFANA_DASHBOARD if settings.grafana_url else None,
        panels=prometheus.PANELS,
    )


async def data(request: web.Request) -> web.Response:
    url = request.app[context.SETTINGS].prometheus_url
    if not url:
        return web.json_response(
            {"error": "Prometheus is not configured (PROMETHEUS_URL)"}, status=503
        )
    try:
        charts = await prometheus.performance(request.app[context.HTTP], url)
    except prometheus.PrometheusUnavailable as exc:
        return web.json_response({"error": str(exc)}, status=503)
    return web.json_response(charts)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/performance", page)
    app.router.add_get("/performance/data.json", data)
