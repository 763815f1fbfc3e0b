"""Webhook endpoints: where the tenant's batch events are posted; add one (its signing
secret shown once), delete one, and each one's delivery log with replay
(``engine.webhook_endpoints``, ``engine.webhook_deliveries``, as ``/api/webhook-endpoints``)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from engine import webhook_deliveries, webhook_endpoints
from engine.accounts import Sealer
from engine.errors import BatchSenderError
from web import context, render

DELIVERIES_PAGE = 25


async def _list(
    request: web.Request,
    *,
    status: int = 200,
    created: dict[str, Any] | None = None,
    errors: dict[str, list[str]] | None = None,
    values: dict[str, Any] | None = None,
    problem: str | None = None,
) -> web.Response:
    found = await webhook_endpoints.list_endpoints(
        context.services(request).pool, context.tenant(request), cursor=context.cursor(request)
    )
    return await render.page(
        request,
        "webhooks/list.html",
        active="webhooks",
        title="Webhooks",
        status=status,
        rows=found["data"],
        next_cursor=found["next_cursor"],
        paged=bool(context.cursor(request)),
        event_types=webhook_endpoints.EVENT_TYPES,
        created=created,
        errors=errors or {},
        values=values or {"url": "", "description": "", "event_types": []},
        problem=problem,
    )


async def index(request: web.Request) -> web.Response:
    return await _list(request)


async def create(request: web.Request) -> web.Response:
    form = await context.form(request)
    values = {
        "url": str(form.get("url", "")).strip(),
        "description": str(form.get("description", "")).strip(),
        "event_types": [str(e) for e in form.getall("event_types", [])],
    }
    body: dict[str, Any] = {"url": values["url"], "event_types": values["event_types"]}
    if values["description"]:
        body["description"] = values["description"]
    settings = request.app[context.SETTINGS]
    try:
        created = await webhook_endpoints.create(
            context.services(request).pool,
            Sealer(settings.credentials_keys),
            context.tenant(request),
            body,
            allow_private=settings.webhook_allow_private_urls,
        )
    except BatchSenderError as exc:
        errors, _ = render.field_errors(exc)
        return await _list(
            request, status=exc.status, errors=errors, values=values, problem=exc.message
        )
    return await _list(request, status=201, created=created)


async def show(request: web.Request) -> web.Response:
    endpoint_id = request.match_info["id"]
    pool, tenant = context.services(request).pool, context.tenant(request)
    endpoint = await webhook_endpoints.get(pool, tenant, endpoint_id)
    status = context.choice(request, "status", webhook_deliveries.STATUSES)
    found = await webhook_deliveries.list_deliveries(
        pool,
        tenant,
        endpoint_id,
        status=status,
        limit=DELIVERIES_PAGE,
        cursor=context.cursor(request),
    )
    return await render.page(
        request,
        "webhooks/detail.html",
        active="webhooks",
        title=endpoint["url"],
        endpoint=endpoint,
        deliveries=found["data"],
        next_cursor=found["next_cursor"],
        paged=bool(context.cursor(request)),
        status_filter=status,
        statuses=webhook_deliveries.STATUSES,
    )


async def remove(request: web.Request) -> web.Response:
    await webhook_endpoints.delete(
        context.services(request).pool, context.tenant(request), request.match_info["id"]
    )
    return await render.flash_redirect(request, "/webhooks", "Endpoint deleted.")


async def replay(request: web.Request) -> web.Response:
    endpoint_id = request.match_info["id"]
    back = f"/webhooks/{endpoint_id}"
    try:
        await webhook_deliveries.replay(
            context.services(request).pool,
            context.tenant(request),
            endpoint_id,
            request.match_info["delivery_id"],
        )
    except BatchSenderError as exc:
        if exc.status == 404:
            raise
        return await render.flash_redirect(request, back, exc.message, "error")
    return await render.flash_redirect(request, back, "Delivery queued to be posted again.")


def add_routes(app: web.Application) -> None:
    uuid = "[0-9a-fA-F-]{36}"
    app.router.add_get("/webhooks", index)
    app.router.add_post("/webhooks", create)
    app.router.add_get(f"/webhooks/{{id:{uuid}}}", show)
    app.router.add_post(f"/webhooks/{{id:{uuid}}}/delete", remove)
    app.router.add_post(f"/webhooks/{{id:{uuid}}}/deliveries/{{delivery_id:{uuid}}}/replay", replay)
