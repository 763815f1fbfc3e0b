"""The connections one process holds: PostgreSQL pool, NATS/JetStream, Dragonfly.

Both the API and each worker process open one ``Services`` and pass it to engine
functions; nothing else opens connections of its own.

``check_services`` is the one reachability check of the four services (short timeouts,
no retries): the CLI runs it before a command, the benchmarks before a run, and
``Services.open`` when connecting fails, so that a service that is down is named in one
line (``ServiceUnavailable``: which service, where, why; URLs without credentials)
instead of a traceback.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from engine.config import Settings
from engine.db import create_pool
from engine.errors import BatchSenderError
from engine.topology import Topology, ensure_topology

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Services:
    settings: Settings
    pool: asyncpg.Pool
    nc: NATS
    js: JetStreamContext
    redis: aioredis.Redis
    topology: Topology

    @classmethod
    async def open(cls, settings: Settings, *, pool_size: int = 10) -> Services:
        """Connect to everything; ``ServiceUnavailable`` naming the service when connecting
        fails because one is down (NATS is waited for: its client reconnects for ever)."""
        try:
            return await cls._open(settings, pool_size)
        except Exception as exc:
            if failures := await check_services(settings):
                raise ServiceUnavailable(failures) from exc
            raise

    @classmethod
    async def _open(cls, settings: Settings, pool_size: int) -> Services:
        pool = await create_pool(settings, max_size=pool_size)
        nc = NATS()

        async def disconnected() -> None:
            if not nc.is_draining and not nc.is_closed:
                log.warning("nats disconnected; reconnecting")

        await nc.connect(
            settings.nats_url,
            name="batchsender",
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            error_cb=functools.partial(_log_nats_error, safe_url(settings.nats_url)),
            disconnected_cb=disconnected,
        )
        js = nc.jetstream(timeout=10)
        topology = Topology(settings.nats_prefix, settings.nats_replicas)
        await ensure_topology(js, topology)
        client = aioredis.Redis.from_url(settings.dragonfly_url, socket_timeout=5)
        return cls(settings, pool, nc, js, client, topology)

    def key(self, *parts: str) -> str:
        """A Dragonfly key under this deployment's ``KEY_PREFIX``."""
        return self.settings.key_prefix + ":".join(parts)

    async def close(self) -> None:
        for closing in (self.nc.drain(), self.redis.aclose(), self.pool.close()):
            try:
                await asyncio.wait_for(closing, 10)
            except Exception as exc:  # closing must go on for the others
                log.warning("error while closing: %r", exc)


async def _log_nats_error(url: str, exc: Exception) -> None:
    if isinstance(exc, OSError):  # connecting failed: the client keeps trying
        log.warning("NATS at %s is not reachable (%s); retrying", url, exc.strerror or exc)
    else:
        log.warning("nats error: %r", exc)


# --- is every service there? ---------------------------------------------------------

SERVICE_NAMES = {
    "postgres": "PostgreSQL",
    "nats": "NATS",
    "dragonfly": "Dragonfly/Redis",
    "clickhouse": "ClickHouse",
}
_VARIABLES = {
    "postgres": "DATABASE_URL",
    "nats": "NATS_URL",
    "dragonfly": "DRAGONFLY_URL",
    "clickhouse": "CLICKHOUSE_URL",
}
ALL_SERVICES: tuple[str, ...] = tuple(SERVICE_NAMES)
CHECK_TIMEOUT = 3.0  # seconds per service; the checks run at the same time
START_HINT = "./setup-dev.sh starts"


@dataclass(frozen=True, slots=True)
class Unreachable:
    """One service that did not answer (``refused``: answered, but not as we need)."""

    service: str  # a key of SERVICE_NAMES
    url: str  # without credentials
    reason: str
    refused: bool = False

    def describe(self) -> str:
        name = SERVICE_NAMES[self.service]
        if self.refused:
            return f"{name} at {self.url} refused the connection ({self.reason})"
        return f"{name} at {self.url} is not reachable ({self.reason})"


class ServiceUnavailable(BatchSenderError):
    """Services the process needs are down (or refuse it). ``message`` is one line."""

    status = 503
    code = "service_unavailable"

    def __init__(self, failures: Sequence[Unreachable]):
        self.failures = tuple(failures)
        down = [f for f in self.failures if not f.refused]
        text = "; ".join(f.describe() for f in self.failures)
        if len(down) == 1:
            text += f" — is it running? {START_HINT} it"
        elif down:
            text += f" — are they running? {START_HINT} them"
        else:
            variables = ", ".join(_VARIABLES[f.service] for f in self.failures)
            text += f" — check {variables}"
        super().__init__(text)


def safe_url(url: str) -> str:
    """``url`` without its user, password, query and fragment: fit to be shown."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = f"{host}:{parts.port}" if parts.port else host
    except ValueError:
        return "(an invalid URL)"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _reason(exc: BaseException, within: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {within:g} s"
    if isinstance(exc, socket.gaierror):
        return "unknown host"
    if isinstance(getattr(exc, "os_error", None), OSError):  # aiohttp's connection errors
        exc = exc.os_error  # type: ignore[attr-defined]
    if isinstance(exc, ConnectionRefusedError) or "Errno 111" in str(exc):
        return "connection refused"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


class _Refused(Exception):
    """The service answered, but refused us or lacks what we need."""


async def _postgres(url: str, within: float) -> None:
    try:
        conn = await asyncpg.connect(url, timeout=within)
    except asyncpg.InvalidCatalogNameError:
        return  # the server is there; the database is created by the migrations
    except asyncpg.PostgresError as exc:
        raise _Refused(str(exc)) from None
    await conn.close(timeout=within)


async def _nats(url: str, within: float) -> None:
    """The server's greeting (its INFO line, before any authentication) says whether it
    is NATS and whether JetStream is on. Only the first server of a list is checked."""
    parts = urlsplit(url.split(",")[0].strip())
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 4222)
    try:
        line = await reader.readline()
    finally:
        writer.close()
    if not line.startswith(b"INFO "):
        raise _Refused("not a NATS server")
    if not orjson.loads(line[5:]).get("jetstream"):
        raise _Refused("JetStream is off: start nats-server with -js")


async def _dragonfly(url: str, within: float) -> None:
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    client = aioredis.Redis.from_url(
        url, socket_connect_timeout=within, socket_timeout=within, retry=Retry(NoBackoff(), 0)
    )
    try:
        await client.ping()
    except aioredis.AuthenticationError as exc:
        raise _Refused(str(exc)) from None
    except aioredis.ConnectionError as exc:
        raise (exc.__cause__ or exc.__context__ or exc) from None
    except aioredis.ResponseError as exc:
        raise _Refused(str(exc)) from None
    finally:
        await client.aclose()


async def _clickhouse(url: str, within: float) -> None:
    import aiohttp  # here: the processes that check need not all load it

    ping = safe_url(url).rstrip("/") + "/ping"
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=within)) as session,
        session.get(ping) as response,
    ):
        if response.status != 200:
            raise _Refused(f"HTTP {response.status} for /ping")


_CHECKS = {"postgres": _postgres, "nats": _nats, "dragonfly": _dragonfly, "clickhouse": _clickhouse}


async def check_services(
    settings: Settings,
    services: Iterable[str] = ALL_SERVICES,
    within: float = CHECK_TIMEOUT,
) -> list[Unreachable]:
    """The services (of ``ALL_SERVICES``) that do not answer as they should, checked at
    the same time, each given ``within`` seconds; empty when all do."""
    urls = {
        "postgres": settings.database_url,
        "nats": settings.nats_url,
        "dragonfly": settings.dragonfly_url,
        "clickhouse": settings.clickhouse_url,
    }

    async def check(service: str) -> Unreachable | None:
        url = urls[service]
        try:
            await asyncio.wait_for(_CHECKS[service](url, within), within)
        except _Refused as exc:
            return Unreachable(service, safe_url(url), str(exc)[:200], refused=True)
        except Exception as exc:
            return Unreachable(service, safe_url(url), _reason(exc, within))
        return None

    found = await asyncio.gather(*(check(service) for service in services))
    return [failure for failure in found if failure is not None]


async def require_services(
    settings: Settings,
    services: Iterable[str] = ALL_SERVICES,
    within: float = CHECK_TIMEOUT,
) -> None:
    """Raise ``ServiceUnavailable`` unless every one of ``services`` answers."""
    if failures := await check_services(settings, services, within):
        raise ServiceUnavailable(failures)
