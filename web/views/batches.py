"""Batches: the list (filters, paging, live), one batch (counts, progress, ETA, the
per-minute chart and provider latency from ClickHouse, its recipients) and its controls.

Data: ``engine.batches`` (list, one batch, its recipients: paged queries only),
``engine.control`` (pause, resume, cancel, send), ``engine.analytics.batch_report``. A
batch of another tenant is ``NotFound`` there, so its pages answer 404 here.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from engine import accounts, analytics, batches, control
from engine.errors import Conflict, NotFound
from engine.lifecycle import BATCH_STATUSES, FINISHED, RECIPIENT_STATUSES, SENDING, UNFINISHED
from web import context, render

PAGE = 25
RECIPIENTS_PAGE = 25
CHART_LEAD_MINUTES = 4  # minutes shown before a batch's first event
# The order of a batch chart's series: the sends, then what providers said.
CHART_EVENTS = ("sent", "delivered", "failed", "bounced", "complained", "opened", "clicked")
ACTIONS = {
    "pause": control.pause,
    "resume": control.resume,
    "cancel": control.cancel,
    "send": control.send,
}


def view(batch: dict[str, Any]) -> dict[str, Any]:
    """A batch as the pages show it: with its ETA and the actions its status allows."""
    status, progress = batch["status"], batch["progress"]
    left = batch["total_recipients"] - progress["final"]
    rate = progress["per_second"]
    return {
        **batch,
        "active": status not in FINISHED,
        "eta_seconds": left / rate if rate and status in SENDING and left > 0 else None,
        "left": left,
        "can": {
            "pause": status in SENDING,
            "resume": status == "paused",
            "cancel": status in UNFINISHED,
            "send": status == "draft",
        },
    }


async def index(request: web.Request) -> web.Response:
    status = context.choice(request, "status", BATCH_STATUSES)
    external_id = (request.query.get("external_id") or "").strip() or None
    found = await batches.list_batches(
        context.services(request).pool,
        context.tenant(request),
        status=status,
        external_id=external_id,
        limit=PAGE,
        cursor=context.cursor(request),
    )
    rows = [view(b) for b in found["data"]]
    return await render.page(
        request,
        "batches/list.html",
        fragment="batches/_table.html",
        active="batches",
        title="Batches",
        rows=rows,
        next_cursor=found["next_cursor"],
        paged=bool(context.cursor(request)),
        status_filter=status,
        external_id=external_id,
        statuses=BATCH_STATUSES,
        live=any(r["active"] for r in rows),
        here=request.path_qs,
    )


async def _account_name(request: web.Request, batch: dict[str, Any]) -> str | None:
    if batch["provider_account_id"] is None:
        return None
    try:
        found = await accounts.get(
            context.services(request).pool, context.tenant(request), batch["provider_account_id"]
        )
    except NotFound:  # deleted since
        return None
    return found["name"]


async def _recipients(request: web.Request, batch_id: str) -> dict[str, Any]:
    status = context.choice(request, "status", RECIPIENT_STATUSES)
    found = await batches.list_recipients(
        context.services(request).pool,
        context.tenant(request),
        batch_id,
        status=status,
        limit=RECIPIENTS_PAGE,
        cursor=context.cursor(request),
    )
    return {
        "recipients": found["data"],
        "recipients_next": found["next_cursor"],
        "recipients_paged": bool(context.cursor(request)),
        "recipient_status": status,
        "recipient_statuses": RECIPIENT_STATUSES,
    }


async def show(request: web.Request) -> web.Response:
    batch_id = request.match_info["id"]
    batch = view(
        await batches.get_batch(context.services(request).pool, context.tenant(request), batch_id)
    )
    return await render.page(
        request,
        "batches/detail.html",
        active="batches",
        title=batch["name"],
        batch=batch,
        account_name=await _account_name(request, batch),
        **await _recipients(request, batch_id),
    )


async def summary(request: web.Request) -> web.Response:
    """The batch's live part (status, progress, counts, controls), polled while it runs."""
    batch = await batches.get_batch(
        context.services(request).pool, context.tenant(request), request.match_info["id"]
    )
    return await render.page(request, "batches/_summary.html", batch=view(batch), error=None)


async def recipients(request: web.Request) -> web.Response:
    batch_id = request.match_info["id"]
    found = await _recipients(request, batch_id)
    if not context.is_htmx(request):
        return render.redirect(f"/batches/{batch_id}?{request.query_string}")
    batch = await batches.get_batch(
        context.services(request).pool, context.tenant(request), batch_id
    )
    return await render.page(request, "batches/_recipients.html", batch=view(batch), **found)


def chart_of(series: list[dict[str, Any]]) -> dict[str, Any]:
    """The per-minute rows (minute, event, count) as a chart: every minute from a few
    before the first event to the last (zeros where nothing happened), one series per
    event."""
    counts: dict[str, dict[int, int]] = {}
    for row in series:
        at = int(render._parse(row["minute"]).timestamp())  # type: ignore[union-attr]
        per_minute = counts.setdefault(row["event"], {})
        per_minute[at] = per_minute.get(at, 0) + row["count"]
    minutes = sorted({at for per_minute in counts.values() for at in per_minute})
    if not minutes:
        return {"x": [], "series": [], "unit": "events per minute"}
    x = list(range(minutes[0] - CHART_LEAD_MINUTES * 60, minutes[-1] + 1, 60))
    events = [e for e in CHART_EVENTS if e in counts] + sorted(set(counts) - set(CHART_EVENTS))
    return {
        "x": x,
        "series": [{"label": e, "values": [counts[e].get(at, 0) for at in x]} for e in events],
        "unit": "events per minute",
    }


async def series(request: web.Request) -> web.Response:
    """The batch's chart and latency (``engine.analytics.batch_report``) as JSON."""
    try:
        report = await analytics.batch_report(
            request.app[context.READER],
            context.services(request).pool,
            context.tenant(request),
            request.match_info["id"],
        )
    except analytics.AnalyticsUnavailable as exc:
        return web.json_response({"error": exc.message}, status=503)
    return web.json_response(
        {
            "chart": chart_of(report["series"]),
            "latency_ms": report["latency_ms"],
            "truncated": report["series_truncated"],
        }
    )


async def act(request: web.Request) -> web.Response:
    """Pause, resume, cancel or send: the batch as it is afterwards, at once."""
    batch_id, name = request.match_info["id"], request.match_info["action"]
    action = ACTIONS.get(name)
    if action is None:
        raise web.HTTPNotFound()
    services, tenant = context.services(request), context.tenant(request)
    error, status = None, 200
    try:
        batch = await action(services, tenant, batch_id)
    except Conflict as exc:
        batch = await batches.get_batch(services.pool, tenant, batch_id)
        error, status = exc.message, 409
    if not context.is_htmx(request):
        text = error or f"Batch {batch['name']!r} is {batch['status']} now."
        return await render.flash_redirect(
            request, f"/batches/{batch_id}", text, "error" if error else "ok"
        )
    return await render.page(
        request, "batches/_summary.html", status=status, batch=view(batch), error=error
    )


def add_routes(app: web.Application) -> None:
    app.router.add_get("/batches", index)
    app.router.add_get(r"/batches/{id:[0-9a-fA-F-]{36}}", show)
    app.router.add_get(r"/batches/{id:[0-9a-fA-F-]{36}}/summary", summary)
    app.router.add_get(r"/batches/{id:[0-9a-fA-F-]{36}}/recipients", recipients)
    app.router.add_get(r"/batches/{id:[0-9a-fA-F-]{36}}/analytics.json", series)
    app.router.add_post(r"/batches/{id:[0-9a-fA-F-]{36}}/{action}", act)
