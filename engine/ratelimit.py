"""Token buckets in Dragonfly: system, provider-account and tenant limits in one Lua call.

Reservation semantics: a call takes ``n`` tokens from every bucket at once and answers
how long the caller must wait before sending (tokens may go below zero, by at most
``max_wait`` seconds' worth). Sends are therefore spaced exactly at the configured rate
across all processes and pods, nobody starves, and one round trip serves a whole chunk.
When the wait would exceed ``max_wait`` nothing is taken and the caller retries later.
``max_wait`` is short (100 ms): a process that is descheduled after reserving can only be
late by that much, so late sends cannot pile up on top of punctual ones at the provider.
All keys are passed as KEYS (Dragonfly requires declared keys); the clock is the server's.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis

from engine.config import Rate

_SCRIPT = """
local n = tonumber(ARGV[1])
local max_wait = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local wait = 0
local held = 0
local level = {}
for i, key in ipairs(KEYS) do
  local rate = tonumber(ARGV[1 + 2 * i])
  local burst = tonumber(ARGV[2 + 2 * i])
  local state = redis.call('HMGET', key, 'tokens', 'ts')
  local tokens = tonumber(state[1])
  local ts = tonumber(state[2])
  if tokens == nil or ts == nil then
    tokens = burst
    ts = now
  end
  tokens = math.min(burst, tokens + math.max(0, now - ts) * rate) - n
  level[i] = tokens
  if tokens < 0 and -tokens / rate > wait then
    wait = -tokens / rate
    held = i
  end
end
if wait > max_wait then
  return {0, tostring(wait), held}
end
for i, key in ipairs(KEYS) do
  local rate = tonumber(ARGV[1 + 2 * i])
  local burst = tonumber(ARGV[2 + 2 * i])
  redis.call('HSET', key, 'tokens', tostring(level[i]), 'ts', tostring(now))
  redis.call('PEXPIRE', key, math.ceil((burst / rate + max_wait) * 1000) + 60000)
end
return {1, tostring(wait), held}
"""


@dataclass(frozen=True, slots=True)
class Reservation:
    granted: bool
    wait: float  # seconds to wait before sending (granted) or before asking again
    held_by: int | None = None  # index of the bucket that made it wait (None: no wait)


class TokenBuckets:
    def __init__(self, client: aioredis.Redis, *, max_wait: float = 0.1):
        self._script = client.register_script(_SCRIPT)
        self.max_wait = max_wait

    async def reserve(self, n: int, buckets: list[tuple[str, Rate]]) -> Reservation:
        """Take ``n`` tokens from every (key, rate) bucket, or none when the wait is too long."""
        args: list[float | int] = [n, self.max_wait]
        for _, rate in buckets:
            args += [rate.per_second, rate.burst]
        granted, wait, held = await self._script(keys=[key for key, _ in buckets], args=args)
        return Reservation(bool(granted), float(wait), held - 1 if held else None)
