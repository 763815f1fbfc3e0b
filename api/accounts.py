"""``/api/provider-accounts``: a tenant's accounts at its providers (``engine.accounts``)."""

from __future__ import annotations

from aiohttp import web

from api import context
from engine import accounts


async def create(request: web.Request) -> web.Response:
    body = await context.json_body(request)
    settings = request.app[context.SETTINGS]
    created = await accounts.create(
        request.app[context.SERVICES].pool,
        accounts.Sealer(settings.credentials_keys),
        request[context.TENANT],
        body,
        allow_private=settings.provider_allow_private_urls,
    )
    return context.json_response(created, status=201)


async def replace(request: web.Request) -> web.Response:
    body = await context.json_body(request)
    settings = request.app[context.SETTINGS]
    replaced = await accounts.replace(
        request.app[context.SERVICES].pool,
        accounts.Sealer(settings.credentials_keys),
        request[context.TENANT],
        request.match_info["ref"],
        body,
        allow_private=settings.provider_allow_private_urls,
    )
    return context.json_response(replaced)


async def index(request: web.Request) -> web.Response:
    page = await accounts.list_accounts(
        request.app[context.SERVICES].pool,
        request[context.TENANT],
        limit=context.query_int(request, "limit", accounts.MAX_ACCOUNTS_PAGE),
        after=request.query.get("cursor"),
    )
    return context.json_response(page)


async def show(request: web.Request) -> web.Response:
    found = await accounts.get(
        request.app[context.SERVICES].pool, request[context.TENANT], request.match_info["ref"]
    )
    return context.json_response(found)


async def check(request: web.Request) -> web.Response:
    """Test the account's credentials with its provider: 200 whatever they answer."""
    settings = request.app[context.SETTINGS]
    result = await accounts.check(
        request.app[context.SERVICES].pool,
        accounts.Sealer(settings.credentials_keys),
        request[context.TENANT],
        request.match_info["ref"],
        allow_private=settings.provider_allow_private_urls,
    )
    return context.json_response(result)


async def remove(request: web.Request) -> web.Response:
    await accounts.delete(
        request.app[context.SERVICES].pool, request[context.TENANT], request.match_info["ref"]
    )
    return web.Response(status=204)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/provider-accounts", create)
    app.router.add_get("/api/provider-accounts", index)
    app.router.add_get("/api/provider-accounts/{ref}", show)
    app.router.add_put("/api/provider-accounts/{ref}", replace)
    app.router.add_delete("/api/provider-accounts/{ref}", remove)
    app.router.add_post("/api/provider-accounts/{ref}/check", check)
