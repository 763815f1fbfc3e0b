"""Prometheus metrics. Every process writes its own (prometheus-client multiprocess mode,
``METRICS_DIR``); ``render_metrics`` merges all processes on the host and adds what is read
at scrape time (queue depth from NATS consumer state, batches per status from PostgreSQL).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY

from engine.lifecycle import BATCH_STATUSES

log = logging.getLogger(__name__)

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

EMAILS = Counter(
    "batchsender_emails", "Recipients by final outcome of a send attempt.", ["provider", "status"]
)
SEND_SECONDS = Histogram(
    "batchsender_send_duration_seconds",
    "Duration of one provider call.",
    ["provider"],
    buckets=_LATENCY,
)
RATE_LIMIT_WAIT = Histogram(
    "batchsender_rate_limit_wait_seconds",
    "Time a chunk waited for rate-limit tokens.",
    ["provider"],
    buckets=(0, *_LATENCY),
)
CLICKHOUSE_ROWS = Counter("batchsender_clickhouse_rows", "Event rows written to ClickHouse.")
CLICKHOUSE_INSERT_SECONDS = Histogram(
    "batchsender_clickhouse_insert_seconds", "Duration of one ClickHouse insert.", buckets=_LATENCY
)
CLICKHOUSE_FAILURES = Counter(
    "batchsender_clickhouse_insert_failures", "ClickHouse inserts that failed (retried later)."
)
STATUS_ROWS = Counter("batchsender_status_rows", "Recipient status rows written to PostgreSQL.")
WEBHOOKS = Counter(
    "batchsender_webhooks", "Provider webhook events accepted.", ["provider", "event"]
)
WORKER_PROCESSES = Gauge(
    "batchsender_worker_processes", "Live worker processes.", multiprocess_mode="livesum"
)
CHUNKS_IN_FLIGHT = Gauge(
    "batchsender_chunks_in_flight", "Chunks being processed.", multiprocess_mode="livesum"
)
HTTP_REQUESTS = Counter("batchsender_http_requests", "HTTP requests answered.", ["route", "status"])
HTTP_SECONDS = Histogram(
    "batchsender_http_request_seconds", "HTTP request duration.", ["route"], buckets=_LATENCY
)


def _registry() -> CollectorRegistry:
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry
    return REGISTRY


def mark_process_dead(pid: int) -> None:
    """Drop a dead process's live gauges (its counters stay counted)."""
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        multiprocess.mark_process_dead(pid)


def forget_dead_processes() -> None:
    """Drop the live gauges of processes that are gone without being reaped by their
    supervisor (a supervisor killed with -9): they would count as live for ever."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder:
        return
    for path in Path(folder).glob("gauge_live*_*.db"):
        pid = int(path.stem.rpartition("_")[2])
        if not _alive(pid):
            mark_process_dead(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's
    try:  # a zombie (dead, not yet reaped) is not alive
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return True


class _Snapshot:
    """Scrape-time series, gathered beforehand on the event loop."""

    def __init__(self, families: list[GaugeMetricFamily]):
        self.families = families

    def collect(self) -> list[GaugeMetricFamily]:
        return self.families


async def _queue_depth(services) -> GaugeMetricFamily:
    family = GaugeMetricFamily(
        "nats_queue_depth",
        "Messages waiting in a consumer: not yet delivered plus delivered and unacknowledged.",
        labels=["stream", "consumer"],
    )

    async def one(stream: str, consumer: str) -> None:
        try:
            info = await services.js.consumer_info(stream, consumer)
        except Exception as exc:
            log.warning("queue depth of %s/%s unavailable: %r", stream, consumer, exc)
            return
        family.add_metric([stream, consumer], info.num_pending + info.num_ack_pending)

    await asyncio.gather(*(one(s, c) for s, c in services.topology.consumers()))
    return family


async def _batches(services) -> GaugeMetricFamily:
    family = GaugeMetricFamily("batchsender_batches", "Batches per status.", labels=["status"])
    rows = await services.pool.fetch("SELECT status, count(*) AS n FROM batches GROUP BY status")
    counts = {r["status"]: r["n"] for r in rows}
    for status in BATCH_STATUSES:
        family.add_metric([status], counts.get(status, 0))
    return family


async def render_metrics(services) -> bytes:
    """All processes' metrics plus the scrape-time series, in Prometheus text format."""
    forget_dead_processes()
    families: list[GaugeMetricFamily] = []
    for gather in (_queue_depth, _batches):
        try:
            families.append(await asyncio.wait_for(gather(services), 5))
        except Exception as exc:  # a down dependency must not break the whole scrape
            log.warning("metrics: %s failed: %r", gather.__name__, exc)
    extra = CollectorRegistry(auto_describe=False)
    extra.register(_Snapshot(families))
    return generate_latest(_registry()) + generate_latest(extra)
