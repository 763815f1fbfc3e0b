"""A tenant's provider accounts (``/api/provider-accounts``): credentials sealed at rest.

An account names a provider, holds the credentials that provider needs
(``providers.registry.CREDENTIALS``), where to reach it (base URL, region, Mailgun domain),
its rate (its own token bucket, across every worker and pod) and an optional daily quota.

Sealing: the credentials (and the webhook secret) are encrypted with Fernet (AES-128-CBC and
HMAC-SHA256, from ``cryptography``) under keys derived with HKDF from ``CREDENTIALS_KEYS``,
a comma-separated list of secrets. The first seals; every one opens (``MultiFernet``).
Rotation: put a new secret first and keep the old ones after it, restart, run
``batchsender provider-accounts reseal`` (re-seals every account under the first), then drop
the old secrets. Nothing of a credential is ever answered, logged or put in an error: the
API shows a masked hint (its last four characters when it is long enough to spare them).

Checking (``check``, ``POST /api/provider-accounts/{ref}/check`` and the dashboard's "Test
credentials"): the account's adapter, built with its opened credentials, makes its
provider's cheapest authenticated read call (``providers.base.Provider.check``), within
``CHECK_SECONDS``, and is closed; the answer says whether the credentials work, why not,
and the quota where the provider reports one. Nothing is sent.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import orjson
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from engine.config import Rate
from engine.errors import Conflict, NotFound, ValidationError
from engine.lifecycle import FINISHED
from engine.outbound import PublicResolver, check_host
from providers.base import Account, CheckResult
from providers.http import scrub
from providers.registry import CREDENTIALS, PROVIDERS

log = logging.getLogger(__name__)

MAX_ACCOUNTS_PAGE = 100
CHECK_SECONDS = 10.0  # the longest a credentials check may take
MAX_SECRET_CHARS = 4096
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_REGION = re.compile(r"[a-z]{2}(-[a-z0-9]+){1,3}")
_DOMAIN = re.compile(r"(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}")
_FIELDS = {
    "name", "provider", "credentials", "base_url", "region", "domain", "rate_per_second",
    "burst", "daily_quota", "webhook_secret",
}  # fmt: skip
_COLUMNS = (
    "id, name, provider, hints, webhook_secret IS NOT NULL AS webhook_secret_set, base_url, "
    "region, domain, rate_per_second, burst, daily_quota, created_at"
)


class Sealer:
    """Seals and opens credentials under ``CREDENTIALS_KEYS`` (the first seals)."""

    def __init__(self, secrets: tuple[str, ...]) -> None:
        if not secrets:
            raise ValueError("at least one credentials key is needed")
        self._fernet = MultiFernet([_fernet(secret) for secret in secrets])

    def seal(self, value: Any) -> bytes:
        return self._fernet.encrypt(orjson.dumps(value))

    def open(self, token: bytes) -> Any:
        try:
            return orjson.loads(self._fernet.decrypt(bytes(token)))
        except InvalidToken:
            raise ValueError("sealed under none of CREDENTIALS_KEYS") from None

    def reseal(self, token: bytes) -> bytes:
        try:
            return self._fernet.rotate(bytes(token))
        except InvalidToken:
            raise ValueError("sealed under none of CREDENTIALS_KEYS") from None


@functools.lru_cache(maxsize=8)
def _fernet(secret: str) -> Fernet:
    key = HKDF(SHA256(), 32, salt=None, info=b"batchsender provider credentials v1").derive(
        secret.encode()
    )
    return Fernet(base64.urlsafe_b64encode(key))


def hint(secret: str) -> str:
    """What the API shows of a credential: its last four characters when it has at least
    sixteen (too little of it to matter), else nothing."""
    return "••••" + secret[-4:] if len(secret) >= 16 else "••••"


def _invalid(field: str, problem: str) -> ValidationError:
    return ValidationError(f"{field}: {problem}", {"field": field}, code="invalid_account")


def _text(body: dict[str, Any], field: str, pattern: re.Pattern[str] | None = None) -> str | None:
    value = body.get(field)
    if value is None:
        return None
    if not isinstance(value, str) or not value or "\x00" in value:
        raise _invalid(field, "must be a non-empty string")
    if pattern is not None and not pattern.fullmatch(value):
        raise _invalid(field, f"must match {pattern.pattern}")
    return value


def _number(body: dict[str, Any], field: str, *, integer: bool) -> float | int | None:
    value = body.get(field)
    if value is None:
        return None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not 0 < value <= 1_000_000_000:
        kind = "an integer" if integer else "a number"
        raise _invalid(field, f"must be {kind} above 0 and at most 1,000,000,000")
    return value


def _credentials(provider: str, value: Any) -> dict[str, str]:
    wanted = CREDENTIALS[provider]
    if not isinstance(value, dict):
        raise _invalid("credentials", f"must be an object with {', '.join(wanted)}")
    unknown = sorted(set(value) - set(wanted))
    missing = [name for name in wanted if name not in value]
    if unknown or missing:
        raise _invalid("credentials", f"{provider} takes exactly {', '.join(wanted)}")
    for name in wanted:
        secret = value[name]
        if (
            not isinstance(secret, str)
            or not 0 < len(secret) <= MAX_SECRET_CHARS
            or "\x00" in secret
        ):
            raise _invalid(f"credentials.{name}", f"must be 1 to {MAX_SECRET_CHARS} characters")
    return {name: value[name] for name in wanted}


def _base_url(body: dict[str, Any], provider: str, allow_private: bool) -> str | None:
    """The account's base URL: the provider's form, no credentials in it and, unless
    ``allow_private``, https (or SMTP) to a host that is no loopback, private or
    link-local address (``engine.outbound``)."""
    url = _text(body, "base_url")
    if url is None:
        if provider == "smtp":
            raise _invalid("base_url", "required: smtp://host:port or smtps://host:port")
        return None
    parts = urlsplit(url)
    if provider == "smtp":
        schemes: tuple[str, ...] = ("smtp", "smtps")
    else:
        schemes = ("https", "http") if allow_private else ("https",)
    try:
        port = parts.port
    except ValueError:
        port = None
    if (
        parts.scheme not in schemes
        or not parts.hostname
        or parts.username
        or (provider == "smtp" and (port is None or parts.path not in ("", "/")))
    ):
        if provider == "smtp":
            form = "smtp://host:port or smtps://host:port"
        else:
            form = "an http(s) URL" if allow_private else "an https URL"
        raise _invalid("base_url", f"must be {form} without credentials")
    if not allow_private:
        try:
            check_host(parts.hostname)
        except ValueError as exc:
            raise _invalid("base_url", str(exc)) from None
    return url.rstrip("/")


def validate(body: Any, *, allow_private: bool = False) -> dict[str, Any]:
    """The columns of a new account from a request body, or ``ValidationError`` naming the
    field (never echoing a credential). ``allow_private``: ``PROVIDER_ALLOW_PRIVATE_URLS``."""
    if not isinstance(body, dict):
        raise ValidationError("the body must be a JSON object", code="invalid_account")
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise _invalid(unknown[0], "unknown field")
    name = _text(body, "name", _NAME)
    if name is None:
        raise _invalid("name", "required")
    provider = body.get("provider")
    if not isinstance(provider, str) or provider not in CREDENTIALS:
        raise _invalid("provider", f"must be one of {', '.join(CREDENTIALS)}")
    credentials = _credentials(provider, body.get("credentials"))
    rate = _number(body, "rate_per_second", integer=False)
    if rate is None:
        raise _invalid("rate_per_second", "required (the provider's sending rate)")
    burst = _number(body, "burst", integer=True) or max(1, int(rate))
    secret = _text(body, "webhook_secret")
    if secret is not None and len(secret) > MAX_SECRET_CHARS:
        raise _invalid("webhook_secret", f"at most {MAX_SECRET_CHARS} characters")
    fields = {
        "name": name,
        "provider": provider,
        "credentials": credentials,
        "webhook_secret": secret,
        "base_url": _base_url(body, provider, allow_private),
        "region": _text(body, "region", _REGION),
        "domain": _text(body, "domain", _DOMAIN),
        "rate_per_second": float(rate),
        "burst": burst,
        "daily_quota": _number(body, "daily_quota", integer=True),
    }
    _check_adapter(fields)
    return fields


def _check_adapter(fields: dict[str, Any]) -> None:
    """The provider's adapter must accept the account (SES needs a region, Mailgun a
    domain, ...): refused here, with the adapter's reason, rather than at its first send.
    Building one opens nothing (sessions and connections open on first use)."""
    build = PROVIDERS[fields["provider"]].for_account
    if build is None:
        raise _invalid("provider", "has no provider accounts")
    try:
        build(
            Account(
                fields["provider"],
                fields["credentials"],
                fields["base_url"],
                fields["region"],
                fields["domain"],
            )
        )
    except ValueError as exc:
        raise ValidationError(str(exc), {"field": "provider"}, code="invalid_account") from None


def _view(row: asyncpg.Record) -> dict[str, Any]:
    view = dict(row)
    view["id"] = str(row["id"])
    view["credentials"] = view.pop("hints")  # masked: engine.db decodes jsonb
    view["created_at"] = row["created_at"].isoformat()
    return view


async def create(
    pool: asyncpg.Pool, sealer: Sealer, tenant_id: str, body: Any, *, allow_private: bool = False
) -> dict[str, Any]:
    row = await _write(
        pool,
        sealer,
        validate(body, allow_private=allow_private),
        f"""INSERT INTO provider_accounts (id, tenant_id, name, provider, credentials, hints,
                webhook_secret, base_url, region, domain, rate_per_second, burst, daily_quota)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
            RETURNING {_COLUMNS}""",
        uuid.uuid4(),
        tenant_id,
    )
    return _view(row)


async def replace(
    pool: asyncpg.Pool,
    sealer: Sealer,
    tenant_id: str,
    ref: str,
    body: Any,
    *,
    allow_private: bool = False,
) -> dict[str, Any]:
    """Replace an account's settings with a whole new body (``PUT``: credentials given
    again in full, as at create; the provider stays the same). The workers use the new
    settings within ``engine.routes.TTL`` seconds; a batch paused because the provider
    refused the old credentials is then resumed by its operator."""
    column, value = _key(ref)
    row = await _write(
        pool,
        sealer,
        validate(body, allow_private=allow_private),
        f"""UPDATE provider_accounts
               SET name = $3, credentials = $5, hints = $6, webhook_secret = $7,
                   base_url = $8, region = $9, domain = $10, rate_per_second = $11,
                   burst = $12, daily_quota = $13
             WHERE tenant_id = $1 AND {column} = $2 AND provider = $4
         RETURNING {_COLUMNS}""",
        tenant_id,
        value,
    )
    if row is None:
        current = await get(pool, tenant_id, ref)  # 404 when there is no such account
        raise _invalid("provider", f"cannot change (the account is a {current['provider']} one)")
    return _view(row)


async def _write(
    pool: asyncpg.Pool, sealer: Sealer, fields: dict[str, Any], sql: str, first: Any, second: Any
) -> asyncpg.Record | None:
    """Run ``sql`` with ``first``, ``second`` and then the sealed columns of ``fields``
    (``validate``: $3 name, $4 provider, $5 credentials, $6 hints, $7 webhook secret, $8
    base URL, $9 region, $10 domain, $11 rate, $12 burst, $13 daily quota)."""
    credentials, secret = fields["credentials"], fields["webhook_secret"]
    try:
        return await pool.fetchrow(
            sql,
            first,
            second,
            fields["name"],
            fields["provider"],
            sealer.seal(credentials),
            {name: hint(value) for name, value in credentials.items()},
            sealer.seal(secret) if secret is not None else None,
            fields["base_url"],
            fields["region"],
            fields["domain"],
            fields["rate_per_second"],
            fields["burst"],
            fields["daily_quota"],
        )
    except asyncpg.UniqueViolationError:
        raise Conflict(
            f"an account named {fields['name']!r} exists already", code="account_exists"
        ) from None


async def list_accounts(
    pool: asyncpg.Pool, tenant_id: str, *, limit: int = MAX_ACCOUNTS_PAGE, after: str | None = None
) -> dict[str, Any]:
    """A page of the tenant's accounts by name (``next_cursor``: the last name)."""
    if not 1 <= limit <= MAX_ACCOUNTS_PAGE:
        raise ValidationError(
            f"limit: must be between 1 and {MAX_ACCOUNTS_PAGE}", {"field": "limit"}
        )
    if after is not None and not _NAME.fullmatch(after):
        raise ValidationError("cursor: not a cursor this API returned", {"field": "cursor"})
    rows = await pool.fetch(
        f"""SELECT {_COLUMNS} FROM provider_accounts
             WHERE tenant_id = $1 AND ($2::text IS NULL OR name > $2)
             ORDER BY name LIMIT $3""",
        tenant_id,
        after,
        limit + 1,
    )
    page = [_view(row) for row in rows[:limit]]
    return {"data": page, "next_cursor": page[-1]["name"] if len(rows) > limit else None}


def _key(ref: str) -> tuple[str, Any]:
    """An account is named by its id or its name."""
    try:
        return "id", uuid.UUID(ref)
    except ValueError:
        return "name", ref


async def get(pool: asyncpg.Pool, tenant_id: str, ref: str) -> dict[str, Any]:
    column, value = _key(ref)
    row = await pool.fetchrow(
        f"SELECT {_COLUMNS} FROM provider_accounts WHERE tenant_id = $1 AND {column} = $2",
        tenant_id,
        value,
    )
    if row is None:
        raise NotFound("no such provider account", code="account_not_found")
    return _view(row)


async def delete(pool: asyncpg.Pool, tenant_id: str, ref: str) -> None:
    """Delete an account; 409 while a batch that is not finished sends through it."""
    column, value = _key(ref)
    async with pool.acquire() as conn, conn.transaction():
        found = await conn.fetchval(
            f"""SELECT id FROM provider_accounts WHERE tenant_id = $1 AND {column} = $2
                FOR UPDATE""",
            tenant_id,
            value,
        )
        if found is None:
            raise NotFound("no such provider account", code="account_not_found")
        using = await conn.fetchval(
            """SELECT count(*) FROM batches
                WHERE provider_account_id = $1 AND status <> ALL($2::text[])""",
            found,
            list(FINISHED),
        )
        if using:
            raise Conflict(
                f"{using} unfinished batch(es) send through this account; cancel them or "
                "wait for them to finish",
                {"batches": using},
                code="account_in_use",
            )
        await conn.execute("DELETE FROM provider_accounts WHERE id = $1", found)


async def resolve(
    conn: asyncpg.Connection, tenant_id: str, ref: str
) -> tuple[uuid.UUID, str] | None:
    """(id, provider) of the tenant's account named ``ref`` (its name or id), or None.
    (A delete racing the create of a batch that names the account can still win; that
    batch's chunks then fail with the reason, ``engine.sender``.)"""
    column, value = _key(ref)
    row = await conn.fetchrow(
        f"SELECT id, provider FROM provider_accounts WHERE tenant_id = $1 AND {column} = $2",
        tenant_id,
        value,
    )
    return None if row is None else (row["id"], row["provider"])


@dataclass(frozen=True, slots=True)
class Sending:
    """What a worker sends through: the opened account, its rate and its daily quota."""

    account: Account
    rate: Rate
    daily_quota: int | None


async def sending(
    pool: asyncpg.Pool, sealer: Sealer, account_id: str, *, allow_private: bool = False
) -> Sending | None:
    """The account a batch sends through (None: it was deleted); see ``_opened``."""
    row = await pool.fetchrow(
        """SELECT provider, credentials, base_url, region, domain, rate_per_second, burst,
                  daily_quota FROM provider_accounts WHERE id = $1""",
        uuid.UUID(account_id),
    )
    if row is None:
        return None
    return Sending(
        _opened(sealer, row, allow_private=allow_private),
        Rate(row["rate_per_second"], row["burst"]),
        row["daily_quota"],
    )


@dataclass(frozen=True, slots=True)
class WebhookSecret:
    """What checks the webhook posts of one account: its provider, its tenant and the
    opened secret (never in a repr)."""

    provider: str
    tenant_id: str
    secret: str = field(repr=False)


async def webhook_secret(
    pool: asyncpg.Pool, sealer: Sealer, account_id: uuid.UUID
) -> WebhookSecret | None:
    """The opened webhook secret of an account (``/webhooks/{provider}/{account_id}``);
    None when there is no such account or it has no webhook secret. ``ValueError`` when
    the secret is sealed under none of ``CREDENTIALS_KEYS``."""
    row = await pool.fetchrow(
        "SELECT provider, tenant_id, webhook_secret FROM provider_accounts WHERE id = $1",
        account_id,
    )
    if row is None or row["webhook_secret"] is None:
        return None
    return WebhookSecret(row["provider"], row["tenant_id"], sealer.open(row["webhook_secret"]))


async def _sealed(pool: asyncpg.Pool, tenant_id: str, ref: str) -> asyncpg.Record:
    """The tenant's account row, credentials still sealed; 404 when it has none so named."""
    column, value = _key(ref)
    row = await pool.fetchrow(
        f"""SELECT id, name, provider, credentials, base_url, region, domain,
                   rate_per_second, daily_quota
              FROM provider_accounts WHERE tenant_id = $1 AND {column} = $2""",
        tenant_id,
        value,
    )
    if row is None:
        raise NotFound("no such provider account", code="account_not_found")
    return row


def _opened(sealer: Sealer, row: asyncpg.Record, *, allow_private: bool) -> Account:
    """The account of ``row`` with its credentials opened; unless ``allow_private``, its
    adapter connects only to public addresses (``engine.outbound.PublicResolver``)."""
    return Account(
        provider=row["provider"],
        credentials=sealer.open(row["credentials"]),
        base_url=row["base_url"],
        region=row["region"],
        domain=row["domain"],
        resolver=None if allow_private else PublicResolver(),
    )


async def account(pool: asyncpg.Pool, sealer: Sealer, tenant_id: str, ref: str) -> Account:
    """The opened account (``providers.base.Account``), its connections unguarded: to read,
    not to send through (``sending`` is)."""
    return _opened(sealer, await _sealed(pool, tenant_id, ref), allow_private=True)


async def check(
    pool: asyncpg.Pool,
    sealer: Sealer,
    tenant_id: str,
    ref: str,
    *,
    allow_private: bool = False,
    within: float = CHECK_SECONDS,
) -> dict[str, Any]:
    """Ask the provider whether the tenant's account ``ref`` (id or name; another
    tenant's is 404) can send: its adapter's ``check``, bounded to ``within`` seconds, the
    adapter closed after. Answers ``{"ok", "detail", "account" (its name), "provider",
    "call", "quota", "seconds"}``: ``quota`` (``per_day``, ``per_second``,
    ``sent_last_24_hours``) only where the provider reports one, and then the detail notes
    an account rate or daily quota above it. No credential is in the answer or the log."""
    row = await _sealed(pool, tenant_id, ref)
    started = time.monotonic()
    secrets: list[str] = []
    try:
        opened = _opened(sealer, row, allow_private=allow_private)
    except ValueError:
        result = CheckResult(
            False, "the credentials are sealed under none of CREDENTIALS_KEYS: enter them again"
        )
    else:
        secrets = [secret for secret in opened.credentials.values() if len(secret) >= 4]
        result = await _run_check(opened, within)
    quota = result.quota
    notes = [] if quota is None else _over_quota(row, quota.per_day, quota.per_second)
    log.info(
        "provider account checked",
        extra={"account_id": str(row["id"]), "provider": row["provider"], "ok": result.ok},
    )
    return {
        "ok": result.ok,
        # The adapter cleans its own texts; this is the last guard.
        "detail": scrub("; ".join([result.detail, *notes]), secrets),
        "account": row["name"],
        "provider": row["provider"],
        "call": result.call or None,
        "quota": None
        if quota is None
        else {
            "per_day": quota.per_day,
            "per_second": quota.per_second,
            "sent_last_24_hours": quota.sent_last_24_hours,
        },
        "seconds": round(time.monotonic() - started, 3),
    }


async def _run_check(opened: Account, within: float) -> CheckResult:
    build = PROVIDERS[opened.provider].for_account
    if build is None:  # pragma: no cover - validate() refuses such accounts
        return CheckResult(False, f"{opened.provider} has no provider accounts")
    try:
        adapter = build(opened)
    except ValueError as exc:  # the adapter refuses the account (its reason names no secret)
        return CheckResult(False, str(exc))
    try:
        async with asyncio.timeout(within):
            return await adapter.check()
    except TimeoutError:
        return CheckResult(False, f"timed out: the provider did not answer within {within:g} s")
    finally:
        await adapter.close()


def _over_quota(row: asyncpg.Record, per_day: float | None, per_second: float | None) -> list[str]:
    """Notes on an account configured to send faster or more than the provider allows."""
    notes = []
    if per_second is not None and row["rate_per_second"] > per_second:
        notes.append(
            f"the account's rate of {row['rate_per_second']:g}/s is above the provider's "
            f"{per_second:g}/s: the provider will throttle it"
        )
    if per_day is not None and (row["daily_quota"] or 0) > per_day:
        notes.append(
            f"the account's daily quota of {row['daily_quota']:,} is above the provider's "
            f"{per_day:,.0f} per 24 h"
        )
    return notes


async def reseal_all(pool: asyncpg.Pool, sealer: Sealer, tenant_id: str | None = None) -> int:
    """Seal every account's secrets (or one tenant's) under the first of
    ``CREDENTIALS_KEYS`` (rotation); all or nothing."""
    done = 0
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(
            """SELECT id, credentials, webhook_secret FROM provider_accounts
                WHERE $1::text IS NULL OR tenant_id = $1 FOR UPDATE""",
            tenant_id,
        )
        for row in rows:
            secret = row["webhook_secret"]
            await conn.execute(
                "UPDATE provider_accounts SET credentials = $2, webhook_secret = $3 WHERE id = $1",
                row["id"],
                sealer.reseal(row["credentials"]),
                sealer.reseal(secret) if secret is not None else None,
            )
            done += 1
    return done
