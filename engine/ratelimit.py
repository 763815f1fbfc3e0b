"""Token buckets in Dragonfly: system, provider-account and tenant limits in one Lua call;
and a provider account's daily quota (``DailyQuota``).

Reservation semantics: a call takes ``n`` tokens from every bucket at once and answers
how long the caller must wait before sending (tokens may go below zero, by at most
``max_wait`` seconds' worth). Sends are therefore spaced exactly at the configured rate
across all processes and pods, nobody starves, and one round trip serves a whole chunk.
When the wait would exceed ``max_wait`` nothing is taken and the caller retries later.
A reservation can carry bits to set in a bitmap (``Bits``: the sender's done bits of its
previous provider call, ``engine.cells``), so that they cost no round trip of their own.
``max_wait`` is short (100 ms): a process that is descheduled after reserving can only be
late by that much, so late sends cannot pile up on top of punctual ones at the provider.
All keys are passed as KEYS (Dragonfly requires declared keys); the clock is the server's.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import redis.asyncio as aioredis

from engine.config import Rate

# Sets the bits first..last of bitmap ``key``: the whole bytes among them in one SETRANGE,
# only the bits at the edges one by one (a provider call's 100 results: about 8 calls, not
# 100). Bit 0 is the highest bit of byte 0, as for SETBIT. For every script that sets bits.
SET_BITS_LUA = """
local function set_bits(key, first, last)
  local lo = math.floor((first + 7) / 8) * 8
  local hi = math.floor((last + 1) / 8) * 8 - 1
  if hi < lo then hi = lo - 1 end
  for seq = first, math.min(last, lo - 1) do redis.call('SETBIT', key, seq, 1) end
  if hi >= lo then
    local bytes = string.rep('\\255', math.floor((hi - lo + 1) / 8))
    redis.call('SETRANGE', key, math.floor(lo / 8), bytes)
  end
  for seq = math.max(first, hi + 1, lo), last do redis.call('SETBIT', key, seq, 1) end
end
"""

# KEYS: the buckets, then (when ARGV[3] > 0) the bitmap; ARGV: n, max_wait, how many
# (first, last) seq-range numbers follow, the bitmap's TTL, those numbers, (rate, burst)
# per bucket.
_SCRIPT = (
    SET_BITS_LUA
    + """
local n = tonumber(ARGV[1])
local max_wait = tonumber(ARGV[2])
local ranges = tonumber(ARGV[3])
local buckets = #KEYS
if ranges > 0 then
  buckets = buckets - 1
  for i = 5, 4 + ranges, 2 do set_bits(KEYS[#KEYS], tonumber(ARGV[i]), tonumber(ARGV[i + 1])) end
  redis.call('EXPIRE', KEYS[#KEYS], ARGV[4])
end
local base = 2 + ranges
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local wait = 0
local held = 0
local level = {}
for i = 1, buckets do
  local key = KEYS[i]
  local rate = tonumber(ARGV[base + 1 + 2 * i])
  local burst = tonumber(ARGV[base + 2 + 2 * i])
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
for i = 1, buckets do
  local key = KEYS[i]
  local rate = tonumber(ARGV[base + 1 + 2 * i])
  local burst = tonumber(ARGV[base + 2 + 2 * i])
  redis.call('HSET', key, 'tokens', tostring(level[i]), 'ts', tostring(now))
  redis.call('PEXPIRE', key, math.ceil((burst / rate + max_wait) * 1000) + 60000)
end
return {1, tostring(wait), held}
"""
)


# Empties KEYS[1] (rate ARGV[1], burst ARGV[2]) so that the next token comes ARGV[3]
# seconds from now: what a provider's "slow down, retry after N s" means for every sender.
_HOLD_SCRIPT = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local seconds = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
  tokens = burst
  ts = now
end
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
tokens = math.min(tokens, -seconds * rate)
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst / rate + seconds) * 1000) + 60000)
return tostring(tokens)
"""


@dataclass(frozen=True, slots=True)
class Bits:
    """Bits to set in a bitmap ``key`` (expiring ``ttl`` seconds later): ``ranges`` are
    flat (first, last) pairs of bit offsets."""

    key: str
    ttl: int
    ranges: list[int]


@dataclass(frozen=True, slots=True)
class Reservation:
    granted: bool
    wait: float  # seconds to wait before sending (granted) or before asking again
    held_by: int | None = None  # index of the bucket that made it wait (None: no wait)


class TokenBuckets:
    def __init__(self, client: aioredis.Redis, *, max_wait: float = 0.1):
        self._script = client.register_script(_SCRIPT)
        self._hold = client.register_script(_HOLD_SCRIPT)
        self.max_wait = max_wait

    async def hold(self, key: str, rate: Rate, seconds: float) -> None:
        """Give no token of bucket ``key`` for ``seconds`` (a provider said to wait that
        long): every process that reserves from it waits, not only the one told."""
        await self._hold(keys=[key], args=[rate.per_second, rate.burst, seconds])

    async def reserve(
        self, n: int, buckets: list[tuple[str, Rate]], bits: Bits | None = None
    ) -> Reservation:
        """Take ``n`` tokens from every (key, rate) bucket, or none when the wait is too long.
        ``bits`` are set in the same call whether tokens are taken or not (one round trip
        for the caller's bookkeeping and its next reservation)."""
        keys = [key for key, _ in buckets]
        args: list[float | int] = [n, self.max_wait, 0, 0]
        if bits is not None and bits.ranges:
            keys.append(bits.key)
            args = [n, self.max_wait, len(bits.ranges), bits.ttl, *bits.ranges]
        for _, rate in buckets:
            args += [rate.per_second, rate.burst]
        granted, wait, held = await self._script(keys=keys, args=args)
        return Reservation(bool(granted), float(wait), held - 1 if held else None)


# Takes up to ARGV[1] of the quota ARGV[2] left in KEYS[1] (expiring after ARGV[3] seconds);
# answers how many it took. One call: concurrent workers never take more than the quota.
_QUOTA_SCRIPT = """
local want = tonumber(ARGV[1])
local quota = tonumber(ARGV[2])
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local take = math.max(0, math.min(want, quota - used))
if take > 0 then
  redis.call('INCRBY', KEYS[1], take)
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
end
return take
"""


def quota_window(now: datetime | None = None) -> tuple[str, datetime]:
    """The daily quota's window: the UTC day (its name) and when the next one opens."""
    now = now or datetime.now(UTC)
    day = now.date()
    return day.isoformat(), datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(days=1)


class DailyQuota:
    """A provider account's daily quota, counted per UTC day across every worker and pod.
    What the quota does not allow today is held (the batch waits for the next window)."""

    def __init__(self, client: aioredis.Redis):
        self._script = client.register_script(_QUOTA_SCRIPT)

    async def take(self, key: str, want: int, quota: int) -> int:
        """How many of ``want`` messages today's quota still allows (those are counted)."""
        return int(await self._script(keys=[key], args=[want, quota, 2 * 86400]))
