"""Pages from Jinja2 templates (``web/templates``): one ordinary, autoescaping environment,
apart from the sandboxed one ``engine.templates`` renders e-mails with.

``page`` renders a whole page (the layout with its navigation, the session's flash
messages and CSRF token) or, for an htmx request that names a fragment, just that
fragment. Static files are linked with a digest of their content (``static``), so they can
be cached for a long time and still change with a release.
"""

from __future__ import annotations

import hashlib
import math
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

from aiohttp import web
from jinja2 import Environment, PackageLoader, StrictUndefined

from engine.errors import BatchSenderError
from web import context

STATIC = Path(__file__).resolve().parent / "static"

NAV = (
    ("batches", "Batches", "/batches"),
    ("new", "New batch", "/batches/new"),
    ("analytics", "Analytics", "/analytics"),
    ("queue", "Queue", "/queue"),
    ("suppressions", "Suppressions", "/suppressions"),
    ("keys", "API keys", "/keys"),
    ("accounts", "Provider accounts", "/provider-accounts"),
    ("webhooks", "Webhooks", "/webhooks"),
    ("performance", "Performance", "/performance"),
)


@cache
def static(path: str) -> str:
    """The URL of a static file, with a digest of its content."""
    digest = hashlib.sha256((STATIC / path).read_bytes()).hexdigest()[:12]
    return f"/static/{path}?v={digest}"


# --- filters -------------------------------------------------------------------------


def number(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.1f}"
    return f"{int(value):,}"


def percent(value: float | None, digits: int = 1) -> str:
    """A ratio (0..1) as a percentage."""
    if value is None:
        return "—"
    return f"{value * 100:.{digits}f}%"


def _parse(value: Any) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def when(value: Any) -> str:
    """An instant, in UTC, as a person reads it: 2 Dec 2026, 04:47:12 UTC."""
    moment = _parse(value)
    if moment is None:
        return "—"
    return moment.astimezone(UTC).strftime("%-d %b %Y, %H:%M:%S UTC")


def iso(value: Any) -> str:
    moment = _parse(value)
    return moment.astimezone(UTC).isoformat() if moment else ""


def duration(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds) or seconds < 0:
        return "—"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s" if seconds else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    return f"{hours // 24} d {hours % 24} h"


ENV = Environment(
    loader=PackageLoader("web", "templates"),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
ENV.filters.update(number=number, percent=percent, when=when, iso=iso, duration=duration)
ENV.globals.update(static=static, nav=NAV)


def render(name: str, **values: Any) -> str:
    return ENV.get_template(name).render(**values)


async def page(
    request: web.Request,
    template: str,
    *,
    active: str = "",
    title: str = "",
    status: int = 200,
    fragment: str | None = None,
    headers: dict[str, str] | None = None,
    **values: Any,
) -> web.Response:
    """The page ``template`` (``fragment`` instead, for an htmx request: a template of just
    the part it swaps) with the session's flash messages, shown once."""
    session = request.get(context.SESSION)
    flash: list[list[str]] = []
    if session is not None and session.flash and not (fragment and context.is_htmx(request)):
        flash, session.flash = session.flash, []
        await request.app[context.SESSIONS].save(session)
    name = fragment if fragment and context.is_htmx(request) else template
    text = render(
        name,
        request=request,
        session=session,
        csrf_token=session.csrf if session is not None else "",
        active=active,
        title=title,
        flash=flash,
        settings=request.app[context.SETTINGS],
        **values,
    )
    return web.Response(text=text, status=status, content_type="text/html", headers=headers)


def redirect(location: str) -> web.Response:
    """303 See Other (after a form: the browser GETs the next page)."""
    return web.Response(status=303, headers={"Location": location})


async def flash_redirect(
    request: web.Request, location: str, text: str, level: str = "ok"
) -> web.Response:
    """Back to ``location`` with a message shown there once (htmx: a full redirect too)."""
    await request.app[context.SESSIONS].flash(request[context.SESSION], level, text)
    if context.is_htmx(request):
        return web.Response(status=204, headers={"HX-Redirect": location})
    return redirect(location)


# --- errors next to their fields -----------------------------------------------------------


def field_errors(exc: BatchSenderError) -> tuple[dict[str, list[str]], list[dict[str, Any]]]:
    """A refusal's errors as the API reports them, split for a form: messages per field
    (``{"field": ..., "message": ...}`` entries, or the one field the error names) and
    the recipients' rows (``{"row": ..., "field": ..., "message": ...}``)."""
    fields: dict[str, list[str]] = {}
    rows: list[dict[str, Any]] = []
    details = exc.details if isinstance(exc.details, dict) else {}
    for entry in details.get("errors") or []:
        if "row" in entry:
            rows.append(entry)
        else:
            fields.setdefault(str(entry.get("field", "")), []).append(str(entry["message"]))
    if not fields and not rows and details.get("field"):
        name = str(details["field"])
        message = exc.message
        prefix = f"{name}: "
        fields[name] = [message[len(prefix) :] if message.startswith(prefix) else message]
    return fields, rows
