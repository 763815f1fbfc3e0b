"""End-to-end benchmark: N recipients from the first byte of a REST upload to the last
recipient final, on a throw-away deployment of the real processes.

    python -m bench.e2e --recipients 100000
    python -m bench.e2e --recipients 100000 --nats      # also one batch over NATS

Prints intake recipients/s (the streamed NDJSON request), end-to-end recipients/s, and
the peak resident memory of every process. Checks at the end that the mock provider
received every recipient exactly once. Uses this machine's PostgreSQL, NATS, Redis and
ClickHouse (as .env.test names them; the environment's DATABASE_URL, NATS_URL,
DRAGONFLY_URL and CLICKHOUSE_URL override them: bench/preflight.py) with its own
databases and prefixes, and removes them afterwards. A service that is down is named in
one line before anything starts (exit code 69).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench import preflight
from bench.profile import Profiler
from devkit.stack import Stack, drop_all, environ_for, isolated_environ, mock_stats, tenant_key
from engine.config import load_settings
from engine.migrate import migrate_all
from engine.publisher import BatchRequest, Publisher, Recipient

# With webhooks, how long after the batch is completed its delivered events may still take.
DELIVERED_WAIT = 120.0
TEMPLATE = {
    "name": "bench",
    "from_email": "bench@example.com",
    "subject": "Hello {{ name }}",
    "text": "Your code is {{ code }}.",
    "provider": "mock",
}


def ndjson_body(
    total: int, chunk_rows: int = 10_000, template: dict[str, Any] = TEMPLATE
) -> list[bytes]:
    """The request body, made before the clock starts (a client uploads a file; it does not
    spend the machine's CPU generating JSON while the server works). ``template``: the
    header line (bench/providers.py names a provider account instead of the mock)."""
    body = [orjson.dumps(template) + b"\n"]
    for start in range(0, total, chunk_rows):
        body.append(
            b"".join(
                orjson.dumps(
                    {"email": f"user{i}@example.com", "name": f"User {i}", "vars": {"code": str(i)}}
                )
                + b"\n"
                for i in range(start, min(total, start + chunk_rows))
            )
        )
    return body


async def _stream(body: list[bytes]) -> AsyncIterator[bytes]:
    for piece in body:
        yield piece


async def wait_completed(session: aiohttp.ClientSession, api: str, batch_id: str) -> datetime:
    while True:
        async with session.get(f"{api}/api/batches/{batch_id}") as response:
            batch = orjson.loads(await response.read())
        if batch["status"] == "completed":
            return datetime.fromisoformat(batch["completed_at"])
        if batch["status"] in ("failed", "cancelled"):
            raise RuntimeError(f"batch ended {batch['status']}")
        await asyncio.sleep(0.1)


async def wait_delivered(
    session: aiohttp.ClientSession, api: str, batch_id: str, total: int
) -> tuple[float | None, int]:
    """When (time.time()) every recipient of the batch is ``delivered`` (None when that is
    not so within ``DELIVERED_WAIT`` seconds), and how many were delivered when it looked
    last."""
    delivered = 0
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(DELIVERED_WAIT):
            while True:
                async with session.get(f"{api}/api/batches/{batch_id}") as response:
                    batch = orjson.loads(await response.read())
                delivered = batch["counts"]["delivered"]
                if delivered >= total:
                    return time.time(), delivered
                await asyncio.sleep(0.1)
    return None, delivered


async def run_rest(
    stack: Stack, key: str, total: int, *, delivered: bool = False
) -> dict[str, float | None]:
    """Intake and end-to-end seconds of one REST batch: to its completion, or with
    ``delivered`` until every recipient's delivered webhook is applied (``e2e_s`` None when
    that does not happen within ``DELIVERED_WAIT`` seconds after the completion)."""
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/x-ndjson"}
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(timeout=timeout, headers=headers) as session:
        body = ndjson_body(total)
        started_wall, started = time.time(), time.perf_counter()
        async with session.post(f"{stack.api}/api/batches", data=_stream(body)) as response:
            created = orjson.loads(await response.read())
            if response.status != 201:
                raise RuntimeError(f"create failed: {response.status} {created}")
        intake = time.perf_counter() - started
        end: float | None = (await wait_completed(session, stack.api, created["id"])).timestamp()
        completed, delivered_count = end, None
        if delivered:
            end, delivered_count = await wait_delivered(session, stack.api, created["id"], total)
    return {
        "intake_s": intake,
        "completed_s": completed - started_wall,
        "e2e_s": None if end is None else end - started_wall,
        "delivered": delivered_count,
        "start": started_wall,
    }


async def run_nats(stack: Stack, key: str, tenant: str, total: int) -> float:
    settings = stack.settings
    publisher = await Publisher.connect(settings.nats_url, settings.nats_prefix)
    request = BatchRequest(
        **{k: v for k, v in TEMPLATE.items() if k != "text"},
        text="Hello",
        recipients=[Recipient(f"nats{i}@example.com", f"N {i}") for i in range(total)],
    )
    msg_id = f"bench-{uuid.uuid4()}"
    started_wall = time.time()
    await publisher.publish(tenant, request, msg_id, ack_wait=60)
    await publisher.close()
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        while True:
            async with session.get(
                f"{stack.api}/api/batches", params={"external_id": msg_id}
            ) as response:
                page = orjson.loads(await response.read())
            if page["data"]:
                break
            await asyncio.sleep(0.05)
        done = await wait_completed(session, stack.api, page["data"][0]["id"])
    return done.timestamp() - started_wall


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem_gb:.0f} GiB, Python {platform.python_version()}"


async def measure_e2e(
    recipients: int,
    *,
    workers: int = 2,
    latency_ms: float = 0.0,
    concurrency: int = 32,
    nats_recipients: int = 0,
    profile: str | None = None,
    webhooks: bool = False,
) -> dict[str, Any]:
    """One REST batch (and optionally one NATS batch) through a throw-away deployment.

    ``webhooks``: the mock provider also posts a signed ``delivered`` event per recipient
    to the API, which records it (a second status write per recipient). Issue 3's scenario
    is the send path alone; the webhook run shows the cost of following every message."""
    tag = f"b{uuid.uuid4().hex[:8]}"
    environ = preflight.on_services(isolated_environ(tag))
    environ.update(
        WORKER_PROCESSES=str(workers),
        PROVIDER_RATES="mock=10000000/1000000",
        WORKER_CONCURRENCY=str(concurrency),
    )
    settings = load_settings(environ)
    await migrate_all(settings)
    stack = Stack(settings, environ_for(environ), Path(tempfile.mkdtemp(prefix=f"bench-{tag}-")))
    profiler = Profiler(Path(profile)) if profile else None
    try:
        key = await tenant_key(settings, "bench")
        await asyncio.to_thread(
            partial(stack.start_all, ("--latency-ms", str(latency_ms)), webhooks=webhooks)
        )
        if profiler:
            profiler.start(stack.pids())
        cpu_before = stack.cpu_seconds()
        rest = await run_rest(stack, key, recipients, delivered=webhooks)
        cpu = {k: v - cpu_before.get(k, 0.0) for k, v in stack.cpu_seconds().items()}
        if profiler:
            profiler.stop()
        nats_s = await run_nats(stack, key, "bench", nats_recipients) if nats_recipients else None
        peaks = stack.peak_rss_mb()
        async with aiohttp.ClientSession() as session:
            stats = await mock_stats(session, stack.mock)
    except BaseException:
        print(stack.tail(), file=sys.stderr)
        raise
    finally:
        await asyncio.to_thread(stack.stop_all)
        await drop_all(settings)
    seconds = sorted(int(k) for k in stats["per_second"])
    return {
        "recipients": recipients,
        "workers": workers,
        "latency_ms": latency_ms,
        "webhooks": webhooks,
        "intake_s": rest["intake_s"],
        "intake_per_s": recipients / rest["intake_s"],
        "completed_s": rest["completed_s"],
        "delivered": rest["delivered"],
        "e2e_s": rest["e2e_s"],
        "e2e_per_s": recipients / rest["e2e_s"] if rest["e2e_s"] else 0.0,
        "nats_recipients": nats_recipients,
        "nats_s": nats_s,
        "nats_per_s": nats_recipients / nats_s if nats_s else None,
        "peak_rss_mb": peaks,
        "cpu_s": cpu,
        "provider": stats,
        "sends_from_s": seconds[0] - rest["start"] if seconds else None,
        "sends_until_s": seconds[-1] + 1 - rest["start"] if seconds else None,
        "exactly_once": stats["unique"] == recipients + nats_recipients
        and stats["duplicates"] == 0,
        # with webhooks: the mock posted every delivered event, and every one was applied
        "all_delivered": None
        if not webhooks
        else bool(rest["e2e_s"]) and stats["webhooks_dropped"] == 0,
        "profile": profiler.summary() if profiler else None,
    }


def report(r: dict[str, Any]) -> bool:
    n = r["recipients"]
    print(f"machine:            {machine()}")
    print(
        f"workers:            {r['workers']} processes, mock latency {r['latency_ms']} ms/request, "
        f"delivery webhooks {'on' if r['webhooks'] else 'off'}"
    )
    print(f"recipients:         {n:,} (REST, streamed NDJSON)")
    print(f"intake:             {r['intake_s']:.2f} s  = {r['intake_per_s']:,.0f} recipients/s")
    if r["e2e_s"] is None:
        print(
            f"end-to-end:         not every recipient delivered {DELIVERED_WAIT:.0f} s after"
            f" ({r['delivered'] or 0:,} of {n:,} delivered)"
        )
    else:
        print(f"end-to-end:         {r['e2e_s']:.2f} s  = {r['e2e_per_s']:,.0f} recipients/s")
    if r["webhooks"]:
        stats = r["provider"]
        print(
            f"webhooks:           completed after {r['completed_s']:.2f} s, every recipient"
            f" delivered after {r['e2e_s'] or float('nan'):.2f} s (the end above);"
            f" {stats['webhooks_sent']:,} events posted, {stats['webhooks_dropped']:,} dropped"
        )
    if r["nats_s"] is not None:
        print(
            f"NATS batch:         {r['nats_recipients']:,} in {r['nats_s']:.2f} s"
            f" = {r['nats_per_s']:,.0f} recipients/s"
        )
    print(
        "peak RSS (MB):      "
        + ", ".join(f"{k} {v:.0f}" for k, v in sorted(r["peak_rss_mb"].items()))
    )
    busy = sorted(((v, k) for k, v in r["cpu_s"].items() if v >= 0.05), reverse=True)
    print(
        f"CPU s (REST batch): total {sum(r['cpu_s'].values()):.1f}"
        f" of {2 * (r['e2e_s'] or r['completed_s']):.1f} on 2 cores; "
        + ", ".join(f"{k} {v:.1f}" for v, k in busy)
    )
    stats = r["provider"]
    print(
        f"provider received:  {stats['accepted']:,} ({stats['unique']:,} unique, "
        f"{stats['duplicates']} duplicates)"
    )
    if r["sends_from_s"] is not None:
        print(
            f"provider timeline:  sends from {r['sends_from_s']:.0f} s to {r['sends_until_s']:.0f} s "
            f"after the POST, peak {max(stats['per_second'].values()):,}/s"
        )
    if r["profile"]:
        print(r["profile"])
    print(
        "check:              "
        + ("ok: every recipient exactly once" if r["exactly_once"] else "FAILED")
        + {None: "", True: ", every one delivered", False: "; NOT every one delivered"}[
            r["all_delivered"]
        ]
    )
    return r["exactly_once"] and r["all_delivered"] is not False


async def main(args: argparse.Namespace) -> int:
    result = await measure_e2e(
        args.recipients,
        workers=args.workers,
        latency_ms=args.latency_ms,
        concurrency=args.concurrency,
        nats_recipients=args.nats_recipients if args.nats else 0,
        profile=args.profile,
        webhooks=args.webhooks,
    )
    return 0 if report(result) else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipients", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes")
    parser.add_argument(
        "--latency-ms", type=float, default=0.0, help="mock provider latency per request"
    )
    parser.add_argument("--concurrency", type=int, default=32, help="chunks in flight per worker")
    parser.add_argument("--nats", action="store_true", help="also send one batch over NATS")
    parser.add_argument("--nats-recipients", type=int, default=10_000)
    parser.add_argument(
        "--webhooks",
        action="store_true",
        help="the mock posts a delivered webhook per recipient (a second status write)",
    )
    parser.add_argument(
        "--profile", metavar="DIR", help="py-spy every process into DIR and summarise"
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    raise SystemExit(preflight.run(main(parse_args()), "bench.e2e"))
