"""A bounded Locust run against ``batchsender worker --autoscale 1..N``, traced every second.

    python -m loadtests.autoscale_run                 # the run of loadtests/RESULTS.md
    python -m loadtests.autoscale_model               # its replay through KEDA + the HPA

A throw-away deployment of the real processes on this machine's services (``devkit.stack``:
databases, streams and keys of its own, dropped at the end): the mock provider answering
every call after ``--latency-ms`` (so a worker process is bound by its calls in flight, as
with a real provider, not by this machine's two cores), the API, and the supervisor with
``--autoscale 1..--max``. Locust's REST users create batches of ``--recipients`` under the
step shape (``--step-users`` more every ``--step-seconds``, ``--steps`` times), a master
bound to 127.0.0.1 and one worker, headless, CSV; then the run waits for the queue to
empty and the processes to come back to 1 (bounded by ``--max-seconds``).

Every second it records (``loadtests/autoscale/trace.csv``): the send consumer's depth
(pending, ack-pending), the chunks published so far (the stream's last sequence), the
recipients the mock accepted, the worker processes' CPU and the machine's, the live worker
processes and the supervisor's wanted count (its log), and Locust's users. At the end it
checks that every recipient of every batch reached the mock exactly once, and writes the
parameters and that check to ``run.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import aiohttp
import asyncpg
import nats
import orjson

from bench import preflight
from devkit.stack import (
    ROOT,
    Stack,
    drop_all,
    environ_for,
    free_port,
    http_ok,
    isolated_environ,
    mock_stats,
    tenant_key,
    wait_until,
)
from engine.autoscale import CpuSampler
from engine.config import load_settings
from engine.migrate import migrate_all
from engine.topology import Topology

OUT = ROOT / "loadtests" / "autoscale"


@dataclass(slots=True)
class Sample:
    t: float  # seconds since the first sample
    users: int  # Locust users (from its history, filled in at the end)
    depth: int  # num_pending + num_ack_pending of the send consumer
    pending: int
    ack_pending: int
    published: int  # chunk messages published so far (the SEND stream's last sequence)
    sent: int  # recipients the mock accepted so far
    worker_cpu: float  # cores used by the worker processes over the last second
    machine_cpu: float  # percent of all cores, every process of the machine
    processes: int  # live worker processes (those draining included)
    wanted: int  # the supervisor's latest decision


class SupervisorLog:
    """The supervisor's wanted count, from its ``autoscale: a -> b`` log lines."""

    def __init__(self, path: Path, initial: int) -> None:
        self.path, self.offset, self.wanted = path, 0, initial

    def read(self) -> int:
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        for line in data[:end].splitlines():
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(entry, dict) and str(entry.get("msg", "")).startswith("autoscale:"):
                self.wanted = entry["to"]
        return self.wanted


class Tracer:
    """One ``Sample`` a second."""

    def __init__(self, stack: Stack, minimum: int) -> None:
        self.stack = stack
        self.log = SupervisorLog(stack.logs / "worker.log", minimum)
        self.cpu = CpuSampler()
        self.samples: list[Sample] = []
        # CPU counted from now: what the processes used before (their start) is no load
        self._used = {pid: self.cpu.cpu_seconds(pid) or 0.0 for pid in stack.worker_children()}
        self._machine = _machine_ticks()
        self._at = time.monotonic()
        self.started = time.monotonic()
        self.started_wall = time.time()

    async def sample(self, js, session: aiohttp.ClientSession) -> Sample:
        topology = Topology(self.stack.settings.nats_prefix)
        info = await js.consumer_info(topology.send_stream, "send")
        stream = await js.stream_info(topology.send_stream)
        stats = await mock_stats(session, self.stack.mock)
        children = await asyncio.to_thread(self.stack.worker_children)
        now = time.monotonic()
        used = {pid: self.cpu.cpu_seconds(pid) for pid in children}
        used = {pid: s for pid, s in used.items() if s is not None}
        spent = sum(s - self._used.get(pid, 0.0) for pid, s in used.items())  # new: since fork
        machine = _machine_ticks()
        busy = machine[0] - self._machine[0]
        total = machine[1] - self._machine[1]
        sample = Sample(
            t=round(now - self.started, 2),
            users=0,
            depth=info.num_pending + info.num_ack_pending,
            pending=info.num_pending,
            ack_pending=info.num_ack_pending,
            published=stream.state.last_seq,
            sent=stats["accepted"],
            worker_cpu=round(max(0.0, spent) / max(1e-3, now - self._at), 3),
            machine_cpu=round(100 * busy / total, 1) if total else 0.0,
            processes=len(children),
            wanted=self.log.read(),
        )
        self._used, self._machine, self._at = used, machine, now
        self.samples.append(sample)
        return sample


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def _users(history: Path, started_wall: float) -> list[tuple[float, int]]:
    """(seconds since the trace's start, users) from Locust's stats history."""
    if not history.exists():
        return []
    with history.open() as handle:
        rows = [r for r in csv.DictReader(handle) if r["Name"] == "Aggregated"]
    return [(float(r["Timestamp"]) - started_wall, int(r["User Count"])) for r in rows]


def _locust(args: argparse.Namespace, stack: Stack, key: str, port: int, prefix: Path):
    files = "loadtests/locustfile.py,loadtests/shapes/step.py"
    env = {
        **stack.environ,
        "BATCHSENDER_API_KEY": key,
        "LOADTEST_USERS": "rest",
        "LOADTEST_RECIPIENTS": str(args.recipients),
        "STEP_USERS": str(args.step_users),
        "STEP_SECONDS": str(args.step_seconds),
        "STEPS": str(args.steps),
    }
    master = [sys.executable, "-m", "locust", "-f", files, "--headless", "--master",
              "--master-bind-host", "127.0.0.1", "--master-bind-port", str(port),
              "--expect-workers", "1", "--host", stack.api, "--csv", str(prefix),
              "--csv-full-history", "--only-summary", "--stop-timeout", "60"]  # fmt: skip
    worker = [sys.executable, "-m", "locust", "-f", "loadtests/locustfile.py", "--worker",
              "--master-host", "127.0.0.1", "--master-port", str(port)]  # fmt: skip
    return env, master, worker


async def _exactly_once(stack: Stack, session: aiohttp.ClientSession) -> dict[str, object]:
    conn = await asyncpg.connect(stack.settings.database_url)
    try:
        row = await conn.fetchrow(
            "SELECT count(*) AS batches, count(*) FILTER (WHERE status = 'completed') AS done,"
            " coalesce(sum(total_recipients), 0) AS recipients FROM batches"
        )
    finally:
        await conn.close()
    stats = await mock_stats(session, stack.mock)
    return {
        "batches": row["batches"],
        "batches_completed": row["done"],
        "recipients": int(row["recipients"]),
        "accepted_by_mock": stats["accepted"],
        "unique_at_mock": stats["unique"],
        "duplicates": stats["duplicates"],
        "exactly_once": stats["accepted"] == stats["unique"] == int(row["recipients"]),
    }


async def run(args: argparse.Namespace) -> int:
    tag = f"as{uuid.uuid4().hex[:8]}"
    environ = preflight.on_services(isolated_environ(tag))
    settings = load_settings(environ)
    logs = Path(tempfile.mkdtemp(prefix="autoscale-run-"))
    stack = Stack(settings, environ_for(environ), logs)
    OUT.mkdir(parents=True, exist_ok=True)
    prefix = OUT / "locust"
    failed = True
    try:
        await migrate_all(settings)
        key = await tenant_key(settings, "loadtest")
        port = stack.mock.rsplit(":", 1)[1]
        stack.start("mock", "mock-provider", "--port", port, "--latency-ms", str(args.latency_ms))
        stack.start("api", "api")
        stack.start("worker", "worker", "--autoscale", f"1..{args.max}",
                    "--autoscale-target", str(args.target), "--autoscale-interval",
                    str(args.interval), "--autoscale-down-window", str(args.down_window))  # fmt: skip
        await asyncio.to_thread(wait_until, lambda: http_ok(f"{stack.api}/health"), 60)
        await asyncio.to_thread(wait_until, lambda: http_ok(f"{stack.mock}/health"), 30)
        await asyncio.to_thread(wait_until, lambda: len(stack.worker_children()) == 1, 30)
        env, master, worker = _locust(args, stack, key, free_port(), prefix)
        nc = await nats.connect(settings.nats_url)
        tracer = Tracer(stack, 1)
        deadline = time.monotonic() + args.max_seconds
        async with aiohttp.ClientSession() as session:
            locust = [await asyncio.create_subprocess_exec(*cmd, cwd=ROOT, env=env,
                      stdout=(logs / f"locust-{i}.log").open("wb"), stderr=asyncio.subprocess.STDOUT)
                      for i, cmd in enumerate((master, worker))]  # fmt: skip
            quiet = 0  # seconds in a row with nothing left and the processes back at 1
            while time.monotonic() < deadline and quiet < 10:
                tick = time.monotonic()
                s = await tracer.sample(nc.jetstream(), session)
                running = locust[0].returncode is None
                if not running and s.depth == 0 and s.processes == s.wanted == 1:
                    quiet += 1
                else:
                    quiet = 0
                if int(s.t) % 10 == 0:
                    print(f"t={s.t:6.0f}s depth={s.depth:5} published={s.published:6} "
                          f"sent={s.sent:8} processes={s.processes} wanted={s.wanted} "
                          f"workers_cpu={s.worker_cpu:.2f} machine={s.machine_cpu:.0f}%"
                          f"{' locust' if running else ''}", flush=True)  # fmt: skip
                await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
            for proc in locust:
                if proc.returncode is None:
                    proc.send_signal(signal.SIGINT)
                await proc.wait()
            check = await _exactly_once(stack, session)
        await nc.close()
        users = _users(Path(f"{prefix}_stats_history.csv"), tracer.started_wall)
        for s in tracer.samples:
            s.users = next((n for at, n in reversed(users) if at <= s.t), 0)
        with (OUT / "trace.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow([f.name for f in fields(Sample)])
            writer.writerows([list(asdict(s).values()) for s in tracer.samples])
        result = {
            "command": "python -m loadtests.autoscale_run " + " ".join(sys.argv[1:]),
            "machine": f"{os.cpu_count()} cores, Python {platform.python_version()}",
            "parameters": vars(args),
            "worker_concurrency": settings.worker_concurrency,
            "seconds": tracer.samples[-1].t if tracer.samples else 0,
            "drained_and_back_to_1": quiet >= 10,
            **check,
        }
        (OUT / "run.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        failed = not (check["exactly_once"] and quiet >= 10)
        return 1 if failed else 0
    finally:
        stack.stop("worker")
        stack.stop_all()
        await drop_all(settings)
        shutil.rmtree(settings.metrics_dir, ignore_errors=True)
        if failed:
            print(stack.tail(), file=sys.stderr)
            print(f"logs kept in {logs}", file=sys.stderr)
        else:
            shutil.rmtree(logs, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.autoscale_run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--max", type=int, default=4, help="--autoscale 1..MAX (default 4)")
    parser.add_argument("--latency-ms", type=float, default=500, help="per provider call")
    parser.add_argument("--recipients", type=int, default=100_000, help="per batch")
    parser.add_argument("--step-users", type=int, default=1)
    parser.add_argument("--step-seconds", type=float, default=40)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--target", type=float, default=100, help="chunks per process")
    parser.add_argument("--interval", type=float, default=5, help="between decisions")
    parser.add_argument("--down-window", type=float, default=60, help="scale-down window")
    parser.add_argument("--max-seconds", type=float, default=1200, help="the whole run, at most")
    args = parser.parse_args()
    raise SystemExit(preflight.run(run(args), parser.prog))


if __name__ == "__main__":
    main()
