"""Locust load tests of BatchSender: REST batch creation, direct NATS publishing, provider
webhooks. Commands, shapes and what each user does: loadtests/README.md.

    ./setup-dev.sh        # the stack, with its API key in .dev/api-key
    locust -f loadtests/locustfile.py --headless -u 20 -r 5 -t 60s --host http://127.0.0.1:6001

Users (LOADTEST_USERS, comma-separated; default ``rest``):

- ``rest``: ``RestBatchUser`` creates batches of 1 to 100,000 recipients to the mock
  provider (JSON up to 1,000, streamed NDJSON above), reads them back and lists them.
- ``nats``: ``NatsPublisherUser`` publishes send requests straight to JetStream
  (``{NATS_PREFIX}.intake.{tenant}``) through the project's own publisher helper
  (engine.publisher), as an internal service does; one NATS message holds at most about
  10,000 recipients (1 MB).
- ``webhooks``: ``MockWebhookUser`` posts signed mock-provider webhooks (opened / clicked
  events for the recipients of a batch it creates) to ``/webhooks/mock``.

Settings come from the engine's own configuration (engine.config: NATS_URL, NATS_PREFIX,
MOCK_WEBHOOK_SECRET, from the environment or .env.<BATCHSENDER_ENV>); the API key from
BATCHSENDER_API_KEY or .dev/api-key; the tenant for NATS from LOADTEST_TENANT.

Loopback only: the run refuses a target (``--host``, NATS_URL) or a master bind address that
is not on this machine. Always bounded: ``-t`` or a shape (loadtests/shapes/) stops it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import os
import random
import time
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import gevent
import orjson
from gevent import monkey
from locust import HttpUser, User, between, events, task
from locust.runners import MasterRunner

from engine.config import load_settings
from engine.publisher import BatchRequest, Publisher, Recipient
from providers.mock import signed_headers

T = TypeVar("T")
USERS = {name.strip() for name in os.environ.get("LOADTEST_USERS", "rest").split(",")}
FIXED_SIZE = int(os.environ.get("LOADTEST_RECIPIENTS", "0"))  # 0: the size mix below
# Batch sizes of the REST user and their weights: mostly small, a few very large.
REST_SIZES = {1: 30, 10: 30, 100: 25, 1_000: 10, 10_000: 4, 100_000: 1}
# The NATS user's sizes: one message is at most 1 MB (about 10,000 recipients).
NATS_SIZES = {1: 30, 10: 30, 100: 25, 1_000: 12, 5_000: 3}
JSON_LIMIT = 1_000  # larger batches are streamed as NDJSON
WEBHOOK_EVENTS_PER_POST = 100
_tags = itertools.count()


def _key() -> str:
    key = os.environ.get("BATCHSENDER_API_KEY")
    if key:
        return key
    path = Path(__file__).resolve().parents[1] / ".dev" / "api-key"
    return path.read_text().strip()


def _size(weights: dict[int, int]) -> int:
    if FIXED_SIZE:
        return FIXED_SIZE
    return random.choices(list(weights), weights=list(weights.values()))[0]


def _recipients(tag: str, count: int) -> list[dict[str, Any]]:
    return [{"email": f"l{tag}.{i}@example.com", "name": f"L{i}"} for i in range(count)]


def _fields(tag: str) -> dict[str, Any]:
    return {
        "name": f"locust {tag}",
        "from_email": "load@example.com",
        "subject": "Hi {{ name }}",
        "text": "Load test {{ name }}",
        "provider": "mock",
    }


# --- loopback only ---------------------------------------------------------------------


def _loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@events.init.add_listener
def _only_this_machine(environment, **_kwargs) -> None:
    """Refuse any target or bind address that is not on this machine."""
    problems = []
    if environment.host and not _loopback(urlsplit(environment.host).hostname):
        problems.append(f"--host {environment.host} is not a loopback address")
    if "nats" in USERS:
        nats_url = load_settings().nats_url
        if not _loopback(urlsplit(nats_url).hostname):
            problems.append(f"NATS_URL {nats_url} is not a loopback address")
    options = environment.parsed_options
    if isinstance(environment.runner, MasterRunner) and options is not None:
        bind = options.master_bind_host
        if not _loopback(bind):
            problems.append(f"--master-bind-host {bind!r}: bind the master to 127.0.0.1")
    if problems:
        raise SystemExit("loadtests: refusing to run: " + "; ".join(problems))


# --- REST ------------------------------------------------------------------------------


class RestBatchUser(HttpUser):
    """Creates batches over REST, reads them back, lists them."""

    abstract = "rest" not in USERS
    wait_time = between(0.1, 0.5)

    def on_start(self) -> None:
        self.client.headers["Authorization"] = f"Bearer {_key()}"
        self.batches: list[str] = []

    @task(2)
    def create_batch(self) -> None:
        tag = f"{uuid.uuid4().hex[:8]}{next(_tags)}"
        count = _size(REST_SIZES)
        name = f"/api/batches [POST{_bucket(count)}]"
        if count <= JSON_LIMIT:
            body = orjson.dumps({**_fields(tag), "recipients": _recipients(tag, count)})
            kind = "application/json"
        else:  # the batch fields as the first line, then one recipient per line
            lines = [orjson.dumps(_fields(tag))]
            lines += [orjson.dumps(r) for r in _recipients(tag, count)]
            body = b"\n".join(lines) + b"\n"
            kind = "application/x-ndjson"
        with self.client.post("/api/batches", data=body, catch_response=True, name=name,
                              headers={"Content-Type": kind}) as response:  # fmt: skip
            if response.status_code == 201:
                self.batches = (self.batches + [response.json()["id"]])[-20:]
            else:
                response.failure(f"{response.status_code}: {response.text[:200]}")

    @task(4)
    def read_batch(self) -> None:
        if self.batches:
            self.client.get(f"/api/batches/{random.choice(self.batches)}", name="/api/batches/{id}")

    @task(1)
    def list_batches(self) -> None:
        self.client.get("/api/batches?limit=20", name="/api/batches [GET]")


def _bucket(count: int) -> str:
    """A label per batch size, so each size has its own line in the statistics (none with
    LOADTEST_RECIPIENTS: one size)."""
    return "" if FIXED_SIZE else f" {count:,}"


# --- NATS ------------------------------------------------------------------------------


class _AsyncioThread:
    """One asyncio event loop in a real OS thread for every NATS user of this process:
    nats-py is asyncio, Locust is gevent. A greenlet hands a coroutine over and waits for
    its result in gevent's thread pool, so other greenlets run meanwhile."""

    _lock = monkey.get_original("threading", "Lock")()
    _loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def loop(cls) -> asyncio.AbstractEventLoop:
        with cls._lock:
            if cls._loop is None:
                loop = asyncio.new_event_loop()
                thread_class = monkey.get_original("threading", "Thread")
                thread_class(target=loop.run_forever, name="loadtests-asyncio", daemon=True).start()
                cls._loop = loop
            return cls._loop

    @classmethod
    def run(cls, coroutine: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        future = asyncio.run_coroutine_threadsafe(coroutine, cls.loop())
        return gevent.get_hub().threadpool.spawn(future.result, timeout).get()


class NatsPublisherUser(User):
    """Publishes send requests to JetStream with engine.publisher.Publisher, the helper
    internal services use; each publish waits for JetStream's ack (what is timed)."""

    abstract = "nats" not in USERS
    wait_time = between(0.05, 0.2)

    def on_start(self) -> None:
        settings = load_settings()
        self.tenant = os.environ.get("LOADTEST_TENANT", "loadtest")
        self.publisher = _AsyncioThread.run(
            Publisher.connect(settings.nats_url, settings.nats_prefix)
        )

    def on_stop(self) -> None:
        _AsyncioThread.run(self.publisher.close())

    @task
    def publish_batch(self) -> None:
        tag = f"{uuid.uuid4().hex[:8]}{next(_tags)}"
        count = _size(NATS_SIZES)
        request = BatchRequest(
            **_fields(tag),
            recipients=[Recipient(r["email"], r["name"]) for r in _recipients(tag, count)],
        )
        started = time.perf_counter()
        exception: BaseException | None = None
        size = 0
        try:
            ack = _AsyncioThread.run(
                self.publisher.publish(self.tenant, request, msg_id=f"locust-{tag}")
            )
            size = count
            if ack.duplicate:
                exception = RuntimeError("JetStream reported a duplicate for a new id")
        except Exception as exc:  # noqa: BLE001 - reported to Locust as the request's failure
            exception = exc
        self.environment.events.request.fire(
            request_type="NATS",
            name=f"{self.publisher.prefix}.intake.{{tenant}} [publish{_bucket(count)}]",
            response_time=(time.perf_counter() - started) * 1000,
            response_length=size,
            exception=exception,
            context={},
        )


# --- webhooks --------------------------------------------------------------------------


class MockWebhookUser(HttpUser):
    """Posts signed mock-provider webhooks: opened and clicked events for the recipients
    of a batch of its own (their refs are ``<batch id>:<seq>``), signed as the mock provider
    signs them (providers.mock.signed_headers, MOCK_WEBHOOK_SECRET)."""

    abstract = "webhooks" not in USERS
    wait_time = between(0.05, 0.2)
    recipients = 1_000

    def on_start(self) -> None:
        self.secret = load_settings().mock_webhook_secret
        tag = f"hooks{uuid.uuid4().hex[:8]}"
        body = orjson.dumps({**_fields(tag), "recipients": _recipients(tag, self.recipients)})
        response = self.client.post("/api/batches", data=body, name="/api/batches [POST webhooks setup]",
                                    headers={"Authorization": f"Bearer {_key()}",
                                             "Content-Type": "application/json"})  # fmt: skip
        response.raise_for_status()
        self.batch_id = response.json()["id"]

    @task
    def post_events(self) -> None:
        now = time.time()
        events_ = [
            {
                "event_id": f"locust-{uuid.uuid4().hex}",
                "event": random.choice(("opened", "clicked")),
                "ref": f"{self.batch_id}:{random.randint(1, self.recipients)}",
                "timestamp": now,
            }
            for _ in range(WEBHOOK_EVENTS_PER_POST)
        ]
        body = orjson.dumps(events_)
        headers = {"Content-Type": "application/json", **signed_headers(body, self.secret)}
        with self.client.post("/webhooks/mock", data=body, headers=headers, catch_response=True,
                              name="/webhooks/mock [POST 100 events]") as response:  # fmt: skip
            if response.status_code >= 300:
                response.failure(f"{response.status_code}: {response.text[:200]}")
