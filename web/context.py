"""What the dashboard's views share with its application factory: the app and request keys,
and small readers of a request (the signed-in tenant, the form, a page's cursor)."""

from __future__ import annotations

import aiohttp
from aiohttp import web
from multidict import MultiDictProxy

from engine import analytics
from engine.auth import Authenticator
from engine.config import Settings
from engine.services import Services
from web.sessions import Session, SessionStore

SETTINGS = web.AppKey("settings", Settings)
SERVICES = web.AppKey("services", Services)
AUTH = web.AppKey("authenticator", Authenticator)
READER = web.AppKey("analytics_reader", analytics.Reader)
SESSIONS = web.AppKey("sessions", SessionStore)
HTTP = web.AppKey("http_client", aiohttp.ClientSession)  # Prometheus, for the Performance page
SESSION = web.RequestKey("session", Session)
FORM = web.RequestKey("form", MultiDictProxy)  # an urlencoded form, read once (web.csrf)


def services(request: web.Request) -> Services:
    return request.app[SERVICES]


def tenant(request: web.Request) -> str:
    """The signed-in tenant: every engine call of a view is scoped to it."""
    return request[SESSION].tenant_id


async def form(request: web.Request) -> MultiDictProxy:
    """The request's urlencoded form (already read by the CSRF check)."""
    found = request.get(FORM)
    if found is None:
        found = await request.post()
        request[FORM] = found
    return found


def is_htmx(request: web.Request) -> bool:
    return request.headers.get("HX-Request") == "true"


def cursor(request: web.Request) -> str | None:
    return request.query.get("cursor") or None


def choice(request: web.Request, name: str, allowed: tuple[str, ...]) -> str | None:
    """A query parameter that must be one of ``allowed`` ('' or absent: None)."""
    value = request.query.get(name) or None
    return value if value in allowed else None
