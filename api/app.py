"""The API application: factory, resource lifetimes, middlewares, routes."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from api import batches, ops, queue, suppressions, webhooks
from engine import metrics
from engine.config import Settings
from engine.errors import (
    BadRequest,
    BatchSenderError,
    PayloadTooLarge,
    TooManyRequests,
    ValidationError,
)
from engine.health import HealthChecker
from engine.services import Services
from engine.tenants import authenticate

log = logging.getLogger(__name__)

SERVICES = web.AppKey("services", Services)
HEALTH = web.AppKey("health", HealthChecker)
SETTINGS = web.AppKey("settings", Settings)
TENANT = web.RequestKey("tenant_id", str)
PUBLIC = frozenset({"/health", "/health/live", "/api/metrics", "/api/openapi.json"})
_AUTH_CACHE_SECONDS = 10.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(
    status: int, code: str, message: str, details: object = None,
    headers: dict[str, str] | None = None,
) -> web.Response:  # fmt: skip
    body = {"error": {"code": code, "message": message, "details": details}}
    return json_response(body, status, headers)


def json_response(
    data: object, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(data), content_type="application/json", headers=headers
    )


async def json_body(request: web.Request) -> Any:
    """The request body as JSON; ``BadRequest`` when it is not JSON."""
    try:
        return orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}", code="invalid_json") from None


def query_int(request: web.Request, name: str, default: int | None = None) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValidationError(f"{name}: must be a whole number", {"field": name}) from None


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except TooManyRequests as exc:
        headers = {"Retry-After": str(exc.retry_after)}
        return error_response(exc.status, exc.code, exc.message, exc.details, headers)
    except BatchSenderError as exc:
        return error_response(exc.status, exc.code, exc.message, exc.details)
    except web.HTTPRequestEntityTooLarge:
        err = PayloadTooLarge(
            f"the body is larger than {request.client_max_size} bytes; stream NDJSON or CSV instead"
        )
        return error_response(413, err.code, err.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        return error_response(exc.status, code, exc.text or exc.reason)
    except Exception:
        log.exception("unhandled error", extra={"path": request.path})
        return error_response(500, "internal_error", "something went wrong on our side")


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    route = request.match_info.route.resource
    name = route.canonical if route is not None else "unmatched"
    response = await handler(request)
    metrics.HTTP_REQUESTS.labels(name, str(response.status)).inc()
    metrics.HTTP_SECONDS.labels(name).observe(time.perf_counter() - started)
    return response


class _KeyCache:
    """Recently checked keys, so a busy client does not cost a query per request."""

    def __init__(self) -> None:
        self._items: dict[str, tuple[str, float]] = {}

    async def tenant(self, services: Services, key: str | None) -> str:
        now = time.monotonic()
        hit = self._items.get(key or "")
        if hit is not None and hit[1] > now:
            return hit[0]
        tenant_id = await authenticate(services.pool, key)
        if len(self._items) > 10_000:
            self._items.clear()
        self._items[key or ""] = (tenant_id, now + _AUTH_CACHE_SECONDS)
        return tenant_id


def _presented_key(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return request.headers.get("X-API-Key")


def auth_middleware(cache: _KeyCache) -> Callable:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/api/") and request.path not in PUBLIC:
            request[TENANT] = await cache.tenant(request.app[SERVICES], _presented_key(request))
        return await handler(request)

    return middleware


def create_app(settings: Settings) -> web.Application:
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[metrics_middleware, errors_middleware, auth_middleware(_KeyCache())],
    )
    app[SETTINGS] = settings

    async def services_ctx(app: web.Application) -> AsyncIterator[None]:
        services = await Services.open(settings, pool_size=20)
        app[SERVICES] = services
        app[HEALTH] = HealthChecker(services)
        yield
        await services.close()

    app.cleanup_ctx.append(services_ctx)
    ops.add_routes(app)
    batches.add_routes(app)
    webhooks.add_routes(app)
    suppressions.add_routes(app)
    queue.add_routes(app)
    return app
