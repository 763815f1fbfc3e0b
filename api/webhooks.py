"""``POST /webhooks/{provider}`` (the server's default account) and
``POST /webhooks/{provider}/{account_id}`` (a tenant's provider account): answer fast,
the engine does the rest through NATS (``engine.webhooks``)."""

from __future__ import annotations

from aiohttp import web

from api import body, context
from engine import webhooks
from engine.config import Settings


async def _body(request: web.Request, settings: Settings) -> bytes:
    """The body. A post that arrived whole with its headers (most webhook posts: a few KiB)
    is taken as it is: nothing to wait for, so no deadline to keep, and no task per piece
    (bench/RESULTS.md, webhook intake). Any other is read by ``body.read_bytes`` (with
    its deadlines, and its 413 past ``MAX_BODY_BYTES``)."""
    content = request.content
    if content.is_eof() and content.total_bytes <= settings.max_body_bytes:
        return content.read_nowait()
    return await body.read_bytes(request, settings)


async def receive(request: web.Request) -> web.Response:
    received = await webhooks.receive(
        request.app[context.SERVICES],
        request.match_info["provider"],
        await _body(request, request.app[context.SETTINGS]),
        request.headers,
        request.match_info.get("account_id"),
    )
    return context.json_response(received.answer())


def add_routes(app: web.Application) -> None:
    app.router.add_post("/webhooks/{provider}", receive)
    app.router.add_post("/webhooks/{provider}/{account_id}", receive)
