"""What every benchmark does before it measures anything: find the services it runs on and
stop with one line naming the one that is down (``engine.services.check_services``).

The throw-away deployments run on this machine's services as ``.env.test`` names them;
``DATABASE_URL``, ``NATS_URL``, ``DRAGONFLY_URL`` and ``CLICKHOUSE_URL`` in the environment
override them (``DATABASE_URL`` for its server only: every deployment has a database of
its own there, dropped afterwards).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from engine.config import load_settings
from engine.errors import ConfigError
from engine.services import ServiceUnavailable, check_services

EXIT_UNAVAILABLE = 69  # as the batchsender command (cli.main)
_SERVICE_VARIABLES = ("DATABASE_URL", "NATS_URL", "DRAGONFLY_URL", "CLICKHOUSE_URL")
T = TypeVar("T")


def service_overrides(database: str) -> dict[str, str]:
    """The service URLs the environment sets; ``DATABASE_URL`` names ``database`` on the
    server it names (a deployment's own database, never the one in the variable)."""
    found = {name: os.environ[name] for name in _SERVICE_VARIABLES if os.environ.get(name)}
    if "DATABASE_URL" in found:
        parts = urlsplit(found["DATABASE_URL"])
        found["DATABASE_URL"] = urlunsplit(parts._replace(path=f"/{database}"))
    return found


def on_services(environ: dict[str, str]) -> dict[str, str]:
    """A deployment's variables (``devkit.stack.isolated_environ``) on the services the
    environment names, keeping its database's name."""
    database = urlsplit(environ["DATABASE_URL"]).path.lstrip("/")
    return {**environ, **service_overrides(database)}


def _fail(prog: str, message: str) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_UNAVAILABLE)


async def check(prog: str) -> None:
    """Exit (code 69) with one line naming what is down, where, when a service is."""
    try:
        settings = load_settings({"BATCHSENDER_ENV": "test", **service_overrides("postgres")})
    except ConfigError as exc:
        print(f"{prog}: configuration error: {exc.message}", file=sys.stderr)
        raise SystemExit(2) from None
    if failures := await check_services(settings):
        _fail(prog, ServiceUnavailable(failures).message)


def run(
    main: Coroutine[Any, Any, T],
    prog: str,
    runner: Callable[[Coroutine[Any, Any, T]], T] = asyncio.run,
) -> T:
    """``runner(main)`` (``asyncio.run``, or ``uvloop.run``) after ``check``; when ``main``
    fails and a service is down by then, one line naming it instead of the traceback."""

    async def checked() -> T:
        try:
            await check(prog)
        except BaseException:
            main.close()  # never started: no "never awaited" warning after the line
            raise
        try:
            return await main
        except ServiceUnavailable as exc:
            _fail(prog, exc.message)
            raise
        except Exception:
            await check(prog)
            raise

    return runner(checked())
