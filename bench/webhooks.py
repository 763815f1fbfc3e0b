"""Provider webhook intake under load: signed posts to a tenant account's route on a
throw-away deployment, then the time until every event is applied in PostgreSQL and
ClickHouse.

    python -m bench.webhooks                          # mailgun, resend, sendgrid×500
    python -m bench.webhooks --runs mailgun --events 100000 --duration 20
    python -m bench.webhooks --runs sendgrid:100,sendgrid:1000 --array-events 500000

Each run (``PROVIDER`` one event per post, ``PROVIDER:K`` K events per post: SendGrid's
arrays) has a deployment of its own, as bench/providers.py makes it (``Stack``: mock
provider, API and workers on their own databases, streams and keys; removed afterwards):

1. A provider account of the provider through the API (``POST /api/provider-accounts``,
   with a ``webhook_secret``: Mailgun's test signing key, a Svix secret for Resend, the
   verification key of a fresh P-256 key for SendGrid) and a dry-run batch of N recipients
   through it (``bench.providers.run_batch``: streamed NDJSON, waited for until every
   recipient is ``sent``; a dry run calls no provider).
2. One ``delivered`` per recipient, signed as the provider signs it (the documented sample
   payloads of tests/fixtures with our ref; every Mailgun token and Svix id new), made and
   framed as raw HTTP/1.1 requests to ``POST /webhooks/{provider}/{account_id}`` before the
   clock starts: signing is the provider's cost, not ours.
3. A load generator at a fixed concurrency (``--connections`` keep-alive connections, one
   request in flight each) until the posts are used up or ``--duration`` has passed:
   ``wrk`` (Debian's package; the posts fed by a Lua script) when it is installed, else
   (or with ``--client python``) a raw HTTP/1.1 client on asyncio in ``--processes``
   processes. Requests/s, events/s, latency p50/p95/p99/max (client side), answers by
   status; the generator's own CPU (``wait4``).
4. While it runs and after: PostgreSQL (``batch_counts`` delivered), ClickHouse (``events``
   rows of the batch) and the results consumers' lag (``batchsender_results_lag_seconds``
   and ``nats_queue_depth`` of ``/api/metrics``, once a second) sampled; the time from the
   load's end until both hold every event the API accepted
   (``batchsender_webhooks_total``), and the CPU of every process and service.

Checked: every accepted event applied exactly once in both (recipients ``delivered``,
``batch_counts``, distinct ClickHouse rows), no answer but 200. ``--profile DIR``:
py-spy on every process of the stack during the load (bench/profile.py).

``--load FILE --port N --connections C --deadline T`` is one process of the Python load
generator, as the benchmark starts it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson

from bench import preflight
from bench.e2e import TEMPLATE, machine
from bench.profile import Profiler
from bench.providers import create_account, run_batch
from devkit.stack import ROOT, Stack, drop_all, environ_for, isolated_environ, tenant_key
from engine.clickhouse import ClickHouse
from engine.config import Settings, load_settings
from engine.migrate import migrate_all

FIXTURES = ROOT / "tests" / "fixtures"
Post = tuple[bytes, dict[str, str]]  # body, headers


# --- signed posts, as each provider makes them -----------------------------------------------


@dataclass(frozen=True)
class Signer:
    secret: str  # the account's webhook_secret
    post: Callable[[list[int], str], Post]  # (seqs, batch id): one signed post of their events


def _fixture(path: str) -> Any:
    return orjson.loads((FIXTURES / path).read_bytes())


def _mailgun() -> Signer:
    from devkit.fakes.mailgun import TEST_SIGNING_KEY, signed_post

    sample = _fixture("mailgun/delivered.json")

    def post(seqs: list[int], batch_id: str) -> Post:
        (seq,) = seqs
        data = dict(
            sample,
            id=f"bench{seq:018d}",
            recipient=f"user{seq}@example.com",
            **{"user-variables": {"ref": f"{batch_id}:{seq}"}},
        )
        # A new 50-character token each (signed_post's default): a reused one is refused.
        return signed_post(data, TEST_SIGNING_KEY), {"Content-Type": "application/json"}

    return Signer(TEST_SIGNING_KEY, post)


def _resend() -> Signer:
    from standardwebhooks.webhooks import Webhook as StandardWebhook

    from providers.resend import encode_ref

    secret = "whsec_" + base64.b64encode(b"bench-webhooks-svix-signing-key!").decode()
    svix = StandardWebhook(secret)
    sample = _fixture("resend/email_delivered.json")

    def post(seqs: list[int], batch_id: str) -> Post:
        (seq,) = seqs
        tag = encode_ref(f"{batch_id}:{seq}")
        data = dict(
            sample["data"],
            email_id=str(uuid.uuid4()),
            to=[f"user{seq}@example.com"],
            tags={tag["name"]: tag["value"]},
        )
        body = orjson.dumps(dict(sample, data=data))
        msg_id, when = f"msg_{uuid.uuid4().hex}", datetime.now(UTC)
        return body, {
            "Content-Type": "application/json",
            "svix-id": msg_id,
            "svix-timestamp": str(int(when.timestamp())),
            "svix-signature": svix.sign(msg_id, when, body.decode()),
        }

    return Signer(secret, post)


def _sendgrid() -> Signer:
    from devkit.fakes.sendgrid import new_signing_key, signed_headers, verification_key

    key = new_signing_key()
    sample = next(e for e in _fixture("sendgrid/events.json") if e["event"] == "delivered")

    def post(seqs: list[int], batch_id: str) -> Post:
        body = orjson.dumps(
            [
                dict(
                    sample,
                    ref=f"{batch_id}:{seq}",
                    email=f"user{seq}@example.com",
                    sg_event_id=f"bench{seq:017d}",
                )
                for seq in seqs
            ]
        )
        return body, signed_headers(body, key)

    return Signer(verification_key(key), post)


SIGNERS: dict[str, Callable[[], Signer]] = {
    "mailgun": _mailgun,
    "resend": _resend,
    "sendgrid": _sendgrid,
}


def raw_request(path: str, host: str, post: Post) -> bytes:
    """One keep-alive HTTP/1.1 POST, as it goes on the wire."""
    body, headers = post
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def write_posts(requests: list[bytes], folder: Path, shards: int) -> list[Path]:
    """The requests in ``shards`` files (request i in shard i % shards), each framed as
    ``<length>\\n<bytes>``: one file per wrk thread or Python load process."""
    paths = []
    for shard in range(shards):
        path = folder / f"posts-{shard}.bin"
        with path.open("wb") as out:
            for raw in requests[shard::shards]:
                out.write(b"%d\n" % len(raw))
                out.write(raw)
        paths.append(path)
    return paths


def read_posts(path: Path) -> list[bytes]:
    data, posts, at = path.read_bytes(), [], 0
    while at < len(data):
        newline = data.index(b"\n", at)
        size = int(data[at:newline])
        posts.append(data[newline + 1 : newline + 1 + size])
        at = newline + 1 + size
    return posts


# --- the load generators ---------------------------------------------------------------------

# Each wrk thread reads its own file of framed requests and sends them in turn; a thread
# whose requests are used up stops (its requests still in flight are not counted: the API's
# own count says what it accepted). Answers are counted by status in every thread.
WRK_SCRIPT = r"""
local files = {%(files)s}
local threads, made = {}, 0

-- Wall-clock seconds (LuaJIT's FFI): wrk's own duration is always its -d, even when the
-- posts run out before.
local ffi = require("ffi")
ffi.cdef[[
  typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
  int clock_gettime(int clock, bench_timespec *ts);
]]
local ts = ffi.new("bench_timespec")
local function now()
  ffi.C.clock_gettime(0, ts)
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) / 1e9
end

function setup(thread)
  made = made + 1
  thread:set("file", files[made])
  thread:set("index", made)
  table.insert(threads, thread)
end

function init(args)
  local f = assert(io.open(file, "rb"))
  local data = f:read("*a")
  f:close()
  posts, statuses, sent = {}, {}, 0
  local at = 1
  while at <= #data do
    local newline = data:find("\n", at, true)
    local size = tonumber(data:sub(at, newline - 1))
    posts[#posts + 1] = data:sub(newline + 1, newline + size)
    at = newline + size + 1
  end
end

function request()
  if index == 1 and not checked then  -- wrk parses thread 1's first request once: not sent
    checked = true
    return posts[1]
  end
  if first == nil then first = now() end
  sent = sent + 1
  if sent > #posts then
    if sent == #posts + 1 then  -- tells the benchmark, which ends wrk (SIGINT) once all are
      io.open(file .. ".done", "w"):close()
    end
    wrk.thread:stop()
    return "GET /health/live HTTP/1.1\r\nHost: %(host)s\r\n\r\n"
  end
  return posts[sent]
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  last = now()
end

function done(summary, latency, requests)
  local by, start, stop = {}, nil, nil
  for _, thread in ipairs(threads) do
    local t0, t1 = thread:get("first"), thread:get("last")
    if t0 and (start == nil or t0 < start) then start = t0 end
    if t1 and (stop == nil or t1 > stop) then stop = t1 end
    for status, n in pairs(thread:get("statuses")) do
      by[tostring(status)] = (by[tostring(status)] or 0) + n
    end
  end
  local parts = {}
  for status, n in pairs(by) do
    parts[#parts + 1] = string.format('"%%s": %%d', status, n)
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH {"start": %%.6f, "end": %%.6f, "requests": %%d, "statuses": {%%s}, ' ..
    '"socket_errors": {"connect": %%d, "read": %%d, "write": %%d, "timeout": %%d}, ' ..
    '"latency_ms": {"p50": %%.3f, "p95": %%.3f, "p99": %%.3f, "max": %%.3f, "mean": %%.3f}}\n',
    start or 0, stop or 0, summary.requests, table.concat(parts, ", "),
    e.connect, e.read, e.write, e.timeout,
    latency:percentile(50) / 1e3, latency:percentile(95) / 1e3, latency:percentile(99) / 1e3,
    latency.max / 1e3, latency.mean / 1e3))
end
"""


def machine_cpu() -> tuple[float, float]:
    """(busy, all) CPU seconds of the whole machine so far (/proc/stat): what other
    programs than ours took during a run shows as busy less ours."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / tick, sum(fields[:8]) / tick


def _own_cpu() -> float:
    """This process's CPU seconds (the watcher's sampling; its load children not yet)."""
    usage = os.times()
    return usage.user + usage.system


def _wait(proc: subprocess.Popen, done: Callable[[], bool] | None = None) -> float:
    """Wait for a child (SIGINT once ``done()``); its CPU seconds (user + system, its
    threads included)."""
    interrupted = False
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG if done else 0)
        if pid:
            break
        if done is not None and not interrupted and done():
            proc.send_signal(signal.SIGINT)
            interrupted = True
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_utime + usage.ru_stime


def run_wrk(
    files: list[Path], port: int, connections: int, duration: float, folder: Path
) -> dict[str, Any]:
    host = f"127.0.0.1:{port}"
    script = folder / "posts.lua"
    names = ", ".join(json.dumps(str(path)) for path in files)
    script.write_text(WRK_SCRIPT % {"files": names, "host": host})
    out = folder / "wrk.out"
    command = ["wrk", "-t", str(len(files)), "-c", str(connections), "-d", f"{duration:.0f}s",
               "--timeout", "30s", "-s", str(script), f"http://{host}/"]  # fmt: skip
    with out.open("wb") as stdout:
        proc = subprocess.Popen(command, stdout=stdout, stderr=subprocess.STDOUT)
        # wrk runs for its -d even when every thread has stopped: once all the posts are
        # used up, SIGINT ends it (it reports as at the end of -d).
        marks = [Path(f"{path}.done") for path in files]
        cpu = _wait(proc, lambda: all(mark.exists() for mark in marks))
    text = out.read_text(errors="replace")
    line = next((row for row in text.splitlines() if row.startswith("BENCH ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {text[-2000:]}")
    found = json.loads(line[len("BENCH ") :])
    found["statuses"] = {int(k): v for k, v in found["statuses"].items()}
    found["seconds"] = found["end"] - found["start"]
    found["client_cpu_s"] = cpu
    found["client"] = f"wrk, {len(files)} thread(s), {connections} connections"
    return found


def run_python(
    files: list[Path], port: int, connections: int, duration: float, folder: Path
) -> dict[str, Any]:
    """The Python load generator: one process per file, the connections shared out."""
    deadline = time.time() + duration + 5  # the processes' start included
    procs = []
    for i, path in enumerate(files):
        share = connections // len(files) + (1 if i < connections % len(files) else 0)
        out = (folder / f"load-{i}.json").open("wb")
        command = [sys.executable, "-m", "bench.webhooks", "--load", str(path), "--port",
                   str(port), "--connections", str(share), "--deadline", f"{deadline:.3f}"]  # fmt: skip
        procs.append((subprocess.Popen(command, cwd=ROOT, stdout=out), out))
    cpu = 0.0
    for proc, out in procs:
        cpu += _wait(proc)
        out.close()
    parts = [json.loads((folder / f"load-{i}.json").read_bytes()) for i in range(len(files))]
    latencies = sorted(x for p in parts for x in p["latency_ms"])
    statuses: Counter[int] = Counter()
    for part in parts:
        statuses.update({int(k): v for k, v in part["statuses"].items()})
    seconds = max(p["end"] for p in parts) - min(p["start"] for p in parts)
    return {
        "start": min(p["start"] for p in parts),
        "end": max(p["end"] for p in parts),
        "seconds": seconds,
        "requests": len(latencies),
        "statuses": dict(statuses),
        "socket_errors": {"connect": sum(p["errors"] for p in parts)},
        "latency_ms": {
            "p50": percentile(latencies, 50),
            "p95": percentile(latencies, 95),
            "p99": percentile(latencies, 99),
            "max": latencies[-1] if latencies else 0.0,
            "mean": sum(latencies) / len(latencies) if latencies else 0.0,
        },
        "client_cpu_s": cpu,
        "client": f"Python (asyncio, uvloop), {len(files)} process(es), {connections} connections",
    }


def percentile(ordered: list[float], p: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


async def _load(path: Path, port: int, connections: int, deadline: float) -> dict[str, Any]:
    """Send the file's requests over ``connections`` keep-alive connections, one in flight
    each, until they are used up or ``deadline`` (epoch seconds)."""
    posts = iter(read_posts(path))
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    errors = 0

    async def connection() -> None:
        nonlocal errors
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            errors += 1
            return
        try:
            for raw in posts:
                if time.time() >= deadline:
                    break
                started = time.perf_counter()
                writer.write(raw)
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                await reader.readexactly(int(length[1]) if length else 0)
                latencies.append(1e3 * (time.perf_counter() - started))
                statuses[int(head[9:12])] += 1
        except (OSError, asyncio.IncompleteReadError):
            errors += 1
        finally:
            writer.close()

    start = time.time()
    await asyncio.gather(*(connection() for _ in range(connections)))
    return {
        "start": start,
        "end": time.time(),
        "latency_ms": latencies,
        "statuses": statuses,
        "errors": errors,
    }


def serve_load(path: Path, port: int, connections: int, deadline: float) -> None:
    import uvloop

    found = uvloop.run(_load(path, port, connections, deadline))
    sys.stdout.buffer.write(orjson.dumps(found, option=orjson.OPT_NON_STR_KEYS))


# --- what the deployment has applied ---------------------------------------------------------

_SERIES = re.compile(r"^(batchsender_results_lag_seconds|nats_queue_depth)\{([^}]*)\} (\S+)$", re.M)


def parse_metrics(text: str, provider: str) -> dict[str, float]:
    """The results consumers' lag and depth, and the events the API accepted."""
    found: dict[str, float] = {}
    for name, labels, value in _SERIES.findall(text):
        consumer = re.search(r'consumer="([^"]+)"', labels)
        if consumer and consumer[1].startswith("results-"):
            kind = "lag" if name.startswith("batchsender") else "depth"
            found[f"{kind}:{consumer[1]}"] = float(value)
    accepted = re.search(
        rf'^batchsender_webhooks_total\{{(?=[^}}]*event="delivered")(?=[^}}]*provider="{provider}")'
        r"[^}]*\} (\S+)$",
        text,
        re.M,
    )
    found["accepted"] = float(accepted[1]) if accepted else 0.0
    return found


class Watcher:
    """Samples what is applied (PostgreSQL, ClickHouse) every ``interval`` and the results
    consumers' lag (``/api/metrics``) every second, from the start of the load on."""

    def __init__(self, settings: Settings, api: str, batch_id: str, provider: str) -> None:
        self.settings, self.api, self.batch_id, self.provider = settings, api, batch_id, provider
        self.samples: list[dict[str, float]] = []
        self.metrics: list[dict[str, float]] = []
        self._tasks: list[asyncio.Task] = []
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()  # one query at a time on the connection
        self._clickhouse = ClickHouse(settings)

    async def start(self, interval: float = 0.25) -> None:
        self._conn = await asyncpg.connect(self.settings.database_url)
        self._tasks = [
            asyncio.create_task(self._applied(interval)),
            asyncio.create_task(self._lag()),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._conn is not None:
            await self._conn.close()
        self._clickhouse.close()

    async def counts(self) -> tuple[int, int]:
        assert self._conn is not None
        async with self._lock:
            pg = await self._conn.fetchval(
                "SELECT n FROM batch_counts WHERE batch_id = $1 AND status = 'delivered'",
                uuid.UUID(self.batch_id),
            )
        sql = (
            f"SELECT count() FROM {self.settings.clickhouse_database}.events "
            f"WHERE batch_id = '{self.batch_id}' AND event = 'delivered'"
        )
        async with self._lock:  # the ClickHouse client takes one query at a time too
            ch = (await asyncio.to_thread(self._clickhouse.query, sql))[0][0]
        return int(pg or 0), int(ch)

    async def _applied(self, interval: float) -> None:
        while True:
            at = time.time()
            pg, ch = await self.counts()
            self.samples.append({"t": at, "pg": pg, "ch": ch})
            await asyncio.sleep(max(0.0, interval - (time.time() - at)))

    async def _lag(self) -> None:
        async with aiohttp.ClientSession() as session:
            while True:
                at = time.time()
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(f"{self.api}/api/metrics") as response:
                        text = await response.text()
                    self.metrics.append({"t": at, **parse_metrics(text, self.provider)})
                await asyncio.sleep(max(0.0, 1.0 - (time.time() - at)))

    async def accepted(self) -> int:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{self.api}/api/metrics") as response,
        ):
            return int(parse_metrics(await response.text(), self.provider)["accepted"])

    async def until(self, expected: int, give_up_s: float) -> float | None:
        """When (epoch seconds) both held ``expected`` events; None when not in time."""
        deadline = time.time() + give_up_s
        while time.time() < deadline:
            for sample in self.samples:
                if sample["pg"] >= expected and sample["ch"] >= expected:
                    return sample["t"]
            await asyncio.sleep(0.1)
        return None

    async def final(self) -> dict[str, int]:
        """The exactly-once figures: recipients delivered, batch_counts, ClickHouse rows
        and distinct recipients among them."""
        assert self._conn is not None
        batch = uuid.UUID(self.batch_id)
        async with self._lock:
            recipients = await self._conn.fetchval(
                "SELECT count(*) FROM recipient_statuses WHERE batch_id = $1 AND status = 'delivered'",
                batch,
            )
        pg, ch = await self.counts()
        sql = (
            f"SELECT uniqExact(seq) FROM {self.settings.clickhouse_database}.events "
            f"WHERE batch_id = '{self.batch_id}' AND event = 'delivered'"
        )
        async with self._lock:
            distinct = (await asyncio.to_thread(self._clickhouse.query, sql))[0][0]
        return {
            "recipients": recipients,
            "batch_counts": pg,
            "ch_rows": ch,
            "ch_distinct": distinct,
        }


# --- one run ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    provider: str
    per_post: int  # events per post
    events: int  # recipients of the batch: one delivered each

    @property
    def posts(self) -> int:
        return -(-self.events // self.per_post)

    @property
    def name(self) -> str:
        return self.provider if self.per_post == 1 else f"{self.provider}×{self.per_post}"


def _window(rows: list[dict[str, float]], start: float, end: float) -> list[dict[str, float]]:
    return [row for row in rows if start <= row["t"] <= end]


async def measure_run(
    run: Run,
    *,
    workers: int,
    connections: int,
    duration: float,
    client: str,
    shards: int,
    timeout_s: float,
    profile: Path | None = None,
) -> dict[str, Any]:
    tag = f"w{uuid.uuid4().hex[:8]}"
    environ = preflight.on_services(isolated_environ(tag))
    environ.update(WORKER_PROCESSES=str(workers))
    settings = load_settings(environ)
    await migrate_all(settings)
    logs = Path(tempfile.mkdtemp(prefix=f"bench-{tag}-"))
    stack = Stack(settings, environ_for(environ), logs)
    result: dict[str, Any] = {"run": run.name, "problems": []}
    result.update(provider=run.provider, per_post=run.per_post, events=run.events)
    profiler = Profiler(profile / run.name) if profile else None
    watcher: Watcher | None = None
    failed = True
    try:
        key = await tenant_key(settings, "bench")
        await asyncio.to_thread(partial(stack.start_all, ("--latency-ms", "0"), webhooks=False))
        signer = SIGNERS[run.provider]()
        headers = {"Authorization": f"Bearer {key}"}
        timeout = aiohttp.ClientTimeout(total=None)
        async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
            # The account the batch goes through and the webhooks are posted to (the fakes' test
            # credentials; a dry run never uses them).
            account = await create_account(
                session, stack.api, run.provider, webhook_secret=signer.secret
            )
            template = {k: v for k, v in TEMPLATE.items() if k != "provider"}
            template.update(provider_account=account["name"], dry_run=True)
            progress: dict[str, Any] = {}
            await asyncio.wait_for(
                run_batch(session, stack.api, run.events, template, progress), timeout_s
            )
        batch_id = progress["batch_id"]
        result["batch_s"] = progress["done"] - progress["start"]

        started = time.perf_counter()
        path = f"/webhooks/{run.provider}/{account['id']}"
        host = f"127.0.0.1:{settings.api_port}"
        requests = [
            raw_request(path, host, signer.post(list(range(first, last + 1)), batch_id))
            for first in range(1, run.events + 1, run.per_post)
            for last in [min(run.events, first + run.per_post - 1)]
        ]
        result["signing_s"] = time.perf_counter() - started
        result["post_bytes"] = sum(len(r) for r in requests) / len(requests)
        files = write_posts(requests, logs, shards)
        del requests

        watcher = Watcher(settings, stack.api, batch_id, run.provider)
        await watcher.start()
        if profiler:
            profiler.start(stack.pids())
        cpu_before, machine_before, own_before = stack.cpu_seconds(), machine_cpu(), _own_cpu()
        load_start = time.time()
        runner = run_wrk if client == "wrk" else run_python
        load = await asyncio.to_thread(
            runner, files, settings.api_port, connections, duration, logs
        )
        load_end = time.time()
        cpu_load, machine_load = stack.cpu_seconds(), machine_cpu()
        result["bench_cpu_s"] = _own_cpu() - own_before
        if profiler:
            profiler.stop()
            result["profile"] = profiler.summary()
        result["load"] = load
        accepted = await watcher.accepted()
        result["accepted_events"] = accepted
        applied_at = await watcher.until(accepted, timeout_s)
        cpu_after = stack.cpu_seconds()
        result["cpu_load_s"] = {k: v - cpu_before.get(k, 0.0) for k, v in cpu_load.items()}
        result["machine_load_s"] = [
            a - b for a, b in zip(machine_load, machine_before, strict=True)
        ]
        result["cpu_drain_s"] = {k: v - cpu_load.get(k, 0.0) for k, v in cpu_after.items()}
        result["load_s"] = load_end - load_start
        load_end = load["end"] or load_end  # the last answer (wrk idles until its -d)
        result["applied_after_s"] = applied_at - load_end if applied_at else None
        during = _window(watcher.samples, load_start, load_end)
        at_end = during[-1] if during else {"pg": 0, "ch": 0}
        result["applied_at_load_end"] = {"pg": at_end["pg"], "ch": at_end["ch"]}
        lags = _window(watcher.metrics, load_start, applied_at or time.time())
        result["max_lag"] = {
            name: max((m.get(f"lag:{name}", 0.0) for m in lags), default=None)
            for name in ("results-pg", "results-ch")
        }
        result["max_depth"] = {
            name: max((m.get(f"depth:{name}", 0.0) for m in lags), default=None)
            for name in ("results-pg", "results-ch")
        }
        result["timeline"] = timeline(watcher, load_start, applied_at or time.time())
        result["final"] = final = await watcher.final()
        result["peak_rss_mb"] = stack.peak_rss_mb()
        result["problems"] += problems(result, accepted, final, applied_at)
        failed = bool(result["problems"])
    except Exception as exc:
        result["problems"].append(f"{type(exc).__name__}: {exc}")
    finally:
        try:  # the processes are stopped and the deployment dropped whatever failed here
            if watcher is not None:
                await watcher.stop()
            await asyncio.to_thread(stack.stop_all)
            if failed:
                print(stack.tail(), file=sys.stderr)
                print(f"logs kept in {logs}", file=sys.stderr)
        finally:
            await drop_all(settings)
            shutil.rmtree(settings.metrics_dir, ignore_errors=True)
            if not failed:
                shutil.rmtree(logs, ignore_errors=True)
    return result


def timeline(watcher: Watcher, start: float, end: float) -> list[dict[str, float]]:
    """Once a second from the load's start until all was applied: events accepted by the
    API, applied in PostgreSQL and ClickHouse, and the two consumers' lag."""
    rows = []
    for m in _window(watcher.metrics, start, end + 1):
        near = min(watcher.samples, key=lambda s: abs(s["t"] - m["t"]), default=None)
        rows.append(
            {
                "t": round(m["t"] - start, 1),
                "accepted": m.get("accepted", 0.0),
                "pg": near["pg"] if near else 0,
                "ch": near["ch"] if near else 0,
                "lag_pg": m.get("lag:results-pg"),
                "lag_ch": m.get("lag:results-ch"),
            }
        )
    return rows


def problems(
    r: dict[str, Any], accepted: int, final: dict[str, int], applied_at: float | None
) -> list[str]:
    found = []
    statuses = r["load"]["statuses"]
    others = {k: v for k, v in statuses.items() if k != 200}
    if others:
        found.append(f"answers other than 200: {others}")
    answered = statuses.get(200, 0) * r["per_post"]
    if accepted < answered:
        found.append(f"the API counted {accepted:,} events, the client {answered:,} accepted")
    if applied_at is None:
        found.append(f"not all {accepted:,} events applied within the timeout")
    for name, value in final.items():
        if value != accepted:
            found.append(f"{name} {value:,} for {accepted:,} events accepted")
    return found


# --- the report ------------------------------------------------------------------------------


def derived(r: dict[str, Any]) -> dict[str, Any]:
    load = r.get("load") or {}
    ok = (load.get("statuses") or {}).get(200, 0)
    seconds = load.get("seconds") or 0.0
    cpu = r.get("cpu_load_s") or {}
    return {
        "rps": ok / seconds if seconds else 0.0,
        "eps": ok * r["per_post"] / seconds if seconds else 0.0,
        "api_us": 1e6 * cpu.get("api", 0.0) / ok if ok else None,
        "api_cpu": cpu.get("api", 0.0),
        "workers_cpu": sum(v for k, v in cpu.items() if k.startswith("worker")),
        "client_cpu": load.get("client_cpu_s", 0.0),
        "errors": {k: v for k, v in (load.get("statuses") or {}).items() if k != 200},
    }


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> bool:
    print(f"machine:    {machine()}")
    print(
        f"run:        {args.connections} connections, at most {args.duration:.0f} s per run, "
        f"{args.workers} worker processes, one API process; dry-run batches through a "
        "provider account, one delivered per recipient"
    )
    ok = True
    for r in results:
        d = derived(r)
        load = r.get("load") or {}
        print(f"--- {r['run']}: {r['events']:,} events, {r['per_post']} per post")
        if "batch_s" in r:
            print(
                f"prepared:   batch sent (dry run) in {r['batch_s']:.1f} s; posts signed in "
                f"{r['signing_s']:.1f} s, {r['post_bytes']:,.0f} bytes each"
            )
        if load:
            lat = load["latency_ms"]
            print(f"client:     {load['client']}, CPU {d['client_cpu']:.1f} s")
            print(
                f"load:       {load['requests']:,} answers in {load['seconds']:.2f} s = "
                f"{d['rps']:,.0f} requests/s, {d['eps']:,.0f} events/s (HTTP 200 only)"
            )
            print(
                f"latency:    p50 {lat['p50']:.1f} ms, p95 {lat['p95']:.1f}, p99 {lat['p99']:.1f}, "
                f"max {lat['max']:.1f}, mean {lat['mean']:.1f}"
            )
            statuses = ", ".join(f"HTTP {k}: {v:,}" for k, v in sorted(load["statuses"].items()))
            sockets = {k: v for k, v in load.get("socket_errors", {}).items() if v}
            print(f"answers:    {statuses}" + (f"; socket errors {sockets}" if sockets else ""))
        if "final" in r:
            end = r["applied_at_load_end"]
            print(
                f"applied:    {r['accepted_events']:,} accepted by the API; at the load's end "
                f"PostgreSQL {end['pg']:,}, ClickHouse {end['ch']:,}; all applied "
                + (
                    f"{r['applied_after_s']:.1f} s after it"
                    if r["applied_after_s"] is not None
                    else "NOT in time"
                )
            )
            print(
                "lag:        max results-pg "
                f"{_ms(r['max_lag']['results-pg'])} s (depth {r['max_depth']['results-pg']}), "
                f"results-ch {_ms(r['max_lag']['results-ch'])} s "
                f"(depth {r['max_depth']['results-ch']})"
            )
            print(f"final:      {r.get('final')}")
            print("timeline:   s: accepted / PostgreSQL / ClickHouse (lag pg, ch s)")
            for row in r.get("timeline") or ():
                print(
                    f"  {row['t']:5.1f}: {row['accepted']:>9,.0f} / {row['pg']:>9,} / "
                    f"{row['ch']:>9,} ({_ms(row['lag_pg'])}, {_ms(row['lag_ch'])})"
                )
        for label, key in (("CPU s load", "cpu_load_s"), ("CPU s drain", "cpu_drain_s")):
            cpu = r.get(key) or {}
            busy = sorted(((v, k) for k, v in cpu.items() if v >= 0.05), reverse=True)
            print(
                f"{label + ':':<12}total {sum(cpu.values()):.1f}; "
                + ", ".join(f"{k} {v:.1f}" for v, k in busy)
            )
        if r.get("machine_load_s"):
            busy, available = r["machine_load_s"]
            bench = r.get("bench_cpu_s", 0.0)
            ours = sum((r.get("cpu_load_s") or {}).values()) + d["client_cpu"] + bench
            print(
                f"machine:    {busy:.1f} of {available:.1f} CPU s busy during the load: the "
                f"stack, its services and the load generator, and this process {bench:.1f}: "
                f"{ours:.1f}; other programs {busy - ours:.1f}"
            )
        if d["api_us"]:
            print(f"API CPU:    {d['api_us']:.0f} µs per request accepted")
        if r.get("profile"):
            print(r["profile"])
        print(
            "check:      "
            + (
                "ok: every accepted event applied once in PostgreSQL and ClickHouse"
                if not r["problems"]
                else "FAILED: " + "; ".join(r["problems"])
            )
        )
        ok = ok and not r["problems"]
    print()
    print(
        "| run | posts × events | requests/s | events/s | p50 / p95 / p99 ms | non-200 "
        "| applied after the load | max lag pg / ch s | CPU s: API / workers / load generator "
        "| API µs/request | exactly once |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        d, load = derived(r), r.get("load") or {}
        lat = load.get("latency_ms") or {}
        lag = r.get("max_lag") or {}
        after = r.get("applied_after_s")
        print(
            f"| {r['run']} | {load.get('requests', 0):,} × {r['per_post']} | {d['rps']:,.0f} "
            f"| {d['eps']:,.0f} | {lat.get('p50', 0):.1f} / {lat.get('p95', 0):.1f} / "
            f"{lat.get('p99', 0):.1f} | {sum(d['errors'].values()):,} "
            f"| {'—' if after is None else f'{after:.1f} s'} "
            f"| {_ms(lag.get('results-pg'))} / {_ms(lag.get('results-ch'))} "
            f"| {d['api_cpu']:.1f} / {d['workers_cpu']:.1f} / {d['client_cpu']:.1f} "
            f"| {_ms(d['api_us'])} "
            f"| {'yes' if not r['problems'] else 'NO'} |"
        )
    return ok


def parse_runs(text: str, events: int, array_events: int) -> list[Run]:
    runs = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        provider, _, per_post = item.partition(":")
        if provider not in SIGNERS:
            raise SystemExit(f"bench.webhooks: unknown provider {provider!r}")
        k = int(per_post or 1)
        runs.append(Run(provider, k, events if k == 1 else array_events))
    return runs


async def main(args: argparse.Namespace) -> int:
    runs = parse_runs(args.runs, args.events, args.array_events)
    client = args.client or ("wrk" if shutil.which("wrk") else "python")
    if client == "wrk" and not shutil.which("wrk"):
        raise SystemExit("bench.webhooks: wrk is not installed (apt-get install wrk)")
    shards = args.threads if client == "wrk" else args.processes
    results = []
    for run in runs:
        print(f"{run.name}: {run.events:,} events ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        result = await measure_run(
            run,
            workers=args.workers,
            connections=args.connections,
            duration=args.duration,
            client=client,
            shards=shards,
            timeout_s=args.timeout,
            profile=args.profile,
        )
        results.append(result)
        d = derived(result)
        print(
            f"  {d['rps']:,.0f} requests/s, {d['eps']:,.0f} events/s "
            f"({time.monotonic() - started:.0f} s with setup)"
            + (f"; {'; '.join(result['problems'])}" if result["problems"] else ""),
            file=sys.stderr,
            flush=True,
        )
        if args.json:
            args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0 if report(results, args) else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--runs",
        default="mailgun,resend,sendgrid:500",
        help="comma-separated PROVIDER (one event per post) or PROVIDER:K (K per post)",
    )
    parser.add_argument("--events", type=int, default=100_000, help="per single-event run")
    parser.add_argument("--array-events", type=int, default=500_000, help="per array run")
    parser.add_argument("--connections", type=int, default=64, help="requests in flight")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load at most")
    parser.add_argument("--client", choices=("wrk", "python"), help="default: wrk if installed")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--processes", type=int, default=2, help="Python load processes")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for each wait")
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    parser.add_argument("--profile", type=Path, metavar="DIR", help="py-spy every process")
    parser.add_argument("--load", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.load:
        serve_load(arguments.load, arguments.port, arguments.connections, arguments.deadline)
    else:
        raise SystemExit(preflight.run(main(arguments), "bench.webhooks"))
