"""One leader across all processes and pods: a lease in Dragonfly that its holder renews.

Whoever holds ``leader`` runs the cluster-wide chores (``engine.recovery``). If the holder
dies, the lease expires after ``ttl`` seconds and another process takes it over.
"""

from __future__ import annotations

import os
import socket
import uuid

import redis.asyncio as aioredis

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0
"""


class Lease:
    def __init__(self, client: aioredis.Redis, key: str, ttl: float = 10.0):
        self.key = key
        self.ttl_ms = int(ttl * 1000)
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._script = client.register_script(_RENEW)

    async def hold(self) -> bool:
        """Take or renew the lease; True while this process is the leader."""
        return bool(await self._script(keys=[self.key], args=[self.holder, self.ttl_ms]))
