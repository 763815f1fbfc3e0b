"""The supervisor under fire, on the real processes: kill -9 mid-batch, a hung worker,
graceful drain, a second signal, and a crash loop. In every case nothing accepted is lost."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import urllib.request
from functools import partial
from pathlib import Path

import pytest

from devkit.stack import free_port
from tests.e2e.conftest import FINAL, Stack, command, eventually, final_at_least


def _completed(batch: dict) -> bool:
    return batch["status"] == "completed"


async def test_sigkill_of_worker_processes_during_a_50k_batch(stack, client):
    """Both worker processes killed with -9 in turn, mid-batch: every recipient reaches the
    provider, and the duplicates stay within the documented bound (engine.cells): the
    chunks whose provider calls were under way in each killed process."""
    total = 50_000
    await client.mock_config(latency_ms=800)  # slow enough that the kills land mid-batch
    batch_id = await client.create(total)
    killed = []
    for at_least in (5_000, 20_000):
        await client.until(batch_id, f"{at_least} final", final_at_least(at_least), 120)
        victim = stack.worker_children()[0]
        os.kill(victim, signal.SIGKILL)
        killed.append(victim)
        await eventually(partial(_replaced, stack, victim), 30, what="the killed worker replaced")
    batch = await client.until(batch_id, "batch completed", _completed)
    assert sum(batch["counts"][s] for s in FINAL) == total
    received = await client.received(batch_id)
    assert len(received) == total, "every recipient reached the provider"
    duplicates = sum(n - 1 for n in received.values())
    bound = len(killed) * stack.settings.worker_concurrency * 100
    print(f"\nkill -9 of {len(killed)} workers during a {total} batch: "
          f"{duplicates} duplicate sends (bound {bound})")  # fmt: skip
    assert duplicates <= bound


async def _replaced(stack: Stack, victim: int) -> bool:
    children = stack.worker_children()
    return len(children) == 2 and victim not in children


async def test_a_hung_worker_is_killed_and_replaced(stack, client):
    victim = stack.worker_children()[0]
    os.kill(victim, signal.SIGSTOP)  # alive but its event loop no longer runs
    await eventually(partial(_replaced, stack, victim), 60, what="the hung worker replaced")


async def test_sigterm_drains_in_flight_chunks_without_loss(stack, client):
    total = 10_000
    await client.mock_config(latency_ms=400)
    batch_id = await client.create(total)
    await client.until(batch_id, "1000 final", final_at_least(1_000), 120)
    code = stack.stop("worker", signal.SIGTERM, wait=60)
    assert code == 0, stack.tail()
    await client.mock_config(latency_ms=0)
    stack.start("worker", "worker")
    await client.until(batch_id, "batch completed", _completed)
    received = await client.received(batch_id)
    assert len(received) == total
    assert sum(n - 1 for n in received.values()) == 0, "a drained worker leaves no duplicates"


async def test_a_second_signal_stops_at_once(stack, client):
    await client.mock_config(latency_ms=5_000)  # chunks that would take long to finish
    await client.create(2_000)
    await asyncio.sleep(1.0)
    children = stack.worker_children()
    proc = stack.procs["worker"]
    proc.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(proc.wait, 15)
    assert code != 0
    for pid in children:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # killed and reaped, not left running or as zombies
    stack.procs.pop("worker")


def _kill_children_until_exit(proc: subprocess.Popen, limit: int = 50) -> set[int]:
    """Kill every child of ``proc`` as soon as it appears, as an OOM killer would."""
    killed: set[int] = set()
    while proc.poll() is None and len(killed) < limit:
        out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
        for pid in map(int, out.stdout.split()):
            if pid not in killed:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
        time.sleep(0.05)
    return killed


def test_a_crash_loop_stops_the_supervisor(stack):
    """Children that die as soon as they start make the supervisor stop with exit code 3
    instead of spinning."""
    proc = subprocess.Popen(command("worker", "-n", "1"), env=stack.environ,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        killed = _kill_children_until_exit(proc)
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 3
    assert 5 < len(killed) < 50


def _children_of(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") >= 0


def _wait(predicate, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_workers_of_a_killed_supervisor_drain_and_exit(stack):
    proc = subprocess.Popen(command("worker", "-n", "1"), env=stack.environ,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        assert _wait(lambda: len(_children_of(proc.pid)) == 1, 30)
        child = _children_of(proc.pid)[0]
        time.sleep(2)  # connected and consuming
        proc.kill()
        proc.wait(10)
        assert _wait(lambda: _gone(child), 30), "an orphaned worker kept running"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_stop_signal_ends_workers_still_waiting_for_a_service(stack):
    environ = {**stack.environ, "NATS_URL": "nats://127.0.0.1:1"}  # nothing listens: retries
    proc = subprocess.Popen(command("worker", "-n", "1"), env=environ,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        assert _wait(lambda: len(_children_of(proc.pid)) == 1, 30)
        child = _children_of(proc.pid)[0]
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert _gone(child)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_workers_serve_their_own_metrics_where_asked(stack, tmp_path):
    """WORKER_METRICS_PORT: the supervisor's child serves every process's metrics of this
    host (for a worker pod, which the API's /api/metrics cannot see), and goes with the
    supervisor, even one killed with -9."""
    port = free_port()
    environ = {**stack.environ, "WORKER_METRICS_PORT": str(port),
               "METRICS_DIR": str(tmp_path / "metrics")}  # fmt: skip
    proc = subprocess.Popen(command("worker", "-n", "1"), env=environ,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        assert _wait(lambda: "batchsender_worker_processes 1.0" in _scrape(url), 60)
        text = _scrape(url)
        assert 'batchsender_worker_restarts_total{reason="exited"} 0.0' in text
        assert "nats_queue_depth" not in text  # scrape-time series are the API's
        workers = _children_of(proc.pid)
        proc.kill()
        proc.wait(10)
        assert _wait(lambda: _scrape(url) == "", 30), "the metrics server outlived its supervisor"
        assert _wait(lambda: all(_gone(pid) for pid in workers), 30)
    finally:
        if proc.poll() is None:
            proc.kill()


def _scrape(url: str) -> str:
    """The metrics text, or "" when nothing answers."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2) as response:
            return response.read().decode()
    except OSError:
        return ""
