"""Dashboard sessions: kept server-side in Dragonfly, under the deployment's ``KEY_PREFIX``.

- **The cookie** (``bs_session``) holds only a random 256-bit token. Dragonfly holds the
  session under the token's sha256, so reading the store yields no usable cookie. The
  cookie is ``HttpOnly``, ``SameSite=Lax``, ``Path=/``, and ``Secure`` when the request came
  over TLS: directly, or with ``X-Forwarded-Proto: https`` from one of ``TRUSTED_PROXIES``
  (a header from anyone else is ignored). It has no ``Max-Age``: it ends with the browser.
- **A session** names its tenant, the API key it was opened with (its id and prefix, never
  the key), its CSRF token and when it was opened. Signing in always makes a new token (no
  fixation).
- **It ends** ``WEB_SESSION_SECONDS`` after sign-in whatever happens, ``WEB_IDLE_SECONDS``
  after its last request (the Dragonfly key's TTL, renewed by each request in the same
  command that reads it), at sign-out, and when its key is revoked: every request checks
  the key (``engine.auth.Authenticator.key_in_use``: cached briefly, dropped at once on a
  revocation from anywhere), and a revocation from the dashboard also deletes the key's
  sessions at once (``close_key``, through a per-key index).
- **CSRF**: each session has its own random token (the synchronizer pattern); every form
  carries it as ``csrf_token`` and htmx sends it as ``X-CSRF-Token`` (``web.csrf``). The
  sign-in form, before any session, is protected by a token in a short-lived cookie of its
  own (``bs_login``) that the form must repeat (double submit).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import secrets
import time
from dataclasses import dataclass, field

import orjson
from aiohttp import web

from engine.config import Settings
from engine.services import Services

log = logging.getLogger(__name__)

COOKIE = "bs_session"
LOGIN_COOKIE = "bs_login"
LOGIN_COOKIE_SECONDS = 3600
ENDED_SECONDS = 3600  # how long an ended session's marker says why it ended


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def same_token(expected: str, given: str | None) -> bool:
    """Constant-time comparison of a CSRF token; False for a missing one."""
    return bool(given) and hmac.compare_digest(expected.encode(), given.encode())  # type: ignore[union-attr]


@dataclass(slots=True)
class Session:
    token_hash: str
    tenant_id: str
    key_id: int
    key_prefix: str
    csrf: str
    created: float
    flash: list[list[str]] = field(default_factory=list)  # [level, text], shown once

    def as_json(self) -> bytes:
        return orjson.dumps(
            {
                "tenant_id": self.tenant_id,
                "key_id": self.key_id,
                "key_prefix": self.key_prefix,
                "csrf": self.csrf,
                "created": self.created,
                "flash": self.flash,
            }
        )


class SessionStore:
    """The sessions of one deployment (every dashboard process shares them)."""

    def __init__(self, services: Services) -> None:
        self.services = services
        settings = services.settings
        self.lifetime = settings.web_session_seconds
        self.idle = min(settings.web_idle_seconds, settings.web_session_seconds)

    def _key(self, token_hash: str) -> str:
        return self.services.key("web", "session", token_hash)

    def _index(self, key_id: int) -> str:
        return self.services.key("web", "key-sessions", str(key_id))

    async def open(self, tenant_id: str, key_id: int, key_prefix: str) -> tuple[str, Session]:
        """A new session; returns the cookie's token (never stored) and the session."""
        token = secrets.token_urlsafe(32)
        session = Session(
            _digest(token), tenant_id, key_id, key_prefix, secrets.token_urlsafe(32), time.time()
        )
        index = self._index(key_id)
        async with self.services.redis.pipeline(transaction=True) as pipe:
            pipe.set(self._key(session.token_hash), session.as_json(), ex=self.idle)
            pipe.sadd(index, session.token_hash)
            pipe.expire(index, self.lifetime)
            await pipe.execute()
        return token, session

    async def load(self, token: str) -> tuple[Session | None, str | None]:
        """The session of a cookie's token, its idle time renewed, or None and why not:
        ``expired`` (its lifetime is over, or it is unknown: idle, signed out, never) or
        ``revoked`` (its key was revoked from the dashboard)."""
        if not token or len(token) > 100:
            return None, "expired"
        token_hash = _digest(token)
        raw = await self.services.redis.getex(self._key(token_hash), ex=self.idle)
        if raw is None:
            return None, "expired"
        data = orjson.loads(raw)
        if data.get("ended"):
            return None, str(data["ended"])
        session = Session(
            token_hash,
            data["tenant_id"],
            int(data["key_id"]),
            data["key_prefix"],
            data["csrf"],
            float(data["created"]),
            data.get("flash") or [],
        )
        if session.created + self.lifetime <= time.time():
            await self.close(session)
            return None, "expired"
        return session, None

    async def save(self, session: Session) -> None:
        """Write a changed session (its flash messages) back, keeping its expiry."""
        await self.services.redis.set(
            self._key(session.token_hash), session.as_json(), keepttl=True, xx=True
        )

    async def flash(self, session: Session, level: str, text: str) -> None:
        """A message for the next page this session sees (after a redirect)."""
        session.flash.append([level, text])
        await self.save(session)

    async def close(self, session: Session) -> None:
        async with self.services.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._key(session.token_hash))
            pipe.srem(self._index(session.key_id), session.token_hash)
            await pipe.execute()

    async def close_key(self, key_id: int) -> int:
        """End every session opened with the key ``key_id`` (each leaves a marker for an
        hour, so its browser is told why); how many there were."""
        index = self._index(key_id)
        hashes = [h.decode() for h in await self.services.redis.smembers(index)]
        ended = orjson.dumps({"ended": "revoked"})
        async with self.services.redis.pipeline(transaction=True) as pipe:
            for token_hash in hashes:
                pipe.set(self._key(token_hash), ended, ex=ENDED_SECONDS, xx=True)
            pipe.delete(index)
            results = await pipe.execute()
        return sum(1 for done in results[:-1] if done)


# --- cookies ---------------------------------------------------------------------------


def behind_tls(request: web.Request, settings: Settings) -> bool:
    """Whether the client reached us over TLS: the connection itself, or a trusted proxy's
    ``X-Forwarded-Proto: https``."""
    if request.scheme == "https":  # aiohttp: the connection's own TLS, never a header
        return True
    proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    if proto != "https":
        return False
    try:
        peer = ipaddress.ip_address(request.remote or "")
    except ValueError:
        return False
    return any(peer in network for network in settings.trusted_proxies)


def set_cookie(
    response: web.StreamResponse,
    request: web.Request,
    settings: Settings,
    name: str,
    value: str,
    max_age: int | None = None,
) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/",
        httponly=True,
        samesite="Lax",
        secure=behind_tls(request, settings),
    )


def clear_cookie(
    response: web.StreamResponse, request: web.Request, settings: Settings, name: str
) -> None:
    response.del_cookie(
        name, path="/", httponly=True, samesite="Lax", secure=behind_tls(request, settings)
    )
