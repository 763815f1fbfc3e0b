"""What the route handlers share with the application factory: the app and request keys
(``SERVICES``, ``HEALTH``, ``SETTINGS``, ``AUTH``, ``TENANT``) and the small helpers that read
a request and write an answer."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from api import body
from engine.auth import Authenticator
from engine.config import Settings
from engine.errors import ValidationError
from engine.health import HealthChecker
from engine.services import Services

SERVICES = web.AppKey("services", Services)
HEALTH = web.AppKey("health", HealthChecker)
SETTINGS = web.AppKey("settings", Settings)
AUTH = web.AppKey("authenticator", Authenticator)
TENANT = web.RequestKey("tenant_id", str)


def error_response(
    status: int,
    code: str,
    message: str,
    details: object = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = {"error": {"code": code, "message": message, "details": details}}
    return json_response(body, status, headers)


def json_response(
    data: object, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(data), content_type="application/json", headers=headers
    )


async def json_body(request: web.Request) -> Any:
    """The request body as JSON (``api.body``: deadlines, parsed in steps); ``BadRequest``
    when it is not JSON."""
    data, _ = await body.read_json(request, request.app[SETTINGS])
    return data


def query_int(request: web.Request, name: str, default: int | None = None) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValidationError(f"{name}: must be a whole number", {"field": name}) from None
