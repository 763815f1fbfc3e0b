"""``/api/queue``: consumer state and the tenant's dead-lettered messages."""

from __future__ import annotations

from aiohttp import web

from api import context
from engine import deadletters, queue_stats


async def stats(request: web.Request) -> web.Response:
    result = await queue_stats.queue_stats(request.app[context.SERVICES], request[context.TENANT])
    return context.json_response(result)


async def dlq(request: web.Request) -> web.Response:
    result = await deadletters.dead_letters(
        request.app[context.SERVICES],
        request[context.TENANT],
        limit=context.query_int(request, "limit"),
        after=context.query_int(request, "cursor"),
    )
    return context.json_response(result)


async def replay(request: web.Request) -> web.Response:
    replayed = await deadletters.replay_request(
        request.app[context.SERVICES], request[context.TENANT], await context.json_body(request)
    )
    return context.json_response({"replayed": replayed})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/queue/stats", stats)
    app.router.add_get("/api/queue/dlq", dlq)
    app.router.add_post("/api/queue/dlq/replay", replay)
