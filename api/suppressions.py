"""``/api/suppressions`` (the tenant's list) and the public one-click ``/unsubscribe/{token}``."""

from __future__ import annotations

import html

from aiohttp import web

from api import context
from engine import suppressions

_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>Unsubscribe</title></head>
<body style="font-family: sans-serif; max-width: 32em; margin: 4em auto">{body}</body></html>"""


async def index(request: web.Request) -> web.Response:
    limit = context.query_int(request, "limit", 100)
    result = await suppressions.list_suppressions(
        request.app[context.SERVICES].pool,
        request[context.TENANT],
        limit=limit,
        after=request.query.get("cursor"),
    )
    return context.json_response(result)


async def add(request: web.Request) -> web.Response:
    body = await context.json_body(request)
    added = await suppressions.add_suppressions(
        request.app[context.SERVICES].pool, request[context.TENANT], body
    )
    return context.json_response({"added": added}, status=201)


async def remove(request: web.Request) -> web.Response:
    await suppressions.remove_suppression(
        request.app[context.SERVICES].pool, request[context.TENANT], request.match_info["email"]
    )
    return web.Response(status=204)


async def confirm(request: web.Request) -> web.Response:
    """A page with one button: a GET (a link scanner, a preview) never unsubscribes."""
    services = request.app[context.SERVICES]
    _, email = await suppressions.read_token(
        services.pool, services.settings.unsubscribe_secret, request.match_info["token"]
    )
    body = (
        f"<p>Stop e-mail to <b>{html.escape(email)}</b>?</p><form method='post'>"
        "<button name='List-Unsubscribe' value='One-Click'>Unsubscribe</button></form>"
    )
    return web.Response(text=_PAGE.format(body=body), content_type="text/html")


async def one_click(request: web.Request) -> web.Response:
    """RFC 8058 one-click unsubscribe (and the confirmation page's button)."""
    services = request.app[context.SERVICES]
    email = await suppressions.unsubscribe(
        services.pool, services.settings.unsubscribe_secret, request.match_info["token"]
    )
    body = f"<p><b>{html.escape(email)}</b> is unsubscribed.</p>"
    return web.Response(text=_PAGE.format(body=body), content_type="text/html")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/suppressions", index)
    app.router.add_post("/api/suppressions", add)
    app.router.add_delete("/api/suppressions/{email}", remove)
    app.router.add_get("/unsubscribe/{token}", confirm)
    app.router.add_post("/unsubscribe/{token}", one_click)
