"""engine.turns.TurnBatch: the calls of one event-loop turn run as one batch, each caller
with its own answer or error; later calls go to the next batch."""

from __future__ import annotations

import asyncio

import pytest

from engine.turns import TurnBatch


async def test_calls_of_one_turn_run_together_each_with_its_answer() -> None:
    batches: list[list[int]] = []

    async def run(context: str, items: list[int]) -> list[object]:
        batches.append(items)
        return [ValueError(f"odd {i}") if i % 2 else i * 10 for i in items]

    double = TurnBatch[int, int](run)
    answers = await asyncio.gather(*(double("a", i) for i in range(4)), return_exceptions=True)
    assert batches == [[0, 1, 2, 3]]
    assert answers[0] == 0 and answers[2] == 20
    assert [str(a) for a in answers[1::2]] == ["odd 1", "odd 3"]
    assert await double("a", 4) == 40 and batches[-1] == [4]  # a later call: a batch of its own


async def test_contexts_are_never_mixed_and_a_failed_batch_fails_its_calls() -> None:
    seen: list[tuple[str, list[int]]] = []

    async def run(context: str, items: list[int]) -> list[object]:
        seen.append((context, items))
        if context == "down":
            raise ConnectionError("down")
        return items

    batch = TurnBatch[int, int](run)
    up = asyncio.gather(batch("up", 1), batch("up", 2))
    down = asyncio.gather(batch("down", 3), batch("down", 4), return_exceptions=True)
    assert await up == [1, 2]
    assert [type(e) for e in await down] == [ConnectionError, ConnectionError]
    assert sorted(seen) == [("down", [3, 4]), ("up", [1, 2])]


async def test_a_cancelled_caller_leaves_the_others_their_answers() -> None:
    async def run(context: str, items: list[int]) -> list[object]:
        await asyncio.sleep(0.01)
        return items

    batch = TurnBatch[int, int](run)
    first = asyncio.ensure_future(batch("c", 1))
    second = asyncio.ensure_future(batch("c", 2))
    await asyncio.sleep(0)
    first.cancel()
    assert await second == 2
    with pytest.raises(asyncio.CancelledError):
        await first
