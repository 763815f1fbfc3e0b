"""``/api/keys``: the calling tenant's API keys (list, create shown once, revoke)."""

from __future__ import annotations

from aiohttp import web

from api import context
from engine import tenants


async def index(request: web.Request) -> web.Response:
    page = await tenants.list_keys(
        request.app[context.SERVICES].pool,
        request[context.TENANT],
        limit=context.query_int(request, "limit"),
        cursor=request.query.get("cursor"),
    )
    return context.json_response(page.as_json())


async def create(request: web.Request) -> web.Response:
    key, secret = await tenants.issue_key(
        request.app[context.SERVICES].pool, request[context.TENANT]
    )
    return context.json_response({**key.as_json(), "key": secret}, status=201)


async def revoke(request: web.Request) -> web.Response:
    await request.app[context.AUTH].revoke(request.match_info["id"], request[context.TENANT])
    return web.Response(status=204)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/keys", index)
    app.router.add_post("/api/keys", create)
    app.router.add_delete("/api/keys/{id}", revoke)
