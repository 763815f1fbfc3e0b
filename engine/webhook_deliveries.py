"""Posting deliveries to customers' webhook endpoints, retried, with their log and replay.

A delivery (``webhook_deliveries``, written by ``engine.webhook_outbox``) is one POST of
its stored body, signed with the Standard Webhooks scheme (the ``standardwebhooks``
package): ``webhook-id`` (the delivery's id, the same on every retry and replay, so a
receiver can drop a copy), ``webhook-timestamp`` and ``webhook-signature``
(``v1,<base64 HMAC-SHA256 of "id.timestamp.body">`` under the endpoint's secret).

Outcome of an attempt: a 2xx answer is ``delivered``; 410 Gone ``failed`` and the endpoint
disabled (its other pending deliveries fail with it, and nothing more is written for it);
anything else (another status, a redirect, a timeout, a refused connection, an address
that is not public) is retried after ``Policy.delay`` (exponential with jitter: 5 s, 10 s,
20 s ... capped at 4 h; with 16 attempts about 18 h) until ``max_attempts`` attempts or
``max_age`` (24 h) since it was written or replayed, then ``failed``.

Never in the way of sending, nor of other endpoints: posting runs in its own loop of
every worker process, off the results consumers' acknowledgements; each process posts at
most ``concurrency`` deliveries at once, at most ``per_endpoint`` of them to one endpoint,
each bounded by ``timeout``. A delivery is claimed with ``FOR UPDATE SKIP LOCKED`` and a
lease (its ``next_attempt_at`` moved ``lease`` ahead): processes never post the same
delivery at once, and one that died holding it leaves it to another after the lease. So a
delivery is posted at least once; twice only when a process dies between the POST and
recording its answer (the receiver sees the same ``webhook-id``).

Retention (``prune``): deliveries are kept ``RETENTION`` (7 days) after they were written,
the outbox's records of seen messages a day, its ``batch.completed`` records two days.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
from standardwebhooks.webhooks import Webhook

from engine import metrics
from engine.accounts import Sealer
from engine.errors import Conflict, NotFound, ValidationError
from engine.outbound import PublicResolver
from engine.services import Services
from engine.topology import REDELIVERY, Redelivery
from engine.webhook_endpoints import (
    check_limit,
    check_url,
    decode_cursor,
    endpoint_uuid,
    page_of,
)
from engine.webhook_outbox import BATCHING, Batching, Fetch, Outbox

log = logging.getLogger(__name__)

STATUSES = ("pending", "delivered", "failed")
RETENTION = timedelta(days=7)
PRUNE_EVERY = 600.0  # seconds
USER_AGENT = "BatchSender-Webhooks/1"


@dataclass(frozen=True, slots=True)
class Policy:
    """How deliveries are posted and retried (see the module docstring)."""

    base_delay: float = 5.0
    max_delay: float = 4 * 3600.0
    max_attempts: int = 16
    max_age: float = 24 * 3600.0
    jitter: float = 0.2  # each delay is scaled by a random factor in 1 ± jitter
    timeout: float = 15.0  # one POST, connecting included
    connect_timeout: float = 5.0
    concurrency: int = 64  # posts in flight per process
    per_endpoint: int = 4  # posts in flight per endpoint per process
    lease: float = 60.0  # a claimed delivery goes to another process after this
    poll: float = 0.5  # seconds between looks for due deliveries when none was written here

    def delay(self, attempts: int) -> float:
        """Seconds before the next attempt after ``attempts`` failed ones."""
        delay = min(self.max_delay, self.base_delay * 2 ** min(max(attempts, 1) - 1, 40))
        return delay * random.uniform(1 - self.jitter, 1 + self.jitter)

    def gives_up(self, attempts: int, age: float) -> bool:
        return attempts >= self.max_attempts or age >= self.max_age


POLICY = Policy()


async def run(
    services: Services,
    fetch: Fetch,
    stopping: asyncio.Event,
    *,
    batching: Batching = BATCHING,
    policy: Policy = POLICY,
    redelivery: Redelivery = REDELIVERY,
) -> None:
    """A worker process's customer webhooks until ``stopping``: the ``results-hooks``
    consumer (``fetch`` fetches from it), the ``batch.completed`` sweep, retention, and
    the posting of deliveries."""
    poster = Poster(services, policy)
    outbox = Outbox(services, batching, redelivery, wake=poster.wake.set)
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(poster.run(stopping))
        tasks.create_task(outbox.run(fetch, stopping))
        tasks.create_task(_chores(services, outbox, batching.sweep_seconds, stopping))


async def _chores(
    services: Services, outbox: Outbox, every: float, stopping: asyncio.Event
) -> None:
    pruned = time.monotonic()
    while not stopping.is_set():
        try:
            await outbox.sweep_completions()
            if time.monotonic() - pruned >= PRUNE_EVERY:
                await prune(services.pool)
                pruned = time.monotonic()
        except Exception as exc:  # PostgreSQL down: the next sweep catches up
            log.warning("webhooks: batch.completed sweep or pruning failed: %r", exc)
        await _sleep(stopping, every)


async def _sleep(stopping: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stopping.wait(), seconds)


@dataclass(slots=True)
class _Claimed:
    id: uuid.UUID
    endpoint_id: uuid.UUID
    url: str
    secret: bytes
    body: bytes
    attempts: int
    since: datetime  # written or replayed: max_age counts from here


_CLAIM = """
WITH busy AS (
    SELECT * FROM unnest($2::uuid[], $3::int[]) AS b(endpoint_id, n)
), candidates AS (
    SELECT d.id, d.endpoint_id, d.next_attempt_at
      FROM webhook_deliveries d
      JOIN webhook_endpoints e ON e.id = d.endpoint_id AND e.disabled_at IS NULL
     WHERE d.status = 'pending' AND d.next_attempt_at <= now()
       AND d.endpoint_id <> ALL($4::uuid[])
     ORDER BY d.next_attempt_at
     LIMIT $1 * 4
), ranked AS (
    SELECT c.id, c.next_attempt_at,
           row_number() OVER (PARTITION BY c.endpoint_id ORDER BY c.next_attempt_at)
           + coalesce(b.n, 0) AS place
      FROM candidates c LEFT JOIN busy b USING (endpoint_id)
), due AS (
    SELECT d.id FROM webhook_deliveries d JOIN ranked r USING (id)
     WHERE r.place <= $5 AND d.status = 'pending' AND d.next_attempt_at <= now()
     ORDER BY r.next_attempt_at
     LIMIT $1
       FOR UPDATE OF d SKIP LOCKED
)
UPDATE webhook_deliveries d
   SET next_attempt_at = now() + make_interval(secs => $6)
  FROM due, webhook_endpoints e
 WHERE d.id = due.id AND e.id = d.endpoint_id
RETURNING d.id, d.endpoint_id, e.url, e.secret, d.body, d.attempts,
          coalesce(d.replayed_at, d.created_at) AS since
"""

_RECORD = """
UPDATE webhook_deliveries
   SET status = $2, attempts = attempts + 1, last_attempt_at = now(), last_status_code = $3,
       last_error = $4, next_attempt_at = now() + make_interval(secs => $5),
       delivered_at = CASE WHEN $2 = 'delivered' THEN now() ELSE delivered_at END
 WHERE id = $1 AND status = 'pending' AND coalesce(replayed_at, created_at) = $6
"""  # (a delivery replayed while this attempt was in flight is left to its replay)


class Poster:
    """Posts due deliveries (claimed from PostgreSQL) and records their outcomes."""

    def __init__(self, services: Services, policy: Policy = POLICY) -> None:
        self.services = services
        self.policy = policy
        self.sealer = Sealer(services.settings.credentials_keys)
        self.allow_private = services.settings.webhook_allow_private_urls
        self.wake = asyncio.Event()  # set when deliveries were written in this process
        self._tasks: set[asyncio.Task] = set()
        self._in_flight: Counter[uuid.UUID] = Counter()
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self.policy.concurrency,
                resolver=None if self.allow_private else PublicResolver(),
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(
                    total=self.policy.timeout, sock_connect=self.policy.connect_timeout
                ),
                headers={"User-Agent": USER_AGENT},
                auto_decompress=False,
            )
        return self._session

    async def run(self, stopping: asyncio.Event) -> None:
        failures = 0
        try:
            while not stopping.is_set():
                self.wake.clear()
                free = self.policy.concurrency - len(self._tasks)
                claimed: list[_Claimed] = []
                if free > 0:
                    try:
                        claimed = await self.claim(free)
                        failures = 0
                    except Exception as exc:  # PostgreSQL down: try again later
                        failures += 1
                        log.warning("webhooks: claiming deliveries failed: %r", exc)
                        await _sleep(stopping, min(30.0, 0.5 * 2**failures))
                        continue
                for delivery in claimed:
                    self._in_flight[delivery.endpoint_id] += 1
                    task = asyncio.create_task(self._deliver(delivery))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                if claimed and len(claimed) == free:
                    continue  # more may be due: claim again once a post ends
                await self._idle(stopping)
        finally:
            if self._tasks:  # drain: the posts in flight end within their timeout
                await asyncio.wait(self._tasks, timeout=self.policy.timeout + 5)
            if self._session is not None:
                await self._session.close()

    async def _idle(self, stopping: asyncio.Event) -> None:
        """Until deliveries were written here, a post ended, or ``poll`` seconds passed."""
        waiters = {asyncio.create_task(self.wake.wait()), asyncio.create_task(stopping.wait())}
        try:
            await asyncio.wait(
                waiters | self._tasks, timeout=self.policy.poll, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def claim(self, limit: int) -> list[_Claimed]:
        """Up to ``limit`` due deliveries, at most ``per_endpoint`` in flight per endpoint
        here, leased to this process."""
        busy = [e for e, n in self._in_flight.items() if n > 0]
        full = [e for e in busy if self._in_flight[e] >= self.policy.per_endpoint]
        rows = await self.services.pool.fetch(
            _CLAIM,
            limit,
            busy,
            [self._in_flight[e] for e in busy],
            full,
            self.policy.per_endpoint,
            self.policy.lease,
        )
        return [_Claimed(**dict(row)) for row in rows]

    async def _deliver(self, delivery: _Claimed) -> None:
        try:
            code, error = await self.post(delivery)
            await self._record(delivery, code, error)
        except Exception:  # recording failed: the lease ends and the delivery is retried
            log.exception("webhooks: recording delivery %s failed", delivery.id)
        finally:
            self._in_flight[delivery.endpoint_id] -= 1
            if self._in_flight[delivery.endpoint_id] <= 0:
                del self._in_flight[delivery.endpoint_id]

    async def post(self, delivery: _Claimed) -> tuple[int | None, str | None]:
        """POST a delivery, signed; (HTTP status or None, the problem or None)."""
        try:
            url = check_url(delivery.url, self.allow_private)
            secret = self.sealer.open(delivery.secret)
            msg_id = str(delivery.id)
            now = datetime.now(UTC)
            signature = Webhook(secret).sign(msg_id, now, delivery.body.decode())
            headers = {
                "Content-Type": "application/json",
                "webhook-id": msg_id,
                "webhook-timestamp": str(int(now.timestamp())),
                "webhook-signature": signature,
            }
            async with self._client().post(
                url, data=delivery.body, headers=headers, allow_redirects=False
            ) as response:
                code = response.status
        except TimeoutError:
            return None, f"no answer within {self.policy.timeout:g} s"
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return None, _problem(exc)
        return code, None if 200 <= code < 300 else f"HTTP {code}"

    async def _record(self, delivery: _Claimed, code: int | None, error: str | None) -> None:
        attempts, since = delivery.attempts + 1, delivery.since
        pool = self.services.pool
        if code is not None and 200 <= code < 300:
            await pool.execute(_RECORD, delivery.id, "delivered", code, None, 0.0, since)
            outcome = "delivered"
        elif code == 410:
            await disable(pool, delivery.endpoint_id, delivery.id, since)
            outcome = "disabled"
        else:
            age = (datetime.now(UTC) - since).total_seconds()
            if self.policy.gives_up(attempts, age):
                await pool.execute(_RECORD, delivery.id, "failed", code, error, 0.0, since)
                outcome = "failed"
            else:
                delay = self.policy.delay(attempts)
                await pool.execute(_RECORD, delivery.id, "pending", code, error, delay, since)
                outcome = "retried"
        metrics.CUSTOMER_WEBHOOK_DELIVERIES.labels(outcome).inc()
        if outcome != "delivered":
            where = {"delivery_id": str(delivery.id), "endpoint_id": str(delivery.endpoint_id)}
            log.info(
                "webhook delivery %s",
                outcome,
                extra={**where, "attempts": attempts, "status_code": code, "error": error},
            )


def _problem(exc: BaseException) -> str:
    """What went wrong with a post, in a few words (no secrets: the URL is the customer's)."""
    cause = getattr(exc, "os_error", None) or exc.__cause__ or exc
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused"
    text = str(cause) or type(cause).__name__
    return f"{type(exc).__name__}: {text}"[:300]


async def disable(
    pool: asyncpg.Pool, endpoint_id: uuid.UUID, delivery_id: uuid.UUID, since: datetime
) -> None:
    """The endpoint answered 410 Gone: the delivery fails, the endpoint is disabled and its
    other pending deliveries fail with it (one transaction)."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            _RECORD, delivery_id, "failed", 410, "HTTP 410: the endpoint is disabled", 0.0, since
        )
        await conn.execute(
            """UPDATE webhook_endpoints SET disabled_at = now(),
                      disabled_reason = 'the endpoint answered 410 Gone'
                WHERE id = $1 AND disabled_at IS NULL""",
            endpoint_id,
        )
        await conn.execute(
            """UPDATE webhook_deliveries SET status = 'failed', last_error = 'the endpoint is disabled'
                WHERE endpoint_id = $1 AND status = 'pending'""",
            endpoint_id,
        )


async def prune(pool: asyncpg.Pool) -> None:
    """Forget what is past keeping (a bounded number of rows per table and call)."""
    await pool.execute(
        """DELETE FROM webhook_deliveries WHERE id IN (
               SELECT id FROM webhook_deliveries
                WHERE created_at < now() - make_interval(days => $1) AND status <> 'pending'
                LIMIT 10000)""",
        RETENTION.days,
    )
    await pool.execute(
        """DELETE FROM webhook_results_seen WHERE ctid IN (
               SELECT ctid FROM webhook_results_seen WHERE seen_at < now() - interval '1 day'
                LIMIT 100000)"""
    )
    await pool.execute(
        """DELETE FROM webhook_batch_completions WHERE ctid IN (
               SELECT ctid FROM webhook_batch_completions
                WHERE created_at < now() - interval '2 days' LIMIT 100000)"""
    )


# --- the delivery log and replay (the API) --------------------------------------------

_TIMES = ("created_at", "last_attempt_at", "next_attempt_at", "delivered_at", "replayed_at")
_VIEW = """d.id, d.status, d.event_count, d.attempts, d.last_status_code, d.last_error,
           d.created_at, d.last_attempt_at, d.next_attempt_at, d.delivered_at, d.replayed_at"""


def _view(row: asyncpg.Record) -> dict[str, Any]:
    view = dict(row)
    view["id"] = str(row["id"])
    if row["status"] != "pending":
        view["next_attempt_at"] = None
    for name in _TIMES:
        view[name] = view[name].isoformat() if view[name] else None
    return view


async def _endpoint(conn: Any, tenant_id: str, endpoint_id: str) -> asyncpg.Record:
    row = await conn.fetchrow(
        "SELECT id, disabled_at FROM webhook_endpoints WHERE tenant_id = $1 AND id = $2",
        tenant_id,
        endpoint_uuid(endpoint_id),
    )
    if row is None:
        raise NotFound("no such webhook endpoint", code="webhook_endpoint_not_found")
    return row


async def list_deliveries(
    pool: asyncpg.Pool,
    tenant_id: str,
    endpoint_id: str,
    *,
    status: str | None = None,
    limit: int | None = None,
    cursor: str | None = None,
) -> dict[str, Any]:
    """A page of an endpoint's deliveries, newest first."""
    if status is not None and status not in STATUSES:
        raise ValidationError(f"status: must be one of {', '.join(STATUSES)}", {"field": "status"})
    limit = check_limit(limit)
    before = decode_cursor(cursor)
    endpoint = await _endpoint(pool, tenant_id, endpoint_id)
    rows = await pool.fetch(
        f"""SELECT {_VIEW} FROM webhook_deliveries d
             WHERE d.endpoint_id = $1 AND ($2::text IS NULL OR d.status = $2)
               AND ($3::timestamptz IS NULL OR (d.created_at, d.id) < ($3, $4))
             ORDER BY d.created_at DESC, d.id DESC LIMIT $5""",
        endpoint["id"],
        status,
        before[0] if before else None,
        before[1] if before else None,
        limit + 1,
    )
    return page_of(rows, limit, _view)


async def replay(
    pool: asyncpg.Pool, tenant_id: str, endpoint_id: str, delivery_id: str
) -> dict[str, Any]:
    """Post a delivery again, as it was (same ``webhook-id`` and body), with a fresh retry
    budget; 409 while its endpoint is disabled."""
    async with pool.acquire() as conn, conn.transaction():
        endpoint = await _endpoint(conn, tenant_id, endpoint_id)
        if endpoint["disabled_at"] is not None:
            raise Conflict(
                "the endpoint is disabled (it answered 410 Gone); create it again",
                code="webhook_endpoint_disabled",
            )
        try:
            wanted = uuid.UUID(delivery_id)
        except ValueError:
            wanted = None
        row = await conn.fetchrow(
            f"""UPDATE webhook_deliveries d
                   SET status = 'pending', attempts = 0, next_attempt_at = now(),
                       replayed_at = now(), delivered_at = NULL
                 WHERE d.id = $1 AND d.endpoint_id = $2
             RETURNING {_VIEW}""",
            wanted,
            endpoint["id"],
        )
    if row is None:
        raise NotFound("no such delivery", code="webhook_delivery_not_found")
    return _view(row)
