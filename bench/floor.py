"""The floor: what the infrastructure alone can do with the pipeline's data shapes.

    python -m bench.floor --recipients 200000
    python -m bench.floor --recipients 200000 --mock-latency-ms 20   # also a 20 ms mock

Each component is measured on its own, on N recipients in chunk messages of 1,000 (cells)
and provider calls of 100, in a throw-away deployment (``devkit.stack.isolated_environ``,
``migrate_all``; ``drop_all`` at the end), and reported in recipients/s. No engine process
runs; this program does the client side exactly as the engine does it, with the engine's
own functions where they exist:

1. NATS (the deployment's real streams and durable pull consumers): the chunk messages
   (``{"b","t","p","f","n"}`` with ``Nats-Msg-Id`` ``batch:first``) published with
   ``publish_async`` in windows of 512 (``engine.chunks.queue_batch``), then fetched 64 at a
   time from ``send`` and acked one by one (the worker's send loop). Then one results
   message per provider call (``engine.results.encode`` of 100 realistic rows) published the same
   way and read by each consumer of the RESULTS stream as the worker reads them:
   ``results-pg`` ``RESULTS_FLUSH_MESSAGES`` per fetch, ``results-ch`` and ``results-hooks``
   500 per fetch.
2. PostgreSQL, through ``engine.db.create_pool``: ``copy_records_to_table`` of the
   recipients (the columns and types of ``engine.intake.copier``), then
   ``engine.results.apply_results`` over the same rows in flushes of
   ``RESULTS_FLUSH_MESSAGES`` results messages (what one ``results-pg`` fetch brings), first ``sent``, then
   a second pass of ``delivered`` (the webhook update).
3. ClickHouse: ``engine.clickhouse.ClickHouse.insert_events`` of the same events, built
   column by column as ``engine.event_writer.EventWriter`` builds them, ``CLICKHOUSE_FLUSH_ROWS``
   rows per insert; once for ``sent``, once for ``delivered``.
4. Token buckets: ``TokenBuckets.reserve`` once per provider call over the sender's three buckets
   (system, provider, tenant; keys under the deployment's ``KEY_PREFIX``) with rates far
   above what the run takes, one caller after the other and ``WORKER_CONCURRENCY`` (32)
   callers at once. A reservation that would make anybody wait fails the run.
5. The mock provider's ceiling: ``python -m devkit.mock_provider`` on a free port
   (latency 0, no webhooks), 100-message requests through ``providers.mock.MockProvider``,
   64 in flight. Every message must come back accepted.

Combined figures. One recipient passes every step of the pipeline, and every step runs on
the same 2 cores, so per recipient the machine's time adds up: a step measured alone at
``rate_i`` recipients/s (with the whole machine to itself) occupies the machine for
``1 / rate_i`` seconds per recipient, and the pipeline can at best do

    combined = 1 / sum_i(1 / rate_i)

recipients/s. ``combined_send`` sums the sending path: the chunk leg of NATS (publish +
fetch), the results leg (publish + fetch by ``results-pg``, ``results-ch`` and
``results-hooks``),
PostgreSQL COPY, the ``sent`` status write, the ClickHouse insert, the token call (32
callers, as the worker makes it) and the mock provider at 0 ms. ``combined_webhook`` adds
what a ``delivered`` webhook event costs the infrastructure: the results leg once more
(measured with 100-row messages; the API publishes one per webhook post), the
``delivered`` status write and the second ClickHouse insert. Neither counts the engine's
own Python work (reading the chunk's recipients, rendering, decoding and building results,
the API's webhook handling, the mock's webhook posting): the pipeline can only be slower.

The sum is exact only when a step alone keeps both cores busy. A step bound by one
connection's round trips (one COPY, one status-write transaction at a time) leaves a core
idle that other steps could use, so its ``1 / rate`` overstates its share. Therefore each
step also counts the CPU time it caused, during the step and after it until the machine
is quiet again (work that outlasts the call: acks, WAL, merges started at once), in this
process, its mock server and the services (``/proc``; PostgreSQL backends of other
databases excluded), and ``combined_*_cpu = cores / sum_i(CPU seconds per recipient_i)``
is the same bound counted in CPU instead of wall time: the better estimate when the
table's busy column shows steps well under 100 %. Work a service defers for longer
(vacuum, checkpoints, later merges) is in neither figure.

Run it on a quiet machine: every step shares the cores with whatever else runs. The table
says how much of the machine other programs used before and during the steps.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import nats.errors
import orjson
from nats.js import JetStreamContext

from bench import preflight
from bench.e2e import machine
from devkit.stack import ROOT, drop_all, free_port, isolated_environ, mock_provider_command
from engine.chunks import cell_size
from engine.clickhouse import EVENT_COLUMNS, ClickHouse
from engine.config import Rate, Settings, load_settings
from engine.event_writer import append_event_rows
from engine.migrate import migrate_all
from engine.ratelimit import TokenBuckets
from engine.results import Columns, apply_results, decode, encode
from engine.services import Services
from engine.tenants import ensure_tenant
from engine.webhook_outbox import Batching
from engine.worker import RESULTS_FLUSH_MESSAGES
from providers.base import Message
from providers.mock import MockProvider
from providers.registry import PROVIDERS

PROVIDER = "mock"
TENANT = "floor"
CHUNK = PROVIDERS[PROVIDER].max_per_call  # 100 recipients per provider call (and results message)
CELL = cell_size(CHUNK)  # 1,000 recipients per chunk message (engine.chunks)
PUBLISH_WINDOW = 512  # engine.chunks.queue_batch: futures awaited every 512 publishes
CHUNK_FETCH = 64  # engine.worker: the send loop fetches at most 64 chunks at a time
RESULTS_PG_FETCH = RESULTS_FLUSH_MESSAGES  # results-pg messages per fetch (= per flush)
RESULTS_CH_FETCH = 500  # engine.worker: results-ch messages per fetch
RESULTS_HOOKS_FETCH = Batching().fetch  # engine.webhook_outbox: results-hooks per fetch
MOCK_CONCURRENCY = 64
SETTLE_WINDOW = 0.2  # s: after a step, the machine is watched in windows this long
SETTLE_QUIET = 0.05  # until one is busy under 5 % of the cores above idle
SETTLE_MAX = 3.0  # s, at most
RECIPIENT_COLUMNS = ["batch_id", "seq", "email", "name", "vars", "status"]

# The steps one recipient passes, as keys of the returned rates.
SEND_PATH = (
    "nats_chunks",
    "nats_results",
    "pg_copy",
    "pg_sent",
    "ch_sent",
    "token_concurrent",
    "mock",
)
WEBHOOK_EXTRA = ("nats_results", "pg_delivered", "ch_delivered")
# Steps made of measured parts (their times and CPU add up).
COMPOSITE = {
    "nats_chunks": ("nats_chunk_publish", "nats_chunk_fetch"),
    "nats_results": (
        "nats_results_publish",
        "nats_results_fetch_pg",
        "nats_results_fetch_ch",
        "nats_results_fetch_hooks",
    ),
}


_SERVICES = frozenset({"postgres", "nats-server", "clickhouse-serv", "redis-server", "dragonfly"})
_CLIENT_ADDRESS = re.compile(r"\(\d+\)|\[local\]")  # in a PostgreSQL backend's title
_TICK = os.sysconf("SC_CLK_TCK")


def _machine_busy_seconds() -> float:
    """CPU time the whole machine has spent busy since boot (all cores, all processes)."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values
    return (user + nice + system + irq + softirq + steal) / _TICK


@dataclass(frozen=True, slots=True)
class CpuCounter:
    """CPU seconds used by this run: this process and its children (the mock server) and
    the services, except PostgreSQL backends of other databases (so other programs on the
    machine, and other deployments' database sessions, are not counted)."""

    database: str
    pid: int = field(default_factory=os.getpid)

    def _counts(self, pid: int, comm: str, ppid: int) -> bool:
        if pid == self.pid or ppid == self.pid:
            return True
        if comm not in _SERVICES:
            return False
        if comm != "postgres":
            return True
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                title = cmdline.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return False
        # A backend names its user, database and client; background processes do not.
        return _CLIENT_ADDRESS.search(title) is None or f" {self.database} " in title

    def seconds(self) -> float:
        total = 0
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    stat = f.read()
            except OSError:  # gone meanwhile
                continue
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2 :].split()
            if self._counts(int(entry.name), comm, int(fields[1])):
                total += int(fields[11]) + int(fields[12])  # utime + stime, all threads
        return total / _TICK


@dataclass(slots=True)
class Step:
    label: str
    seconds: float
    cpu_seconds: float  # CPU of this run (CpuCounter) during the step
    after_cpu_seconds: float = 0.0  # the same above idle after it returned, until quiet
    other_cpu_seconds: float = 0.0  # CPU of everything else on the machine during the step


@dataclass(slots=True)
class Meter:
    """The measured steps of one run and what follows from them."""

    recipients: int
    counter: CpuCounter
    cores: int = field(default_factory=lambda: os.cpu_count() or 1)
    idle_cpu: float = 0.0  # cores busy with this run's services while nothing happens
    idle_other: float = 0.0  # cores busy with other programs before the run
    steps: dict[str, Step] = field(default_factory=dict)

    def _sample(self) -> tuple[float, float, float]:
        """(ours, whole machine) CPU seconds and the time."""
        return self.counter.seconds(), _machine_busy_seconds(), time.perf_counter()

    def _since(self, sample: tuple[float, float, float]) -> tuple[float, float, float]:
        """(ours, others, elapsed) since ``sample``."""
        ours, machine, at = sample
        now_ours, now_machine, now = self._sample()
        return now_ours - ours, (now_machine - machine) - (now_ours - ours), now - at

    async def calibrate(self, seconds: float = 1.0) -> None:
        """How busy the services and the rest of the machine are with nothing to do."""
        start = self._sample()
        await asyncio.sleep(seconds)
        ours, others, elapsed = self._since(start)
        self.idle_cpu, self.idle_other = ours / elapsed, max(0.0, others) / elapsed

    @contextlib.asynccontextmanager
    async def measure(self, key: str, label: str) -> AsyncIterator[None]:
        """Time the block and count the CPU it used, then wait for the services' work that
        outlasts it (acks, WAL, merges) and count that too."""
        gc.collect()
        start = self._sample()
        started = time.perf_counter()
        yield
        seconds = time.perf_counter() - started
        ours, others, _ = self._since(start)
        after = await self._settle()
        self.steps[key] = Step(label, seconds, ours, after, max(0.0, others))

    async def _settle(self) -> float:
        """This run's CPU above idle, in windows of ``SETTLE_WINDOW`` until one is quiet."""
        after = 0.0
        deadline = time.monotonic() + SETTLE_MAX
        while time.monotonic() < deadline:
            start = self._sample()
            await asyncio.sleep(SETTLE_WINDOW)
            ours, _, elapsed = self._since(start)
            used = ours - self.idle_cpu * elapsed
            if used < SETTLE_QUIET * self.cores * elapsed:
                break
            after += used
        return after

    @property
    def others_share(self) -> float:
        """Share of the machine other programs used while the steps ran."""
        steps = self.steps.values()
        seconds = sum(s.seconds for s in steps)
        return sum(s.other_cpu_seconds for s in steps) / (seconds * self.cores) if seconds else 0.0

    def step(self, key: str) -> Step:
        """A measured step, or a composite one (its parts added up)."""
        if key in self.steps:
            return self.steps[key]
        parts = [self.steps[k] for k in COMPOSITE[key]]
        return Step(
            key,
            sum(p.seconds for p in parts),
            sum(p.cpu_seconds for p in parts),
            sum(p.after_cpu_seconds for p in parts),
            sum(p.other_cpu_seconds for p in parts),
        )

    def rate(self, key: str) -> float:
        return self.recipients / self.step(key).seconds

    def cpu_per_recipient(self, key: str) -> float:
        """CPU seconds per recipient the step caused: during it and after it."""
        step = self.step(key)
        return (step.cpu_seconds + step.after_cpu_seconds) / self.recipients

    def combined(self, path: Sequence[str]) -> float:
        return 1.0 / sum(1.0 / self.rate(k) for k in path)

    def combined_cpu(self, path: Sequence[str]) -> float:
        cpu = sum(self.cpu_per_recipient(k) for k in path)
        return self.cores / cpu if cpu > 0 else float("inf")

    def results(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for key in [*self.steps, *COMPOSITE]:
            out[key] = self.rate(key)
            out[f"{key}_cpu_us"] = self.cpu_per_recipient(key) * 1e6
        webhook = (*SEND_PATH, *WEBHOOK_EXTRA)
        out["combined_send"] = self.combined(SEND_PATH)
        out["combined_webhook"] = self.combined(webhook)
        out["combined_send_cpu"] = self.combined_cpu(SEND_PATH)
        out["combined_webhook_cpu"] = self.combined_cpu(webhook)
        out["others_share"] = self.others_share
        return out


# --- the data --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Shape:
    """One batch of ``recipients`` recipients, sequence numbers 1..N, in chunks."""

    batch_id: uuid.UUID
    recipients: int
    chunk: int = CHUNK

    @property
    def chunks(self) -> list[tuple[int, int]]:
        """(first seq, count) of every provider call (and its results message)."""
        return _runs(self.recipients, self.chunk)

    @property
    def cells(self) -> list[tuple[int, int]]:
        """(first seq, count) of every chunk message (a cell of whole provider calls)."""
        return _runs(self.recipients, CELL)


def _runs(n: int, size: int) -> list[tuple[int, int]]:
    return [(first, min(size, n - first + 1)) for first in range(1, n + 1, size)]


_PMID_PREFIX = uuid.uuid4().hex[:12]  # provider message ids look like the mock's


def _pmid(seq: int) -> str:
    return f"{_PMID_PREFIX}{seq:012x}"


def recipient_records(shape: Shape) -> list[tuple[Any, ...]]:
    """COPY records as engine.intake.copier makes them (the e2e benchmark's recipients)."""
    b = shape.batch_id
    return [
        (b, i, f"user{i}@example.com", f"User {i}", {"code": str(i)}, "queued")
        for i in range(1, shape.recipients + 1)
    ]


def chunk_messages(shape: Shape) -> list[tuple[bytes, dict[str, str]]]:
    """Bodies and headers as engine.chunks.queue_batch publishes them (one per cell)."""
    b = str(shape.batch_id)
    return [
        (
            orjson.dumps({"b": b, "t": TENANT, "p": PROVIDER, "f": first, "n": n}),
            {"Nats-Msg-Id": f"{b}:{first}"},
        )
        for first, n in shape.cells
    ]


def result_bodies(shape: Shape, status: str) -> list[bytes]:
    """One results message per chunk: ``sent`` as the sender publishes it (one provider
    call's latency for the whole chunk), ``delivered`` as engine.webhooks builds it."""
    b = str(shape.batch_id)
    bodies = []
    for first, n in shape.chunks:
        columns = Columns()
        for seq in range(first, first + n):
            if status == "sent":
                columns.append(
                    b,
                    seq,
                    "sent",
                    provider_message_id=_pmid(seq),
                    latency_ms=3 + first % 7,
                    domain="example.com",
                )
            else:
                columns.append(
                    b, seq, status, provider_message_id=_pmid(seq), attempts=0, domain="example.com"
                )
        bodies.append(encode(TENANT if status == "sent" else None, PROVIDER, columns))
    return bodies


def status_flushes(bodies: list[bytes]) -> list[Columns]:
    """What engine.worker hands apply_results: the results of up to 1,000 messages."""
    flushes = []
    for start in range(0, len(bodies), RESULTS_PG_FETCH):
        columns = Columns()
        for body in bodies[start : start + RESULTS_PG_FETCH]:
            columns.extend(decode(body).columns)
        flushes.append(columns)
    return flushes


def event_columns(bodies: list[bytes]) -> list[list[Any]]:
    """ClickHouse columns as engine.event_writer.EventWriter builds them."""
    columns: list[list[Any]] = [[] for _ in EVENT_COLUMNS]
    tenants: dict[str, str] = {}  # webhook results: the writer looks the tenant up by batch
    for body in bodies:
        result = decode(body)
        for batch_id in result.columns.batch_id[:1]:
            tenants.setdefault(batch_id, TENANT)
        append_event_rows(columns, result, tenants)
    return columns


def provider_calls(shape: Shape) -> list[list[Message]]:
    """One list of 100 personalised messages per chunk, as engine.sender makes them."""
    b = str(shape.batch_id)
    calls = []
    for first, n in shape.chunks:
        part = []
        for seq in range(first, first + n):
            ref = f"{b}:{seq}"
            part.append(
                Message(
                    ref=ref,
                    to_email=f"user{seq}@example.com",
                    to_name=f"User {seq}",
                    from_email="bench@example.com",
                    from_name=None,
                    subject=f"Hello User {seq}",
                    html=None,
                    text=f"Your code is {seq}.",
                    headers={"X-BatchSender-Ref": ref},
                )
            )
        calls.append(part)
    return calls


# --- 1. NATS -----------------------------------------------------------------------------


async def _publish(
    js: JetStreamContext, subject: str, messages: Sequence[tuple[bytes, dict[str, str] | None]]
) -> None:
    pending: list[asyncio.Future[Any]] = []
    for body, headers in messages:
        pending.append(await js.publish_async(subject, body, headers=headers))
        if len(pending) >= PUBLISH_WINDOW:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)


async def _fetch_all(psub: JetStreamContext.PullSubscription, total: int, batch: int) -> None:
    got = 0
    while got < total:
        try:
            msgs = await psub.fetch(batch, timeout=5.0)
        except nats.errors.TimeoutError:
            raise RuntimeError(f"fetched {got} of {total} messages, then nothing") from None
        for msg in msgs:
            await msg.ack()
        got += len(msgs)


async def _expect_empty(js: JetStreamContext, stream: str) -> None:
    """Every message acknowledged: the work-queue / interest stream has let go of them."""
    for _ in range(100):  # acks are fire-and-forget: give the server up to 5 s
        left = (await js.stream_info(stream)).state.messages
        if not left:
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{stream} still holds {left} messages after every ack")


async def measure_nats(services: Services, meter: Meter, shape: Shape, sent: list[bytes]) -> None:
    js, topo = services.js, services.topology
    chunks = chunk_messages(shape)
    results: list[tuple[bytes, dict[str, str] | None]] = [(body, None) for body in sent]
    send = await js.pull_subscribe_bind("send", topo.send_stream)
    to_pg = await js.pull_subscribe_bind("results-pg", topo.results_stream)
    to_ch = await js.pull_subscribe_bind("results-ch", topo.results_stream)
    to_hooks = await js.pull_subscribe_bind("results-hooks", topo.results_stream)
    window = f"publish_async, window {PUBLISH_WINDOW}"
    try:
        async with meter.measure("nats_chunk_publish", f"NATS  chunks: {window}"):
            await _publish(js, topo.send_subject(PROVIDER), chunks)
        async with meter.measure("nats_chunk_fetch", f"NATS  chunks: fetch {CHUNK_FETCH} + ack"):
            await _fetch_all(send, len(chunks), CHUNK_FETCH)
            await services.nc.flush()
        await _expect_empty(js, topo.send_stream)
        async with meter.measure("nats_results_publish", f"NATS  results: {window}"):
            await _publish(js, topo.results_subject, results)
        for key, psub, batch, durable in (
            ("nats_results_fetch_pg", to_pg, RESULTS_PG_FETCH, "results-pg"),
            ("nats_results_fetch_ch", to_ch, RESULTS_CH_FETCH, "results-ch"),
            ("nats_results_fetch_hooks", to_hooks, RESULTS_HOOKS_FETCH, "results-hooks"),
        ):
            async with meter.measure(key, f"NATS  results: fetch {batch:,} + ack ({durable})"):
                await _fetch_all(psub, len(results), batch)
                await services.nc.flush()
        await _expect_empty(js, topo.results_stream)
    finally:
        for psub in (send, to_pg, to_ch, to_hooks):
            with contextlib.suppress(Exception):
                await psub.unsubscribe()
        for stream in (topo.send_stream, topo.results_stream):
            with contextlib.suppress(Exception):
                await js.purge_stream(stream)


# --- 2. PostgreSQL -----------------------------------------------------------------------


async def _count(services: Services, status: str) -> int:
    return await services.pool.fetchval(
        "SELECT count(*) FROM recipient_statuses WHERE status = $1", status
    )


async def measure_postgres(
    services: Services, meter: Meter, shape: Shape, sent: list[bytes], delivered: list[bytes]
) -> None:
    pool, n = services.pool, shape.recipients
    records = recipient_records(shape)
    passes = [
        ("pg_sent", "sent", status_flushes(sent)),
        ("pg_delivered", "delivered", status_flushes(delivered)),
    ]
    await ensure_tenant(pool, TENANT)
    await pool.execute(
        """INSERT INTO batches (id, tenant_id, name, from_email, subject, text, provider,
               status, chunk_size, total_recipients)
           VALUES ($1, $2, 'floor', 'bench@example.com', 'Hello {{ name }}',
                   'Your code is {{ code }}.', $3, 'queued', $4, $5)""",
        shape.batch_id,
        TENANT,
        PROVIDER,
        shape.chunk,
        n,
    )
    try:
        async with pool.acquire() as conn:
            async with meter.measure("pg_copy", "PG    COPY recipients (copy_records_to_table)"):
                await conn.copy_records_to_table(
                    "recipients", records=records, columns=RECIPIENT_COLUMNS
                )
            # engine.lifecycle.created adds the batch's counts after its COPY (one row, not timed).
            await conn.execute(
                "INSERT INTO batch_counts (batch_id, status, n) VALUES ($1, 'queued', $2)",
                shape.batch_id,
                n,
            )
        del records
        rows = f"{RESULTS_PG_FETCH * shape.chunk:,}"
        for key, status, flushes in passes:
            async with meter.measure(key, f"PG    apply_results '{status}', {rows} rows a flush"):
                for columns in flushes:
                    async with pool.acquire() as conn:
                        await apply_results(conn, columns)
            if (done := await _count(services, status)) != n:
                raise RuntimeError(f"{done} of {n} recipients {status} after apply_results")
        state = await pool.fetchval("SELECT status FROM batches WHERE id = $1", shape.batch_id)
        counts = dict(await pool.fetch("SELECT status, n FROM batch_counts WHERE n <> 0"))
        if state != "completed" or counts != {"delivered": n}:
            raise RuntimeError(f"after every result the batch is {state!r}, counts {counts}")
    finally:
        await pool.execute(
            "TRUNCATE recipients, recipient_finals, recipient_sends, recipient_deliveries, batches,"
            " suppressions, api_keys, tenants CASCADE"
        )


# --- 3. ClickHouse -----------------------------------------------------------------------


def _slices(columns: list[list[Any]], rows: int) -> Iterator[list[list[Any]]]:
    for start in range(0, len(columns[0]), rows):
        yield [column[start : start + rows] for column in columns]


async def measure_clickhouse(
    settings: Settings, meter: Meter, sent: list[bytes], delivered: list[bytes]
) -> None:
    rows, db = settings.clickhouse_flush_rows, settings.clickhouse_database
    clickhouse = ClickHouse(settings)
    try:
        await asyncio.to_thread(clickhouse.ping)
        for key, bodies in (("ch_sent", sent), ("ch_delivered", delivered)):
            columns = event_columns(bodies)
            event = columns[4][0]
            async with meter.measure(
                key, f"CH    insert_events '{event}', {rows:,} rows an insert"
            ):
                for part in _slices(columns, rows):
                    await asyncio.to_thread(clickhouse.insert_events, part)
            counted = await asyncio.to_thread(
                clickhouse.command, f"SELECT count() FROM {db}.events WHERE event = '{event}'"
            )
            if int(counted) != len(columns[0]):
                raise RuntimeError(f"ClickHouse holds {counted} of {len(columns[0])} {event}")
    finally:
        for table in ("events", "`.inner.events_per_minute`"):
            with contextlib.suppress(Exception):
                await asyncio.to_thread(clickhouse.command, f"TRUNCATE TABLE {db}.{table}")
        clickhouse.close()


# --- 4. token buckets --------------------------------------------------------------------


async def measure_tokens(services: Services, meter: Meter, shape: Shape, callers: int) -> None:
    plenty = 10 * shape.recipients + 1_000_000  # never binds: refills faster than we take
    rate = Rate(float(plenty), plenty)
    keys = [
        services.key("rl", "system"),
        services.key("rl", "provider", PROVIDER),
        services.key("rl", "tenant", TENANT),
    ]
    buckets = [(key, rate) for key in keys]
    tokens = TokenBuckets(services.redis)
    sizes = [n for _, n in shape.chunks]
    bound = 0

    async def caller(todo: Iterator[int]) -> None:
        nonlocal bound
        for n in todo:
            reservation = await tokens.reserve(n, buckets)
            bound += not reservation.granted or reservation.wait > 0

    try:
        await tokens.reserve(1, buckets)  # loads the script (EVALSHA misses once)
        async with meter.measure("token_sequential", "Redis TokenBuckets.reserve, 1 caller"):
            await caller(iter(sizes))
        todo = iter(sizes)
        async with meter.measure(
            "token_concurrent", f"Redis TokenBuckets.reserve, {callers} callers"
        ):
            await asyncio.gather(*(caller(todo) for _ in range(callers)))
        if bound:
            raise RuntimeError(f"{bound} reservations had to wait: the rate was meant not to bind")
    finally:
        await services.redis.delete(*keys)


# --- 5. the mock provider ----------------------------------------------------------------


async def _wait_healthy(url: str, proc: asyncio.subprocess.Process) -> None:
    async with (
        asyncio.timeout(20),
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session,
    ):
        while True:
            if proc.returncode is not None:
                raise RuntimeError(f"the mock provider exited with {proc.returncode}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(f"{url}/health") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.1)


async def measure_mock(meter: Meter, calls: list[list[Message]], latency_ms: float) -> None:
    key = "mock" if latency_ms == 0 else f"mock_{latency_ms:g}ms"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile(prefix="floor-mock-", suffix=".log", delete=False)
    proc = await asyncio.create_subprocess_exec(
        *mock_provider_command(port, latency_ms),
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    provider = MockProvider(url)
    accepted = 0

    async def caller(todo: Iterator[list[Message]]) -> None:
        nonlocal accepted
        for messages in todo:
            answers = await provider.send(messages)
            accepted += sum(answer.ok for answer in answers)  # not `+= await`: lost updates

    try:
        await _wait_healthy(url, proc)
        warm = iter([calls[0]] * MOCK_CONCURRENCY)  # connections opened before the clock runs
        await asyncio.gather(*(caller(warm) for _ in range(MOCK_CONCURRENCY)))
        accepted = 0
        todo = iter(calls)
        label = f"Mock  /v1/send via MockProvider, {MOCK_CONCURRENCY} in flight, {latency_ms:g} ms"
        async with meter.measure(key, label):
            await asyncio.gather(*(caller(todo) for _ in range(MOCK_CONCURRENCY)))
        if accepted != meter.recipients:
            tail = (await asyncio.to_thread(Path(log.name).read_text, errors="replace"))[-2000:]
            raise RuntimeError(f"the mock accepted {accepted} of {meter.recipients}\n{tail}")
    finally:
        await provider.close()
        if proc.returncode is None:
            proc.terminate()  # the server shuts down cleanly on SIGTERM
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        log.close()
        os.unlink(log.name)


# --- the run -----------------------------------------------------------------------------


async def run_floor(recipients: int = 200_000, *, mock_latency_ms: float | None = None) -> Meter:
    """Measure every component on a throw-away deployment; return the measured steps."""
    if recipients < 1:
        raise ValueError("recipients must be at least 1")
    tag = f"f{uuid.uuid4().hex[:8]}"
    environ = preflight.on_services(isolated_environ(tag))
    settings = load_settings(environ)
    meter = Meter(recipients, CpuCounter(urlsplit(settings.database_url).path.lstrip("/")))
    shape = Shape(uuid.uuid4(), recipients)
    sent, delivered = result_bodies(shape, "sent"), result_bodies(shape, "delivered")
    try:
        await migrate_all(settings)
        services = await Services.open(settings)
        try:
            await meter.calibrate()
            await measure_nats(services, meter, shape, sent)
            await measure_postgres(services, meter, shape, sent, delivered)
            await measure_clickhouse(settings, meter, sent, delivered)
            await measure_tokens(services, meter, shape, settings.worker_concurrency)
        finally:
            await services.close()
        calls = provider_calls(shape)
        for latency in (0.0, *([mock_latency_ms] if mock_latency_ms else [])):
            await measure_mock(meter, calls, latency)
    finally:
        await drop_all(settings)
        shutil.rmtree(environ["METRICS_DIR"], ignore_errors=True)
    return meter


async def measure_floor(
    recipients: int = 200_000, *, mock_latency_ms: float | None = None
) -> dict[str, float]:
    """Recipients/s per component and combined, measured on ``recipients`` recipients.

    Keys (recipients/s unless they end in ``_cpu_us``):

    - measured steps: ``nats_chunk_publish``, ``nats_chunk_fetch``, ``nats_results_publish``,
      ``nats_results_fetch_pg``, ``nats_results_fetch_ch``, ``nats_results_fetch_hooks``,
      ``pg_copy``, ``pg_sent``,
      ``pg_delivered``, ``ch_sent``, ``ch_delivered``, ``token_sequential``,
      ``token_concurrent``, ``mock`` (0 ms) and, with ``mock_latency_ms``, ``mock_<ms>ms``;
    - legs made of steps (times added): ``nats_chunks`` (chunk publish + fetch) and
      ``nats_results`` (results publish + both fetches);
    - ``<step>_cpu_us`` for each of the above: CPU microseconds per recipient the step
      caused in this process, the mock server and the services, during it and after it
      until quiet;
    - ``combined_send``: 1 / sum(1 / rate) over the sending path (``SEND_PATH``);
      ``combined_webhook``: the same with the delivered update added (``WEBHOOK_EXTRA``);
    - ``combined_send_cpu``, ``combined_webhook_cpu``: cores / sum(CPU seconds per
      recipient) over the same steps;
    - ``others_share``: the share of the machine (0..1) other programs used while the
      steps ran; above ~0.05 the run was not quiet and its figures are low.
    """
    meter = await run_floor(recipients, mock_latency_ms=mock_latency_ms)
    return meter.results()


def table(meter: Meter) -> str:
    n = meter.recipients
    lines = [
        f"machine:    {machine()}",
        f"recipients: {n:,} in chunk messages of {CELL}, provider calls of {CHUNK} (one batch)",
        f"others:     {meter.idle_other / meter.cores:.0%} of the machine busy before the run,"
        f" {meter.others_share:.0%} during the steps"
        + ("  << NOT QUIET: the figures are low" if meter.others_share > 0.05 else ""),
        "",
        "per recipient: wall µs = 1/rate; CPU µs = CPU this run caused (this process, the mock,"
        " the services)",
        "during the step and after it until quiet ('after'); busy, others = share of all cores"
        " used by this run, by everything else, during the step",
        f"{'step':<54} {'s':>6} {'recipients/s':>13} {'wall µs':>8} {'CPU µs':>7}"
        f" {'after':>6} {'busy':>5} {'others':>6}",
    ]

    def row(key: str, label: str | None = None) -> str:
        step = meter.step(key)
        machine_seconds = step.seconds * meter.cores
        return (
            f"{label or step.label:<54} {step.seconds:>6.2f} {meter.rate(key):>13,.0f}"
            f" {1e6 / meter.rate(key):>8.2f} {meter.cpu_per_recipient(key) * 1e6:>7.2f}"
            f" {step.after_cpu_seconds / n * 1e6:>6.2f} {step.cpu_seconds / machine_seconds:>5.0%}"
            f" {step.other_cpu_seconds / machine_seconds:>6.0%}"
        )

    for key in meter.steps:
        lines.append(row(key))
        for leg, parts in COMPOSITE.items():
            if key == parts[-1]:
                lines.append(row(leg, f"  = {leg} (the above added)"))
    results = meter.results()
    lines += [
        "",
        "combined: 1 / sum(1 / rate)  |  by CPU: cores / sum(CPU per recipient)",
        f"  send path:    {' + '.join(SEND_PATH)}",
        f"                {results['combined_send']:>8,.0f} recipients/s"
        f"  |  by CPU {results['combined_send_cpu']:>8,.0f} recipients/s",
        f"  with webhook: + {' + '.join(WEBHOOK_EXTRA)}",
        f"                {results['combined_webhook']:>8,.0f} recipients/s"
        f"  |  by CPU {results['combined_webhook_cpu']:>8,.0f} recipients/s",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipients", type=int, default=200_000)
    parser.add_argument(
        "--mock-latency-ms",
        type=float,
        default=None,
        help="also measure the mock provider answering after this many ms (e.g. 20)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import uvloop
    except ImportError:
        run = asyncio.run
    else:
        run = uvloop.run  # as the worker and the mock provider run
    started = time.perf_counter()
    meter = preflight.run(
        run_floor(args.recipients, mock_latency_ms=args.mock_latency_ms), "bench.floor", run
    )
    print(table(meter))
    print(f"\nwall time of the whole run: {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
