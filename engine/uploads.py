"""Concurrent uploads per tenant: a bounded set of leases in Dragonfly.

Every request that creates a batch or adds recipients holds one of its tenant's
``TENANT_MAX_UPLOADS`` slots from its first byte to its answer, across every API process
and pod, so one tenant cannot tie up the API's uploads, spool space and database work
for everyone. A slot is a member of the tenant's sorted set scored by its expiry; the
holder renews it while it works, and a slot whose process died expires by itself after
``LEASE_SECONDS``. One Lua call takes a slot (all keys declared, the clock the server's).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator

from redis.exceptions import RedisError

from engine.errors import TooManyRequests
from engine.services import Services

LEASE_SECONDS = 60
RETRY_AFTER_SECONDS = 5
log = logging.getLogger(__name__)

_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if ARGV[3] == '0' and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[4])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2])) + 1)
return 1
"""


@contextlib.asynccontextmanager
async def upload_slot(services: Services, tenant_id: str) -> AsyncIterator[None]:
    """Hold one of the tenant's upload slots; ``TooManyRequests`` when all are taken."""
    key = services.key("uploads", tenant_id)
    take = services.redis.register_script(_TAKE)
    member = secrets.token_hex(8)
    limit = services.settings.tenant_max_uploads
    try:
        taken = await take(keys=[key], args=[limit, LEASE_SECONDS, 0, member])
    except RedisError as exc:  # Dragonfly down: intake goes on, unbounded, and says so
        log.warning("upload slots unavailable; not bounding uploads (%r)", exc)
        yield
        return
    if not taken:
        raise TooManyRequests(
            f"this tenant already has {limit} uploads in progress; try again when one has finished",
            {"limit": "max_uploads", "value": limit},
            retry_after=RETRY_AFTER_SECONDS,
            code="too_many_uploads",
        )

    async def renew() -> None:
        while True:
            await asyncio.sleep(LEASE_SECONDS / 3)
            await take(keys=[key], args=[limit, LEASE_SECONDS, 1, member])

    renewing = asyncio.create_task(renew())
    try:
        yield
    finally:
        renewing.cancel()
        with contextlib.suppress(asyncio.CancelledError, RedisError):
            await renewing
        try:
            await services.redis.zrem(key, member)
        except RedisError as exc:  # the slot expires by itself after LEASE_SECONDS
            log.warning("could not give an upload slot back (%r)", exc)
