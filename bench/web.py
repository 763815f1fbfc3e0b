"""Server time per dashboard page for a large tenant: 1,000 batches, one of them with
1,000,000 recipients (and 2,000,000 events of it in ClickHouse).

    python -m bench.web [--requests 20] [--recipients 1000000] [--batches 1000]

The data is written straight into a throw-away deployment's databases, for speed: the
batches with one multi-row INSERT, the recipients with one COPY (statuses spread as a
finished batch's would be: mostly delivered, some bounced and failed, the last few
complained, ten still queued), stored as the engine stores them (a ``sent`` or
``delivered`` recipient's row says ``queued``; every final recipient's bit, a
``recipient_sends`` row per block of every recipient sent, the delivered bits and a
``recipient_deliveries`` row per block: ``engine.lifecycle``), their counts, and the events with one ClickHouse
``INSERT ... SELECT`` from ``numbers()``. Then the dashboard (``web.app``, in this process, on the deployment's own
services) is signed in to and each page is asked ``--requests`` times in a row; the figure
is the server's own time, from the ``Server-Timing: app;dur=`` header every answer carries
(median, p95, max), and the answer's size. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import re
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta

import aiohttp
from aiohttp import web

from devkit.stack import drop_all, free_port, isolated_environ
from engine.clickhouse import ClickHouse
from engine.config import load_settings
from engine.db import create_pool
from engine.migrate import migrate_all
from engine.tenants import create_key
from web.app import create_app

TOKEN = re.compile(r'name="csrf_token" value="([^"]+)"')
TIMING = re.compile(r"app;dur=([0-9.]+)")
TENANT = "bench"


# Every recipient of the batch ($1, $2 recipients) final but the ten still queued (seqs
# $2 - 19 .. $2 - 10); every final one but the failed sent (its provider message id and
# attempts in recipient_sends, one row per block); the delivered ones (a row saying
# `queued`, seq % 100 below 90) by their delivered bits and a recipient_deliveries row per
# block; the others' statuses in their rows (their stored bits).
_FINAL = "batch_id = $1 AND seq NOT BETWEEN $2 - 19 AND $2 - 10"
_FINAL_BITS = (
    f"""INSERT INTO recipient_finals (batch_id, block, bits, before, stored, delivered)
SELECT batch_id, (seq - 1) >> 10, bit_or(B'1'::bit(1024) >> ((seq - 1) & 1023)), B'0'::bit(1024),
       coalesce(bit_or(B'1'::bit(1024) >> ((seq - 1) & 1023)) FILTER (WHERE status <> 'queued'),
                B'0'::bit(1024)),
       coalesce(bit_or(B'1'::bit(1024) >> ((seq - 1) & 1023))
                    FILTER (WHERE status = 'queued' AND seq % 100 < 90), B'0'::bit(1024))
  FROM recipients WHERE {_FINAL} GROUP BY 1, 2""",
    f"""INSERT INTO recipient_sends (batch_id, block, first_seq, seqs, pmids, attempts)
SELECT batch_id, (seq - 1) >> 10, min(seq), array_agg(seq ORDER BY seq),
       array_agg('<' || seq || '.bench@mock.example>' ORDER BY seq),
       array_agg(1::smallint ORDER BY seq)
  FROM recipients WHERE {_FINAL} AND status <> 'failed' GROUP BY 1, 2""",
    f"""INSERT INTO recipient_deliveries (batch_id, block, first_seq, seqs)
SELECT batch_id, (seq - 1) >> 10, min(seq), array_agg(seq ORDER BY seq)
  FROM recipients WHERE {_FINAL} AND status = 'queued' AND seq % 100 < 90 GROUP BY 1, 2""",
)


async def seed(settings, batches: int, recipients: int) -> str:
    """The tenant's batches and the big one's recipients; the big batch's id."""
    pool = await create_pool(settings, max_size=2)
    big = uuid.uuid4()
    now = datetime.now(UTC)
    try:
        started = time.perf_counter()
        rows = []
        for i in range(batches):
            bid = big if i == batches - 1 else uuid.uuid4()
            total = recipients if bid == big else 100 + i % 900
            status = "completed" if i % 10 else ("processing" if i % 20 else "paused")
            final = total if status == "completed" else total // 2
            if bid == big:  # ten recipients left to send
                status, final = "processing", total - 10
            created = now - timedelta(minutes=batches - i)
            rows.append((bid, TENANT, f"Newsletter {i + 1}", status, total, final, created))
        await pool.executemany(
            """INSERT INTO batches (id, tenant_id, name, from_email, subject, text, provider,
                   status, total_recipients, final_count, chunk_size, created_at, queued_at,
                   started_at, completed_at)
               VALUES ($1, $2, $3, 'news@example.com', 'Hello {{ name }}', 'Hi', 'mock', $4::text,
                       $5, $6, 100, $7::timestamptz, $7::timestamptz,
                       $7::timestamptz + interval '1 second',
                       CASE WHEN $4::text = 'completed' THEN $7::timestamptz + interval '40 seconds'
                       END)""",
            rows,
        )
        statuses = ["delivered"] * 90 + ["bounced"] * 4 + ["failed"] * 3 + ["sent"] * 3

        def status_of(seq: int) -> str:
            if seq > recipients - 20:
                return "complained" if seq > recipients - 10 else "queued"
            return statuses[seq % 100]

        def stored(seq: int) -> str:  # what the recipient's own row holds
            status = status_of(seq)
            return "queued" if status in ("sent", "delivered") else status

        async with pool.acquire() as conn:
            await conn.copy_records_to_table(
                "recipients",
                columns=["batch_id", "seq", "email", "name", "status", "attempts", "updated_at"],
                records=(
                    (big, seq, f"reader{seq}@example.com", f"Reader {seq}", stored(seq), 1, now)
                    for seq in range(1, recipients + 1)
                ),
            )
            for statement in _FINAL_BITS:
                await conn.execute(statement, big, recipients)
            counts: dict[str, int] = {}
            for seq in range(1, recipients + 1):
                counts[status_of(seq)] = counts.get(status_of(seq), 0) + 1
            await conn.executemany(
                "INSERT INTO batch_counts (batch_id, status, n) VALUES ($1, $2, $3)",
                [(big, s, n) for s, n in counts.items()],
            )
            await conn.execute("ANALYZE batches; ANALYZE recipients; ANALYZE batch_counts")
        print(
            f"seeded {batches} batches and {recipients:,} recipients in "
            f"{time.perf_counter() - started:.1f} s (INSERT, COPY)",
            file=sys.stderr,
        )
    finally:
        await pool.close()
    clickhouse = ClickHouse(settings, timeout=300)
    try:
        db = settings.clickhouse_database
        start = int((now - timedelta(minutes=40)).timestamp())
        clickhouse.command(
            f"""INSERT INTO {db}.events (ts, tenant_id, batch_id, seq, event, provider,
                    email_domain, latency_ms, attempts, error, provider_message_id)
                SELECT toDateTime({start} + intDiv(number % {recipients}, 500)), '{TENANT}',
                       '{big}', toUInt32(number % {recipients} + 1),
                       if(number < {recipients}, 'sent', 'delivered'), 'mock', 'example.com',
                       toUInt32(5 + number % 40), 1, '', ''
                  FROM numbers({2 * recipients})"""
        )
    finally:
        clickhouse.close()
    return str(big)


async def sign_in(session: aiohttp.ClientSession, base: str, key: str) -> None:
    page = await (await session.get(f"{base}/login")).text()
    token = TOKEN.search(page).group(1)
    async with session.post(
        f"{base}/login", data={"csrf_token": token, "api_key": key}, allow_redirects=False
    ) as answer:
        assert answer.status == 303, answer.status


async def measure(session: aiohttp.ClientSession, url: str, n: int) -> tuple[list[float], int]:
    times, size = [], 0
    for _ in range(n):
        async with session.get(url, allow_redirects=False) as answer:
            body = await answer.read()
            assert answer.status == 200, (url, answer.status, body[:300])
            times.append(float(TIMING.search(answer.headers["Server-Timing"]).group(1)))
            size = len(body)
    return times, size


async def cursor_at(session: aiohttp.ClientSession, url: str, pages: int) -> str:
    """The cursor of the ``pages``-th page of a list page (following "Next page")."""
    cursor = ""
    for _ in range(pages):
        text = await (await session.get(url + cursor)).text()
        found = re.search(r'cursor=([^"&]+)"', text.split("Next page")[0][-600:])
        cursor = f"&cursor={found.group(1)}"
    return cursor


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--recipients", type=int, default=1_000_000)
    parser.add_argument("--batches", type=int, default=1_000)
    args = parser.parse_args()
    environ = isolated_environ(f"web{uuid.uuid4().hex[:8]}")
    environ["WEB_PORT"] = str(free_port())
    settings = load_settings(environ)
    await migrate_all(settings)
    runner = None
    try:
        pool = await create_pool(settings, max_size=1)
        key = await create_key(pool, TENANT)
        await pool.close()
        big = await seed(settings, args.batches, args.recipients)
        runner = web.AppRunner(create_app(settings), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", settings.web_port).start()
        base = f"http://127.0.0.1:{settings.web_port}"
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
            await sign_in(session, base, key)
            deep = await cursor_at(session, f"{base}/batches?status=", 20)
            deep_seq = base64.urlsafe_b64encode(b"[900000]").decode()
            pages = [
                ("batches, first page", "/batches"),
                ("batches, status filter", "/batches?status=paused"),
                ("batches, page 21 (cursor)", f"/batches?status={deep}"),
                ("batches, live refresh (htmx)", "/batches#htmx"),
                ("batch of 1,000,000: detail", f"/batches/{big}"),
                ("batch: live summary (htmx)", f"/batches/{big}/summary#htmx"),
                (
                    "batch: recipients after #900,000 (cursor)",
                    f"/batches/{big}/recipients?status=&cursor={deep_seq}#htmx",
                ),
                (
                    "batch: recipients, status failed",
                    f"/batches/{big}/recipients?status=failed#htmx",
                ),
                (
                    "batch: recipients, status complained (last 10)",
                    f"/batches/{big}/recipients?status=complained#htmx",
                ),
                ("batch: recipients, status sent", f"/batches/{big}/recipients?status=sent#htmx"),
                (
                    "batch: recipients, status queued (10 left, then the last 10 final)",
                    f"/batches/{big}/recipients?status=queued#htmx",
                ),
                (
                    "batch: recipients, status delivered",
                    f"/batches/{big}/recipients?status=delivered#htmx",
                ),
                ("batch: chart and latency (ClickHouse)", f"/batches/{big}/analytics.json"),
                ("new batch form", "/batches/new"),
                ("analytics page (8 ClickHouse queries)", "/analytics?range=24h"),
                ("analytics chart data", "/analytics/data.json?range=24h"),
                ("queue", "/queue"),
                ("suppressions", "/suppressions"),
                ("API keys", "/keys"),
                ("provider accounts", "/provider-accounts"),
                ("webhooks", "/webhooks"),
                ("performance (no Prometheus)", "/performance"),
            ]
            print(
                f"\n{args.batches:,} batches, one of {args.recipients:,} recipients; "
                f"{args.requests} requests per page, server time (Server-Timing)\n"
            )
            print("| page | median ms | p95 ms | max ms | bytes |")
            print("|---|---:|---:|---:|---:|")
            for label, path in pages:
                htmx = path.endswith("#htmx")
                url = base + path.removesuffix("#htmx")
                if htmx:
                    session.headers["HX-Request"] = "true"
                times, size = await measure(session, url, args.requests)
                session.headers.pop("HX-Request", None)
                times.sort()
                p95 = times[min(len(times) - 1, int(0.95 * len(times)))]
                print(f"| {label} | {statistics.median(times):.1f} | {p95:.1f} | "
                      f"{times[-1]:.1f} | {size:,} |")  # fmt: skip
    finally:
        if runner is not None:
            await runner.cleanup()
        await drop_all(settings)


if __name__ == "__main__":
    asyncio.run(main())
