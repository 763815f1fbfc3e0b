"""Latency of a single message: a one-recipient batch on an idle system, from the first
byte of the REST request to the mock provider accepting it, on a throw-away deployment.

    python -m bench.latency --tries 200

Target: p50 ≤ 50 ms and p99 ≤ 200 ms over 200 tries.

The tries run one after another with a pause between them, so the system is idle when
each starts (a few untimed tries first open the connections and warm the caches). When
the mock accepted the message is read from its delivery webhook, which carries the
``time.time()`` of the accept: the deployment's mock posts its webhooks to a tap in this
program that records the times and forwards each post unchanged to the API (see
``devkit.stack.WebhookTap``). Nothing polls the mock, so the measurement adds no load, and
the mock is not changed. A try ends when its webhook has come in (the mock posts them
every 0.2 s); the pause starts then. To show where the time goes the program also records
when the API answered 201 and when the chunk message appeared on the NATS send subject (a
plain NATS subscription next to the workers' JetStream consumer; it takes nothing from
them). At the end it checks that every ref ``<batch_id>:1`` was received exactly once.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import time
import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp
import nats
import orjson
from nats.aio.msg import Msg

from bench import preflight
from bench.e2e import TEMPLATE, machine
from devkit.stack import UNLIMITED, WebhookTap, deployment, mock_stats
from engine.topology import Topology

P50_MS, P99_MS = 50.0, 200.0


@dataclass(slots=True)
class Try:
    received_ms: float  # POST sent -> the mock accepted the message
    answered_ms: float  # POST sent -> the API's 201 arrived
    queued_ms: float  # POST sent -> the chunk message seen on the NATS send subject


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(len(ordered) * p / 100)))
    return ordered[rank - 1]


def _body(i: int) -> bytes:
    recipient = {"email": f"lat{i}@example.com", "name": f"L {i}", "vars": {"code": str(i)}}
    return orjson.dumps({**TEMPLATE, "name": f"latency {i}", "recipients": [recipient]})


class Probe:
    """One try at a time: POST a one-recipient batch, wait for the provider to accept it."""

    def __init__(self, session: aiohttp.ClientSession, api: str, key: str, tap: WebhookTap):
        self.session = session
        self.url = f"{api}/api/batches"
        self.headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        self.tap = tap
        self.batch_ids: list[str] = []
        self._queued: dict[str, float] = {}  # batch id -> when its chunk appeared on NATS

    async def on_chunk(self, msg: Msg) -> None:
        self._queued.setdefault(orjson.loads(msg.data)["b"], time.time())

    async def once(self, i: int, give_up_s: float = 10.0) -> Try:
        body = _body(i)
        started = time.time()
        async with self.session.post(self.url, data=body, headers=self.headers) as response:
            created = orjson.loads(await response.read())
            answered = time.time()
            if response.status != 201:
                raise RuntimeError(f"create failed: {response.status} {created}")
        batch_id = created["id"]
        self.batch_ids.append(batch_id)
        try:
            accepted = await self.tap.accepted(f"{batch_id}:1", give_up_s)
        except TimeoutError:
            raise TimeoutError(f"try {i}: not received within {give_up_s:.0f} s") from None
        queued = self._queued.pop(batch_id, math.nan)
        return Try(
            1000 * (accepted - started), 1000 * (answered - started), 1000 * (queued - started)
        )


def _summary(values: list[float]) -> dict[str, float]:
    values = [v for v in values if not math.isnan(v)]  # a chunk the subscription missed
    return {
        "p50_ms": percentile(values, 50),
        "p90_ms": percentile(values, 90),
        "p99_ms": percentile(values, 99),
        "max_ms": max(values),
        "mean_ms": statistics.fmean(values),
    }


async def measure_latency(
    tries: int = 200,
    *,
    workers: int = 2,
    pause_ms: float = 50.0,
    warmup: int = 3,
) -> dict[str, Any]:
    """``tries`` sequential one-recipient batches; latency figures (see the module docstring)."""
    overrides = {
        "WORKER_PROCESSES": str(workers),
        "PROVIDER_RATES": f"mock={UNLIMITED}",
        "SYSTEM_RATE": UNLIMITED,
        "TENANT_RATE": UNLIMITED,
    }
    # The environment's service URLs (bench/preflight.py), a database of this run's own.
    overrides.update(preflight.service_overrides(f"bs_l{uuid.uuid4().hex[:12]}"))
    async with (
        deployment("l", overrides, ("--latency-ms", "0")) as dep,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
    ):
        settings = dep.stack.settings
        probe = Probe(session, dep.stack.api, dep.key, dep.tap)
        nc = await nats.connect(settings.nats_url)
        try:
            subject = Topology(settings.nats_prefix).send_subject("mock")
            await nc.subscribe(subject, cb=probe.on_chunk)
            for i in range(warmup):
                await probe.once(-1 - i)
                await asyncio.sleep(pause_ms / 1000)
            results: list[Try] = []
            for i in range(tries):
                results.append(await probe.once(i))
                await asyncio.sleep(pause_ms / 1000)
        finally:
            await nc.close()
        async with session.get(f"{dep.stack.mock}/v1/received") as response:
            refs: dict[str, int] = orjson.loads(await response.read())["refs"]
        stats = await mock_stats(session, dep.stack.mock)
    received = [t.received_ms for t in results]
    figures = _summary(received)
    return {
        "tries": tries,
        "workers": workers,
        "warmup": warmup,
        "pause_ms": pause_ms,
        **figures,
        "min_ms": min(received),
        "received_ms": received,
        "answered": _summary([t.answered_ms for t in results]),
        "queued": _summary([t.queued_ms for t in results]),
        "after_queued": _summary([t.received_ms - t.queued_ms for t in results]),
        "after_answer": _summary([t.received_ms - t.answered_ms for t in results]),
        "all_received_once": all(refs.get(f"{b}:1") == 1 for b in probe.batch_ids)
        and stats["duplicates"] == 0
        and stats["accepted"] == tries + warmup,
        "passed": figures["p50_ms"] <= P50_MS and figures["p99_ms"] <= P99_MS,
    }


def _line(figures: dict[str, float]) -> str:
    return (
        f"p50 {figures['p50_ms']:6.1f}  p90 {figures['p90_ms']:6.1f}  "
        f"p99 {figures['p99_ms']:6.1f}  max {figures['max_ms']:6.1f}  "
        f"mean {figures['mean_ms']:6.1f} ms"
    )


def report(result: dict[str, Any]) -> bool:
    """Print the figures; True when the target is met and every message arrived once."""
    print(f"machine:            {machine()}")
    print(
        f"tries:              {result['tries']} one-recipient JSON batches, one at a time, "
        f"{result['pause_ms']:.0f} ms apart ({result['warmup']} untimed first); "
        f"{result['workers']} worker processes, mock latency 0 ms"
    )
    print(f"POST -> provider:   {_line(result)}  (min {result['min_ms']:.1f})")
    print(f"  POST -> chunk on NATS:       {_line(result['queued'])}")
    print(f"  POST -> 201 answer:          {_line(result['answered'])}")
    print(f"  chunk on NATS -> provider:   {_line(result['after_queued'])}")
    print(f"  201 answer -> provider:      {_line(result['after_answer'])}")
    once = result["all_received_once"]
    print("check:              " + ("ok: every message received once" if once else "FAILED"))
    print(
        f"target p50 ≤ {P50_MS:.0f} ms, p99 ≤ {P99_MS:.0f} ms: "
        + ("PASS" if result["passed"] else "FAIL")
    )
    return result["passed"] and once


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tries", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--pause-ms", type=float, default=50.0, help="idle time between tries")
    parser.add_argument("--warmup", type=int, default=3, help="untimed tries first")
    args = parser.parse_args(argv)
    if args.tries < 1:
        parser.error("--tries must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = preflight.run(
        measure_latency(
            args.tries, workers=args.workers, pause_ms=args.pause_ms, warmup=args.warmup
        ),
        "bench.latency",
    )
    return 0 if report(result) else 1


if __name__ == "__main__":
    raise SystemExit(main())
