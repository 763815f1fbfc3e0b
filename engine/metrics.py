"""Prometheus metrics. Every process writes its own (prometheus-client multiprocess mode,
``METRICS_DIR``); ``render_metrics`` merges all processes on the host and adds what is read
at scrape time (queue depth from NATS consumer state, batches per status from PostgreSQL).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterable
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
from engine.queue_stats import oldest_waiting

log = logging.getLogger(__name__)

_GATHER_SECONDS = 3.0  # the longest a scrape waits for NATS or PostgreSQL
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
WORKER_PROCESSES_WANTED = Gauge(
    "batchsender_worker_processes_wanted",
    "Worker processes the supervisor wants: WORKER_PROCESSES, or its autoscaler's decision "
    "(batchsender worker --autoscale). Processes being retired are not counted.",
    multiprocess_mode="livesum",
)
CHUNKS_IN_FLIGHT = Gauge(
    "batchsender_chunks_in_flight", "Chunks being processed.", multiprocess_mode="livesum"
)
RETRIES = Counter(
    "batchsender_retries",
    "Recipients put back for another send attempt: reason throttled (the provider said to "
    "slow down, e.g. HTTP 429) or error (a timeout, a connection error, a 5xx).",
    ["provider", "reason"],
)
DEAD_LETTERS = Counter(
    "batchsender_dead_letters", "Messages given up and dead-lettered, per kind.", ["kind"]
)
RATE_LIMIT_WAITS = Counter(
    "batchsender_rate_limit_waits",
    "Token reservations that had to wait, per bucket that held them back "
    "(system, provider or tenant).",
    ["bucket"],
)
RATE_LIMIT_TOKENS_WAITED = Counter(
    "batchsender_rate_limit_tokens_waited",
    "Tokens (recipients) that had to wait for a bucket, per bucket that held them back.",
    ["bucket"],
)
CLICKHOUSE_BUFFER = Gauge(
    "batchsender_clickhouse_buffer_rows",
    "Event rows held in memory, not yet written to ClickHouse.",
    multiprocess_mode="livesum",
)
WORKER_RESTARTS = Counter(
    "batchsender_worker_restarts",
    "Worker processes that died unexpectedly and were replaced: reason exited (it exited "
    "or was killed) or unresponsive (its heartbeat stopped and the supervisor killed it).",
    ["reason"],
)
LEADER = Gauge(
    "batchsender_leader",
    "1 in the process holding the leader lease (sum over processes: 1, or 0 with no leader).",
    multiprocess_mode="livesum",
)
LEADER_CHANGES = Counter("batchsender_leader_changes", "Times a process took the leader lease.")
CUSTOMER_WEBHOOK_EVENTS = Counter(
    "batchsender_customer_webhook_events",
    "Events written into deliveries to customers' webhook endpoints.",
)
CUSTOMER_WEBHOOK_DELIVERIES = Counter(
    "batchsender_customer_webhook_deliveries",
    "Attempts to post a delivery to a customer's webhook endpoint, by outcome: delivered "
    "(2xx), retried (it is tried again later), failed (past its retry budget), disabled "
    "(the endpoint answered 410 Gone).",
    ["outcome"],
)
HTTP_REQUESTS = Counter("batchsender_http_requests", "HTTP requests answered.", ["route", "status"])
HTTP_SECONDS = Histogram(
    "batchsender_http_request_seconds", "HTTP request duration.", ["route"], buckets=_LATENCY
)


def initialise(
    providers: Iterable[str], dead_letter_kinds: Iterable[str], buckets: Iterable[str]
) -> None:
    """Create, at 0, the labelled series whose label values are known in advance, so they
    are scraped (graphed, alerted on) before their first event rather than appearing then."""
    for provider in providers:
        for status in ("sent", "failed"):
            EMAILS.labels(provider, status)
        for reason in ("throttled", "error"):
            RETRIES.labels(provider, reason)
    for kind in dead_letter_kinds:
        DEAD_LETTERS.labels(kind)
    for bucket in buckets:
        RATE_LIMIT_WAITS.labels(bucket)
        RATE_LIMIT_TOKENS_WAITED.labels(bucket)
    for outcome in ("delivered", "retried", "failed", "disabled"):
        CUSTOMER_WEBHOOK_DELIVERIES.labels(outcome)


def _registry() -> CollectorRegistry:
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry
    return REGISTRY


def serve(host: str, port: int) -> None:
    """Serve the metrics of every process on this host (the supervisor's and its workers')
    at ``http://host:port/metrics`` until the parent process is gone: a worker pod's own
    endpoint, where the API's ``/api/metrics`` cannot see it. No scrape-time series here:
    queue depth and batches come from the API."""
    from prometheus_client import start_http_server

    parent = os.getppid()
    server, _ = start_http_server(port, addr=host, registry=_LiveRegistry())
    log.info("worker metrics listening", extra={"port": port})
    try:
        while os.getppid() == parent:  # a supervisor killed with -9 takes this one along
            time.sleep(1.0)
    finally:
        server.shutdown()


class _LiveRegistry:
    """Every process's metrics, dead processes' live gauges dropped first."""

    def collect(self):
        forget_dead_processes()
        return _registry().collect()


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


async def _consumers(services) -> list[GaugeMetricFamily]:
    """Every consumer's depth (the autoscaler's series) and the results consumers' lag."""
    depth = GaugeMetricFamily(
        "nats_queue_depth",
        "Messages waiting in a consumer: not yet delivered plus delivered and unacknowledged "
        "(num_pending + num_ack_pending). The send consumer's is the autoscaling signal.",
        labels=["stream", "consumer"],
    )
    lag = GaugeMetricFamily(
        "batchsender_results_lag_seconds",
        "Age of the oldest result a results consumer has not applied yet (0: none waits).",
        labels=["consumer"],
    )
    results_stream = services.topology.results_stream

    async def one(stream: str, consumer: str) -> None:
        try:
            info = await services.js.consumer_info(stream, consumer)
            depth.add_metric([stream, consumer], info.num_pending + info.num_ack_pending)
            if stream == results_stream:
                oldest = await oldest_waiting(services, stream, info)
                lag.add_metric([consumer], oldest or 0.0)
        except Exception as exc:  # a missing consumer is no series, never a made-up value
            log.warning("state of consumer %s/%s unavailable: %r", stream, consumer, exc)

    await asyncio.gather(*(one(s, c) for s, c in services.topology.consumers()))
    return [depth, lag]


async def _batches(services) -> list[GaugeMetricFamily]:
    family = GaugeMetricFamily("batchsender_batches", "Batches per status.", labels=["status"])
    rows = await services.pool.fetch("SELECT status, count(*) AS n FROM batches GROUP BY status")
    counts = {r["status"]: r["n"] for r in rows}
    for status in BATCH_STATUSES:
        family.add_metric([status], counts.get(status, 0))
    return [family]


async def render_metrics(services) -> bytes:
    """All processes' metrics plus the scrape-time series, in Prometheus text format."""
    forget_dead_processes()
    gatherers = (_consumers, _batches)
    # Together, and well within Prometheus's scrape timeout (5 s in monitoring/).
    answers = await asyncio.gather(
        *(asyncio.wait_for(gather(services), _GATHER_SECONDS) for gather in gatherers),
        return_exceptions=True,
    )
    families: list[GaugeMetricFamily] = []
    for gather, answer in zip(gatherers, answers, strict=True):
        if isinstance(answer, BaseException):  # a down dependency must not break the scrape
            log.warning("metrics: %s failed: %r", gather.__name__, answer)
        else:
            families += answer
    extra = CollectorRegistry(auto_describe=False)
    extra.register(_Snapshot(families))
    return generate_latest(_registry()) + generate_latest(extra)
