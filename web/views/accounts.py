"""Provider accounts: the tenant's accounts (credentials only as masked hints), add one,
delete one, test one's credentials (``engine.accounts``, as ``/api/provider-accounts``).

An add checks what the API checks: the fields, and that the provider's adapter accepts the
account (SES a region, Mailgun a domain, ...). "Test credentials" is
``engine.accounts.check`` (``POST /api/provider-accounts/{ref}/check``): the provider's
cheapest authenticated read call, nothing sent; with htmx its answer replaces the page's
result region (a polite live region, so it is read out), without it the page comes back
with the answer as its message.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from engine import accounts
from engine.errors import BatchSenderError
from providers.registry import CREDENTIALS
from web import context, render

NUMBERS = {"rate_per_second": float, "burst": int, "daily_quota": int}
TEXTS = ("name", "base_url", "region", "domain", "webhook_secret")
LABELS = {
    "username": "Username",
    "password": "Password",
    "access_key_id": "Access key ID",
    "secret_access_key": "Secret access key",
    "api_key": "API key",
    "server_token": "Server token",
}


async def _page(
    request: web.Request,
    *,
    status: int = 200,
    errors: dict[str, list[str]] | None = None,
    values: dict[str, str] | None = None,
    problem: str | None = None,
) -> web.Response:
    found = await accounts.list_accounts(
        context.services(request).pool, context.tenant(request), after=context.cursor(request)
    )
    settings = request.app[context.SETTINGS]
    return await render.page(
        request,
        "accounts.html",
        active="accounts",
        title="Provider accounts",
        status=status,
        rows=found["data"],
        next_cursor=found["next_cursor"],
        paged=bool(context.cursor(request)),
        credentials=CREDENTIALS,
        labels=LABELS,
        errors=errors or {},
        values=values or {"provider": ""},
        problem=problem,
        webhook_base=settings.public_url.rstrip("/") + "/webhooks",
    )


async def page(request: web.Request) -> web.Response:
    return await _page(request)


def body_of(values: dict[str, str]) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """The form as the API's JSON body; number fields that are not numbers as errors."""
    provider = values.get("provider", "")
    body: dict[str, Any] = {"provider": provider}
    errors: dict[str, list[str]] = {}
    for name in TEXTS:
        if values.get(name, "").strip():
            body[name] = values[name].strip()
    for name, kind in NUMBERS.items():
        raw = values.get(name, "").strip()
        if raw:
            try:
                body[name] = kind(raw)
            except ValueError:
                errors[name] = ["must be a number" if kind is float else "must be a whole number"]
    if provider in CREDENTIALS:
        body["credentials"] = {
            name: values.get(f"credential_{provider}_{name}", "") for name in CREDENTIALS[provider]
        }
        body["credentials"] = {k: v for k, v in body["credentials"].items() if v}
    return body, errors


async def create(request: web.Request) -> web.Response:
    form = await context.form(request)
    values = {k: v for k, v in form.items() if isinstance(v, str) and k != "csrf_token"}
    body, errors = body_of(values)
    # Never sent back to the browser: credentials and the webhook secret are typed again.
    kept = {
        k: v for k, v in values.items() if not k.startswith("credential_") and k != "webhook_secret"
    }
    if errors:
        return await _page(
            request, status=422, errors=errors, values=kept, problem="Check the numbers."
        )
    settings = request.app[context.SETTINGS]
    try:
        created = await accounts.create(
            context.services(request).pool,
            accounts.Sealer(settings.credentials_keys),
            context.tenant(request),
            body,
            allow_private=settings.provider_allow_private_urls,
        )
    except BatchSenderError as exc:
        found, _ = render.field_errors(exc)
        found = {
            k.replace("credentials.", f"credential_{body['provider']}_"): v
            for k, v in found.items()
        }
        return await _page(
            request, status=exc.status, errors=found, values=kept, problem=exc.message
        )
    return await render.flash_redirect(
        request, "/provider-accounts", f"Account {created['name']} added ({created['provider']})."
    )


async def remove(request: web.Request) -> web.Response:
    ref = request.match_info["id"]
    try:
        await accounts.delete(context.services(request).pool, context.tenant(request), ref)
    except BatchSenderError as exc:
        if exc.status == 404:
            raise
        return await render.flash_redirect(request, "/provider-accounts", exc.message, "error")
    return await render.flash_redirect(request, "/provider-accounts", "Account deleted.")


async def check(request: web.Request) -> web.Response:
    settings = request.app[context.SETTINGS]
    result = await accounts.check(  # another tenant's account: 404, as in the API
        context.services(request).pool,
        accounts.Sealer(settings.credentials_keys),
        context.tenant(request),
        request.match_info["id"],
        allow_private=settings.provider_allow_private_urls,
    )
    detail = (result["detail"][:1].upper() + result["detail"][1:]).rstrip(".")
    if not context.is_htmx(request):
        verdict = "the credentials work" if result["ok"] else "the check failed"
        text = f"{result['account']}: {verdict}. {detail}."
        return await render.flash_redirect(
            request, "/provider-accounts", text, "ok" if result["ok"] else "error"
        )
    return await render.page(
        request, "accounts.html", fragment="_accounts_check.html", check=result, detail=detail
    )


def add_routes(app: web.Application) -> None:
    app.router.add_get("/provider-accounts", page)
    app.router.add_post("/provider-accounts", create)
    app.router.add_post(r"/provider-accounts/{id:[0-9a-fA-F-]{36}}/delete", remove)
    app.router.add_post(r"/provider-accounts/{id:[0-9a-fA-F-]{36}}/check", check)
