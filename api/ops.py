"""Health, metrics and the OpenAPI document (all public)."""

from __future__ import annotations

from aiohttp import web

from api import context
from api.openapi import OPENAPI
from engine.metrics import render_metrics


async def health(request: web.Request) -> web.Response:
    checks = await request.app[context.HEALTH].check()
    down = [name for name, state in checks.items() if state != "ok"]
    if down:
        body = {"status": "down", "down": down, "checks": checks}
        return context.json_response(body, status=503)
    return context.json_response({"status": "ok", "checks": checks})


async def live(_request: web.Request) -> web.Response:
    return context.json_response({"status": "ok"})


async def prometheus(request: web.Request) -> web.Response:
    body = await render_metrics(request.app[context.SERVICES])
    return web.Response(
        body=body,
        content_type="text/plain",
        charset="utf-8",
        headers={"X-Content-Type-Options": "nosniff"},
    )


async def openapi(_request: web.Request) -> web.Response:
    return context.json_response(OPENAPI)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/health", health)
    app.router.add_get("/health/live", live)
    app.router.add_get("/api/metrics", prometheus)
    app.router.add_get("/api/openapi.json", openapi)
