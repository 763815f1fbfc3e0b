"""``/api/queue``: consumer state and the tenant's dead-lettered messages."""

from __future__ import annotations

from aiohttp import web

from api import app as api_app
from engine import queues
from engine.errors import ValidationError


async def stats(request: web.Request) -> web.Response:
    return api_app.json_response(await queues.queue_stats(request.app[api_app.SERVICES]))


async def dlq(request: web.Request) -> web.Response:
    result = await queues.dead_letters(
        request.app[api_app.SERVICES], request[api_app.TENANT],
        limit=api_app.query_int(request, "limit", 50), after=api_app.query_int(request, "cursor", 0),
    )  # fmt: skip
    return api_app.json_response(result)


async def replay(request: web.Request) -> web.Response:
    body = await api_app.json_body(request)
    seqs = body.get("seqs") if isinstance(body, dict) else None
    everything = isinstance(body, dict) and body.get("all") is True
    valid = isinstance(seqs, list) and seqs and all(type(s) is int for s in seqs)
    if everything == bool(valid):
        raise ValidationError(
            'send {"seqs": [...]} (from /api/queue/dlq) or {"all": true}', {"field": "seqs"}
        )
    replayed = await queues.replay(
        request.app[api_app.SERVICES], request[api_app.TENANT], None if everything else seqs
    )
    return api_app.json_response({"replayed": replayed})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/queue/stats", stats)
    app.router.add_get("/api/queue/dlq", dlq)
    app.router.add_post("/api/queue/dlq/replay", replay)
