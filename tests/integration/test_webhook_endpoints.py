"""Event webhooks to the customer on the real API, PostgreSQL and NATS: endpoints
(tenant-scoped, validated, the secret shown once and sealed), and the worker's loops
in-process (``results-pg`` and ``results-hooks`` on streams of each test's own) posting
to receivers on 127.0.0.1 that check every signature with ``standardwebhooks``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from api.app import create_app
from engine import results, webhook_deliveries
from engine.accounts import Sealer
from engine.config import Settings
from engine.intake.decoders import list_rows
from engine.intake.fields import parse_batch_fields
from engine.intake.store import create_batch
from engine.results import Columns
from engine.services import Services
from engine.tenants import create_key
from engine.topology import Redelivery
from engine.webhook_deliveries import Policy
from engine.webhook_outbox import Batching, Outbox
from engine.worker import Worker
from tests.integration.conftest import bearer

FIELDS = {"name": "hooks", "from_email": "news@shop.example", "subject": "Hi",
          "text": "Hello", "provider": "mock"}  # fmt: skip
FAST = Redelivery(max_deliveries=3, base_delay=0.2, max_delay=0.2)
QUICK = Policy(base_delay=0.3, max_delay=1.0, jitter=0.0, timeout=2.0, poll=0.1, lease=30.0)
BATCHING = Batching(max_events=4, max_seconds=0.3, sweep_seconds=0.3)
ENDPOINT = {"url": "https://hooks.example.com/batchsender", "event_types": ["sent", "delivered"]}


# --- fixtures and helpers -------------------------------------------------------------


@pytest.fixture
async def new_tenant(services: Services) -> AsyncIterator[Callable[[], Awaitable[tuple]]]:
    """Makes fresh tenants (id, key); their endpoints are deleted afterwards, so no later
    test's loops post to this one's receivers."""
    made: list[str] = []

    async def make() -> tuple[str, str]:
        tenant_id = f"t{uuid.uuid4().hex[:10]}"
        made.append(tenant_id)
        return tenant_id, await create_key(services.pool, tenant_id)

    yield make
    await services.pool.execute(
        "DELETE FROM webhook_endpoints WHERE tenant_id = ANY($1::text[])", made
    )


class Receiver:
    """A customer's endpoint on 127.0.0.1: checks each post's signature, records it, and
    answers ``answers`` in turn (then 200); ``hang`` makes it never answer."""

    def __init__(self) -> None:
        self.secret: str | None = None
        self.answers: list[int] = []
        self.hang = False
        self.posts: list[dict[str, Any]] = []
        self.refused: list[str] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            Webhook(self.secret or "whsec_").verify(body, dict(request.headers))
        except WebhookVerificationError as exc:
            self.refused.append(str(exc))
            return web.Response(status=400)
        self.posts.append({"id": request.headers["webhook-id"], "body": orjson.loads(body)})
        if self.hang:
            await asyncio.sleep(3600)
        return web.Response(status=self.answers.pop(0) if self.answers else 200)

    @property
    def events(self) -> list[dict[str, Any]]:
        return [event for post in self.posts for event in post["body"]["data"]]


@asynccontextmanager
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver()
    app = web.Application()
    app.router.add_post("/hook", found.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    found.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    try:
        yield found
    finally:
        await runner.cleanup()


async def dead_url() -> str:
    """A loopback URL where nothing listens (any more)."""
    async with receiver() as gone:
        return gone.url


@asynccontextmanager
async def worker_loops(
    services: Services, *, hooks: int = 1, results_pg: bool = True, policy: Policy = QUICK
) -> AsyncIterator[Worker]:
    """``results-pg`` and ``hooks`` copies of the customer webhooks loop (as many worker
    processes would run them), as ``Worker.run`` starts them but with quick policies."""
    worker = Worker(services.settings, redelivery=FAST)
    stream = services.topology.results_stream

    async def one_hooks_loop() -> None:
        async with worker._subscription(services.js, stream, "results-hooks") as psub:
            fetch = functools.partial(worker._fetch, psub)
            await webhook_deliveries.run(
                services, fetch, worker.stopping, batching=BATCHING, policy=policy, redelivery=FAST
            )

    tasks = [asyncio.create_task(one_hooks_loop()) for _ in range(hooks)]
    if results_pg:
        tasks.append(asyncio.create_task(worker._results_loop(services)))
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)


async def eventually(check: Callable[[], Any], what: str, within: float = 30) -> Any:
    """``check()`` (awaited when it is a coroutine) once it is truthy, polled until then."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {within}s waiting for {what}")


async def new_batch(services: Services, tenant_id: str, count: int) -> str:
    rows = [{"email": f"person{i}@example.com"} for i in range(1, count + 1)]
    created = await create_batch(services, tenant_id, parse_batch_fields(FIELDS), list_rows(rows))
    assert created.status == "queued", created
    return created.id


async def publish(
    services: Services, tenant_id: str | None, batch_id: str, seqs: Any, status: str = "sent"
) -> None:
    columns = Columns()
    for seq in seqs:
        columns.append(batch_id, seq, status, provider_message_id=f"pm-{seq}", domain="example.com")
    await results.publish(services, tenant_id, "mock", columns)


async def create_endpoint(
    client: TestClient, key: str, url: str, types: list[str], secret_to: Receiver | None = None
) -> dict[str, Any]:
    response = await client.post(
        "/api/webhook-endpoints", headers=bearer(key), json={"url": url, "event_types": types}
    )
    created = await response.json()
    assert response.status == 201, created
    if secret_to is not None:
        secret_to.secret = created["secret"]
    return created


async def delivery_log(client: TestClient, key: str, endpoint_id: str) -> list[dict[str, Any]]:
    response = await client.get(
        f"/api/webhook-endpoints/{endpoint_id}/deliveries", headers=bearer(key)
    )
    assert response.status == 200
    return (await response.json())["data"]


async def recipient_statuses(services: Services, batch_id: str) -> dict[int, str]:
    rows = await services.pool.fetch(
        "SELECT seq, status FROM recipient_statuses WHERE batch_id = $1", uuid.UUID(batch_id)
    )
    return {r["seq"]: r["status"] for r in rows}


# --- the resource ---------------------------------------------------------------------


async def test_an_endpoint_shows_its_secret_once_and_keeps_it_sealed(
    client: TestClient, new_tenant, services: Services
) -> None:
    _, key = await new_tenant()
    body = {**ENDPOINT, "event_types": ["delivered", "sent", "sent"], "description": "CRM"}
    response = await client.post("/api/webhook-endpoints", headers=bearer(key), json=body)
    created = await response.json()
    assert response.status == 201, created
    secret = created.pop("secret")
    assert secret.startswith("whsec_") and Webhook(secret)  # the Standard Webhooks format
    assert created["event_types"] == ["sent", "delivered"]  # once each, in one order
    assert created["secret_hint"] == "whsec_••••" + secret[-4:]
    assert created["enabled"] is True and created["description"] == "CRM"

    shown = await client.get(f"/api/webhook-endpoints/{created['id']}", headers=bearer(key))
    assert shown.status == 200 and await shown.json() == created
    listed = await (await client.get("/api/webhook-endpoints", headers=bearer(key))).json()
    assert listed == {"data": [created], "next_cursor": None}
    assert secret[6:] not in str(listed)

    sealed = await services.pool.fetchval(
        "SELECT secret FROM webhook_endpoints WHERE id = $1", uuid.UUID(created["id"])
    )
    assert secret.encode() not in bytes(sealed)
    assert Sealer(services.settings.credentials_keys).open(sealed) == secret

    path = f"/api/webhook-endpoints/{created['id']}"
    assert (await client.delete(path, headers=bearer(key))).status == 204
    assert (await client.get(path, headers=bearer(key))).status == 404
    assert (await client.delete(path, headers=bearer(key))).status == 404


async def test_another_tenant_sees_none_of_them(client: TestClient, new_tenant) -> None:
    _, key = await new_tenant()
    _, other = await new_tenant()
    created = await create_endpoint(client, key, ENDPOINT["url"], ["sent"])
    base = f"/api/webhook-endpoints/{created['id']}"
    for method, path in (
        ("GET", base),
        ("DELETE", base),
        ("GET", f"{base}/deliveries"),
        ("POST", f"{base}/deliveries/{uuid.uuid4()}/replay"),
    ):
        response = await client.request(method, path, headers=bearer(other))
        assert response.status == 404, (method, path)
        assert (await response.json())["error"]["code"] == "webhook_endpoint_not_found"
    listed = await (await client.get("/api/webhook-endpoints", headers=bearer(other))).json()
    assert listed["data"] == []
    assert (await client.get(base, headers=bearer(key))).status == 200  # still there
    assert (
        await client.get("/api/webhook-endpoints/not-a-uuid", headers=bearer(key))
    ).status == 404


@pytest.mark.parametrize(
    "change, field",
    [
        ({"url": None}, "url"),  # None: left out
        ({"url": "ftp://hooks.example.com/x"}, "url"),
        ({"url": "https://user:secret@hooks.example.com/"}, "url"),
        ({"url": "hooks.example.com/no-scheme"}, "url"),
        ({"url": "https://hooks.example.com/\x00"}, "url"),
        ({"url": 42}, "url"),
        ({"event_types": None}, "event_types"),
        ({"event_types": []}, "event_types"),
        ({"event_types": "sent"}, "event_types"),
        ({"event_types": ["sent", "exploded"]}, "event_types"),
        ({"event_types": [{"sent": 1}]}, "event_types"),
        ({"description": "x" * 501}, "description"),
        ({"description": 5}, "description"),
        ({"secret": "whsec_mine"}, "secret"),  # the secret is made here, not chosen
    ],
)  # fmt: skip
async def test_bad_input_is_refused_naming_the_field(
    client: TestClient, new_tenant, change: dict, field: str
) -> None:
    _, key = await new_tenant()
    body = {name: value for name, value in {**ENDPOINT, **change}.items() if value is not None}
    response = await client.post("/api/webhook-endpoints", headers=bearer(key), json=body)
    error = await response.json()
    assert response.status == 422, error
    assert error["error"]["code"] == "invalid_webhook_endpoint"
    assert error["error"]["details"] == {"field": field}
    assert error["error"]["message"].startswith(f"{field}: ")
    listed = await (await client.get("/api/webhook-endpoints", headers=bearer(key))).json()
    assert listed["data"] == []


async def test_without_the_development_setting_only_public_https_urls_are_taken(
    migrated: Settings, new_tenant
) -> None:
    """SSRF: what the API refuses in prod (WEBHOOK_ALLOW_PRIVATE_URLS off)."""
    settings = dataclasses.replace(migrated, webhook_allow_private_urls=False)
    _, key = await new_tenant()
    async with TestClient(TestServer(create_app(settings), host="127.0.0.1")) as strict:
        for url in (
            "http://hooks.example.com/",
            "https://127.0.0.1/hook",
            "https://localhost:8443/hook",
            "https://10.0.0.7/hook",
            "https://169.254.169.254/latest/meta-data/",
            "https://[::1]/hook",
            "https://[::ffff:192.168.0.1]/hook",
        ):
            response = await strict.post(
                "/api/webhook-endpoints", headers=bearer(key), json={**ENDPOINT, "url": url}
            )
            error = await response.json()
            assert response.status == 422, (url, error)
            assert error["error"]["details"] == {"field": "url"}, url
        response = await strict.post("/api/webhook-endpoints", headers=bearer(key), json=ENDPOINT)
        assert response.status == 201


async def test_paging_and_the_limit_per_tenant(client: TestClient, new_tenant) -> None:
    from engine.webhook_endpoints import MAX_ENDPOINTS

    _, key = await new_tenant()
    made = [(await create_endpoint(client, key, ENDPOINT["url"], ["sent"]))["id"]
            for _ in range(MAX_ENDPOINTS)]  # fmt: skip
    response = await client.post("/api/webhook-endpoints", headers=bearer(key), json=ENDPOINT)
    assert response.status == 409
    assert (await response.json())["error"]["code"] == "too_many_webhook_endpoints"
    seen: list[str] = []
    cursor = None
    while True:
        query = "?limit=7" + (f"&cursor={cursor}" if cursor else "")
        page = await (
            await client.get(f"/api/webhook-endpoints{query}", headers=bearer(key))
        ).json()
        seen += [e["id"] for e in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == made  # oldest first, each once
    for query in ("?limit=0", "?limit=101", "?cursor=nonsense"):
        response = await client.get(f"/api/webhook-endpoints{query}", headers=bearer(key))
        assert response.status == 422, query


# --- delivery ---------------------------------------------------------------------------


async def test_events_are_posted_signed_and_in_batches(
    client: TestClient, new_tenant, own: Services
) -> None:
    tenant_id, key = await new_tenant()
    batch_id = await new_batch(own, tenant_id, 8)
    async with receiver() as hook:
        endpoint = await create_endpoint(
            client, key, hook.url, ["sent", "delivered", "bounced"], secret_to=hook
        )
        await publish(own, tenant_id, batch_id, [1, 2, 3])
        await publish(own, tenant_id, batch_id, [4], status="failed")  # not subscribed
        await publish(own, tenant_id, batch_id, [5, 6])
        await publish(own, None, batch_id, [1], status="delivered")  # a provider event
        async with worker_loops(own, results_pg=False):
            await eventually(lambda: len(hook.events) >= 6, "6 events")
            log = await eventually(
                lambda: delivery_log(client, key, endpoint["id"]), "the delivery log"
            )

    assert hook.refused == []  # every signature verified
    assert all(post["body"]["type"] == "batch.events" for post in hook.posts)
    sizes = [len(post["body"]["data"]) for post in hook.posts]
    assert sum(sizes) == 6 and max(sizes) <= BATCHING.max_events
    # Events of several results messages share a post (1-3 sent, 5-6 sent, 1 delivered).
    groups = [
        {(e["type"], e["recipient"] > 3) for e in post["body"]["data"]} for post in hook.posts
    ]
    assert any(len(group) > 1 for group in groups), groups
    got = sorted((e["type"], e["recipient"]) for e in hook.events)
    assert got == [("delivered", 1)] + [("sent", s) for s in (1, 2, 3, 5, 6)]
    first = next(e for e in hook.events if e["recipient"] == 2)
    assert first == {
        "type": "sent",
        "batch_id": batch_id,
        "recipient": 2,
        "email": "person2@example.com",
        "provider": "mock",
        "provider_message_id": "pm-2",
        "timestamp": first["timestamp"],
    }
    # The log: one delivery per post, under the webhook-id the receiver saw.
    assert sorted(d["id"] for d in log) == sorted(post["id"] for post in hook.posts)
    assert all(d["status"] == "delivered" and d["attempts"] == 1 for d in log)
    assert all(d["last_status_code"] == 200 and d["delivered_at"] for d in log)
    assert sorted(d["event_count"] for d in log) == sorted(sizes)


async def test_a_failing_receiver_gets_retries_with_backoff_then_success(
    client: TestClient, new_tenant, own: Services
) -> None:
    tenant_id, key = await new_tenant()
    batch_id = await new_batch(own, tenant_id, 2)
    async with receiver() as hook:
        hook.answers = [500, 503, 404]
        endpoint = await create_endpoint(client, key, hook.url, ["sent"], secret_to=hook)
        await publish(own, tenant_id, batch_id, [1, 2])
        async with worker_loops(own, results_pg=False):

            async def retried() -> dict | None:
                log = await delivery_log(client, key, endpoint["id"])
                return (
                    log[0] if log and log[0]["status"] == "pending" and log[0]["attempts"] else None
                )

            waiting = await eventually(retried, "a failed attempt")
            code = waiting["last_status_code"]
            assert code in (500, 503, 404) and waiting["last_error"] == f"HTTP {code}"
            # backed off by the schedule (no jitter here): base_delay * 2 ** (attempts - 1)
            gap = datetime.fromisoformat(waiting["next_attempt_at"]) - datetime.fromisoformat(
                waiting["last_attempt_at"]
            )
            expected = QUICK.delay(waiting["attempts"])
            assert expected * 0.9 <= gap.total_seconds() <= expected + 0.5

            async def delivered() -> dict | None:
                log = await delivery_log(client, key, endpoint["id"])
                return log[0] if log and log[0]["status"] == "delivered" else None

            done = await eventually(delivered, "the delivery after its retries")
    assert done["attempts"] == 4 and done["last_status_code"] == 200
    assert len(hook.posts) == 4 and len({post["id"] for post in hook.posts}) == 1
    assert all(post["body"] == hook.posts[0]["body"] for post in hook.posts)
    assert hook.refused == []


async def test_a_delivery_past_its_retry_budget_fails(
    client: TestClient, new_tenant, own: Services
) -> None:
    tenant_id, key = await new_tenant()
    batch_id = await new_batch(own, tenant_id, 1)
    async with receiver() as hook:
        hook.answers = [500] * 10
        endpoint = await create_endpoint(client, key, hook.url, ["sent"], secret_to=hook)
        await publish(own, tenant_id, batch_id, [1])
        three = dataclasses.replace(QUICK, max_attempts=3)
        async with worker_loops(own, results_pg=False, policy=three):

            async def failed() -> dict | None:
                log = await delivery_log(client, key, endpoint["id"])
                return log[0] if log and log[0]["status"] == "failed" else None

            done = await eventually(failed, "the delivery given up")
    assert done["attempts"] == 3 and done["last_status_code"] == 500
    assert done["next_attempt_at"] is None and len(hook.posts) == 3


async def test_410_disables_the_endpoint(client: TestClient, new_tenant, own: Services) -> None:
    tenant_id, key = await new_tenant()
    batch_id = await new_batch(own, tenant_id, 3)
    async with receiver() as hook:
        hook.answers = [410]
        endpoint = await create_endpoint(client, key, hook.url, ["sent"], secret_to=hook)
        path = f"/api/webhook-endpoints/{endpoint['id']}"
        await publish(own, tenant_id, batch_id, [1])
        async with worker_loops(own, results_pg=False):

            async def disabled() -> dict | None:
                shown = await (await client.get(path, headers=bearer(key))).json()
                return shown if not shown["enabled"] else None

            shown = await eventually(disabled, "the endpoint disabled")
            assert shown["disabled_at"] and "410" in shown["disabled_reason"]
            # Events after that are not written for it.
            await publish(own, tenant_id, batch_id, [2, 3])
            await eventually(lambda: consumer_idle(own, "results-hooks"), "results-hooks idle")
        log = await delivery_log(client, key, endpoint["id"])
        assert [(d["status"], d["last_status_code"]) for d in log] == [("failed", 410)]
        response = await client.post(
            f"{path}/deliveries/{log[0]['id']}/replay", headers=bearer(key)
        )
        assert response.status == 409
        assert (await response.json())["error"]["code"] == "webhook_endpoint_disabled"
    assert len(hook.posts) == 1


async def consumer_idle(services: Services, consumer: str) -> bool:
    info = await services.js.consumer_info(services.topology.results_stream, consumer)
    return info.num_pending == 0 and info.num_ack_pending == 0


async def test_replay_sends_a_delivery_again(client: TestClient, new_tenant, own: Services) -> None:
    tenant_id, key = await new_tenant()
    batch_id = await new_batch(own, tenant_id, 2)
    async with receiver() as hook:
        endpoint = await create_endpoint(client, key, hook.url, ["sent"], secret_to=hook)
        base = f"/api/webhook-endpoints/{endpoint['id']}/deliveries"
        await publish(own, tenant_id, batch_id, [1, 2])
        async with worker_loops(own, results_pg=False):

            async def delivered() -> dict | None:
                log = await delivery_log(client, key, endpoint["id"])
                return log[0] if log and log[0]["status"] == "delivered" else None

            first = await eventually(delivered, "the first post recorded")
            assert len(hook.posts) == 1
            response = await client.post(f"{base}/{first['id']}/replay", headers=bearer(key))
            replayed = await response.json()
            assert response.status == 202, replayed
            assert replayed["id"] == first["id"] and replayed["status"] == "pending"
            assert replayed["replayed_at"] is not None
            await eventually(lambda: len(hook.posts) == 2, "the replayed post")
            again = await eventually(delivered, "the replay recorded")
        for missing in (uuid.uuid4(), "not-a-uuid"):
            response = await client.post(f"{base}/{missing}/replay", headers=bearer(key))
            assert response.status == 404
            assert (await response.json())["error"]["code"] == "webhook_delivery_not_found"
    assert hook.posts[1] == hook.posts[0]  # same webhook-id, same body
    assert again["attempts"] == 1 and again["replayed_at"] and again["delivered_at"]
    assert len(await delivery_log(client, key, endpoint["id"])) == 1
    response = await client.get(f"{base}?status=bogus", headers=bearer(key))
    assert response.status == 422
    pending = await client.get(f"{base}?status=pending", headers=bearer(key))
    assert (await pending.json())["data"] == []


async def test_batch_completed_is_posted_once_per_batch(
    client: TestClient, new_tenant, own: Services
) -> None:
    tenant_id, key = await new_tenant()
    async with receiver() as hook:
        endpoint = await create_endpoint(client, key, hook.url, ["batch.completed"], secret_to=hook)
        batch_id = await new_batch(own, tenant_id, 3)
        await publish(own, tenant_id, batch_id, [1, 2])
        await publish(own, tenant_id, batch_id, [3], status="failed")
        # two copies of the loop: two processes sweeping for completed batches at once
        async with worker_loops(own, hooks=2):
            completed = await eventually(
                lambda: [e for e in hook.events if e["batch_id"] == batch_id], "batch.completed"
            )
            # More sweeps (a fresh outbox looks back a whole day) add nothing, and the two
            # loops go on sweeping for a while.
            assert await Outbox(own, BATCHING).sweep_completions() == 0
            await asyncio.sleep(5 * BATCHING.sweep_seconds)
        assert await Outbox(own, BATCHING).sweep_completions() == 0
    assert [e["type"] for e in hook.events] == ["batch.completed"]  # no recipient events
    (event,) = completed
    assert event["status"] == "completed" and event["total_recipients"] == 3
    assert event["counts"] == {"sent": 2, "failed": 1} and event["name"] == "hooks"
    rows = await own.pool.fetchval(
        "SELECT count(*) FROM webhook_batch_completions WHERE endpoint_id = $1",
        uuid.UUID(endpoint["id"]),
    )
    assert rows == 1


async def test_a_stopped_or_hanging_receiver_holds_up_neither_sending_nor_other_endpoints(
    client: TestClient, new_tenant, own: Services
) -> None:
    (dead_tenant, dead_key), (slow_tenant, slow_key), (ok_tenant, ok_key) = [
        await new_tenant() for _ in range(3)
    ]
    batches = {t: await new_batch(own, t, 50) for t in (dead_tenant, slow_tenant, ok_tenant)}
    async with receiver() as slow, receiver() as ok:
        slow.hang = True
        dead = await create_endpoint(client, dead_key, await dead_url(), ["sent"])
        await create_endpoint(client, slow_key, slow.url, ["sent"], slow)
        await create_endpoint(client, ok_key, ok.url, ["sent"], ok)
        for tenant_id, batch_id in batches.items():
            for first in range(1, 51, 10):
                await publish(own, tenant_id, batch_id, range(first, first + 10))
        async with worker_loops(own):
            # the status writer applies every result while two receivers do not answer
            for batch_id in batches.values():
                await eventually(
                    lambda b=batch_id: _all_sent(own, b), "results applied by results-pg"
                )
            await eventually(lambda: len(ok.events) == 50, "the healthy endpoint's events")

            async def dead_retried() -> list | None:
                log = await delivery_log(client, dead_key, dead["id"])
                tried = [d for d in log if d["attempts"] >= 1]
                return log if log and len(tried) == len(log) else None

            log = await eventually(dead_retried, "attempts at the stopped receiver")
            assert all(d["status"] == "pending" and d["last_error"] for d in log)
            assert any("refused" in d["last_error"] for d in log)
            assert sum(d["event_count"] for d in log) == 50
            assert slow.posts  # it was posted to, and has not answered
    assert ok.refused == [] and len({e["recipient"] for e in ok.events}) == 50


async def _all_sent(services: Services, batch_id: str) -> bool:
    statuses = await recipient_statuses(services, batch_id)
    return len(statuses) == 50 and set(statuses.values()) == {"sent"}


async def test_a_results_message_redelivered_after_its_deliveries_were_written_adds_none(
    client: TestClient, new_tenant, own: Services
) -> None:
    """Exactly once into the outbox: the crash between writing a flush and acknowledging
    its messages, played out by hand."""
    tenant_id, key = await new_tenant()
    batch_id = await new_batch(own, tenant_id, 3)
    endpoint = await create_endpoint(client, key, ENDPOINT["url"], ["sent"])
    await publish(own, tenant_id, batch_id, [1, 2, 3])
    psub = await own.js.pull_subscribe_bind("results-hooks", own.topology.results_stream)
    outbox = Outbox(own, BATCHING, FAST)
    await outbox.add(await psub.fetch(1, timeout=5))
    assert await outbox._write(list(outbox._buffer)) == 1  # written, never acknowledged
    for item in outbox._buffer:
        await item.msg.nak()
    outbox._buffer.clear()

    again = await psub.fetch(1, timeout=5)
    assert again[0].metadata.num_delivered == 2
    await outbox.add(again)
    assert await outbox.flush()
    await eventually(lambda: consumer_idle(own, "results-hooks"), "acknowledged this time")
    log = await delivery_log(client, key, endpoint["id"])
    assert [d["event_count"] for d in log] == [3]
    await psub.unsubscribe()


async def test_concurrent_sweeps_write_one_batch_completed(
    client: TestClient, new_tenant, own: Services
) -> None:
    tenant_id, key = await new_tenant()
    endpoint = await create_endpoint(client, key, ENDPOINT["url"], ["batch.completed"])
    batch_id = await new_batch(own, tenant_id, 2)
    columns = Columns()
    for seq in (1, 2):
        columns.append(batch_id, seq, "sent")
    async with own.pool.acquire() as conn:
        assert await results.apply_results(conn, columns) == [(batch_id, "completed")]
    written = await asyncio.gather(*(Outbox(own, BATCHING).sweep_completions() for _ in range(6)))
    assert sum(written) == 1
    (delivery,) = await delivery_log(client, key, endpoint["id"])
    assert delivery["event_count"] == 1 and delivery["status"] == "pending"


async def test_the_worker_runs_the_webhooks_loop(
    client: TestClient, new_tenant, own: Services
) -> None:
    """``Worker._webhooks_loop`` as ``Worker.run`` starts it, with the default policies."""
    tenant_id, key = await new_tenant()
    batch_id = await new_batch(own, tenant_id, 2)
    async with receiver() as hook:
        await create_endpoint(client, key, hook.url, ["sent"], secret_to=hook)
        await publish(own, tenant_id, batch_id, [1, 2])
        worker = Worker(own.settings, redelivery=FAST)
        loop = asyncio.create_task(worker._webhooks_loop(own))
        try:
            await eventually(lambda: len(hook.events) == 2, "the events")
        finally:
            worker.stop()
            await asyncio.wait_for(loop, 30)
    assert hook.refused == [] and len(hook.posts) == 1
