"""``/api/webhook-endpoints``: where a tenant's batch events are posted
(``engine.webhook_endpoints``), with each endpoint's delivery log and replay
(``engine.webhook_deliveries``)."""

from __future__ import annotations

from aiohttp import web

from api import context
from engine import webhook_deliveries, webhook_endpoints
from engine.accounts import Sealer


async def create(request: web.Request) -> web.Response:
    body = await context.json_body(request)
    settings = request.app[context.SETTINGS]
    created = await webhook_endpoints.create(
        request.app[context.SERVICES].pool,
        Sealer(settings.credentials_keys),
        request[context.TENANT],
        body,
        allow_private=settings.webhook_allow_private_urls,
    )
    return context.json_response(created, status=201)


async def index(request: web.Request) -> web.Response:
    page = await webhook_endpoints.list_endpoints(
        request.app[context.SERVICES].pool,
        request[context.TENANT],
        limit=context.query_int(request, "limit"),
        cursor=request.query.get("cursor"),
    )
    return context.json_response(page)


async def show(request: web.Request) -> web.Response:
    found = await webhook_endpoints.get(
        request.app[context.SERVICES].pool, request[context.TENANT], request.match_info["id"]
    )
    return context.json_response(found)


async def remove(request: web.Request) -> web.Response:
    await webhook_endpoints.delete(
        request.app[context.SERVICES].pool, request[context.TENANT], request.match_info["id"]
    )
    return web.Response(status=204)


async def deliveries(request: web.Request) -> web.Response:
    page = await webhook_deliveries.list_deliveries(
        request.app[context.SERVICES].pool,
        request[context.TENANT],
        request.match_info["id"],
        status=request.query.get("status"),
        limit=context.query_int(request, "limit"),
        cursor=request.query.get("cursor"),
    )
    return context.json_response(page)


async def replay(request: web.Request) -> web.Response:
    delivery = await webhook_deliveries.replay(
        request.app[context.SERVICES].pool,
        request[context.TENANT],
        request.match_info["id"],
        request.match_info["delivery_id"],
    )
    return context.json_response(delivery, status=202)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/webhook-endpoints", create)
    app.router.add_get("/api/webhook-endpoints", index)
    app.router.add_get("/api/webhook-endpoints/{id}", show)
    app.router.add_delete("/api/webhook-endpoints/{id}", remove)
    app.router.add_get("/api/webhook-endpoints/{id}/deliveries", deliveries)
    app.router.add_post("/api/webhook-endpoints/{id}/deliveries/{delivery_id}/replay", replay)
