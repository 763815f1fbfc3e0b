"""One batch through each batch adapter against its fake server, beside the mock provider's
figure in the same run:

    python -m bench.providers --recipients 1000000
    python -m bench.providers --recipients 20000 --providers mock,ses

For each provider, a throw-away deployment as bench/e2e.py makes it (its own databases,
streams and keys on this machine's services, the same ``Stack``: mock provider, API and
workers, removed afterwards). For every provider but the mock, its fake server
(devkit/fakes/<name>.py, which checks every request against the provider's documented
format) runs as a process of its own on 127.0.0.1 (``--serve-fake``, below), and a provider
account is made through the API (``POST /api/provider-accounts``: base URL the fake, the
fake's test credentials, region or domain where needed, rate 1,000,000/s with a burst of
100,000: never the limit). Then one REST batch of N recipients (streamed NDJSON, as
bench/e2e.py sends it, naming the account with ``provider_account``; the mock row names
``provider: mock`` with its 0 ms latency) from the first byte of the POST to the last
recipient final.

Printed per provider: end-to-end recipients/s, intake recipients/s, the provider calls
made (POSTs to the send endpoint, by answer status), the provider process's CPU seconds,
and the machine's CPU per recipient with and without the provider process (it runs on the
same cores and competes with the engine). Checked: every recipient accepted by the
provider exactly once and every recipient ``sent`` (exit code 1 otherwise). Each provider
is bounded by ``--timeout`` seconds; a provider that fails or times out is reported with
what it had done by then and the next one runs.

``--serve-fake NAME --port N`` runs one fake as the benchmark starts it: the fake's own
application (its checks and answers unchanged), plus a middleware that after every request
moves the refs of what the fake accepted into a counter and empties the fake's records (a
fake keeps every request and every delivered message, gigabytes for 1,000,000), and
``GET /_bench/stats?batch=<id>&n=<N>`` (calls by status, accepted, unique, duplicates,
missing and unexpected refs of that batch).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from bench import preflight
from bench.e2e import TEMPLATE, machine, ndjson_body
from bench.profile import Profiler
from devkit.stack import (
    ROOT,
    Stack,
    drop_all,
    environ_for,
    free_port,
    isolated_environ,
    mock_stats,
    tenant_key,
    wait_until,
)
from engine.config import load_settings
from engine.migrate import migrate_all

PROVIDERS = ("mock", "sendgrid", "mailgun", "postmark", "resend", "ses")
ACCOUNT_RATE = 1_000_000  # per second: the account's own bucket never binds
ACCOUNT_BURST = 100_000  # as the tenant's and the system's default burst
STATS_PATH = "/_bench/stats"


# --- the fakes, as processes of their own --------------------------------------------------


Drain = Callable[[], Iterable[str | None]]


def _sendgrid() -> tuple[web.Application, Drain, Callable[[], dict[str, int]]]:
    from devkit.fakes import sendgrid

    fake = sendgrid.FakeSendGrid()

    def drain() -> list[str | None]:
        refs = [d.custom_args.get("ref") for d in fake.delivered]
        fake.delivered.clear()
        fake.received.clear()
        return refs

    return fake.app(), drain, dict


def _mailgun() -> tuple[web.Application, Drain, Callable[[], dict[str, int]]]:
    from devkit.fakes import mailgun

    fake = mailgun.FakeMailgun()

    def drain() -> list[str | None]:
        refs = [d.user_variables.get("ref") for d in fake.delivered]
        fake.delivered.clear()
        fake.received.clear()
        return refs

    return fake.app(), drain, dict


def _postmark() -> tuple[web.Application, Drain, Callable[[], dict[str, int]]]:
    from devkit.fakes import postmark

    app = postmark.build_app()
    state = app[postmark.FAKE]

    def drain() -> list[str | None]:
        refs = [(m.get("Metadata") or {}).get("ref") for m in state.sent]
        state.sent.clear()
        state.received.clear()
        return refs

    return app, drain, dict


def _resend() -> tuple[web.Application, Drain, Callable[[], dict[str, int]]]:
    from devkit.fakes import resend
    from providers.resend import decode_ref

    app = resend.build_app()
    state = app[resend.FAKE]  # its idempotency keys are kept: they are part of its checks

    def ref(email: dict[str, Any]) -> str | None:
        for tag in email.get("tags") or ():
            found = decode_ref(tag.get("name"), tag.get("value") or "")
            if found is not None:
                return found
        return None

    def drain() -> list[str | None]:
        refs = [ref(email) for email in state.sent]
        state.sent.clear()
        state.received.clear()
        return refs

    return app, drain, dict


def _ses() -> tuple[web.Application, Drain, Callable[[], dict[str, int]]]:
    from devkit.fakes import ses

    app = ses.build_app()
    state = app[ses.STATE]
    refused: Counter[str] = Counter()

    def ref(item: dict[str, Any]) -> str | None:
        for header in item["request"]["Content"].get("Simple", {}).get("Headers") or ():
            if header["Name"].lower() == "x-batchsender-ref":
                return header["Value"]
        return None

    def drain() -> list[str | None]:
        refs = [ref(item) for item in state.received]
        state.received.clear()
        refused.update(item["code"] for item in state.refused)
        state.refused.clear()
        return refs

    return app, drain, lambda: dict(refused)


FAKE_APPS = {
    "sendgrid": _sendgrid,
    "mailgun": _mailgun,
    "postmark": _postmark,
    "resend": _resend,
    "ses": _ses,
}


@dataclass
class Tally:
    """What a fake answered and accepted, by ref (counters only: millions fit)."""

    calls: Counter[int] = field(default_factory=Counter)
    refs: dict[str | None, int] = field(default_factory=dict)
    accepted: int = 0

    def add(self, refs: Iterable[str | None]) -> None:
        for ref in refs:
            self.refs[ref] = self.refs.get(ref, 0) + 1
            self.accepted += 1

    def stats(self, batch: str | None, n: int, refused: dict[str, int]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "calls": sum(self.calls.values()),
            "calls_by_status": {str(k): v for k, v in sorted(self.calls.items())},
            "accepted": self.accepted,
            "unique": len(self.refs),
            "duplicates": self.accepted - len(self.refs),
            "without_ref": self.refs.get(None, 0),
            "refused": refused,
        }
        if batch:
            hits = sum(1 for seq in range(1, n + 1) if f"{batch}:{seq}" in self.refs)
            out["missing"] = n - hits
            out["unexpected"] = len(self.refs) - hits
            out["twice_or_more"] = sum(
                1 for seq in range(1, n + 1) if self.refs.get(f"{batch}:{seq}", 0) > 1
            )
        return out


def counted_app(name: str) -> web.Application:
    """The fake's application with the counting middleware and the stats route."""
    app, drain, refused = FAKE_APPS[name]()
    tally = Tally()

    @web.middleware
    async def count(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path == STATS_PATH:  # answered here, whatever the fake's own routes
            n = int(request.query.get("n", "0"))
            tally.add(drain())
            body = tally.stats(request.query.get("batch"), n, refused())
            return web.Response(body=orjson.dumps(body), content_type="application/json")
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            if request.method == "POST":
                tally.calls[status] += 1
            tally.add(drain())  # every record in there is complete: handlers append at once

    app.middlewares.append(count)
    return app


async def _serve(name: str, host: str, port: int) -> None:
    task = asyncio.current_task()
    if task is not None:
        with contextlib.suppress(NotImplementedError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    runner = web.AppRunner(counted_app(name), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        print(f"fake {name} on http://{host}:{port}", flush=True)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def serve_fake(name: str, host: str, port: int) -> None:
    """Run one counted fake until SIGTERM or SIGINT (on uvloop, as the mock provider)."""
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        loop_factory = None
    with (
        contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError),
        asyncio.Runner(loop_factory=loop_factory) as runner,
    ):
        runner.run(_serve(name, host, port))


def _account_fields(provider: str) -> dict[str, Any]:
    """The fake's test credentials (and region or domain) for its provider account."""
    from devkit.fakes import mailgun, postmark, resend, sendgrid, ses

    return {
        "sendgrid": {"credentials": {"api_key": sendgrid.TEST_API_KEY}},
        "mailgun": {
            "credentials": {"api_key": mailgun.TEST_API_KEY},
            "domain": mailgun.TEST_DOMAIN,
        },
        "postmark": {"credentials": {"server_token": postmark.TEST_SERVER_TOKEN}},
        "resend": {"credentials": {"api_key": resend.TEST_API_KEY}},
        "ses": {"credentials": dict(ses.TEST_CREDENTIALS), "region": ses.TEST_REGION},
    }[provider]


def _stats_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + STATS_PATH, timeout=2) as response:
            return response.status == 200
    except Exception:
        return False


def start_fake(stack: Stack, provider: str) -> str:
    """Start ``provider``'s counted fake as a process of the stack (its CPU and memory
    counted as ``<provider>-fake``, stopped with the rest); its URL once it answers."""
    port = free_port()
    log = (stack.logs / f"{provider}-fake.log").open("ab")
    command = [sys.executable, "-m", "bench.providers", "--serve-fake", provider,
               "--port", str(port)]  # fmt: skip
    stack.procs[f"{provider}-fake"] = subprocess.Popen(
        command, env=stack.environ, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: _stats_ok(url), 30, what=f"the {provider} fake")
    return url


# --- one provider's batch ---------------------------------------------------------------------


async def _json(response: aiohttp.ClientResponse) -> Any:
    return orjson.loads(await response.read())


async def create_account(
    session: aiohttp.ClientSession, api: str, provider: str, **fields: Any
) -> dict[str, Any]:
    """A provider account at a rate that never binds, with the fakes' test credentials
    (``fields``: e.g. ``base_url`` of a fake, a ``webhook_secret``)."""
    body = {
        "name": f"bench-{provider}",
        "provider": provider,
        "rate_per_second": ACCOUNT_RATE,
        "burst": ACCOUNT_BURST,
        **_account_fields(provider),
        **fields,
    }
    async with session.post(f"{api}/api/provider-accounts", json=body) as response:
        created = await _json(response)
        if response.status != 201:
            raise RuntimeError(f"account create failed: {response.status} {created}")
    return created


async def batch_state(session: aiohttp.ClientSession, api: str, batch_id: str) -> dict[str, Any]:
    async with session.get(f"{api}/api/batches/{batch_id}") as response:
        return await _json(response)


async def run_batch(
    session: aiohttp.ClientSession,
    api: str,
    total: int,
    template: dict[str, Any],
    progress: dict[str, Any],
) -> None:
    """POST the batch (streamed NDJSON) and wait for its last recipient final; fills
    ``progress`` as it goes (what a timeout reports)."""
    body = ndjson_body(total, template=template)

    async def stream() -> Any:
        for piece in body:
            yield piece

    headers = {"Content-Type": "application/x-ndjson"}
    progress["start"], started = time.time(), time.perf_counter()
    async with session.post(f"{api}/api/batches", data=stream(), headers=headers) as response:
        created = await _json(response)
        if response.status != 201:
            raise RuntimeError(f"batch create failed: {response.status} {created}")
    progress["intake_s"] = time.perf_counter() - started
    progress["batch_id"] = created["id"]
    while True:
        batch = await batch_state(session, api, created["id"])
        if batch["status"] == "completed":
            progress["done"] = datetime.fromisoformat(batch["completed_at"]).timestamp()
            return
        if batch["status"] in ("failed", "cancelled", "paused"):
            why = batch.get("pause_reason") or ""
            raise RuntimeError(f"batch ended {batch['status']} {why}".strip())
        await asyncio.sleep(0.1)


async def provider_stats(
    session: aiohttp.ClientSession, url: str, provider: str, batch_id: str | None, n: int
) -> dict[str, Any]:
    """What the provider accepted: the fake's tally, or the mock's stats in the same form."""
    if provider == "mock":
        stats = await mock_stats(session, url)
        return {
            "calls": stats["requests"],
            "calls_by_status": {},
            "accepted": stats["accepted"],
            "unique": stats["unique"],
            "duplicates": stats["duplicates"],
            "failed_requests": stats["failed_requests"],
            "bad_requests": stats["bad_requests"],
            "rejected": stats["rejected"],
        }
    params = {"batch": batch_id, "n": str(n)} if batch_id else {}
    async with session.get(url + STATS_PATH, params=params) as response:
        return await _json(response)


async def failed_sample(session: aiohttp.ClientSession, api: str, batch_id: str) -> dict[str, int]:
    """The errors of (up to 1,000 of) the batch's failed recipients, with their attempts."""
    params = {"status": "failed", "limit": "1000"}
    async with session.get(f"{api}/api/batches/{batch_id}/recipients", params=params) as response:
        page = await _json(response)
    found = Counter(
        f"{r.get('error')} (attempts {r.get('attempts')})" for r in page.get("data", [])
    )
    return dict(found.most_common(10))


def exactly_once(stats: dict[str, Any], counts: dict[str, int], n: int) -> list[str]:
    """What breaks "every recipient accepted exactly once and recorded sent" (empty: ok)."""
    problems = []
    if stats.get("accepted") != n:
        problems.append(f"accepted {stats.get('accepted')} messages for {n:,} recipients")
    if stats.get("unique") != n:
        problems.append(f"{stats.get('unique')} unique refs")
    if stats.get("duplicates"):
        problems.append(f"{stats['duplicates']} duplicates")
    for name in ("missing", "unexpected", "twice_or_more", "without_ref"):
        if stats.get(name):
            problems.append(f"{stats[name]} {name.replace('_', ' ')}")
    if counts.get("sent") != n:
        others = {k: v for k, v in counts.items() if v and k != "sent"}
        problems.append(f"{counts.get('sent')} recorded sent, {others}")
    return problems


async def measure_provider(
    provider: str,
    recipients: int,
    *,
    workers: int,
    concurrency: int,
    timeout_s: float,
    profile: Path | None = None,
) -> dict[str, Any]:
    """One batch of ``recipients`` through ``provider`` on a deployment of its own."""
    tag = f"p{uuid.uuid4().hex[:8]}"
    environ = preflight.on_services(isolated_environ(tag))
    environ.update(
        WORKER_PROCESSES=str(workers),
        PROVIDER_RATES="mock=10000000/1000000",
        WORKER_CONCURRENCY=str(concurrency),
    )
    settings = load_settings(environ)
    await migrate_all(settings)
    logs = Path(tempfile.mkdtemp(prefix=f"bench-{tag}-"))
    stack = Stack(settings, environ_for(environ), logs)
    result: dict[str, Any] = {"provider": provider, "recipients": recipients, "problems": []}
    progress: dict[str, Any] = {}
    profiler = Profiler(profile / provider) if profile else None
    failed = True
    try:
        key = await tenant_key(settings, "bench")
        await asyncio.to_thread(partial(stack.start_all, ("--latency-ms", "0"), webhooks=False))
        url, template = stack.mock, dict(TEMPLATE)
        headers = {"Authorization": f"Bearer {key}"}
        client_timeout = aiohttp.ClientTimeout(total=None)
        async with aiohttp.ClientSession(headers=headers, timeout=client_timeout) as session:
            if provider != "mock":
                url = await asyncio.to_thread(start_fake, stack, provider)
                account = await create_account(session, stack.api, provider, base_url=url)
                del template["provider"]
                template["provider_account"] = account["name"]
                result["account"] = {
                    k: account.get(k) for k in ("name", "rate_per_second", "burst", "base_url")
                }
            if profiler:
                profiler.start(stack.pids())
            cpu_before = stack.cpu_seconds()
            try:
                await asyncio.wait_for(
                    run_batch(session, stack.api, recipients, template, progress), timeout_s
                )
            except TimeoutError:
                result["problems"].append(f"timed out after {timeout_s:.0f} s")
            except Exception as exc:
                result["problems"].append(f"{type(exc).__name__}: {exc}")
            wall = time.time()
            cpu_after = stack.cpu_seconds()
            if profiler:
                profiler.stop()
                result["profile"] = profiler.summary()
            result["cpu_s"] = {k: v - cpu_before.get(k, 0.0) for k, v in cpu_after.items()}
            result["peak_rss_mb"] = stack.peak_rss_mb()
            batch_id = progress.get("batch_id")
            result["batch_id"] = batch_id
            stats = await provider_stats(session, url, provider, batch_id, recipients)
            result["provider_stats"] = stats
            counts: dict[str, int] = {}
            if batch_id:
                counts = (await batch_state(session, stack.api, batch_id))["counts"]
            result["counts"] = counts
            if batch_id and any(v for k, v in counts.items() if k != "sent"):
                result["failed_sample"] = await failed_sample(session, stack.api, batch_id)
        result["completed"] = "done" in progress  # the last recipient final
        result["intake_s"] = progress.get("intake_s")
        end = progress.get("done", wall)
        result["e2e_s"] = end - progress["start"] if "start" in progress else None
        if "done" in progress:
            result["problems"] += exactly_once(stats, counts, recipients)
        failed = bool(result["problems"])
    except Exception as exc:
        result["problems"].append(f"{type(exc).__name__}: {exc}")
    finally:
        if failed:
            print(stack.tail(), file=sys.stderr)
            print(f"logs kept in {logs}", file=sys.stderr)
        await asyncio.to_thread(_stop, stack)
        await drop_all(settings)
        shutil.rmtree(settings.metrics_dir, ignore_errors=True)
        if not failed:
            shutil.rmtree(logs, ignore_errors=True)
    return result


def _stop(stack: Stack) -> None:
    """Workers first (they drain against a provider that is still there), then the rest."""
    stack.stop("worker")
    stack.stop_all()


# --- the report ------------------------------------------------------------------------------


def _provider_process(r: dict[str, Any]) -> str:
    return "mock" if r["provider"] == "mock" else f"{r['provider']}-fake"


def derived(r: dict[str, Any]) -> dict[str, Any]:
    """The figures of one provider's row."""
    n, cpu = r["recipients"], r.get("cpu_s") or {}
    own = _provider_process(r)
    total = sum(cpu.values())
    # Without the provider: its process, and the idle mock of a fake's run.
    without = sum(v for k, v in cpu.items() if k not in (own, "mock"))
    workers = sum(v for k, v in cpu.items() if k.startswith("worker"))
    stats = r.get("provider_stats") or {}
    calls = stats.get("calls") or 0
    e2e, intake = r.get("e2e_s"), r.get("intake_s")
    return {
        "e2e_per_s": n / e2e if e2e and r.get("completed") else None,
        "intake_per_s": n / intake if intake else None,
        "calls": calls,
        "per_call": stats.get("accepted", 0) / calls if calls else None,
        "provider_cpu_s": cpu.get(own, 0.0),
        "workers_cpu_s": workers,
        "cpu_us_all": 1e6 * total / n,
        "cpu_us_without": 1e6 * without / n,
        "provider_rss_mb": (r.get("peak_rss_mb") or {}).get(own),
    }


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> bool:
    print(f"machine:    {machine()}")
    print(
        f"run:        {args.recipients:,} recipients per provider, one REST batch each, "
        f"{args.workers} worker processes, {args.concurrency} chunks in flight per worker; "
        f"accounts at {ACCOUNT_RATE:,}/s, burst {ACCOUNT_BURST:,}; mock 0 ms per request"
    )
    ok = True
    rows = []
    for r in results:
        d = derived(r)
        stats = r.get("provider_stats") or {}
        busy = sorted(
            ((v, k) for k, v in (r.get("cpu_s") or {}).items() if v >= 0.05), reverse=True
        )
        print(f"--- {r['provider']}")
        if r.get("account"):
            print(f"account:    {r['account']}")
        if r.get("e2e_s") is not None:
            rate = f" = {d['e2e_per_s']:,.0f} recipients/s" if d["e2e_per_s"] else " (not finished)"
            print(f"end to end: {r['e2e_s']:.2f} s{rate}")
        if d["intake_per_s"]:
            print(f"intake:     {r['intake_s']:.2f} s = {d['intake_per_s']:,.0f} recipients/s")
        by_status = stats.get("calls_by_status") or {}
        print(
            f"calls:      {d['calls']:,}"
            + (
                f" ({', '.join(f'HTTP {k}: {v:,}' for k, v in by_status.items())})"
                if by_status
                else ""
            )
            + (f", {d['per_call']:.1f} recipients per call" if d["per_call"] else "")
        )
        print(
            f"provider:   accepted {stats.get('accepted', 0):,}, unique {stats.get('unique', 0):,}, "
            f"duplicates {stats.get('duplicates', 0)}"
            + "".join(
                f", {name} {stats[name]}"
                for name in ("missing", "unexpected", "refused", "rejected", "bad_requests")
                if stats.get(name)
            )
        )
        if r.get("counts"):
            print("recipients: " + ", ".join(f"{k} {v:,}" for k, v in r["counts"].items() if v))
        print(
            f"CPU s:      total {sum((r.get('cpu_s') or {}).values()):.1f}; "
            + ", ".join(f"{k} {v:.1f}" for v, k in busy)
        )
        print(
            f"CPU/recip.: {d['cpu_us_all']:.1f} µs with the provider process, "
            f"{d['cpu_us_without']:.1f} µs without"
        )
        if r.get("peak_rss_mb"):
            print(
                "peak RSS:   "
                + ", ".join(f"{k} {v:.0f}" for k, v in sorted(r["peak_rss_mb"].items()))
                + " MB"
            )
        for error, count in (r.get("failed_sample") or {}).items():
            print(f"failed:     {count:,}× {error}")
        if r.get("profile"):
            print(r["profile"])
        check = "ok: every recipient accepted exactly once, all sent"
        print(
            "check:      " + (check if not r["problems"] else "FAILED: " + "; ".join(r["problems"]))
        )
        ok = ok and not r["problems"]
        rows.append((r, d))
    print()
    print(
        "| provider | end to end | intake | calls | per call | provider CPU s | workers CPU s "
        "| CPU µs/recipient with / without provider | exactly once |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r, d in rows:
        e2e = f"{d['e2e_per_s']:,.0f}/s ({r['e2e_s']:.1f} s)" if d["e2e_per_s"] else "—"
        intake = f"{d['intake_per_s']:,.0f}/s" if d["intake_per_s"] else "—"
        per_call = f"{d['per_call']:.0f}" if d["per_call"] else "—"
        print(
            f"| {r['provider']} | {e2e} | {intake} | {d['calls']:,} | {per_call} "
            f"| {d['provider_cpu_s']:.1f} | {d['workers_cpu_s']:.1f} "
            f"| {d['cpu_us_all']:.1f} / {d['cpu_us_without']:.1f} "
            f"| {'yes' if not r['problems'] else 'NO'} |"
        )
    print("every provider: " + ("every recipient exactly once" if ok else "FAILED"))
    return ok


async def main(args: argparse.Namespace) -> int:
    names = [p.strip() for p in args.providers.split(",") if p.strip()]
    unknown = sorted(set(names) - set(PROVIDERS))
    if unknown:
        raise SystemExit(f"bench.providers: unknown provider(s) {', '.join(unknown)}")
    results = []
    for name in names:
        print(f"{name}: {args.recipients:,} recipients ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        result = await measure_provider(
            name,
            args.recipients,
            workers=args.workers,
            concurrency=args.concurrency,
            timeout_s=args.timeout,
            profile=args.profile,
        )
        results.append(result)
        d = derived(result)
        rate = f"{d['e2e_per_s']:,.0f}/s end to end" if d["e2e_per_s"] else "FAILED"
        print(
            f"  {rate}, {d['calls']:,} calls, provider CPU {d['provider_cpu_s']:.1f} s "
            f"({time.monotonic() - started:.0f} s with setup)"
            + (f"; {'; '.join(result['problems'])}" if result["problems"] else ""),
            file=sys.stderr,
            flush=True,
        )
        if args.json:  # kept as it goes: a later failure loses nothing measured
            args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0 if report(results, args) else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipients", type=int, default=20_000)
    parser.add_argument(
        "--providers", default=",".join(PROVIDERS), help="comma-separated, run in this order"
    )
    parser.add_argument(
        "--timeout", type=float, default=3600.0, help="seconds per provider's batch"
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes")
    parser.add_argument("--concurrency", type=int, default=32, help="chunks in flight per worker")
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    parser.add_argument(
        "--profile", type=Path, metavar="DIR", help="py-spy every process into DIR/<provider>"
    )
    parser.add_argument(
        "--serve-fake", choices=sorted(FAKE_APPS), metavar="NAME", help="run one counted fake"
    )
    parser.add_argument("--host", default="127.0.0.1", help="with --serve-fake")
    parser.add_argument("--port", type=int, default=0, help="with --serve-fake")
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.serve_fake:
        serve_fake(arguments.serve_fake, arguments.host, arguments.port)
    else:
        raise SystemExit(preflight.run(main(arguments), "bench.providers"))
