"""The ``batchsender`` command: every process and operator task of the project.

batchsender migrate                  schema for PostgreSQL and ClickHouse (idempotent)
batchsender keys create --tenant T   a new API key for tenant T (printed once)
batchsender keys list --tenant T     tenant T's keys: id, prefix, created, last used, revoked
batchsender keys revoke KEY          revoke a key (its id, prefix or the key) everywhere at once
batchsender tenants limits T [...]   show or set tenant T's limits (0 or '' = default)
batchsender api                      the REST API (API_PORT)
batchsender web                      the web dashboard (WEB_HOST:WEB_PORT)
batchsender worker [-n N]            the supervisor and its N worker processes
batchsender worker --autoscale 1..8  ... or as many as the send queue needs (HPA rule)
batchsender mock-provider [...]      a local provider that records sends, posts webhooks
batchsender send FILE ...            submit a CSV/NDJSON file and follow it
batchsender all                      api + web + worker + mock-provider, supervised (development)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Coroutine
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from engine import autoscale, gc_tuning
from engine.config import Settings, export_process_env, load_settings
from engine.errors import BatchSenderError, ConfigError

log = logging.getLogger("batchsender")
T = TypeVar("T")
EXIT_UNAVAILABLE = 69  # sysexits' EX_UNAVAILABLE: a service the command needs is down


def _settings() -> Settings:
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"batchsender: configuration error: {exc.message}", file=sys.stderr)
        raise SystemExit(2) from None
    export_process_env(settings)
    from engine.logs import setup_logging

    setup_logging(settings.log_level)
    return settings


def _engine_call(coro: Coroutine[Any, Any, T]) -> T:
    """Run an engine call; a refusal (``BatchSenderError``) is one line and exit code 2."""
    try:
        return asyncio.run(coro)
    except BatchSenderError as exc:
        print(f"batchsender: {exc.message}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_migrate(_args: argparse.Namespace, settings: Settings) -> int:
    from engine.migrate import migrate_all

    asyncio.run(migrate_all(settings))
    print("migrations applied")
    return 0


def cmd_keys(args: argparse.Namespace, settings: Settings) -> int:
    from engine.db import create_pool
    from engine.migrate import migrate_postgres
    from engine.tenants import create_key

    async def run() -> str:
        await migrate_postgres(settings.database_url)
        pool = await create_pool(settings, max_size=1)
        try:
            return await create_key(pool, args.tenant)
        finally:
            await pool.close()

    print(asyncio.run(run()))
    return 0


def cmd_keys_list(args: argparse.Namespace, settings: Settings) -> int:
    from engine.db import create_pool
    from engine.migrate import migrate_postgres
    from engine.tenants import ApiKey, list_keys

    async def run() -> list[ApiKey]:
        await migrate_postgres(settings.database_url)
        pool = await create_pool(settings, max_size=1)
        try:
            found, cursor = [], None
            while True:
                page = await list_keys(pool, args.tenant, limit=1000, cursor=cursor)
                found += page.keys
                if (cursor := page.next_cursor) is None:
                    return found
        finally:
            await pool.close()

    def when(value: datetime | None) -> str:
        return value.isoformat(timespec="minutes") if value else "-"

    table = [("id", "prefix", "created", "last used", "revoked")] + [
        (str(k.id), k.prefix, when(k.created_at), when(k.last_used_at), when(k.revoked_at))
        for k in asyncio.run(run())
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_keys_revoke(args: argparse.Namespace, settings: Settings) -> int:
    from engine.auth import revoke_key
    from engine.migrate import migrate_postgres
    from engine.services import Services
    from engine.tenants import ApiKey

    async def run() -> ApiKey:
        await migrate_postgres(settings.database_url)
        services = await Services.open(settings, pool_size=1)
        try:
            return await revoke_key(services, args.key)
        finally:
            await services.close()

    key = _engine_call(run())
    print(f"revoked key {key.id} ({key.prefix}) of tenant {key.tenant_id}")
    return 0


def cmd_reseal(_args: argparse.Namespace, settings: Settings) -> int:
    from engine import accounts
    from engine.db import create_pool
    from engine.migrate import migrate_postgres

    async def run() -> int:
        await migrate_postgres(settings.database_url)
        pool = await create_pool(settings, max_size=1)
        try:
            return await accounts.reseal_all(pool, accounts.Sealer(settings.credentials_keys))
        finally:
            await pool.close()

    count = _engine_call(run())
    print(f"resealed {count} provider accounts under the first of CREDENTIALS_KEYS")
    return 0


def cmd_limits(args: argparse.Namespace, settings: Settings) -> int:
    from engine import tenants
    from engine.db import create_pool

    async def run() -> tenants.Limits:
        pool = await create_pool(settings, max_size=1)
        try:
            await tenants.set_limits(
                pool,
                args.tenant,
                max_batch_recipients=args.max_batch_recipients,
                max_active_batches=args.max_active_batches,
                send_rate=args.send_rate,
            )
            return await tenants.limits(pool, args.tenant, settings)
        finally:
            await pool.close()

    limits = _engine_call(run())
    rate = (
        limits.send_rate
        or f"{settings.tenant_rate.per_second:g}/{settings.tenant_rate.burst} (default)"
    )
    print(
        f"tenant {args.tenant}: at most {limits.max_batch_recipients} recipients per batch, "
        f"{limits.max_active_batches} unfinished batches, sending at {rate} per second"
    )
    return 0


def cmd_api(_args: argparse.Namespace, settings: Settings) -> int:
    import uvloop
    from aiohttp import web

    from api.app import create_app
    from engine.migrate import migrate_all

    asyncio.run(migrate_all(settings))
    uvloop.install()
    app = create_app(settings)
    gc_tuning.tune_gc(gc_tuning.INTAKE)
    web.run_app(
        app,
        host=settings.api_host,
        port=settings.api_port,
        access_log=None,
        print=lambda _: log.info("api listening", extra={"port": settings.api_port}),
    )
    return 0


def cmd_web(_args: argparse.Namespace, settings: Settings) -> int:
    import uvloop
    from aiohttp import web

    from engine.migrate import migrate_postgres
    from web.app import create_app

    asyncio.run(migrate_postgres(settings.database_url))
    uvloop.install()
    web.run_app(
        create_app(settings),
        host=settings.web_host,
        port=settings.web_port,
        access_log=None,
        print=lambda _: log.info(
            "web dashboard listening", extra={"host": settings.web_host, "port": settings.web_port}
        ),
    )
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from engine.supervisor import Supervisor

    scaler = None
    if args.autoscale:
        scaler = autoscale.Autoscaler(
            *args.autoscale,
            target=args.autoscale_target,
            cpu_target=args.autoscale_cpu / 100,
            interval=args.autoscale_interval,
            behavior=autoscale.local_behavior(args.autoscale_down_window),
        )
    gc_tuning.tune_gc(gc_tuning.WORKER)  # the workers inherit it (and freeze their own modules)
    return Supervisor(settings, args.processes, scaler).run()


def _process_range(text: str) -> tuple[int, int]:
    """``MIN..MAX`` worker processes, 1 <= MIN <= MAX <= 256 (WORKER_PROCESSES' range)."""
    low, dots, high = text.partition("..")
    try:
        bounds = int(low), int(high)
    except ValueError:
        bounds = (0, 0)
    if not dots or not 1 <= bounds[0] <= bounds[1] <= 256:
        raise argparse.ArgumentTypeError(f"expected MIN..MAX with 1 <= MIN <= MAX <= 256: {text!r}")
    return bounds


def _within(low: float, high: float):
    def parse(text: str) -> float:
        value = float(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {low:g}..{high:g}: {text!r}")
        return value

    return parse


def cmd_mock_provider(args: argparse.Namespace, _settings: Settings | None) -> int:
    from devkit import mock_provider
    from engine.logs import setup_logging

    setup_logging("INFO")  # JSON lines like every other process (its basicConfig is then a no-op)
    gc_tuning.tune_gc(gc_tuning.WORKER)
    mock_provider.main(args.rest)
    return 0


def cmd_send(args: argparse.Namespace, settings: Settings) -> int:
    from cli.send import send_file

    url = args.api_url or f"http://127.0.0.1:{settings.api_port}"
    fields = {
        "name": args.name or Path(args.file).name,
        "from_email": args.from_email,
        "subject": args.subject,
        "provider": args.provider,
    }
    for key in ("from_name", "html", "text"):
        if getattr(args, key):
            fields[key] = getattr(args, key)
    if args.dry_run:
        fields["dry_run"] = "true"
    return asyncio.run(send_file(url, args.key, Path(args.file), fields, follow=not args.no_follow))


def cmd_all(_args: argparse.Namespace, settings: Settings) -> int:
    """The development process tree: each part a child, restarted when it dies."""
    from engine.migrate import migrate_all

    asyncio.run(migrate_all(settings))
    exe = [sys.executable, "-m", "cli.main"]
    commands = {
        "mock-provider": exe
        + [
            "mock-provider",
            "--port",
            _port(settings.mock_provider_url),
            "--webhook-url",
            f"http://127.0.0.1:{settings.api_port}/webhooks/mock",
            "--webhook-secret",
            settings.mock_webhook_secret,
        ],
        "api": exe + ["api"],
        "web": exe + ["web"],
        "worker": exe + ["worker"],
    }
    if _taken(settings.web_host, settings.web_port):
        # Another dashboard (or anything else) has the port: the rest still starts, and the
        # web child is not restarted again and again until the tree gives up.
        log.warning(
            "web dashboard not started: %s:%d is taken", settings.web_host, settings.web_port
        )
        del commands["web"]
    env = {**os.environ, **settings.as_environ()}
    children: dict[str, subprocess.Popen] = {}
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        if stopping:  # second signal: no more waiting
            for child in children.values():
                child.kill()
            raise SystemExit(1)
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    restarts: list[float] = []
    while not stopping:
        for name, command in commands.items():
            child = children.get(name)
            if child is not None and child.poll() is None:
                continue
            if child is not None:
                log.warning("%s exited with %s; restarting", name, child.returncode)
                restarts.append(time.monotonic())
            children[name] = subprocess.Popen(command, env=env)
        restarts = [t for t in restarts if t > time.monotonic() - 60]
        if len(restarts) > 10:
            log.error("children keep dying; stopping")
            break
        time.sleep(0.5)
    for child in children.values():
        child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + settings.drain_timeout + 5
    for child in children.values():
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
    return 0


def _taken(host: str, port: int) -> bool:
    import socket

    with socket.socket() as probe:
        probe.settimeout(1)
        return (
            probe.connect_ex((host if host not in ("0.0.0.0", "::", "") else "127.0.0.1", port))
            == 0
        )


def _port(url: str) -> str:
    from urllib.parse import urlsplit

    return str(urlsplit(url).port or 80)


# The services each command needs: checked before it runs, and again when it fails, so that
# a service that is down is named in one line (engine.services.check_services). The
# supervisor is not checked before: its workers wait for NATS and Dragonfly to come back
# (they log which one is down), so a pod that starts before them does not crash-loop.
_WAITS_FOR_SERVICES = {cmd_worker}
_NEEDS: dict[Any, tuple[str, ...]] = {
    cmd_migrate: ("postgres", "clickhouse"),
    cmd_keys: ("postgres",),
    cmd_keys_list: ("postgres",),
    cmd_keys_revoke: ("postgres", "nats", "dragonfly"),
    cmd_limits: ("postgres",),
    cmd_reseal: ("postgres",),
    cmd_api: ("postgres", "nats", "dragonfly", "clickhouse"),
    # ClickHouse is not needed to start: the analytics pages say when it does not answer.
    cmd_web: ("postgres", "nats", "dragonfly"),
    cmd_worker: ("postgres", "nats", "dragonfly", "clickhouse"),
    cmd_all: ("postgres", "nats", "dragonfly", "clickhouse"),
}


def _exit_if_down(settings: Settings, services: tuple[str, ...]) -> None:
    """One line naming what is down and where, and exit code 69, when a service is."""
    from engine.services import ServiceUnavailable, check_services

    if failures := asyncio.run(check_services(settings, services)):
        print(f"batchsender: error: {ServiceUnavailable(failures).message}", file=sys.stderr)
        raise SystemExit(EXIT_UNAVAILABLE)


def _run(args: argparse.Namespace, settings: Settings | None) -> int:
    needs = _NEEDS.get(args.func, ()) if settings is not None else ()
    if not needs:
        return args.func(args, settings)
    if args.func not in _WAITS_FOR_SERVICES:
        _exit_if_down(settings, needs)
    try:
        code = args.func(args, settings)
    except Exception:
        _exit_if_down(settings, needs)  # a service went away meanwhile: that, not a traceback
        raise
    if code:
        _exit_if_down(settings, needs)  # e.g. the supervisor's workers kept dying
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchsender",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="apply the PostgreSQL and ClickHouse schema").set_defaults(
        func=cmd_migrate
    )
    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="action", required=True)
    create = keys.add_parser("create", help="create a key (and the tenant if new); prints it once")
    create.add_argument(
        "--tenant", required=True, help="tenant id: lower-case letters, digits, - or _"
    )
    create.set_defaults(func=cmd_keys)
    listing = keys.add_parser("list", help="a tenant's keys (never the keys themselves)")
    listing.add_argument("--tenant", required=True)
    listing.set_defaults(func=cmd_keys_list)
    revoke = keys.add_parser("revoke", help="revoke a key; running API processes refuse it at once")
    revoke.add_argument("key", help="the key's id (from 'keys list'), its prefix, or the key")
    revoke.set_defaults(func=cmd_keys_revoke)
    tenants = sub.add_parser("tenants", help="tenants").add_subparsers(dest="action", required=True)
    limits = tenants.add_parser("limits", help="show or set a tenant's limits")
    limits.add_argument("tenant")
    limits.add_argument("--max-batch-recipients", type=int, help="per batch (0: server default)")
    limits.add_argument("--max-active-batches", type=int, help="unfinished at once (0: default)")
    limits.add_argument("--send-rate", help="'<per_second>/<burst>' ('': TENANT_RATE)")
    limits.set_defaults(func=cmd_limits)
    provider_accounts = sub.add_parser("provider-accounts", help="provider accounts")
    provider_accounts.add_subparsers(dest="action", required=True).add_parser(
        "reseal",
        help="seal every account's credentials under the first of CREDENTIALS_KEYS (rotation)",
    ).set_defaults(func=cmd_reseal)
    sub.add_parser("api", help="run the REST API").set_defaults(func=cmd_api)
    sub.add_parser("web", help="run the web dashboard (WEB_PORT)").set_defaults(func=cmd_web)
    worker = sub.add_parser("worker", help="run the supervisor and its worker processes")
    count = worker.add_mutually_exclusive_group()
    count.add_argument(
        "-n", "--processes", type=int, default=None, help="default: WORKER_PROCESSES"
    )
    count.add_argument(
        "--autoscale",
        type=_process_range,
        metavar="MIN..MAX",
        help="as many processes as the send queue's depth and their CPU need, by the "
        "Kubernetes HPA's rule (engine/autoscale.py); removed ones drain first",
    )
    worker.add_argument(
        "--autoscale-target",
        type=_within(1, 1e9),
        default=autoscale.TARGET,
        metavar="CHUNKS",
        help="send-queue messages per process (default %(default)g; production's KEDA "
        "lagThreshold is 1000 per pod, which takes 30 s or more to start)",
    )
    worker.add_argument(
        "--autoscale-cpu",
        type=_within(0, 100),
        default=100 * autoscale.CPU_TARGET,
        metavar="PERCENT",
        help="CPU per process, of one core (default %(default)g; 0: queue depth only)",
    )
    worker.add_argument(
        "--autoscale-interval",
        type=_within(0.5, 3600),
        default=autoscale.INTERVAL,
        metavar="SECONDS",
        help="between two decisions (default %(default)g)",
    )
    worker.add_argument(
        "--autoscale-down-window",
        type=_within(0, 86400),
        default=autoscale.DOWN_WINDOW,
        metavar="SECONDS",
        help="scale down only to the highest recommendation of this window (default "
        "%(default)g; production 300)",
    )
    worker.set_defaults(func=cmd_worker)
    mock = sub.add_parser(
        "mock-provider", help="run the local mock provider (--help for options)", add_help=False
    )
    mock.set_defaults(func=cmd_mock_provider)
    send = sub.add_parser("send", help="submit a CSV or NDJSON file as a batch and follow it")
    send.add_argument("file")
    send.add_argument("--key", required=True, help="API key")
    send.add_argument("--subject", required=True)
    send.add_argument("--from-email", required=True)
    send.add_argument("--from-name")
    send.add_argument("--html")
    send.add_argument("--text")
    send.add_argument("--name", help="batch name (default: the file name)")
    send.add_argument("--provider", default="mock")
    send.add_argument("--dry-run", action="store_true")
    send.add_argument("--api-url", help="default: http://127.0.0.1:API_PORT")
    send.add_argument("--no-follow", action="store_true", help="print the batch id and return")
    send.set_defaults(func=cmd_send)
    sub.add_parser(
        "all", help="api + web + worker + mock provider in one supervised tree"
    ).set_defaults(func=cmd_all)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.func is cmd_mock_provider:
        args.rest = rest  # its own options, parsed by devkit.mock_provider
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    # Settings first: they must be in place before prometheus-client is imported.
    settings = None if args.func is cmd_mock_provider else _settings()
    raise SystemExit(_run(args, settings))


if __name__ == "__main__":
    main()
