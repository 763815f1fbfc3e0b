"""The dashboard application: factory, resource lifetimes, middlewares, routes.

Every page is a view over the engine functions the REST API calls (``engine.batches``,
``engine.intake``, ``engine.control``, ``engine.analytics``, ...), with the signed-in
session's tenant: nothing here reads another tenant's rows, and another tenant's batch,
endpoint or account answers 404 as in the API. Sessions and CSRF: ``web.sessions``,
``web.csrf``. Each response says how long the server took (``Server-Timing: app;dur=ms``,
what ``bench/web.py`` records).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import quote

import aiohttp
from aiohttp import web

from engine import analytics, tracing
from engine.auth import Authenticator
from engine.config import Settings
from engine.errors import BatchSenderError, NotFound
from engine.services import Services
from web import context, csrf, render
from web.sessions import COOKIE, SessionStore, clear_cookie
from web.views import (
    accounts,
    analytics_page,
    auth,
    batches,
    keys,
    new_batch,
    performance,
    queue,
    suppressions,
    webhooks,
)

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PUBLIC = frozenset({"/login", "/health/live", "/favicon.ico"})
MAX_FORM_BYTES = 2 << 20  # urlencoded forms; a batch's CSV is streamed (web.views.new_batch)

# No inline script anywhere (htmx's own indicator styles are off, see base.html); inline
# styles are allowed for the rendered e-mail of a batch preview (a sandboxed iframe
# inherits this policy).
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; frame-src 'self'; frame-ancestors 'none'; "
    "form-action 'self'; base-uri 'none'; object-src 'none'"
)


def _public(path: str) -> bool:
    return path in PUBLIC or path.startswith("/static/")


@web.middleware
async def timing_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    response = await handler(request)
    response.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - started) * 1000:.1f}"
    return response


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A refusal of the engine or an unknown page as a page of its own (or, for htmx, an
    alert in place); anything else is logged and answered 500 without its details."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        title = "Page not found" if exc.status == 404 else exc.reason
        return await _error(request, exc.status, title, exc.text if exc.status != 404 else None)
    except BatchSenderError as exc:
        title = "Not found" if isinstance(exc, NotFound) else "Something is not right"
        return await _error(request, exc.status, title, exc.message)
    except Exception:
        log.exception("unhandled error", extra={"path": request.path})
        return await _error(request, 500, "Something went wrong on our side", None)


async def _error(
    request: web.Request, status: int, title: str, message: str | None
) -> web.Response:
    if message and message.startswith(f"{status}: "):  # aiohttp's default text
        message = None
    return await render.page(
        request,
        "error.html",
        fragment="_alert.html",
        status=status,
        title=title,
        error_status=status,
        message=message,
        level="error",
    )


def _login_redirect(request: web.Request, reason: str | None) -> web.StreamResponse:
    target = request.path_qs if request.method == "GET" else "/batches"
    location = "/login?next=" + quote(target, safe="")
    if reason:
        location += f"&reason={reason}"
    if request.path.endswith(".json"):
        response: web.StreamResponse = web.json_response(
            {"error": {"code": "signed_out", "message": "sign in again"}}, status=401
        )
    elif context.is_htmx(request):
        response = web.Response(status=204, headers={"HX-Redirect": location})
    else:
        response = render.redirect(location)
    clear_cookie(response, request, request.app[context.SETTINGS], COOKIE)
    return response


@web.middleware
async def session_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The signed-in session of every page but the public ones, its key checked on each
    request (a revoked key ends it), and the CSRF token of every unsafe request."""
    if _public(request.path):
        return await handler(request)
    token = request.cookies.get(COOKIE, "")
    session, reason = await request.app[context.SESSIONS].load(token) if token else (None, None)
    if session is not None and not await request.app[context.AUTH].key_in_use(
        session.key_id, session.tenant_id
    ):
        await request.app[context.SESSIONS].close(session)
        session, reason = None, "revoked"
    if session is None:
        return _login_redirect(request, reason)
    request[context.SESSION] = session
    tracing.bind(tenant_id=session.tenant_id)
    await csrf.check(request, session)
    return await handler(request)


async def _headers(request: web.Request, response: web.StreamResponse) -> None:
    headers = response.headers
    headers.setdefault("Content-Security-Policy", CSP)
    headers["X-Content-Type-Options"] = "nosniff"
    headers["X-Frame-Options"] = "DENY"
    headers["Referrer-Policy"] = "same-origin"
    headers["Cross-Origin-Opener-Policy"] = "same-origin"
    if request.path.startswith("/static/"):
        headers["Cache-Control"] = (
            "public, max-age=31536000, immutable" if "v" in request.query else "public, max-age=300"
        )
    else:
        headers["Cache-Control"] = "no-store"


async def live(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def favicon(_request: web.Request) -> web.StreamResponse:
    return web.FileResponse(
        render.STATIC / "favicon.svg", headers={"Content-Type": "image/svg+xml"}
    )


async def home(_request: web.Request) -> web.StreamResponse:
    return render.redirect("/batches")


def create_app(settings: Settings) -> web.Application:
    app = web.Application(
        client_max_size=MAX_FORM_BYTES,
        middlewares=[timing_middleware, errors_middleware, session_middleware],
    )
    app[context.SETTINGS] = settings
    app.on_response_prepare.append(_headers)

    async def resources(app: web.Application) -> AsyncIterator[None]:
        services = await Services.open(settings, pool_size=10)
        app[context.SERVICES] = services
        app[context.AUTH] = await Authenticator.start(services)  # also hears revocations
        app[context.SESSIONS] = SessionStore(services)
        app[context.READER] = analytics.Reader(settings)
        app[context.HTTP] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        yield
        await app[context.HTTP].close()
        app[context.READER].close()
        await app[context.AUTH].close()
        await services.close()

    app.cleanup_ctx.append(resources)
    app.router.add_get("/", home)
    app.router.add_get("/health/live", live)
    app.router.add_get("/favicon.ico", favicon)
    app.router.add_static("/static", render.STATIC)
    for module in (
        auth,
        batches,
        new_batch,
        analytics_page,
        queue,
        suppressions,
        keys,
        accounts,
        webhooks,
        performance,
    ):
        module.add_routes(app)
    return app
