"""Every series of ``/api/metrics`` moves when its thing happens, on the real processes:
scrape, make it happen, scrape again, see the change. One scrape covers the API and every
worker process; a killed worker's counters stay counted once and its live gauges go."""

from __future__ import annotations

import asyncio
import os
import signal
from functools import partial

import nats
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from engine import tenants
from engine.config import Settings
from engine.db import create_pool
from engine.topology import Topology
from tests.e2e.conftest import Client, Stack, ensure_workers, eventually

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(client: Client) -> Samples:
    status, text = await client.request("GET", f"{client.stack.api}/api/metrics")
    assert status == 200, text
    for line in text.splitlines():  # no address (nor anything else of a tenant's) in it
        assert line.startswith("#") or "@" not in line, line
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (0 when none)."""
    want = labels.items()
    return sum(v for (n, ls), v in samples.items() if n == name and want <= dict(ls).items())


def present(samples: Samples, name: str, **labels: str) -> bool:
    want = labels.items()
    return any(n == name and want <= dict(ls).items() for n, ls in samples)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def _completed(client: Client, batch_id: str, *, delivered: int = 0) -> dict:
    def done(batch: dict) -> bool:
        return batch["status"] == "completed" and batch["counts"]["delivered"] >= delivered

    return await client.until(batch_id, "batch completed", done, 120)


async def _idle(client: Client) -> Samples:
    """A scrape once no consumer holds a message (what earlier tests sent is done)."""

    async def check():
        samples = await scrape(client)
        return samples if value(samples, "nats_queue_depth") == 0 else None

    return await eventually(check, 120, what="every consumer idle")


async def test_a_batch_moves_every_send_path_series(client):
    before = await _idle(client)
    n = 300
    batch_id = await client.create(n)
    await _completed(client, batch_id, delivered=n)  # the mock posts a delivery per recipient

    async def flushed():  # the events of both statuses are in ClickHouse
        after = await scrape(client)
        return after if moved(before, after, "batchsender_clickhouse_rows_total") >= 2 * n else None

    after = await eventually(flushed, 60, what="the batch's events written to ClickHouse")
    assert moved(before, after, "batchsender_emails_total", provider="mock", status="sent") >= n
    calls = moved(before, after, "batchsender_send_duration_seconds_count", provider="mock")
    assert calls >= n / 100  # one observation per provider call (at most 100 recipients)
    waits = moved(before, after, "batchsender_rate_limit_wait_seconds_count", provider="mock")
    assert waits >= n / 100
    assert moved(before, after, "batchsender_status_rows_total") >= 2 * n  # sent, delivered
    assert moved(before, after, "batchsender_clickhouse_insert_seconds_count") >= 1
    assert (
        moved(before, after, "batchsender_webhooks_total", provider="mock", event="delivered") >= n
    )
    assert moved(before, after, "batchsender_batches", status="completed") >= 1
    create = {"route": "/api/batches", "status": "201"}
    assert moved(before, after, "batchsender_http_requests_total", **create) >= 1
    assert moved(before, after, "batchsender_http_request_seconds_count", route="/api/batches") >= 1
    webhook_route = {"route": "/webhooks/{provider}"}
    assert moved(before, after, "batchsender_http_requests_total", **webhook_route) >= 1
    # every known label value is scraped before its first event, at 0 or more
    for kind in ("intake", "send", "chunk", "results"):
        assert present(after, "batchsender_dead_letters_total", kind=kind)
    for reason in ("throttled", "error"):
        assert present(after, "batchsender_retries_total", provider="mock", reason=reason)
    for bucket in ("system", "provider", "tenant"):
        assert present(after, "batchsender_rate_limit_waits_total", bucket=bucket)
    assert value(after, "batchsender_clickhouse_insert_failures_total") >= 0
    assert present(after, "batchsender_clickhouse_insert_failures_total")


async def test_retries_are_counted_by_reason(client):
    before = await _idle(client)
    # Half the provider calls fail; every fifth failure is a 429 with Retry-After (the mock).
    await client.mock_config(failure_rate=0.5)
    batch_id = await client.create(5_000)
    await _completed(client, batch_id)
    after = await scrape(client)
    assert moved(before, after, "batchsender_retries_total", provider="mock", reason="error") > 0
    throttled = {"provider": "mock", "reason": "throttled"}
    assert moved(before, after, "batchsender_retries_total", **throttled) > 0


async def test_a_tenant_rate_shows_as_waits_on_its_bucket_and_events_wait_in_the_buffer(
    client, stack, tenant
):
    pool = await create_pool(stack.settings, max_size=1)
    try:
        await tenants.set_limits(pool, tenant[0], send_rate="200/20")
    finally:
        await pool.close()
    before = await _idle(client)
    batch_id = await client.create(600)  # about 3 s at 200/s
    buffered = lag = 0.0
    while (await client.batch(batch_id))["status"] != "completed":
        samples = await scrape(client)
        buffered = max(buffered, value(samples, "batchsender_clickhouse_buffer_rows"))
        lag = max(lag, value(samples, "batchsender_results_lag_seconds", consumer="results-ch"))
        await asyncio.sleep(0.05)
    after = await scrape(client)
    assert moved(before, after, "batchsender_rate_limit_waits_total", bucket="tenant") >= 1
    tokens = moved(before, after, "batchsender_rate_limit_tokens_waited_total", bucket="tenant")
    assert tokens >= 20
    assert moved(before, after, "batchsender_rate_limit_waits_total", bucket="system") == 0
    # events wait up to CLICKHOUSE_FLUSH_SECONDS in a worker's buffer, unacknowledged
    assert buffered > 0
    assert lag > 0


async def test_stopped_workers_show_as_depth_lag_and_no_leader_then_dead_letters_move(
    client, stack, tenant
):
    before = await _idle(client)
    assert value(before, "batchsender_worker_processes") == 2
    assert value(before, "batchsender_leader") == 1
    stack.stop("worker")  # drains; its processes' live gauges go with them
    topology = Topology(stack.settings.nats_prefix)
    connection = await nats.connect(stack.settings.nats_url)
    try:
        batch_id = await client.create(2500)  # 3 cells (engine.chunks.cell_size: 1,000)
        js = connection.jetstream()
        for subject in (
            topology.intake_subject(tenant[0]),  # not JSON: an intake dead letter
            topology.send_subject("mock"),  # names no batch: a chunk dead letter
            topology.results_subject,  # not a results message: a results dead letter
        ):
            await js.publish(subject, b"{not a message")
        await asyncio.sleep(1.0)
        stopped = await scrape(client)
        send = await js.consumer_info(topology.send_stream, "send")
        assert value(stopped, "nats_queue_depth", consumer="send") == (
            send.num_pending + send.num_ack_pending
        )
        assert value(stopped, "nats_queue_depth", consumer="send") >= 4  # 3 cells + 1
        assert value(stopped, "nats_queue_depth", consumer="intake") >= 1
        assert value(stopped, "batchsender_results_lag_seconds", consumer="results-pg") >= 1.0
        assert value(stopped, "batchsender_results_lag_seconds", consumer="results-ch") >= 1.0
        assert value(stopped, "batchsender_worker_processes") == 0
        assert value(stopped, "batchsender_leader") == 0
    finally:
        await connection.close()
        await ensure_workers(stack)
    await _completed(client, batch_id)

    async def settled():
        after = await scrape(client)
        kinds = ("intake", "chunk", "results")
        if not all(moved(before, after, "batchsender_dead_letters_total", kind=k) for k in kinds):
            return None
        idle = value(after, "nats_queue_depth") == 0
        return after if idle and value(after, "batchsender_leader") == 1 else None

    after = await eventually(settled, 60, what="three dead letters, empty queues, a leader")
    for kind in ("intake", "chunk", "results"):
        assert moved(before, after, "batchsender_dead_letters_total", kind=kind) == 1, kind
    assert value(after, "batchsender_results_lag_seconds") == 0
    assert value(after, "batchsender_worker_processes") == 2
    assert value(after, "batchsender_leader") == 1
    assert moved(before, after, "batchsender_leader_changes_total") >= 1


async def test_a_killed_worker_keeps_its_counters_once_and_loses_its_live_gauges(client, stack):
    """kill -9 of the worker process that holds the leader lease: what it counted stays
    counted exactly once, its live gauges (processes, leader) go, the supervisor's restart
    and the new leader are counted."""
    n = 400
    await _completed(client, await client.create(n))
    before = await _idle(client)
    assert value(before, "batchsender_worker_processes") == 2
    victim = await _leader_pid(stack.settings)
    assert victim in stack.worker_children()
    os.kill(victim, signal.SIGKILL)
    await eventually(partial(_replaced, stack, victim), 60, what="the killed worker replaced")

    async def new_leader():
        samples = await scrape(client)
        return samples if value(samples, "batchsender_leader") == 1 else None

    after = await eventually(new_leader, 60, what="a new leader")
    sent = {"provider": "mock", "status": "sent"}
    assert value(after, "batchsender_emails_total", **sent) == value(
        before, "batchsender_emails_total", **sent
    )
    assert value(after, "batchsender_worker_processes") == 2
    assert moved(before, after, "batchsender_worker_restarts_total", reason="exited") == 1
    assert moved(before, after, "batchsender_leader_changes_total") >= 1
    # and the new process's counts add to the old ones
    await _completed(client, await client.create(n))
    later = await scrape(client)
    assert moved(after, later, "batchsender_emails_total", **sent) == n


async def _replaced(stack: Stack, victim: int) -> bool:
    children = stack.worker_children()
    return len(children) == 2 and victim not in children


async def _leader_pid(settings: Settings) -> int:
    """The pid in the leader lease (``engine.leader.Lease``: host:pid:nonce)."""
    redis = aioredis.from_url(settings.dragonfly_url)
    try:
        holder = await redis.get(settings.key_prefix + "leader")
    finally:
        await redis.aclose()
    if holder is None:
        pytest.fail("no process holds the leader lease")
    return int(holder.decode().split(":")[1])
