"""engine.ratelimit.TokenBuckets against the real Redis/Dragonfly.

Waits are what the Lua script computed from the server clock. Time passing between two
calls refills a little and can only shorten a wait, by exactly the time that passed; the
rates are slow so that this drift is tiny next to the waits asserted. Nothing here sleeps.
"""

from __future__ import annotations

import math
import uuid

from engine.config import Rate
from engine.ratelimit import TokenBuckets
from engine.services import Services

SLACK = 0.5  # seconds that may pass between two calls of one test


def key(services: Services, name: str) -> str:
    return services.key("test-rl", uuid.uuid4().hex, name)


async def tokens(services: Services, bucket: str) -> float:
    return float(await services.redis.hget(bucket, "tokens"))


def assert_wait(actual: float, expected: float) -> None:
    assert expected - SLACK <= actual <= expected, (actual, expected)


async def test_burst_is_free_then_waits_grow_by_n_over_rate(services: Services) -> None:
    buckets = TokenBuckets(services.redis, max_wait=600)
    bucket = [(key(services, "p"), Rate(per_second=0.1, burst=4))]  # a token per 10 s

    free = [await buckets.reserve(1, bucket) for _ in range(4)]
    assert all(r.granted for r in free)
    assert [r.wait for r in free] == [0.0, 0.0, 0.0, 0.0]

    waits = []
    for _ in range(4):
        reservation = await buckets.reserve(1, bucket)
        assert reservation.granted
        waits.append(reservation.wait)
    # Each reservation of 1 token at 0.1/s waits 10 s longer than the one before.
    for i, wait in enumerate(waits, 1):
        assert_wait(wait, 10.0 * i)
    for earlier, later in zip(waits, waits[1:], strict=False):
        assert_wait(later - earlier, 10.0)

    # n tokens at once: the wait grows by n / rate.
    big = await buckets.reserve(3, bucket)
    assert big.granted
    assert_wait(big.wait - waits[-1], 30.0)


async def test_first_reservation_is_exact(services: Services) -> None:
    buckets = TokenBuckets(services.redis, max_wait=30)
    bucket = [(key(services, "p"), Rate(per_second=4, burst=10))]
    first = await buckets.reserve(18, bucket)  # 8 beyond the burst at 4/s: 2 s
    assert first.granted
    assert first.wait == 2.0
    assert await tokens(services, bucket[0][0]) == -8.0


async def test_a_reservation_over_max_wait_is_refused_and_takes_nothing(
    services: Services,
) -> None:
    buckets = TokenBuckets(services.redis, max_wait=25)
    name = key(services, "p")
    bucket = [(name, Rate(per_second=0.1, burst=2))]
    for _ in range(4):  # waits 0, 0, ~10, ~20
        assert (await buckets.reserve(1, bucket)).granted
    state = await services.redis.hgetall(name)

    refused = await buckets.reserve(1, bucket)
    assert refused.granted is False
    assert_wait(refused.wait, 30.0)  # what it would have waited
    assert await services.redis.hgetall(name) == state  # untouched

    # Nothing was taken: asking again answers the same, not one token more.
    again = await buckets.reserve(1, bucket)
    assert again.granted is False
    assert_wait(again.wait, 30.0)
    assert await services.redis.hgetall(name) == state


async def test_a_refused_first_reservation_creates_nothing(services: Services) -> None:
    buckets = TokenBuckets(services.redis, max_wait=1)
    names = [key(services, "a"), key(services, "b")]
    refused = await buckets.reserve(50, [(names[0], Rate(1000, 1000)), (names[1], Rate(10, 5))])
    assert refused.granted is False
    assert refused.wait == 4.5  # (50 - 5) / 10
    assert await services.redis.exists(*names) == 0


async def test_the_tightest_bucket_decides_and_every_bucket_pays(services: Services) -> None:
    buckets = TokenBuckets(services.redis, max_wait=30)
    system, provider, tenant = key(services, "sys"), key(services, "prov"), key(services, "ten")
    specs = [(system, Rate(1000, 1000)), (provider, Rate(2, 1)), (tenant, Rate(100, 50))]

    first = await buckets.reserve(5, specs)
    assert first.granted
    assert first.wait == 2.0  # the provider bucket: (5 - 1) / 2
    assert await tokens(services, system) == 995.0
    assert await tokens(services, provider) == -4.0
    assert await tokens(services, tenant) == 45.0

    # The order of the buckets does not matter: the longest wait wins.
    tight, loose = key(services, "tight"), key(services, "loose")
    ordered = await buckets.reserve(5, [(tight, Rate(1, 1)), (loose, Rate(10, 1))])
    assert ordered.wait == 4.0  # (5 - 1) / 1, not (5 - 1) / 10

    # Now the tenant bucket is the tightest for a large request.
    loose_provider = key(services, "prov2")
    second = await buckets.reserve(
        145,
        [(system, Rate(1000, 1000)), (loose_provider, Rate(1000, 1000)), (tenant, Rate(100, 50))],
    )
    assert second.granted
    assert_wait(second.wait, 1.0)  # (145 - 45) / 100
    assert await tokens(services, loose_provider) == 855.0


async def test_keys_carry_a_ttl(services: Services) -> None:
    buckets = TokenBuckets(services.redis, max_wait=10)
    fast, slow = key(services, "fast"), key(services, "slow")
    assert (await buckets.reserve(1, [(fast, Rate(1000, 100)), (slow, Rate(10, 100))])).granted
    # TTL = burst / rate (time to refill) + max_wait + one minute.
    fast_ms = math.ceil((100 / 1000 + 10) * 1000) + 60_000
    slow_ms = math.ceil((100 / 10 + 10) * 1000) + 60_000
    fast_ttl, slow_ttl = await services.redis.pttl(fast), await services.redis.pttl(slow)
    assert fast_ms - 5_000 < fast_ttl <= fast_ms
    assert slow_ms - 5_000 < slow_ttl <= slow_ms
    assert slow_ttl > fast_ttl


async def test_keys_are_under_the_session_prefix(services: Services) -> None:
    name = key(services, "p")
    assert name.startswith(services.settings.key_prefix)
    assert (await TokenBuckets(services.redis).reserve(1, [(name, Rate(5, 5))])).granted
    found = [k async for k in services.redis.scan_iter(match=services.settings.key_prefix + "*")]
    assert name.encode() in found


async def server_now(services: Services) -> float:
    seconds, micros = await services.redis.time()
    return seconds + micros / 1_000_000


async def test_tokens_refill_at_the_rate(services: Services) -> None:
    """A bucket last used 20 s ago (state written as the script would) has refilled 20 s' worth."""
    buckets = TokenBuckets(services.redis, max_wait=600)
    name = key(services, "p")
    await services.redis.hset(
        name, mapping={"tokens": "-5", "ts": str(await server_now(services) - 20)}
    )
    reservation = await buckets.reserve(1, [(name, Rate(per_second=0.25, burst=10))])
    assert reservation.granted
    assert_wait(reservation.wait, 4.0)  # -5 + 20 * 0.25 - 1 = -1 token at 0.25/s


async def test_refill_is_capped_at_the_burst(services: Services) -> None:
    buckets = TokenBuckets(services.redis, max_wait=600)
    name = key(services, "p")
    bucket = [(name, Rate(per_second=0.1, burst=3))]
    await services.redis.hset(
        name, mapping={"tokens": "-5", "ts": str(await server_now(services) - 10_000)}
    )
    assert (await buckets.reserve(3, bucket)).wait == 0.0  # a long idle time gives the burst
    assert_wait((await buckets.reserve(1, bucket)).wait, 10.0)  # ... and not one token more


async def test_a_hold_gives_no_token_for_its_seconds(services: Services) -> None:
    """What a provider's "retry after 2 s" does to the account's bucket: a full bucket
    gives nothing until then, to every process (they all read the same key)."""
    buckets = TokenBuckets(services.redis, max_wait=600)
    held = key(services, "held")
    rate = Rate(100, 50)
    await buckets.hold(held, rate, 2.0)
    first = await buckets.reserve(1, [(held, rate)])
    assert first.granted
    assert_wait(first.wait, 2.0 + 1 / rate.per_second)  # 2 s of tokens, then its own
    emptier = key(services, "emptier")
    await buckets.reserve(50 + 100, [(emptier, rate)])  # a second in debt already
    await buckets.hold(emptier, rate, 0.5)  # a hold only ever lowers the level
    assert_wait((await buckets.reserve(1, [(emptier, rate)])).wait, 1.0 + 1 / rate.per_second)
