"""A real local HTTP e-mail provider for tests, benchmarks and the dev stack.

Routes: ``POST /v1/send``, ``GET /v1/stats``, ``GET /v1/received``, ``GET /v1/samples``,
``POST /v1/reset``, ``POST /v1/config``, ``GET /health``. Run with
``python -m devkit.mock_provider --port 6100``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import random
import signal
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from providers.mock import signed_headers

log = logging.getLogger("devkit.mock_provider")

INVALID_DOMAIN = "invalid.test"
MAX_SAMPLES = 1000
MAX_PENDING_WEBHOOKS = 100_000
WEBHOOK_BATCH = 500
WEBHOOK_POSTS = 4  # posts in flight at once, as a provider's many senders post
WEBHOOK_FLUSH_SECONDS = 0.2
WEBHOOK_BACKOFF_MAX = 5.0
RATE_LIMIT_EVERY = 5  # every 5th injected failure is a 429 instead of a 503
MAX_BODY_BYTES = 64 * 1024 * 1024


@dataclass(slots=True)
class Recorder:
    """Counts only (no message bodies beyond the first samples), so millions of refs fit."""

    refs: dict[str, int] = field(default_factory=dict)
    per_second: dict[int, int] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    requests: int = 0
    failed_requests: int = 0
    bad_requests: int = 0
    accepted: int = 0
    rejected: int = 0

    def accept(self, message: dict[str, Any]) -> None:
        ref = message["ref"]
        self.refs[ref] = self.refs.get(ref, 0) + 1
        second = int(time.time())
        self.per_second[second] = self.per_second.get(second, 0) + 1
        self.accepted += 1
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append(_sample(message))

    def stats(self) -> dict[str, Any]:
        unique = len(self.refs)
        return {
            "requests": self.requests,
            "failed_requests": self.failed_requests,
            "bad_requests": self.bad_requests,
            "accepted": self.accepted,
            "unique": unique,
            "duplicates": self.accepted - unique,
            "rejected": self.rejected,
            "per_second": {str(sec): n for sec, n in sorted(self.per_second.items())},
        }


def _sample(message: dict[str, Any]) -> dict[str, Any]:
    return {
        "ref": message["ref"],
        "to": message["to"],
        "subject": message.get("subject"),
        "headers": message.get("headers") or {},
    }


class WebhookSender:
    """Queues delivery events and posts them in signed batches, retrying with backoff."""

    def __init__(self, url: str, secret: str, *, max_pending: int | None = None) -> None:
        self.url = url
        self.secret = secret
        self.max_pending = MAX_PENDING_WEBHOOKS if max_pending is None else max_pending
        self.pending: deque[dict[str, Any]] = deque()
        self.sent = 0
        self.dropped = 0
        self._full = asyncio.Event()
        self._backoff = WEBHOOK_FLUSH_SECONDS

    def enqueue(self, event: dict[str, Any]) -> None:
        if len(self.pending) >= self.max_pending:
            self.pending.popleft()
            self.dropped += 1
        self.pending.append(event)
        if len(self.pending) >= WEBHOOK_BATCH:
            self._full.set()

    def reset_counters(self) -> None:
        self.sent = 0
        self.dropped = 0

    async def run(self, session: aiohttp.ClientSession) -> None:
        """Flush every 200 ms, or as soon as a full batch is waiting; runs until cancelled."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._full.wait(), WEBHOOK_FLUSH_SECONDS)
            self._full.clear()
            if not await self._flush(session):
                await asyncio.sleep(self._backoff)
                self._backoff = min(self._backoff * 2, WEBHOOK_BACKOFF_MAX)

    async def _flush(self, session: aiohttp.ClientSession) -> bool:
        """Post what is pending, ``WEBHOOK_POSTS`` batches at a time; False when one failed
        (it is back in front)."""
        while self.pending:
            batches = []
            while self.pending and len(batches) < WEBHOOK_POSTS:
                count = min(WEBHOOK_BATCH, len(self.pending))
                batches.append([self.pending.popleft() for _ in range(count)])
            posted = await asyncio.gather(*(self._post(session, b) for b in batches))
            for batch, ok in zip(reversed(batches), reversed(posted), strict=True):
                if ok:
                    self.sent += len(batch)
                else:
                    self._requeue(batch)
            if not all(posted):
                return False
            self._backoff = WEBHOOK_FLUSH_SECONDS
        return True

    async def _post(self, session: aiohttp.ClientSession, batch: list[dict[str, Any]]) -> bool:
        body = orjson.dumps(batch)  # signed at each attempt: a retry carries a fresh timestamp
        headers = {"Content-Type": "application/json", **signed_headers(body, self.secret)}
        try:
            async with session.post(self.url, data=body, headers=headers) as resp:
                await resp.read()
                ok = 200 <= resp.status < 300
        except (TimeoutError, aiohttp.ClientError) as exc:
            log.debug("webhook post failed: %s", exc)
            return False
        if not ok:
            log.debug("webhook post answered HTTP %s", resp.status)
        return ok

    def _requeue(self, batch: list[dict[str, Any]]) -> None:
        """Put a failed batch back in front; beyond the cap the oldest events are dropped."""
        for event in reversed(batch):
            if len(self.pending) >= self.max_pending:
                self.dropped += 1
            else:
                self.pending.appendleft(event)


class MockState:
    """Runtime behaviour and recording of one mock provider app."""

    def __init__(
        self,
        *,
        latency_ms: float,
        failure_rate: float,
        webhooks: WebhookSender | None,
        seed: int | None,
    ) -> None:
        self.latency_ms = latency_ms
        self.failure_rate = failure_rate
        self.webhooks = webhooks
        self.recorder = Recorder()
        self._rng = random.Random(seed)

    def should_fail(self) -> bool:
        return self.failure_rate > 0 and self._rng.random() < self.failure_rate

    def process(self, message: dict[str, Any]) -> dict[str, Any]:
        """Accept or reject one message, recording it and queueing its webhook event."""
        ref, to = message["ref"], message["to"]
        local, at, domain = to.rpartition("@")
        if not at or not local:
            return self._reject(ref, "invalid recipient address")
        if domain.lower() == INVALID_DOMAIN:
            return self._reject(ref, "mailbox does not exist")
        message_id = _new_id()
        self.recorder.accept(message)
        if self.webhooks is not None:
            self.webhooks.enqueue(_event(ref, message_id, to, local))
        return {"ref": ref, "status": "accepted", "id": message_id}

    def _reject(self, ref: str, error: str) -> dict[str, Any]:
        self.recorder.rejected += 1
        return {"ref": ref, "status": "rejected", "error": error, "retryable": False}

    def stats(self) -> dict[str, Any]:
        stats = self.recorder.stats()
        webhooks = self.webhooks
        stats["webhooks_sent"] = webhooks.sent if webhooks else 0
        stats["webhooks_dropped"] = webhooks.dropped if webhooks else 0
        stats["webhooks_pending"] = len(webhooks.pending) if webhooks else 0
        stats["latency_ms"] = self.latency_ms
        stats["failure_rate"] = self.failure_rate
        return stats

    def reset(self) -> None:
        self.recorder = Recorder()
        if self.webhooks is not None:
            self.webhooks.reset_counters()


_ID_PREFIX = uuid.uuid4().hex[:12]
_ids = itertools.count(1)


def _new_id() -> str:
    """A unique message id, cheaply: this server's random prefix and a counter."""
    return f"{_ID_PREFIX}{next(_ids):012x}"


def _event(ref: str, message_id: str, email: str, local: str) -> dict[str, Any]:
    local = local.lower()
    if local.startswith("bounce"):
        kind = "bounced"
    elif local.startswith("complain"):
        kind = "complained"
    else:
        kind = "delivered"
    return {
        "event_id": "ev-" + message_id,  # one event per message
        "event": kind,
        "ref": ref,
        "message_id": message_id,
        "email": email,
        "timestamp": time.time(),
    }


STATE = web.AppKey("mock_state", MockState)


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(data), status=status, headers=headers, content_type="application/json"
    )


def parse_send_body(body: bytes) -> list[dict[str, Any]]:
    """The messages of a ``POST /v1/send`` body; ValueError when malformed."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ValueError("body is not valid JSON") from None
    messages = data.get("messages") if isinstance(data, dict) else None
    if not isinstance(messages, list):
        raise ValueError("body must be an object with a 'messages' list")
    for index, message in enumerate(messages):
        _check_message(index, message)
    return messages


def _check_message(index: int, message: Any) -> None:
    if not isinstance(message, dict):
        raise ValueError(f"messages[{index}] must be an object")
    for key in ("ref", "to"):
        if not isinstance(message.get(key), str) or not message[key]:
            raise ValueError(f"messages[{index}].{key} must be a non-empty string")
    headers = message.get("headers")
    if headers is not None and not isinstance(headers, dict):
        raise ValueError(f"messages[{index}].headers must be an object")


async def _send(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.recorder.requests += 1
    try:
        messages = parse_send_body(await request.read())
    except ValueError as exc:
        state.recorder.bad_requests += 1
        return _json({"error": str(exc)}, status=400)
    if state.latency_ms > 0:
        await asyncio.sleep(state.latency_ms / 1000)
    if state.should_fail():
        return _failure(state)
    return _json({"results": [state.process(m) for m in messages]})


def _failure(state: MockState) -> web.Response:
    state.recorder.failed_requests += 1
    if state.recorder.failed_requests % RATE_LIMIT_EVERY == 0:
        return _json({"error": "rate limited"}, status=429, headers={"Retry-After": "1"})
    return _json({"error": "service unavailable"}, status=503)


async def _stats(request: web.Request) -> web.Response:
    return _json(request.app[STATE].stats())


async def _received(request: web.Request) -> web.Response:
    return _json({"refs": request.app[STATE].recorder.refs})


async def _samples(request: web.Request) -> web.Response:
    return _json(request.app[STATE].recorder.samples)


async def _reset(request: web.Request) -> web.Response:
    request.app[STATE].reset()
    return _json({"ok": True})


async def _config(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        latency_ms, failure_rate = _parse_config(await request.read(), state)
    except ValueError as exc:
        return _json({"error": str(exc)}, status=400)
    state.latency_ms, state.failure_rate = latency_ms, failure_rate
    return _json({"latency_ms": latency_ms, "failure_rate": failure_rate})


def _parse_config(body: bytes, state: MockState) -> tuple[float, float]:
    try:
        data = orjson.loads(body or b"{}")
    except orjson.JSONDecodeError:
        raise ValueError("body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ValueError("body must be a JSON object")
    latency_ms = _number(data, "latency_ms", state.latency_ms)
    failure_rate = _number(data, "failure_rate", state.failure_rate)
    if latency_ms < 0:
        raise ValueError("latency_ms must be >= 0")
    if not 0 <= failure_rate <= 1:
        raise ValueError("failure_rate must be between 0 and 1")
    return latency_ms, failure_rate


def _number(data: dict[str, Any], key: str, default: float) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} must be a number")
    return float(value)


async def _health(_request: web.Request) -> web.Response:
    return _json({"status": "ok"})


def _webhook_context(
    sender: WebhookSender,
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A ``cleanup_ctx`` entry running the webhook sender for the app's lifetime."""

    async def run_sender(_app: web.Application) -> AsyncIterator[None]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            task = asyncio.create_task(sender.run(session), name="mock-webhooks")
            yield
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return run_sender


def build_app(
    *,
    latency_ms: float = 0.0,
    failure_rate: float = 0.0,
    webhook_url: str | None = None,
    webhook_secret: str = "mock-secret",
    seed: int | None = None,
) -> web.Application:
    """The mock provider as an aiohttp application."""
    if latency_ms < 0 or not 0 <= failure_rate <= 1:
        raise ValueError("latency_ms must be >= 0 and failure_rate between 0 and 1")
    webhooks = WebhookSender(webhook_url, webhook_secret) if webhook_url else None
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[STATE] = MockState(
        latency_ms=latency_ms, failure_rate=failure_rate, webhooks=webhooks, seed=seed
    )
    if webhooks is not None:
        app.cleanup_ctx.append(_webhook_context(webhooks))
    app.router.add_post("/v1/send", _send)
    app.router.add_get("/v1/stats", _stats)
    app.router.add_get("/v1/received", _received)
    app.router.add_get("/v1/samples", _samples)
    app.router.add_post("/v1/reset", _reset)
    app.router.add_post("/v1/config", _config)
    app.router.add_get("/health", _health)
    return app


async def serve(
    host: str,
    port: int,
    *,
    latency_ms: float = 0.0,
    failure_rate: float = 0.0,
    webhook_url: str | None = None,
    webhook_secret: str = "mock-secret",
    seed: int | None = None,
) -> None:
    """Serve the mock provider on ``host:port`` until cancelled."""
    app = build_app(
        latency_ms=latency_ms,
        failure_rate=failure_rate,
        webhook_url=webhook_url,
        webhook_secret=webhook_secret,
        seed=seed,
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        log.info("mock provider listening on http://%s:%s", host, port)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


async def _serve_until_terminated(coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro``, cancelling it (clean shutdown) on SIGTERM."""
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if task is not None:
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await coro


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Local mock e-mail provider.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=6100)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--failure-rate", type=float, default=0.0)
    parser.add_argument("--webhook-url", default=None)
    parser.add_argument("--webhook-secret", default="mock-secret")
    parser.add_argument("--seed", type=int, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: run the server until interrupted."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    coro = _serve_until_terminated(
        serve(
            args.host,
            args.port,
            latency_ms=args.latency_ms,
            failure_rate=args.failure_rate,
            webhook_url=args.webhook_url,
            webhook_secret=args.webhook_secret,
            seed=args.seed,
        )
    )
    try:
        import uvloop
    except ImportError:
        loop_factory = None
    else:
        loop_factory = uvloop.new_event_loop
    with (
        contextlib.suppress(KeyboardInterrupt),
        asyncio.Runner(loop_factory=loop_factory) as runner,
    ):
        runner.run(coro)


if __name__ == "__main__":
    main()
