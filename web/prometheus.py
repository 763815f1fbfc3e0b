"""What the Performance page reads from Prometheus (``PROMETHEUS_URL``): range queries
over its HTTP API, as charts. The figures are the deployment's (every tenant's sends
together, as on the Grafana dashboard): no series of ``/api/metrics`` has a tenant label."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

WINDOW_SECONDS = 30 * 60
STEP_SECONDS = 15


@dataclass(frozen=True, slots=True)
class Panel:
    key: str
    title: str
    expr: str
    label: str  # the label that names each series ('' : one series)
    unit: str
    scale: float = 1.0


PANELS = (
    Panel(
        "throughput",
        "Throughput",
        "sum by (status) (rate(batchsender_emails_total[1m]))",
        "status",
        "recipients per second",
    ),
    Panel(
        "queue",
        "Queue depth",
        "sum by (consumer) (nats_queue_depth)",
        "consumer",
        "messages waiting (pending + ack-pending)",
    ),
    Panel(
        "workers",
        "Worker processes",
        "sum(batchsender_worker_processes)",
        "",
        "live worker processes",
    ),
    Panel(
        "latency",
        "Provider call latency (p95)",
        "histogram_quantile(0.95, sum by (le, provider) "
        "(rate(batchsender_send_duration_seconds_bucket[5m])))",
        "provider",
        "milliseconds",
        1000.0,
    ),
)


class PrometheusUnavailable(Exception):
    """Prometheus did not answer, or answered with an error (its text, shortened)."""


async def query_range(
    http: aiohttp.ClientSession, url: str, expr: str, start: int, end: int, step: int
) -> list[dict[str, Any]]:
    params = {"query": expr, "start": str(start), "end": str(end), "step": str(step)}
    try:
        async with http.get(f"{url}/api/v1/query_range", params=params) as response:
            body = orjson.loads(await response.read())
    except (aiohttp.ClientError, TimeoutError, OSError, orjson.JSONDecodeError) as exc:
        raise PrometheusUnavailable(
            f"Prometheus at {url} does not answer ({type(exc).__name__})"
        ) from None
    if body.get("status") != "success":
        raise PrometheusUnavailable(str(body.get("error", "query refused"))[:200])
    return body["data"]["result"]


def chart_of(
    panel: Panel, result: list[dict[str, Any]], start: int, end: int, step: int
) -> dict[str, Any]:
    x = list(range(start, end + 1, step))
    at = {t: i for i, t in enumerate(x)}
    series = []
    for item in sorted(result, key=lambda r: r["metric"].get(panel.label, "")):
        values: list[float | None] = [None] * len(x)
        for t, raw in item["values"]:
            value = float(raw)
            index = at.get(int(t))
            if index is not None and math.isfinite(value):
                values[index] = round(value * panel.scale, 3)
        label = item["metric"].get(panel.label, panel.title) if panel.label else panel.title
        series.append({"label": label, "values": values})
    latest = [next((v for v in reversed(s["values"]) if v is not None), None) for s in series]
    return {"x": x, "series": series, "unit": panel.unit, "latest": latest}


async def performance(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    """Every panel's chart over the last ``WINDOW_SECONDS``."""
    end = int(time.time()) // STEP_SECONDS * STEP_SECONDS
    start = end - WINDOW_SECONDS
    results = await asyncio.gather(
        *(query_range(http, url, p.expr, start, end, STEP_SECONDS) for p in PANELS)
    )
    return {
        p.key: chart_of(p, result, start, end, STEP_SECONDS)
        for p, result in zip(PANELS, results, strict=True)
    }
