"""``/api/queue``: consumer state and the tenant's dead-lettered messages."""

from __future__ import annotations

from aiohttp import web

from api import app as api_app
from engine import queues


async def stats(request: web.Request) -> web.Response:
    result = await queues.queue_stats(request.app[api_app.SERVICES], request[api_app.TENANT])
    return api_app.json_response(result)


async def dlq(request: web.Request) -> web.Response:
    result = await queues.dead_letters(
        request.app[api_app.SERVICES], request[api_app.TENANT],
        limit=api_app.query_int(request, "limit"), after=api_app.query_int(request, "cursor"),
    )  # fmt: skip
    return api_app.json_response(result)


async def replay(request: web.Request) -> web.Response:
    replayed = await queues.replay_request(
        request.app[api_app.SERVICES], request[api_app.TENANT], await api_app.json_body(request)
    )
    return api_app.json_response({"replayed": replayed})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/queue/stats", stats)
    app.router.add_get("/api/queue/dlq", dlq)
    app.router.add_post("/api/queue/dlq/replay", replay)
