"""The API application: factory, resource lifetimes, middlewares, routes."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from api import (
    accounts,
    analytics,
    batches,
    keys,
    ops,
    queue,
    suppressions,
    webhook_endpoints,
    webhooks,
)
from api.context import AUTH, HEALTH, SERVICES, SETTINGS, TENANT, error_response
from engine import metrics, tracing
from engine.auth import Authenticator
from engine.config import Settings
from engine.errors import (
    BadRequest,
    BatchSenderError,
    PayloadTooLarge,
    TooManyRequests,
)
from engine.health import HealthChecker
from engine.services import Services

log = logging.getLogger(__name__)

PUBLIC = frozenset({"/health", "/health/live", "/api/metrics", "/api/openapi.json"})
_KEPT_HEADERS = ("Allow",)  # of aiohttp's HTTP errors (405 names the methods it allows)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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
        kept = {name: exc.headers[name] for name in _KEPT_HEADERS if name in exc.headers}
        return error_response(exc.status, code, exc.text or exc.reason, headers=kept or None)
    except Exception as exc:
        if isinstance(exc, ConnectionResetError) and _client_gone(request):
            # Nobody reads an answer and nothing went wrong here: one quiet line.
            log.info("client disconnected", extra={"path": request.path, "error": str(exc)})
            return error_response(499, "client_disconnected", "the client closed the connection")
        log.exception("unhandled error", extra={"path": request.path})
        return error_response(500, "internal_error", "something went wrong on our side")


def _client_gone(request: web.Request) -> bool:
    """The request's own connection is closed (not one to a service behind us)."""
    return request.transport is None or request.transport.is_closing()


@web.middleware
async def text_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Text that enters through the path or the query string is UTF-8 without NUL
    characters (PostgreSQL stores neither NUL nor lone surrogates): else 400, whatever
    the route."""
    for text in (request.path, *request.query.keys(), *request.query.values()):
        if "\x00" in text or not _encodable(text):
            raise BadRequest(
                "the path or query string holds a NUL character or text that is not UTF-8",
                code="invalid_characters",
            )
    return await handler(request)


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return True


TRACE_HEADER = "X-Request-Id"  # the response header naming the request's trace id
_TRACE_ID = web.RequestKey("trace_id", str)


@web.middleware
async def trace_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every request's trace id: the trace-id of its W3C ``traceparent`` header when valid,
    else a new one (32 hex digits either way). Each log line written while the request is
    handled carries it as ``trace_id`` (``engine.tracing``; the context of the request's
    own task, so it is not reset: the task ends with the request), and every response
    names it in ``X-Request-Id`` (``_trace_header``), errors and streamed answers too."""
    trace_id = tracing.trace_id_of(request.headers.get("traceparent")) or tracing.new_trace_id()
    request[_TRACE_ID] = trace_id
    tracing.TRACE_ID.set(trace_id)
    return await handler(request)


async def _trace_header(request: web.Request, response: web.StreamResponse) -> None:
    trace_id = request.get(_TRACE_ID)
    if trace_id is not None:
        response.headers[TRACE_HEADER] = trace_id


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    route = request.match_info.route.resource
    name = route.canonical if route is not None else "unmatched"
    response = await handler(request)
    metrics.HTTP_REQUESTS.labels(name, str(response.status)).inc()
    metrics.HTTP_SECONDS.labels(name).observe(time.perf_counter() - started)
    return response


def _presented_key(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return request.headers.get("X-API-Key")


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The tenant of the request's key (``engine.auth``: cache, revocation, failure limit)."""
    if request.path.startswith("/api/") and request.path not in PUBLIC:
        request[TENANT] = await request.app[AUTH].tenant(
            _presented_key(request), request.remote, request.headers.get("X-Forwarded-For")
        )
        tracing.bind(tenant_id=request[TENANT])  # on the request's log lines
    return await handler(request)


def create_app(settings: Settings) -> web.Application:
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        # A request line up to 64 KiB: batch fields may come as query parameters.
        handler_args={"max_line_size": 64 << 10},
        middlewares=[
            trace_middleware,
            metrics_middleware,
            errors_middleware,
            text_middleware,
            auth_middleware,
        ],
    )
    app[SETTINGS] = settings
    app.on_response_prepare.append(_trace_header)

    async def services_ctx(app: web.Application) -> AsyncIterator[None]:
        services = await Services.open(settings, pool_size=20)
        app[SERVICES] = services
        app[HEALTH] = HealthChecker(services)
        app[AUTH] = await Authenticator.start(services)
        yield
        await app[AUTH].close()
        await services.close()

    app.cleanup_ctx.append(services_ctx)
    ops.add_routes(app)
    batches.add_routes(app)
    webhooks.add_routes(app)
    suppressions.add_routes(app)
    queue.add_routes(app)
    keys.add_routes(app)
    analytics.add_routes(app)
    accounts.add_routes(app)
    webhook_endpoints.add_routes(app)
    return app
