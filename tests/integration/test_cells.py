"""Cell leases, the done bitmap and the rebuild after lost state, on the real Dragonfly/Redis
and NATS (engine.cells)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import nats.errors
import pytest

from engine import results
from engine.cells import Cells, cell_first, cells_of
from engine.results import Columns
from engine.services import Services


@pytest.fixture
async def cells(services: Services) -> Cells:
    await services.redis.set(services.key("state"), "1")  # a deployment with its state
    return Cells(services)


def test_cells_are_aligned_to_the_chunk_grid():
    assert [cell_first(s, 100) for s in (1, 100, 101, 250)] == [1, 1, 101, 201]
    assert cells_of([250, 3, 99, 101, 1000], 100) == [1, 101, 201, 901]


async def test_one_holder_per_cell_until_it_gives_the_cell_back(cells: Cells):
    batch = str(uuid.uuid4())
    first = await cells.claim(batch, 101, 100)
    assert first is not None
    assert await cells.claim(batch, 101, 100) is None  # a second message for the same cell
    other = await cells.claim(batch, 201, 100)  # another cell is free
    assert other is not None
    await cells.finish(first, [])
    again = await cells.claim(batch, 101, 100)
    assert again is not None
    await cells.finish(again, [])
    await cells.finish(other, [])


async def test_recipients_with_published_results_are_done_for_the_next_holder(cells: Cells):
    batch = str(uuid.uuid4())
    claim = await cells.claim(batch, 1, 100)
    assert not claim.any_done and not any(claim.done(seq) for seq in range(1, 101))
    await cells.finish(claim, [1, 2, 50, 99])
    claim = await cells.claim(batch, 1, 100)
    assert claim.any_done
    assert [seq for seq in range(1, 101) if claim.done(seq)] == [1, 2, 50, 99]
    await cells.finish(claim, [])
    await cells.clear_done(batch, [2, 99])  # queued again by a dead-letter replay
    claim = await cells.claim(batch, 1, 100)
    assert [seq for seq in range(1, 101) if claim.done(seq)] == [1, 50]
    await cells.finish(claim, [])
    await cells.clear_done(batch, [1, 50])
    claim = await cells.claim(batch, 1, 100)
    assert not claim.any_done  # every bit cleared again
    await cells.finish(claim, [])


async def test_published_results_are_marked_by_the_next_reservation_a_mark_or_finish(
    services: Services, cells: Cells
):
    """The bits of published results are set by the holder's next Dragonfly call: a token
    reservation (granted or not), ``mark``, or ``finish``; each sets them once."""
    from engine.config import Rate
    from engine.ratelimit import TokenBuckets

    batch = str(uuid.uuid4())
    buckets = TokenBuckets(services.redis)
    bucket = [(services.key("rl", "cells-test", batch), Rate(1.0, 1))]

    async def done_for_the_next_holder() -> list[int]:
        bits = await services.redis.get(services.key("done", batch)) or b""
        return [s for s in range(1, 101) if s // 8 < len(bits) and bits[s // 8] >> (7 - s % 8) & 1]

    claim = await cells.claim(batch, 1, 100)
    cells.published(claim, [1, 2, 3])
    assert await done_for_the_next_holder() == []  # not yet: no call to Dragonfly since
    assert (await buckets.reserve(1, bucket, cells.take_bits(claim))).granted
    assert await done_for_the_next_holder() == [1, 2, 3]
    assert cells.take_bits(claim) is None  # set once
    cells.published(claim, [10, 11])
    refused = await buckets.reserve(5, bucket, cells.take_bits(claim))  # a wait too long
    assert not refused.granted
    assert await done_for_the_next_holder() == [1, 2, 3, 10, 11]
    cells.published(claim, [20])
    await cells.mark(claim)
    cells.published(claim, [30])
    await cells.finish(claim, [31])
    assert await done_for_the_next_holder() == [1, 2, 3, 10, 11, 20, 30, 31]
    again = await cells.claim(batch, 1, 100)  # the lease was given back
    assert again is not None and again.done(30) and not again.done(32)
    await cells.finish(again, [])


async def test_runs_of_seqs_in_any_order_are_all_marked_done(cells: Cells):
    """finish() sends seqs as runs (first, last): unordered, gapped and whole-cell lists all
    land bit for bit."""
    batch = str(uuid.uuid4())
    marked = [107, 105, 106, 101, 150, 151, 200, 199]
    claim = await cells.claim(batch, 101, 100)
    await cells.finish(claim, marked)
    claim = await cells.claim(batch, 101, 100)
    assert [seq for seq in range(101, 201) if claim.done(seq)] == sorted(marked)
    await cells.finish(claim, list(range(101, 201)))
    claim = await cells.claim(batch, 101, 100)
    assert all(claim.done(seq) for seq in range(101, 201)) and not claim.done(201)
    await cells.finish(claim, [])


async def test_bits_set_by_bytes_and_edges_are_exactly_the_runs_given(
    services: Services, cells: Cells
):
    """Runs are set as whole bytes plus the bits at their edges (``SET_BITS_LUA``), by
    ``finish`` and by a token reservation alike: every run length and offset within a
    byte sets exactly its own bits, beside bits set before."""
    from engine.config import Rate
    from engine.ratelimit import Bits, TokenBuckets

    batch = str(uuid.uuid4())
    key = services.key("done", batch)
    await services.redis.setbit(key, 1000, 1)  # set before: stays set
    expected = {1000}
    runs = [(first, first + length - 1) for first in range(1, 40, 3) for length in (1, 7, 8, 9, 30)]
    runs = [(first + 64 * i, last + 64 * i) for i, (first, last) in enumerate(runs)]
    buckets = TokenBuckets(services.redis)
    rate = [(services.key("rl", "bits-test"), Rate(1_000_000, 1_000_000))]
    for i, (first, last) in enumerate(runs):
        expected.update(range(first, last + 1))
        if i % 2:
            await buckets.reserve(1, rate, Bits(key, 60, [first, last]))
        else:
            claim = await cells.claim(batch, 1, 4096)
            await cells.finish(claim, list(range(first, last + 1)))
    raw = await services.redis.get(key)
    got = {i for i in range(len(raw) * 8) if raw[i // 8] >> (7 - i % 8) & 1}
    assert got == expected


async def test_finish_by_a_holder_whose_lease_was_taken_over_keeps_the_new_lease(cells: Cells):
    batch = str(uuid.uuid4())
    stale = await cells.claim(batch, 1, 100)
    await cells.services.redis.delete(cells.services.key("cell", batch, "1"))  # expired
    fresh = await cells.claim(batch, 1, 100)
    assert fresh is not None
    await cells.finish(stale, [7])  # its results still count as done ...
    assert await cells.claim(batch, 1, 100) is None  # ... but the new holder keeps the cell
    assert await cells.renew() >= 1  # the heartbeat extends what this process holds
    await cells.finish(fresh, [])


async def test_lost_state_waits_until_postgres_has_every_published_result(services, cells):
    await services.redis.delete(services.key("state"))
    columns = Columns()
    columns.append(str(uuid.uuid4()), 1, "sent", provider_message_id="m1")
    await results.publish(services, None, "mock", columns)  # not yet applied by results-pg
    claiming = asyncio.create_task(cells.claim(str(uuid.uuid4()), 1, 100))
    await asyncio.sleep(1.5)
    assert not claiming.done(), "sending must wait while results are not in PostgreSQL"
    # The results-pg writer catches up (here: this test takes its messages).
    sub = await services.js.pull_subscribe_bind("results-pg", services.topology.results_stream)
    for _ in range(100):
        info = await services.js.consumer_info(services.topology.results_stream, "results-pg")
        if info.num_pending == 0 and info.num_ack_pending == 0:
            break
        with contextlib.suppress(nats.errors.TimeoutError):
            for msg in await sub.fetch(100, timeout=1):
                await msg.ack()
    claim = await asyncio.wait_for(claiming, 10)
    assert claim is not None
    assert await services.redis.exists(services.key("state"))
    await cells.finish(claim, [])
