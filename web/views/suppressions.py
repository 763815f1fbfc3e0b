"""Suppressions: the tenant's list (paged by address, or from an address on), add and
remove (``engine.suppressions``, as ``/api/suppressions``)."""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from engine import suppressions
from engine.errors import ValidationError
from web import context, render

PAGE = 50
_SEPARATORS = re.compile(r"[\s,;]+")


async def _page(
    request: web.Request,
    *,
    status: int = 200,
    errors: dict[str, list[str]] | None = None,
    values: dict[str, str] | None = None,
) -> web.Response:
    start = (request.query.get("from") or "").strip().lower()
    after = context.cursor(request) or (start and start[:-1] + chr(ord(start[-1]) - 1) + "\uffff")
    found = await suppressions.list_suppressions(
        context.services(request).pool, context.tenant(request), limit=PAGE, after=after or None
    )
    return await render.page(
        request,
        "suppressions.html",
        active="suppressions",
        title="Suppressions",
        status=status,
        rows=found["data"],
        next_cursor=found["next_cursor"],
        paged=bool(context.cursor(request) or start),
        start=start,
        errors=errors or {},
        values=values or {"emails": "", "reason": ""},
    )


async def page(request: web.Request) -> web.Response:
    return await _page(request)


async def add(request: web.Request) -> web.Response:
    form = await context.form(request)
    raw, reason = str(form.get("emails", "")), str(form.get("reason", "")).strip()
    emails = [e for e in _SEPARATORS.split(raw) if e]
    body: dict[str, Any] = {"emails": emails}
    if reason:
        body["reason"] = reason
    try:
        added = await suppressions.add_suppressions(
            context.services(request).pool, context.tenant(request), body
        )
    except ValidationError as exc:
        message = exc.message
        details = exc.details if isinstance(exc.details, dict) else {}
        bad = [emails[i] for i in details.get("invalid_indexes", [])[:5] if i < len(emails)]
        if bad:
            message += ": " + ", ".join(bad)
        field = str(details.get("field", "emails"))
        return await _page(
            request, status=422, errors={field: [message]}, values={"emails": raw, "reason": reason}
        )
    return await render.flash_redirect(
        request, "/suppressions", f"Added {added} address{'es' if added != 1 else ''}."
    )


async def remove(request: web.Request) -> web.Response:
    form = await context.form(request)
    email = str(form.get("email", ""))
    await suppressions.remove_suppression(
        context.services(request).pool, context.tenant(request), email
    )
    return await render.flash_redirect(request, "/suppressions", f"Removed {email}.")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/suppressions", page)
    app.router.add_post("/suppressions", add)
    app.router.add_post("/suppressions/remove", remove)
