"""The supervisor under fire, on the real processes: kill -9 mid-batch, a hung worker,
graceful drain, a second signal, and a crash loop. In every case nothing accepted is lost."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import orjson
import pytest

from tests.e2e.conftest import Client, Stack, command, eventually

FINAL = {"sent", "delivered", "bounced", "complained", "failed", "suppressed", "cancelled"}


async def _create(client: Client, total: int) -> str:
    body = {
        "name": "supervisor", "from_email": "ops@example.com", "subject": "Hi {{ name }}",
        "text": "x", "provider": "mock",
        "recipients": [{"email": f"s{i}@example.com", "name": f"S{i}"} for i in range(total)],
    }  # fmt: skip
    status, created = await client.request("POST", f"{client.stack.api}/api/batches",
                                            data=orjson.dumps(body),
                                            headers={"Content-Type": "application/json"})  # fmt: skip
    assert status == 201, created
    return created["id"]


async def _batch(client: Client, batch_id: str) -> dict:
    _, batch = await client.request("GET", f"{client.stack.api}/api/batches/{batch_id}")
    return batch


async def _progress_at_least(client: Client, batch_id: str, final: int) -> None:
    async def check():
        return (await _batch(client, batch_id))["progress"]["final"] >= final

    await eventually(check, 120, what=f"{final} recipients final")


async def _completed(client: Client, batch_id: str, within: float = 240) -> dict:
    async def check():
        batch = await _batch(client, batch_id)
        return batch if batch["status"] == "completed" else None

    return await eventually(check, within, what="batch completed")


async def _received(client: Client, batch_id: str) -> dict[str, int]:
    _, received = await client.request("GET", f"{client.stack.mock}/v1/received")
    return {ref: n for ref, n in received["refs"].items() if ref.startswith(batch_id)}


async def _latency(client: Client, ms: float) -> None:
    status, _ = await client.request("POST", f"{client.stack.mock}/v1/config",
                                     data=orjson.dumps({"latency_ms": ms}),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    assert status == 200


async def _ensure_worker(stack: Stack) -> None:
    proc = stack.procs.get("worker")
    if proc is None or proc.poll() is not None:
        stack.start("worker", "worker")

    async def two():
        return len(stack.worker_children()) == 2

    await eventually(two, 60, what="2 worker processes")


@pytest.fixture
async def client(stack, tenant):
    await _ensure_worker(stack)
    c = Client(stack, tenant[1])
    yield c
    await _latency(c, 0)
    await _ensure_worker(stack)


async def test_sigkill_of_a_worker_mid_batch_loses_nothing(stack, client):
    total = 20_000
    await _latency(client, 400)  # slow enough that the kill lands mid-batch
    batch_id = await _create(client, total)
    await _progress_at_least(client, batch_id, 2_000)
    assert (await _batch(client, batch_id))["status"] == "processing"
    victim = stack.worker_children()[0]
    os.kill(victim, signal.SIGKILL)
    batch = await _completed(client, batch_id)
    assert sum(batch["counts"][s] for s in FINAL) == total
    received = await _received(client, batch_id)
    assert len(received) == total, "every recipient reached the provider"
    duplicates = sum(n - 1 for n in received.values())
    # Documented bound: the chunks in flight in the killed process (WORKER_CONCURRENCY
    # chunks of 100) plus results not yet applied to PostgreSQL.
    bound = stack.settings.worker_concurrency * 100 * 2
    print(f"\nkill -9 of one worker mid-batch: {duplicates} duplicate sends (bound {bound})")
    assert duplicates <= bound

    async def replaced():
        children = stack.worker_children()
        return len(children) == 2 and victim not in children

    await eventually(replaced, 30, what="the killed worker replaced")


async def test_a_hung_worker_is_killed_and_replaced(stack, client):
    victim = stack.worker_children()[0]
    os.kill(victim, signal.SIGSTOP)  # alive but its event loop no longer runs

    async def replaced():
        children = stack.worker_children()
        return victim not in children and len(children) == 2

    await eventually(replaced, 60, what="the hung worker replaced")


async def test_sigterm_drains_in_flight_chunks_without_loss(stack, client):
    total = 10_000
    await _latency(client, 400)
    batch_id = await _create(client, total)
    await _progress_at_least(client, batch_id, 1_000)
    code = stack.stop("worker", signal.SIGTERM, wait=60)
    assert code == 0, stack.tail()
    assert stack.worker_children.__self__  # the stack object is intact
    await _latency(client, 0)
    stack.start("worker", "worker")
    await _completed(client, batch_id)
    received = await _received(client, batch_id)
    assert len(received) == total
    assert sum(n - 1 for n in received.values()) == 0, "a drained worker leaves no duplicates"


async def test_a_second_signal_stops_at_once(stack, client):
    await _latency(client, 5_000)  # chunks that would take long to finish
    await _create(client, 2_000)
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
