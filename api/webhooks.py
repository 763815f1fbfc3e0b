"""``POST /webhooks/{provider}``: answer fast, the engine does the rest through NATS."""

from __future__ import annotations

from aiohttp import web

from api import app as api_app
from api import body
from engine import webhooks


async def receive(request: web.Request) -> web.Response:
    count = await webhooks.receive(
        request.app[api_app.SERVICES],
        request.match_info["provider"],
        await body.read_bytes(request, request.app[api_app.SETTINGS]),  # with deadlines
        request.headers,
    )
    return api_app.json_response({"accepted": count})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/webhooks/{provider}", receive)
