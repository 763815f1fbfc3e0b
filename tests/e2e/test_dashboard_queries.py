"""The Grafana dashboard against the real thing: a real Prometheus (devkit/prometheus.py,
the repository's scrape job and recording rules) scrapes the real API while a batch goes
through to the mock provider and back; then every panel's query answers, with data."""

from __future__ import annotations

import asyncio
import math
import time
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from devkit.prometheus import (
    GRAFANA_BUILTINS,
    Prometheus,
    PrometheusError,
    dashboard_queries,
    load_dashboard,
    selected_names,
    substitute,
)
from tests.e2e.conftest import Client, Stack, eventually

pytestmark = pytest.mark.e2e

N = 300
VALUES = {**GRAFANA_BUILTINS, "provider": "mock"}


@pytest.fixture
def prometheus(stack: Stack) -> Iterator[Prometheus]:
    with Prometheus(f"127.0.0.1:{stack.settings.api_port}") as prom:  # stopped on the way out
        yield prom


def _scrape(stack: Stack) -> dict[str, list[tuple[dict[str, str], float]]]:
    """The API's /api/metrics now, as Prometheus would read it: samples by name."""
    with urllib.request.urlopen(f"{stack.api}/api/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def _total(samples, name: str, **labels: str) -> float:
    return sum(
        value
        for have, value in samples.get(name, [])
        if all(have.get(k) == v for k, v in labels.items())
    )


async def _ask(prom: Prometheus, expr: str) -> list[dict]:
    return await asyncio.to_thread(prom.query, expr)


async def _send(client: Client, total: int) -> None:
    """A batch to the mock provider, until sent and every delivery webhook applied."""
    batch_id = await client.create(total)

    def settled(batch: dict) -> bool:
        return batch["status"] == "completed" and batch["counts"]["delivered"] == total

    await client.until(batch_id, "completed with every recipient delivered", settled)


async def _drained(stack: Stack) -> dict:
    """The API's metrics once every NATS consumer is empty (results in PostgreSQL and
    ClickHouse)."""

    async def check():
        samples = await asyncio.to_thread(_scrape, stack)
        depths = [value for _, value in samples.get("nats_queue_depth", [])]
        return samples if depths and not any(depths) else None

    return await eventually(check, 120, what="every NATS consumer drained")


async def _holds(prom: Prometheus, wanted: dict[str, float], what: str) -> None:
    """Until Prometheus has scraped at least ``wanted`` (query -> value)."""

    async def check():
        for expr, value in wanted.items():
            if not await _ask(prom, f"{expr} >= {value}"):
                return False
        return True

    await eventually(check, 60, what=f"Prometheus scraping {what}: {wanted}\n{prom.tail()}")


def _finite(result: list[dict]) -> bool:
    return any(not math.isnan(float(sample["value"][1])) for sample in result)


# The latency quantiles: numbers, not NaN, once Prometheus saw the calls happen.
LATENCIES = {
    "provider:batchsender_send_duration_seconds:p50_5m",
    "provider:batchsender_send_duration_seconds:p95_5m",
    "provider:batchsender_send_duration_seconds:p99_5m",
    "provider:batchsender_rate_limit_wait_seconds:p95_5m",
    "batchsender_clickhouse_insert_seconds_bucket",
}


async def test_every_panel_query_returns_data(stack: Stack, tenant, prometheus: Prometheus):
    async def scraping():
        return await _ask(prometheus, 'up{job="batchsender-api"} == 1')

    await eventually(scraping, 60, what=f"Prometheus scraping the API\n{prometheus.tail()}")
    client = Client(stack, tenant[1])
    # A first small batch, so that the mock provider's series exist before the batch under
    # test: Prometheus then sees that one's calls as increases (rates and quantiles).
    await _send(client, 5)
    await _drained(stack)
    await _holds(prometheus, {'sum(batchsender_send_duration_seconds_count{provider="mock"})': 1,
                              'sum(batchsender_webhooks_total{provider="mock"})': 5},
                 "the first batch")  # fmt: skip

    await _send(client, N)
    after = await _drained(stack)
    emails = 'sum(batchsender_emails_total{provider="mock"})'
    webhooks = 'sum(batchsender_webhooks_total{provider="mock"})'
    wanted = {
        emails: _total(after, "batchsender_emails_total", provider="mock"),
        webhooks: _total(after, "batchsender_webhooks_total", provider="mock"),
        "sum(batchsender_clickhouse_rows_total)": _total(
            after, "batchsender_clickhouse_rows_total"
        ),
    }
    assert wanted[emails] >= N + 5 and wanted[webhooks] >= N + 5, wanted
    await _holds(prometheus, wanted, "the batch")
    seen = time.time()

    # Every recording rule's series evaluated after that scrape (timestamp() drops the name:
    # keep it as a label so that the series stay apart).
    recorded = 'label_replace({__name__=~".+:.+"}, "rule", "$1", "__name__", "(.+)")'

    async def rules_evaluated():
        result = await _ask(prometheus, f"min(timestamp({recorded}))")
        return result and float(result[0]["value"][1]) >= seen

    await eventually(rules_evaluated, 60, what="the recording rules evaluated after the scrape")

    providers = await asyncio.to_thread(
        prometheus.label_values, "provider", "batchsender_emails_total"
    )
    assert "mock" in providers, "the $provider variable offers the mock provider"

    queries = [
        (f"{panel['title']} [{target['refId']}]", substitute(target["expr"], VALUES))
        for panel, target in dashboard_queries(load_dashboard())
    ]
    assert len(queries) >= 30
    problems: dict[str, str] = {}

    async def all_answer():
        problems.clear()
        for where, expr in queries:
            try:
                result = await _ask(prometheus, expr)
            except PrometheusError as exc:
                problems[where] = f"error: {exc}"
                continue
            if not result:
                problems[where] = f"no data: {expr}"
            elif selected_names(expr) & LATENCIES and not _finite(result):
                problems[where] = f"only NaN: {expr}"
        return not problems

    try:  # a series born in the last scrape needs one more for rate(): ask again a while
        await eventually(all_answer, 30, interval=1, what="every panel's query answering")
    except AssertionError:
        rules = await asyncio.to_thread(prometheus.rules)
        lines = []
        for where, problem in problems.items():
            names = selected_names(problem.partition(": ")[2])
            health = [f"{n}: {rules[n]['health']} {rules[n].get('lastError', '')}".rstrip()
                      for n in sorted(names) if n in rules]  # fmt: skip
            lines.append(f"{where}: {problem}" + (f"  (rules: {health})" if health else ""))
        missing = sorted(
            name
            for name in {n for _, expr in queries for n in selected_names(expr)}
            if ":" not in name and name != "up" and name not in after
        )
        pytest.fail(
            f"{len(problems)} of {len(queries)} dashboard queries failed:\n"
            + "\n".join(lines)
            + f"\nnot in the API's /api/metrics: {missing}\n{prometheus.tail(15)}"
        )
