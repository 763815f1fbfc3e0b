"""Rate accuracy: one provider account limited to RATE messages/s (burst BURST), sent to by
several worker processes, on a throw-away deployment of the real processes.

    python -m bench.rate --rate 2000 --burst 200 --seconds 30 --workers 2

Target: the mock provider sees RATE/s ±3 % over SECONDS full seconds, and never more than
RATE + BURST in any one-second window.

One batch big enough to keep sending past the end of the window is uploaded (streamed
NDJSON). The first WARMUP epoch seconds from the first accepted message on (the burst)
are left out of the mean; the measurement window is the next SECONDS whole epoch seconds,
counted by the mock provider itself (``GET /v1/stats`` ``per_second``).

"Any one-second window" is checked over the whole run, initial burst included, on the
mock's integer epoch-second buckets and on every sliding window: the mock's delivery
webhooks carry the time it accepted each message (``time.time()`` in its send handler),
so the deployment's mock posts its webhooks to a tap in this program, which records the
times and forwards each post unchanged to the API. The mock itself is not changed.
At the end the rest of the batch is irrelevant: the workers are stopped and the
deployment's databases, streams and keys are dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import time
import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from bench import preflight
from bench.e2e import machine, ndjson_body
from devkit.stack import UNLIMITED, WebhookTap, deployment, mock_stats
from providers.registry import PROVIDERS

TOLERANCE = 0.03


# --- the benchmark ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Window:
    count: int
    start: float  # epoch seconds


def busiest_window(times: list[float], width: float = 1.0) -> Window:
    """The most messages in any closed ``width``-second window, and where it starts.

    A busiest window can always be moved to start at one of its messages, so trying
    every message as the start is exact."""
    times = sorted(times)
    best = Window(0, times[0] if times else 0.0)
    for i, start in enumerate(times):
        count = bisect.bisect_right(times, start + width, lo=i) - i
        if count > best.count:
            best = Window(count, start)
    return best


def request_spreads(accepted_at: dict[str, float], size: int) -> list[float]:
    """Seconds between the first and last accept of each provider request.

    A request is ``size`` consecutive recipients of the batch (refs ``<batch>:<seq>``).
    The mock accepts a request's messages in one synchronous loop, so a spread of more
    than a few milliseconds means the mock process was not running meanwhile (the CPU was
    busy elsewhere), and the requests that arrived in that time are recorded together."""
    spans: dict[tuple[str, int], tuple[float, float]] = {}
    for ref, at in accepted_at.items():
        batch, _, seq = ref.rpartition(":")
        key = (batch, (int(seq) - 1) // size)
        low, high = spans.get(key, (at, at))
        spans[key] = (min(low, at), max(high, at))
    return [high - low for low, high in spans.values()]


async def _upload(session: aiohttp.ClientSession, api: str, key: str, total: int) -> str:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/x-ndjson"}
    async with session.post(
        f"{api}/api/batches", data=b"".join(ndjson_body(total)), headers=headers
    ) as response:
        created = orjson.loads(await response.read())
        if response.status != 201:
            raise RuntimeError(f"create failed: {response.status} {created}")
    return created["id"]


async def _first_second(session: aiohttp.ClientSession, mock: str, give_up_s: float) -> int:
    """The epoch second of the first message the mock accepted."""
    deadline = time.monotonic() + give_up_s
    while time.monotonic() < deadline:
        per_second = (await mock_stats(session, mock))["per_second"]
        if per_second:
            return min(int(second) for second in per_second)
        await asyncio.sleep(0.05)
    raise TimeoutError(f"the mock provider received nothing within {give_up_s:.0f} s")


async def _all_times(tap: WebhookTap, expected: int, end: int, give_up_s: float) -> list[float]:
    """Accept times before ``end`` once the webhooks of all ``expected`` have come in."""
    deadline = time.monotonic() + give_up_s
    while True:
        times = [t for t in tap.accepted_at.values() if t < end]
        if len(times) >= expected or time.monotonic() > deadline:
            return times
        await asyncio.sleep(0.1)


async def measure_rate(
    rate: float = 2000,
    burst: int = 200,
    seconds: int = 30,
    workers: int = 2,
    *,
    warmup: int = 3,
    recipients: int | None = None,
) -> dict[str, Any]:
    """Send one big batch through a provider account limited to ``rate``/``burst`` and
    count what the mock provider accepts per second. See the module docstring."""
    total = recipients or int(rate * (warmup + seconds + 10))
    overrides = {
        "WORKER_PROCESSES": str(workers),
        "PROVIDER_RATES": f"mock={rate:g}/{burst}",
        "SYSTEM_RATE": UNLIMITED,
        "TENANT_RATE": UNLIMITED,
        "DRAIN_TIMEOUT": "5",
    }
    # The environment's service URLs (bench/preflight.py), a database of this run's own.
    overrides.update(preflight.service_overrides(f"bs_r{uuid.uuid4().hex[:12]}"))
    async with (
        deployment("r", overrides, ("--latency-ms", "0")) as dep,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session,
    ):
        stack = dep.stack
        uploaded = time.perf_counter()
        batch_id = await _upload(session, stack.api, dep.key, total)
        intake_s = time.perf_counter() - uploaded
        first = await _first_second(session, stack.mock, give_up_s=60)
        start, end = first + warmup, first + warmup + seconds  # window [start, end)
        await asyncio.sleep(max(0.0, end + 0.5 - time.time()))
        stats = await mock_stats(session, stack.mock)
        per_second = {int(s): n for s, n in stats["per_second"].items()}
        counted = sum(n for s, n in per_second.items() if s < end)
        times = await _all_times(dep.tap, counted, end, give_up_s=10)
    window = [per_second.get(s, 0) for s in range(start, end)]
    mean = sum(window) / seconds
    limit = rate + burst
    run_max = max(n for s, n in per_second.items() if s < end)
    # engine.sender sends a chunk in provider calls of at most the burst
    before_end = {ref: at for ref, at in dep.tap.accepted_at.items() if at < end}
    spreads = request_spreads(before_end, min(PROVIDERS["mock"].max_per_call, burst))
    busiest = busiest_window(times)
    steady = busiest_window([t for t in times if t >= start])
    return {
        "rate": rate,
        "burst": burst,
        "workers": workers,
        "seconds": seconds,
        "warmup": warmup,
        "recipients": total,
        "batch_id": batch_id,
        "intake_s": intake_s,
        "window_start": start,
        "window_per_second": window,
        "mean_per_s": mean,
        "deviation": mean / rate - 1,
        "min_per_s": min(window),
        "max_per_s": max(window),
        "run_per_second": [per_second.get(s, 0) for s in range(first, end)],
        "run_max_per_s": run_max,
        "sliding_max_1s": busiest.count,
        "sliding_max_1s_at": busiest.start - first,
        "sliding_max_1s_window": steady.count,
        "sliding_max_1s_window_at": steady.start - first,
        "mock_stall_max_ms": 1000 * max(spreads, default=0.0),
        "mock_stalls_over_20ms": sum(spread > 0.02 for spread in spreads),
        "accepted_total": stats["accepted"],
        "accepted_before_end": counted,
        "timestamps": len(times),
        "accept_times": sorted(times),
        "still_sending": stats["accepted"] < total and window[-1] > 0,
        "duplicates": stats["duplicates"],
        "rate_ok": abs(mean / rate - 1) <= TOLERANCE,
        "cap_ok": run_max <= limit and busiest.count <= limit,
        "valid": len(times) == counted and stats["accepted"] < total and window[-1] > 0,
    }


def report(result: dict[str, Any]) -> bool:
    """Print the figures; True when both targets are met on a valid window."""
    rate, burst, seconds = result["rate"], result["burst"], result["seconds"]
    limit = rate + burst
    window = result["window_per_second"]
    print(f"machine:              {machine()}")
    print(
        f"setup:                PROVIDER_RATES=mock={rate:g}/{burst}, {result['workers']} worker "
        "processes, system and tenant rates unlimited, mock latency 0 ms"
    )
    print(
        f"batch:                {result['recipients']:,} recipients (streamed NDJSON, intake "
        f"{result['intake_s']:.2f} s); first second + {result['warmup'] - 1} more left out as "
        "warm-up"
    )
    print(
        "per second (run):     "
        + " ".join(str(n) for n in result["run_per_second"][: result["warmup"]])
        + " | "
        + " ".join(str(n) for n in window)
    )
    print(
        f"window:               {seconds} whole epoch seconds: mean {result['mean_per_s']:,.1f}/s "
        f"({result['deviation']:+.2%}), min {result['min_per_s']:,}, max {result['max_per_s']:,}"
    )
    print(
        f"largest 1 s window:   {result['run_max_per_s']:,} in an epoch-second bucket, "
        f"{result['sliding_max_1s']:,} sliding (from {result['sliding_max_1s_at']:.3f} s after "
        "the first second began); whole run, burst included"
    )
    print(
        f"  after the warm-up:  {result['sliding_max_1s_window']:,} sliding (from "
        f"{result['sliding_max_1s_window_at']:.3f} s)"
    )
    print(
        f"mock stalls:          longest {result['mock_stall_max_ms']:.0f} ms within one provider "
        f"request, {result['mock_stalls_over_20ms']} requests took over 20 ms (the mock was not "
        "running; requests queued meanwhile are recorded together)"
    )
    print(
        f"provider received:    {result['accepted_before_end']:,} before the end of the window "
        f"({result['timestamps']:,} accept times from webhooks), {result['duplicates']} "
        "duplicates; still sending then: "
        + ("yes" if result["still_sending"] else "NO (batch too small)")
    )
    if not result["valid"]:
        print("WARNING:              the window is not valid (see the line above)")
    ok = result["rate_ok"] and result["cap_ok"] and result["valid"]
    print(
        f"rate {rate:,.0f}/s ±{TOLERANCE:.0%}:     "
        + ("PASS" if result["rate_ok"] else "FAIL")
        + f"  (allowed {rate * (1 - TOLERANCE):,.0f} .. {rate * (1 + TOLERANCE):,.0f})"
    )
    print(f"≤ rate + burst ({limit:,.0f}): " + ("PASS" if result["cap_ok"] else "FAIL"))
    print("result:               " + ("PASS" if ok else "FAIL"))
    return ok


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=2000, help="provider messages/s")
    parser.add_argument("--burst", type=int, default=200, help="provider bucket size")
    parser.add_argument("--seconds", type=int, default=30, help="measured whole seconds")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--warmup", type=int, default=3, help="seconds left out at the start")
    parser.add_argument(
        "--recipients",
        type=int,
        default=None,
        help="batch size (default rate × (warmup+seconds+10))",
    )
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.burst < 1 or args.seconds < 1 or args.warmup < 1:
        parser.error("--rate, --burst, --seconds and --warmup must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = preflight.run(
        measure_rate(
            args.rate,
            args.burst,
            args.seconds,
            args.workers,
            warmup=args.warmup,
            recipients=args.recipients,
        ),
        "bench.rate",
    )
    return 0 if report(result) else 1


if __name__ == "__main__":
    raise SystemExit(main())
