"""``batchsender worker --autoscale 1..4`` on the real processes: a batch makes the send
queue deep, the supervisor adds processes, and as the queue empties it retires them while
they still hold chunks. Each retired process drains (finishes and records what it holds)
and the batch reaches every recipient exactly once.

The trace (time, send-queue depth, processes) is printed at the end; the Locust run of
``loadtests/autoscale_run.py`` records the same at a larger scale (loadtests/RESULTS.md).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import orjson
import pytest
from prometheus_client.multiprocess import MultiProcessCollector

from devkit.stack import ROOT
from engine.autoscale import send_depth
from tests.e2e.conftest import FINAL, Stack, command, eventually

pytestmark = pytest.mark.e2e

TOTAL = 150_000  # 150 chunks of 1,000
LATENCY_MS = 400  # per provider call of 100: a chunk takes about 4 s
CONCURRENCY = 4  # chunks in flight per process: few, so the queue outlasts the scale-up
TARGET = 20  # chunks per process: 150 waiting ask for 8, capped at 4
WITHIN = 300  # seconds for the whole run: a bound, not a timing


def chunks_in_flight(metrics_dir: str, pid: int) -> float:
    """What one process's ``batchsender_chunks_in_flight`` says now (its own metrics file)."""
    path = Path(metrics_dir) / f"gauge_livesum_{pid}.db"
    if not path.exists():
        return 0.0
    for metric in MultiProcessCollector.merge([str(path)], accumulate=False):
        if metric.name == "batchsender_chunks_in_flight":
            return sum(sample.value for sample in metric.samples)
    return 0.0


class SupervisorLog:
    """The new JSON lines of the autoscaled supervisor's log, read as they come."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def new(self) -> list[dict]:
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        return [orjson.loads(line) for line in data[:end].splitlines() if line.strip()]


async def test_autoscale_adds_processes_then_retires_them_mid_chunk_losing_nothing(
    stack: Stack, client
):
    stack.stop("worker")  # the session's two fixed processes would take the chunks too
    log = SupervisorLog(_start_autoscaled(stack))
    changes: list[tuple[int, int]] = []  # (from, to)
    held: dict[int, float] = {}  # retired pid -> chunks in flight when it was told to stop
    trace: list[tuple[float, int, int]] = []  # (s, depth, processes)
    try:
        await eventually(lambda: _count(stack, 1), 60, what="the first worker process")
        await client.mock_config(latency_ms=LATENCY_MS)
        started = time.monotonic()
        batch_id = await client.create(TOTAL)
        batch: dict = {}

        async def settled() -> bool:
            nonlocal batch
            for entry in log.new():
                if str(entry.get("msg", "")).startswith("autoscale:"):
                    changes.append((entry["from"], entry["to"]))
                if "worker" in entry and str(entry.get("msg", "")).startswith("retiring"):
                    pid = entry["worker"]
                    held[pid] = chunks_in_flight(stack.settings.metrics_dir, pid)
            depth = await send_depth(stack.settings)
            processes = len(stack.worker_children())
            trace.append((round(time.monotonic() - started, 1), depth, processes))
            if not batch or batch["status"] != "completed" or len(trace) % 4 == 0:
                batch = await client.batch(batch_id)
            back_to_one = changes and changes[-1][1] == 1 and processes == 1
            return batch["status"] == "completed" and bool(back_to_one)

        await eventually(settled, WITHIN, interval=0.25, what="the batch done and 1 process")
    finally:
        code = stack.stop("worker", wait=60)
    print(f"\nautoscale 1..4: changes {changes}; chunks held by each retired process {held}")
    print("trace (s, depth, processes):", trace[:: max(1, len(trace) // 40)])

    assert code == 0, stack.tail()
    ups = [c for c in changes if c[1] > c[0]]
    assert ups and max(c[1] for c in ups) >= 3, f"scaled up on the queue: {changes}"
    assert changes.index(ups[0]) < len(changes) - 1 and changes[-1][1] == 1, "then down to 1"
    assert max(p for _, _, p in trace) >= 3
    assert any(n > 0 for n in held.values()), f"a process retired while holding chunks: {held}"
    counts = batch["counts"]
    assert sum(counts[s] for s in FINAL) == TOTAL and counts.get("failed", 0) == 0, counts
    received = await client.received(batch_id)
    assert len(received) == TOTAL, "every recipient reached the provider"
    assert {n for n in received.values()} == {1}, "and none twice"


def _start_autoscaled(stack: Stack) -> Path:
    """The supervisor with ``--autoscale 1..4`` as the stack's worker (so that the stack
    stops it if the test fails); its log, beside the stack's (checked with them)."""
    path = stack.logs / "worker-autoscale.log"
    path.touch()
    with path.open("ab") as out:
        stack.procs["worker"] = subprocess.Popen(
            command("worker", "--autoscale", "1..4", "--autoscale-target", str(TARGET),
                    "--autoscale-interval", "1", "--autoscale-down-window", "5"),
            env={**stack.environ, "WORKER_CONCURRENCY": str(CONCURRENCY)},
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    return path


async def _count(stack: Stack, n: int) -> bool:
    return len(stack.worker_children()) == n
