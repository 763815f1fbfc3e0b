"""Calls made in one turn of the event loop, done together on the next.

Under load many requests reach the same step (a Redis command, a NATS publish) within one
turn of the event loop; a ``TurnBatch`` gathers them and runs them as one (a pipeline, one
message), each caller getting its own answer or error. A call alone costs one task switch
more than calling directly. Callers of different targets (``context``: a Redis client, a
``Services``) are never mixed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")
# run(context, items) -> one answer per item (an exception instance: that item's error)
Run = Callable[[Any, list[T]], Awaitable[list[Any]]]


class TurnBatch(Generic[T, R]):
    def __init__(self, run: Run[T]) -> None:
        self._run = run
        self._waiting: dict[tuple[int, int], list[tuple[T, asyncio.Future[Any]]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def __call__(self, context: Any, item: T) -> R:
        loop = asyncio.get_running_loop()
        slot = (id(loop), id(context))
        waiting = self._waiting.get(slot)
        if waiting is None:
            waiting = self._waiting[slot] = []
            task = loop.create_task(self._send(slot, context, waiting))
            self._tasks.add(task)
            task.add_done_callback(lambda done: self._done(done, slot, waiting))
        future: asyncio.Future[Any] = loop.create_future()
        waiting.append((item, future))
        return await future

    def _done(self, task: asyncio.Task[None], slot: tuple[int, int], waiting: list) -> None:
        self._tasks.discard(task)
        if self._waiting.get(slot) is waiting:  # cancelled before it ran (the loop closed)
            del self._waiting[slot]
            for _, future in waiting:
                future.cancel()

    async def _send(self, slot: tuple[int, int], context: Any, waiting: list) -> None:
        del self._waiting[slot]  # later calls go to the next batch
        try:
            answers = await self._run(context, [item for item, _ in waiting])
        except asyncio.CancelledError:  # the loop is closing
            for _, future in waiting:
                future.cancel()
            raise
        except Exception as exc:  # the batch failed as a whole: every call with it
            for _, future in waiting:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), answer in zip(waiting, answers, strict=True):
            if future.done():  # its caller was cancelled meanwhile
                continue
            if isinstance(answer, BaseException):
                future.set_exception(answer)
            else:
                future.set_result(answer)
