"""API keys: the tenant's keys, a new one (shown once, on the page that made it, never
stored anywhere the dashboard could show it again), revoke (``engine.tenants``,
``engine.auth``: every API and dashboard process drops it before the answer, and the
key's dashboard sessions end, this one too when it is the session's own key)."""

from __future__ import annotations

from aiohttp import web

from engine import tenants
from web import context, render
from web.sessions import COOKIE, clear_cookie

PAGE = 50


async def _page(
    request: web.Request, *, new_key: str | None = None, status: int = 200
) -> web.Response:
    found = await tenants.list_keys(
        context.services(request).pool,
        context.tenant(request),
        limit=PAGE,
        cursor=context.cursor(request),
    )
    return await render.page(
        request,
        "keys.html",
        active="keys",
        title="API keys",
        status=status,
        keys=found.keys,
        next_cursor=found.next_cursor,
        paged=bool(context.cursor(request)),
        new_key=new_key,
        own_key_id=request[context.SESSION].key_id,
    )


async def page(request: web.Request) -> web.Response:
    return await _page(request)


async def create(request: web.Request) -> web.Response:
    _, secret = await tenants.issue_key(context.services(request).pool, context.tenant(request))
    return await _page(request, new_key=secret, status=201)


async def revoke(request: web.Request) -> web.Response:
    session = request[context.SESSION]
    key = await request.app[context.AUTH].revoke(request.match_info["id"], session.tenant_id)
    await request.app[context.SESSIONS].close_key(key.id)
    if key.id == session.key_id:
        response = render.redirect("/login?reason=revoked")
        if context.is_htmx(request):
            response = web.Response(status=204, headers={"HX-Redirect": "/login?reason=revoked"})
        clear_cookie(response, request, request.app[context.SETTINGS], COOKIE)
        return response
    return await render.flash_redirect(
        request, "/keys", f"Key {key.prefix}… is revoked; its sessions have ended."
    )


def add_routes(app: web.Application) -> None:
    app.router.add_get("/keys", page)
    app.router.add_post("/keys", create)
    app.router.add_post(r"/keys/{id:\d+}/revoke", revoke)
