"""``POST /webhooks/{provider}`` (the server's default account) and
``POST /webhooks/{provider}/{account_id}`` (a tenant's provider account): answer fast,
the engine does the rest through NATS (``engine.webhooks``)."""

from __future__ import annotations

from aiohttp import web

from api import body, context
from engine import webhooks


async def receive(request: web.Request) -> web.Response:
    received = await webhooks.receive(
        request.app[context.SERVICES],
        request.match_info["provider"],
        await body.read_bytes(request, request.app[context.SETTINGS]),  # with deadlines
        request.headers,
        request.match_info.get("account_id"),
    )
    return context.json_response(received.answer())


def add_routes(app: web.Application) -> None:
    app.router.add_post("/webhooks/{provider}", receive)
    app.router.add_post("/webhooks/{provider}/{account_id}", receive)
