"""Sign in with an API key (``engine.auth``: the API's own check, failure limit included),
and sign out. What a session is and holds: ``web.sessions``."""

from __future__ import annotations

import secrets

from aiohttp import web

from engine.errors import TooManyRequests, Unauthorized
from engine.tenants import PREFIX_LENGTH
from web import context, csrf, render
from web.sessions import (
    COOKIE,
    LOGIN_COOKIE,
    LOGIN_COOKIE_SECONDS,
    clear_cookie,
    same_token,
    set_cookie,
)

REASONS = {
    "revoked": "The API key of your session was revoked. Sign in with another key.",
    "expired": "Your session has ended. Sign in again.",
    "signed_out": "You are signed out.",
}


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a path of this site only (no open redirect)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/batches"
    return target


async def _login_page(
    request: web.Request, *, status: int = 200, error: str | None = None
) -> web.Response:
    token = secrets.token_urlsafe(32)
    reason = request.query.get("reason")
    response = await render.page(
        request,
        "login.html",
        title="Sign in",
        status=status,
        login_token=token,
        error=error,
        notice=REASONS.get(reason or ""),
        next=safe_next(request.query.get("next")),
    )
    set_cookie(
        response, request, request.app[context.SETTINGS], LOGIN_COOKIE, token, LOGIN_COOKIE_SECONDS
    )
    return response


async def login_form(request: web.Request) -> web.StreamResponse:
    token = request.cookies.get(COOKIE)
    if token and (await request.app[context.SESSIONS].load(token))[0] is not None:
        return render.redirect(safe_next(request.query.get("next")))
    return await _login_page(request)


async def login(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    expected = request.cookies.get(LOGIN_COOKIE, "")
    given = form.get(csrf.FIELD)
    if not expected or not same_token(expected, given if isinstance(given, str) else None):
        raise csrf.refused()
    key = form.get("api_key")
    key = key.strip() if isinstance(key, str) else ""
    try:
        tenant_id, key_id = await request.app[context.AUTH].identify(
            key, request.remote, request.headers.get("X-Forwarded-For")
        )
    except Unauthorized:
        message = "Enter an API key." if not key else "That API key is not valid (or was revoked)."
        return await _login_page(request, status=401, error=message)
    except TooManyRequests as exc:
        response = await _login_page(request, status=429, error=exc.message)
        response.headers["Retry-After"] = str(exc.retry_after)
        return response
    token, _ = await request.app[context.SESSIONS].open(tenant_id, key_id, key[:PREFIX_LENGTH])
    target = form.get("next")
    response = render.redirect(safe_next(target if isinstance(target, str) else None))
    settings = request.app[context.SETTINGS]
    set_cookie(response, request, settings, COOKIE, token)
    clear_cookie(response, request, settings, LOGIN_COOKIE)
    return response


async def logout(request: web.Request) -> web.StreamResponse:
    await request.app[context.SESSIONS].close(request[context.SESSION])
    response = render.redirect("/login?reason=signed_out")
    clear_cookie(response, request, request.app[context.SETTINGS], COOKIE)
    return response


def add_routes(app: web.Application) -> None:
    app.router.add_get("/login", login_form)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
