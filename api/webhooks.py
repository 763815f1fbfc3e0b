"""``POST /webhooks/{provider}``: answer fast, the engine does the rest through NATS."""

from __future__ import annotations

from aiohttp import web

from api import body, context
from engine import webhooks


async def receive(request: web.Request) -> web.Response:
    count = await webhooks.receive(
        request.app[context.SERVICES],
        request.match_info["provider"],
        await body.read_bytes(request, request.app[context.SETTINGS]),  # with deadlines
        request.headers,
    )
    return context.json_response({"accepted": count})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/webhooks/{provider}", receive)
