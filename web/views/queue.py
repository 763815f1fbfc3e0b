"""Queue: the pipeline's streams and consumers with their depth (shared by every tenant,
as ``GET /api/queue/stats`` shows them), the tenant's intake messages waiting, and its own
dead letters with replay (``engine.queue_stats``, ``engine.deadletters``)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from engine import deadletters, queue_stats
from engine.errors import ValidationError
from web import context, render

DLQ_PAGE = 25


def _cursor(request: web.Request) -> int | None:
    raw = request.query.get("cursor", "")
    return int(raw) if raw.isascii() and raw.isdigit() else None


async def page(request: web.Request) -> web.Response:
    services, tenant = context.services(request), context.tenant(request)
    stats = await queue_stats.queue_stats(services, tenant)
    values: dict[str, Any] = {"stats": stats}
    if not context.is_htmx(request):
        after = _cursor(request)
        values["dlq"] = await deadletters.dead_letters(
            services, tenant, limit=DLQ_PAGE, after=after
        )
        values["paged"] = after is not None
    return await render.page(
        request,
        "queue.html",
        fragment="queue/_consumers.html",
        active="queue",
        title="Queue",
        **values,
    )


async def replay(request: web.Request) -> web.Response:
    form = await context.form(request)
    if form.get("all") == "1":
        body: dict[str, Any] = {"all": True}
    else:
        seqs = [int(s) for s in form.getall("seq", []) if isinstance(s, str) and s.isdigit()]
        body = {"seqs": seqs}
    try:
        replayed = await deadletters.replay_request(
            context.services(request), context.tenant(request), body
        )
    except ValidationError:
        return await render.flash_redirect(
            request, "/queue", "Choose the dead letters to replay first.", "error"
        )
    noun = "message" if replayed == 1 else "messages"
    return await render.flash_redirect(request, "/queue", f"Replayed {replayed} {noun}.")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/queue", page)
    app.router.add_post("/queue/replay", replay)
