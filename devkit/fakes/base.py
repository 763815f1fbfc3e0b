"""What the fake provider servers share: serving an aiohttp app on 127.0.0.1 (a free port
for tests, a given one for the dev stack), ``async with`` on a fake object, JSON answers,
a queue of injected failures, and the ``python -m devkit.fakes.<name> --port`` entry.

Each fake keeps only its provider's checks and answers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

HOST = "127.0.0.1"


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """A JSON answer."""
    return web.Response(
        body=orjson.dumps(data), status=status, headers=headers, content_type="application/json"
    )


@dataclass(slots=True, kw_only=True)
class Delivered:
    """What one recipient of an accepted request would receive (each fake adds what its
    provider keeps per recipient)."""

    to: str
    subject: str
    text: str | None
    html: str | None
    headers: dict[str, str]
    message_id: str


@dataclass(slots=True)
class Failure:
    """An injected answer: ``status``, ``body`` and ``headers``, for ``times`` more
    requests (-1: all)."""

    status: int
    body: Any
    headers: dict[str, str]
    times: int


@dataclass(slots=True)
class Failures:
    """The injected failures, answered in order."""

    queue: deque[Failure] = field(default_factory=deque)

    def add(self, status: int, body: Any, headers: dict[str, str] | None, times: int) -> None:
        self.queue.append(Failure(status, body, dict(headers or {}), times))

    def clear(self) -> None:
        self.queue.clear()

    def next(self) -> Failure | None:
        """The failure the next request gets, if any (counted as used)."""
        if not self.queue:
            return None
        failure = self.queue[0]
        if failure.times > 0:
            failure.times -= 1
            if failure.times == 0:
                self.queue.popleft()
        return failure


CONTROL_ERRORS = (orjson.JSONDecodeError, KeyError, TypeError, ValueError)


def add_control_routes(
    app: web.Application,
    key: web.AppKey[Any],
    fail: Callable[[Any, dict[str, Any]], None],
    usage: str,
    respond: Callable[..., web.Response] = json_response,
) -> None:
    """The control routes of a fake whose state (at ``app[key]``) has ``received``
    (records with ``method``, ``path`` and ``status``), ``sent_refs()`` and ``reset()``:
    ``GET /_fake/received``; ``POST /_fake/fail``, its JSON body handed to
    ``fail(state, data)`` (400 ``{"error": usage}`` when it does not fit); and
    ``POST /_fake/reset``. ``respond`` makes the fake's JSON answers."""

    async def received(request: web.Request) -> web.Response:
        fake = request.app[key]
        return respond(
            {
                "requests": [
                    {"method": r.method, "path": r.path, "status": r.status} for r in fake.received
                ],
                "sent_refs": dict(fake.sent_refs()),
            }
        )

    async def failing(request: web.Request) -> web.Response:
        try:
            fail(request.app[key], orjson.loads(await request.read() or b"{}"))
        except CONTROL_ERRORS:
            return respond({"error": usage}, status=400)
        return respond({"ok": True})

    async def reset(request: web.Request) -> web.Response:
        request.app[key].reset()
        return respond({"ok": True})

    app.router.add_get("/_fake/received", received)
    app.router.add_post("/_fake/fail", failing)
    app.router.add_post("/_fake/reset", reset)


@contextlib.asynccontextmanager
async def running(app: web.Application, host: str = HOST, port: int = 0) -> AsyncIterator[str]:
    """Serve ``app`` on ``host:port`` (0: a free port) while inside; yield its base URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        yield f"http://{host}:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def serve(app: web.Application, host: str, port: int) -> None:
    """Serve ``app`` on ``host:port`` until cancelled."""
    async with running(app, host, port):
        await asyncio.Event().wait()


class ServedFake:
    """A fake that serves itself: ``async with fake:`` runs ``fake.app()`` on a free
    127.0.0.1 port and sets ``fake.url``."""

    url: str = ""
    _served: contextlib.AbstractAsyncContextManager[str] | None = None

    def app(self) -> web.Application:
        raise NotImplementedError

    async def __aenter__(self) -> Any:
        self._served = running(self.app())
        self.url = await self._served.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        if self._served is not None:
            served, self._served = self._served, None
            await served.__aexit__(*exc_info)


def arguments(description: str, port: int) -> argparse.ArgumentParser:
    """The command line of ``python -m devkit.fakes.<name>``: ``--host``, ``--port``
    (the fake adds its own options)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default=HOST)
    parser.add_argument("--port", type=int, default=port)
    return parser


def run(app: web.Application, host: str, port: int) -> None:
    """Serve ``app`` until interrupted (the fakes' ``main``)."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(app, host, port))
