"""Who is calling: the API key of each request, checked cheaply, revoked at once, and
not guessable at speed.

- **Cache.** A key checked against PostgreSQL (``engine.tenants.find_key``) is kept in
  this process for ``CACHE_SECONDS``, by its digest, so a busy client costs no query per
  request. Only valid keys are cached.
- **Revocation is immediate across processes.** Every API process subscribes to the core
  NATS subject ``<NATS_PREFIX>.auth.revoked`` and lists itself in Dragonfly (a sorted set
  of instance ids, renewed every ``LISTENER_RENEW_SECONDS``). Revoking a key (API or CLI)
  commits it in PostgreSQL, publishes its id there with a reply inbox, and waits until
  every listed process has answered that it dropped the key from its cache (at most
  ``ACK_TIMEOUT``). So when the revoking request or command returns, no live API process
  accepts the key any more: a broadcast alone arrives a few milliseconds later, after the
  client's next request could. A process that did not answer in time (its NATS connection
  down) keeps the key for at most ``CACHE_SECONDS``: the cache's lifetime is the bound. A
  lookup that was in flight while a revocation arrived is answered but not cached.
- **Repeated failures are slowed per client address.** Every presented key that fails
  counts against the client's address in Dragonfly (a fixed window of
  ``AUTH_FAILURE_WINDOW_SECONDS``); at ``AUTH_FAILURE_LIMIT`` failures the address gets
  429 ``too_many_failed_auth`` with ``Retry-After`` (the rest of the window) for every key
  this process has not already verified, before any database query. Other addresses are
  not affected. A request without a key costs no query and is not counted.
- **A valid key from a blocked address works only if it is in the cache.** Checking it
  would cost the query the limit exists to spare, and answering 200 for a right key but
  429 for a wrong one would tell a guesser which guess was right: the limit would limit
  nothing. So a client that was working a moment ago (its key cached here) goes on, while
  a fresh one behind the same address (one NAT, one office) waits out the window. Keys
  are 256-bit random, so the limit is there for the database's sake and against key
  stuffing, not because a key could be guessed.
- **The client's address** is the TCP peer, or, when the peer is one of
  ``TRUSTED_PROXIES``, the nearest address in ``X-Forwarded-For`` that is not a trusted
  proxy (so a client cannot pick its own address by sending the header). IPv6 addresses
  count per /64, the block one host usually holds.
- A key that is not printable ASCII of the shape this server issues (non-UTF-8 header
  bytes included) is refused without a query, and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
import uuid
from dataclasses import dataclass

import nats.errors
import redis.exceptions
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from engine import tenants
from engine.config import Network
from engine.errors import TooManyRequests, Unauthorized
from engine.services import Services

log = logging.getLogger(__name__)

CACHE_SECONDS = 10.0
CACHE_MAX = 10_000
MAX_KEY_LENGTH = 128
ACK_TIMEOUT = 2.0  # seconds a revocation waits for every API process to confirm
LISTENER_RENEW_SECONDS = 10.0
LISTENER_TTL_SECONDS = 30.0  # a process not renewed for this long is not waited for


def revocation_subject(services: Services) -> str:
    """The core NATS subject revocations are announced on (under ``NATS_PREFIX``)."""
    return f"{services.topology.prefix}.auth.revoked"


def _listeners(services: Services) -> str:
    """The Dragonfly sorted set of API processes (instance id, scored by expiry)."""
    return services.key("auth-listeners")


def client_address(
    peer: str | None, forwarded_for: str | None, trusted: tuple[Network, ...]
) -> str:
    """The address failures are counted against (see the module's docstring)."""
    address = _parse(peer)
    if address is None:
        return "unknown"
    if forwarded_for and _trusted(address, trusted):
        for hop in reversed(forwarded_for.split(",")):
            candidate = _parse(hop.strip())
            if candidate is None:
                break  # garbage: stop at the last hop a trusted proxy vouched for
            address = candidate
            if not _trusted(address, trusted):
                break
    if address.version == 6:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def _parse(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text or "")
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def _trusted(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, trusted: tuple[Network, ...]
) -> bool:
    return any(address in network for network in trusted)


def well_formed(key: str) -> bool:
    """A key this server could have issued: printable ASCII with its prefix, not too long."""
    return (
        len(key) <= MAX_KEY_LENGTH
        and key.isascii()
        and key.isprintable()
        and key.startswith(tenants.API_KEY_PREFIX)
    )


async def revoke_key(services: Services, ref: str, tenant_id: str | None = None) -> tenants.ApiKey:
    """Revoke a key (``engine.tenants.revoke_key``); return once every API process has
    dropped it (or ``ACK_TIMEOUT`` passed: then the cache lifetime bounds it)."""
    key = await tenants.revoke_key(services.pool, ref, tenant_id)
    try:
        await _announce(services, key.id)
    except (nats.errors.Error, redis.exceptions.RedisError, OSError) as exc:
        log.warning("revocation of key %s not announced: %r", key.id, exc)
    return key


async def _announce(services: Services, key_id: int) -> None:
    registry, now = _listeners(services), time.time()
    await services.redis.zremrangebyscore(registry, "-inf", now)
    expected = {m.decode() for m in await services.redis.zrangebyscore(registry, now, "+inf")}
    confirmed: set[str] = set()
    everyone = asyncio.Event()

    async def on_ack(msg: Msg) -> None:
        confirmed.add(msg.data.decode(errors="replace"))
        if expected <= confirmed:
            everyone.set()

    inbox = services.nc.new_inbox()
    subscription = await services.nc.subscribe(inbox, cb=on_ack)
    try:
        await services.nc.publish(revocation_subject(services), str(key_id).encode(), reply=inbox)
        await services.nc.flush(timeout=ACK_TIMEOUT)
        if expected:
            await asyncio.wait_for(everyone.wait(), ACK_TIMEOUT)
    except TimeoutError:
        log.warning(
            "revocation of key %s not confirmed by %d API process(es); they refuse it within %g s",
            key_id,
            len(expected - confirmed),
            CACHE_SECONDS,
        )
    finally:
        await subscription.unsubscribe()


@dataclass(slots=True)
class _Entry:
    tenant_id: str
    key_id: int
    expires: float


class Authenticator:
    """One per API process: the key cache, its revocation subscription, the failure limit."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.instance = uuid.uuid4().hex
        self._cache: dict[bytes, _Entry] = {}
        self._ids: dict[int, _Entry] = {}  # key_in_use's answers, by key id
        self._generation = 0  # revocations received; a lookup spanning one is not cached
        self._subscription: Subscription | None = None
        self._renewing: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, services: Services) -> Authenticator:
        """Subscribe to revocations, then list this process as one to wait for."""
        authenticator = cls(services)
        authenticator._subscription = await services.nc.subscribe(
            revocation_subject(services), cb=authenticator._on_revocation
        )
        await services.nc.flush()
        try:
            await authenticator._register()
        except (redis.exceptions.RedisError, OSError) as exc:  # listed at the next renewal
            log.warning("could not list this API process for revocations yet: %r", exc)
        authenticator._renewing = asyncio.create_task(authenticator._keep_registered())
        return authenticator

    async def close(self) -> None:
        if self._renewing is not None:
            self._renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewing
        with contextlib.suppress(redis.exceptions.RedisError, OSError):
            await self.services.redis.zrem(_listeners(self.services), self.instance)
        if self._subscription is not None:
            await self._subscription.unsubscribe()
            self._subscription = None

    async def tenant(self, key: str | None, peer: str | None, forwarded_for: str | None) -> str:
        """The tenant id of the request's key; ``Unauthorized`` or ``TooManyRequests``."""
        return (await self.identify(key, peer, forwarded_for))[0]

    async def identify(
        self, key: str | None, peer: str | None, forwarded_for: str | None
    ) -> tuple[str, int]:
        """(tenant id, key id) of a presented key, as ``tenant`` checks it (the dashboard's
        sign-in keeps the key's id, never the key)."""
        if not key:
            raise Unauthorized("an API key is required: send 'Authorization: Bearer <key>'")
        formed = well_formed(key)
        digest = tenants.hash_key(key) if formed else b""
        hit = self._cache.get(digest) if formed else None
        if hit is not None and hit.expires > time.monotonic():
            return hit.tenant_id, hit.key_id
        settings = self.services.settings
        address = client_address(peer, forwarded_for, settings.trusted_proxies)
        wait = await self._blocked_for(address)
        if wait:
            raise TooManyRequests(
                "too many failed authentications from this address; try again later",
                {"limit": "auth_failures", "value": settings.auth_failure_limit},
                retry_after=wait,
                code="too_many_failed_auth",
            )
        generation = self._generation
        try:
            if not formed:
                raise Unauthorized("the API key is not valid")
            key_id, tenant_id = await tenants.find_key(self.services.pool, key)
        except Unauthorized:
            await self._failed(address)
            raise
        if generation == self._generation:
            self._remember(digest, _Entry(tenant_id, key_id, time.monotonic() + CACHE_SECONDS))
        return tenant_id, key_id

    async def key_in_use(self, key_id: int, tenant_id: str) -> bool:
        """Whether the tenant's key ``key_id`` is still unrevoked: what a dashboard session,
        which holds the key's id and not the key, checks on each request. Cached like keys
        (``CACHE_SECONDS``, valid answers only) and forgotten on a revocation, so a revoked
        key ends its sessions as it ends its API requests."""
        hit = self._ids.get(key_id)
        if hit is not None and hit.tenant_id == tenant_id and hit.expires > time.monotonic():
            return True
        generation = self._generation
        if await tenants.key_tenant(self.services.pool, key_id) != tenant_id:
            self._ids.pop(key_id, None)
            return False
        if generation == self._generation:
            if len(self._ids) >= CACHE_MAX:
                self._ids.clear()
            self._ids[key_id] = _Entry(tenant_id, key_id, time.monotonic() + CACHE_SECONDS)
        return True

    async def revoke(self, ref: str, tenant_id: str | None = None) -> tenants.ApiKey:
        """Revoke a key everywhere; this process forgets it before answering."""
        key = await revoke_key(self.services, ref, tenant_id)
        self.forget(key.id)
        return key

    def forget(self, key_id: int) -> None:
        self._generation += 1
        self._ids.pop(key_id, None)
        for digest in [d for d, entry in self._cache.items() if entry.key_id == key_id]:
            del self._cache[digest]

    def _remember(self, digest: bytes, entry: _Entry) -> None:
        if len(self._cache) >= CACHE_MAX:
            now = time.monotonic()
            self._cache = {d: e for d, e in self._cache.items() if e.expires > now}
            if len(self._cache) >= CACHE_MAX:
                self._cache.clear()
        self._cache[digest] = entry

    async def _on_revocation(self, msg: Msg) -> None:
        try:
            key_id = int(msg.data)
        except ValueError:
            # Its bytes are not logged: a key published here by mistake would land in the log.
            log.warning("ignored a malformed key revocation (%d bytes)", len(msg.data))
            return
        self.forget(key_id)
        if msg.reply:
            await self.services.nc.publish(msg.reply, self.instance.encode())

    async def _register(self) -> None:
        expires = time.time() + LISTENER_TTL_SECONDS
        await self.services.redis.zadd(_listeners(self.services), {self.instance: expires})

    async def _keep_registered(self) -> None:
        while True:
            await asyncio.sleep(LISTENER_RENEW_SECONDS)
            try:
                await self._register()
            except (redis.exceptions.RedisError, OSError) as exc:
                log.warning("could not renew this API process's listing: %r", exc)

    def _failures_key(self, address: str) -> str:
        return self.services.key("auth-failures", address)

    async def _blocked_for(self, address: str) -> int:
        """Seconds until ``address`` may try again; 0 when it is under the limit. Dragonfly
        being unreachable does not lock everyone out: the limit is then not applied."""
        settings, name = self.services.settings, self._failures_key(address)
        try:
            async with self.services.redis.pipeline(transaction=False) as pipe:
                count, ttl = await pipe.get(name).ttl(name).execute()
        except (redis.exceptions.RedisError, OSError) as exc:
            log.warning("auth failure limit not checked: %r", exc)
            return 0
        if count is None or int(count) < settings.auth_failure_limit:
            return 0
        return max(1, int(ttl)) if ttl and ttl > 0 else settings.auth_failure_window_seconds

    async def _failed(self, address: str) -> None:
        name = self._failures_key(address)
        window = self.services.settings.auth_failure_window_seconds
        try:
            async with self.services.redis.pipeline(transaction=True) as pipe:
                await pipe.set(name, 0, ex=window, nx=True).incr(name).execute()
        except (redis.exceptions.RedisError, OSError) as exc:
            log.warning("auth failure not counted: %r", exc)
