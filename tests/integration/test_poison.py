"""Hostile input that reaches the workers (issue 8): values that would inject headers
(defect 1), and messages that cannot be processed, which must end with a dead letter and
never block the others (defect 4): template errors at send time, poison results
messages, a chunk that fails on every delivery, a malformed chunk.

The worker's own loops run here in-process on the real NATS, PostgreSQL, Dragonfly and
ClickHouse, on streams and keys of their own (so no other test's messages are taken),
with the mock provider server on a loopback port.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from aiohttp import web

from devkit.mock_provider import build_app
from engine.clickhouse import ClickHouse
from engine.event_writer import EventWriter
from engine.intake.decoders import list_rows
from engine.intake.fields import parse_batch_fields
from engine.intake.store import create_batch
from engine.results import Columns, apply_messages, encode
from engine.sender import Sender
from engine.services import Services
from providers.base import Message, SendResult
from providers.mock import MockProvider
from tests.worker_support import (
    FAST,
    batch_status,
    dead_letters,
    eventually,
    recipients,
    worker_loops,
)

FIELDS = {"name": "poison", "from_email": "news@shop.example", "subject": "Hi {{ name }}",
          "text": "Hello", "provider": "mock"}  # fmt: skip


@asynccontextmanager
async def mock_server() -> AsyncIterator[str]:
    runner = web.AppRunner(build_app(), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def new_batch(services: Services, tenant_id: str, rows: list[dict], **fields: Any) -> str:
    spec = parse_batch_fields(FIELDS | fields)
    created = await create_batch(services, tenant_id, spec, list_rows(rows))
    assert created.status == "queued", created
    return created.id


async def nothing_waits(services: Services, stream: str, consumer: str) -> bool:
    info = await services.js.consumer_info(stream, consumer)
    return info.num_pending == 0 and info.num_ack_pending == 0


@asynccontextmanager
async def capturing_provider() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """A provider endpoint that accepts every message and keeps what it was sent."""
    wire: list[dict[str, Any]] = []

    async def send(request: web.Request) -> web.Response:
        messages = orjson.loads(await request.read())["messages"]
        wire.extend(messages)
        answer = [{"ref": m["ref"], "status": "accepted", "id": m["ref"]} for m in messages]
        return web.Response(body=orjson.dumps({"results": answer}), content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/send", send)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", wire
    finally:
        await runner.cleanup()


async def send_until_completed(own: Services, batch_id: str, url: str) -> None:
    """Run the worker's loops, sending to the mock-protocol provider at ``url``, until the
    batch is completed."""
    provider = MockProvider(url)
    try:
        async with worker_loops(own, Sender(own, {"mock": provider})):

            async def completed() -> bool:
                return await batch_status(own, batch_id) == "completed"

            await eventually(completed, 60, "the batch completed")
    finally:
        await provider.close()


async def test_values_that_would_inject_headers_reach_the_provider_as_one_line(
    own: Services, tenant: tuple[str, str]
) -> None:
    """Defect 1 on the mock provider's path, from intake to the wire: an encoded CR LF in a
    variable (the subject's ``{{ first }}``), in the recipient's name and in the sender's
    name arrives as text on one line; the body keeps its line breaks."""
    tenant_id, _ = tenant
    injection = "=?utf-8?q?Ann=0D=0AX-Injected:_x?="
    rows = [{"email": "ann@example.com", "name": f"Ann {injection}", "vars": {"first": injection}},
            {"email": "bob@example.com", "name": "Bob", "vars": {"first": "Bob"}}]  # fmt: skip
    batch_id = await new_batch(own, tenant_id, rows, subject="Hi {{ first }}",
                               text="Dear {{ first }}\nbye", from_name=f"Shop {injection}")  # fmt: skip
    async with capturing_provider() as (url, wire):
        await send_until_completed(own, batch_id, url)

    sent = {m["to"]: m for m in wire}
    ann = sent["ann@example.com"]
    assert ann["subject"] == "Hi Ann X-Injected: x"
    assert ann["to_name"] == "Ann Ann X-Injected: x"
    assert ann["from_name"] == "Shop Ann X-Injected: x"
    assert ann["text"] == f"Dear {injection}\nbye"
    assert (sent["bob@example.com"]["subject"], sent["bob@example.com"]["to_name"]) == (
        "Hi Bob",
        "Bob",
    )
    for message in wire:
        for value in (message["subject"], message["to_name"], message["from_name"],
                      *message["headers"].values()):  # fmt: skip
            assert value.isprintable() and "=?" not in value


async def test_template_errors_fail_their_recipients_and_the_batch_completes(
    own: Services, tenant: tuple[str, str]
) -> None:
    """``{{ 100 // d }}`` with d = 0, ``{{ x + 1 }}`` with text in x, and a sandbox refusal,
    for a few recipients past the first ten (those intake renders itself): exactly those
    recipients are ``failed`` with the reason and dead-lettered; the others are sent."""
    tenant_id, _ = tenant
    text = "{{ 100 // d }} {{ x + 1 }}{% if bad %}{{ name.__class__ }}{% endif %}"
    broken = {20: ("d", 0), 45: ("x", "text"), 77: ("bad", True), 130: ("d", 0), 150: ("x", "y")}
    rows = []
    for i in range(1, 151):
        values: dict[str, Any] = {"d": 1, "x": i, "bad": False}
        if i in broken:
            key, value = broken[i]
            values[key] = value
        rows.append({"email": f"r{i}@example.com", "name": f"R{i}", "vars": values})
    batch_id = await new_batch(own, tenant_id, rows, text=text)

    async with mock_server() as url:
        await send_until_completed(own, batch_id, url)

    found = await recipients(own, batch_id)
    failed = {email: r for email, r in found.items() if r["status"] == "failed"}
    assert sorted(failed) == sorted(f"r{i}@example.com" for i in broken)
    assert {r["status"] for e, r in found.items() if e not in failed} == {"sent"}
    errors = {int(e[1:].split("@")[0]): r["error"] for e, r in failed.items()}
    for seq in (20, 130):
        assert "ZeroDivisionError" in errors[seq]
    for seq in (45, 150):
        assert "TypeError" in errors[seq]
    assert "SecurityError" in errors[77]
    assert all(error.startswith("message could not be built") for error in errors.values())

    entries = [e for e in await dead_letters(own) if e.get("batch_id") == batch_id]
    assert {e["kind"] for e in entries} == {"send"}
    assert all(e["tenant_id"] == tenant_id and e["reason"] for e in entries)
    dead = {f["seq"]: f["error"] for e in entries for f in e["failed"]}
    assert {found[f"r{i}@example.com"]["seq"] for i in broken} == set(dead)
    assert await nothing_waits(own, own.topology.send_stream, "send")


async def test_poison_results_messages_are_dead_lettered_and_their_flush_applied(
    own: Services, tenant: tuple[str, str]
) -> None:
    """Results PostgreSQL refuses (a seq outside int4, a batch id that is no uuid, a seq of
    the wrong type) and a message that is no results message at all, in one flush with
    good results: the good ones are applied, each bad one is dead-lettered with its
    reason, and nothing is left to be redelivered. The ClickHouse writer does the same."""
    tenant_id, _ = tenant
    batch_id = await new_batch(own, tenant_id, [{"email": f"p{i}@example.com"} for i in range(4)])

    def results(*rows: tuple[Any, Any, str]) -> bytes:
        columns = Columns()
        for batch, seq, status in rows:
            columns.append(
                batch,
                seq,
                status,
                provider_message_id=f"pm-{seq}",
                latency_ms=5,
                domain="example.com",
            )
        return encode(tenant_id, "mock", columns)

    bodies = {
        "good-1": results((batch_id, 1, "sent"), (batch_id, 2, "sent")),
        "seq-out-of-range": results((batch_id, 2**40, "sent")),
        "not-a-uuid": results(("not-a-uuid", 3, "sent")),
        "good-2": results((batch_id, 3, "sent")),
        "not-json": b"{not json",
        "seq-text": results((batch_id, "four", "sent")),
    }
    for body in bodies.values():
        await own.js.publish(own.topology.results_subject, body)

    pg = await own.js.pull_subscribe_bind("results-pg", own.topology.results_stream)
    msgs = await pg.fetch(len(bodies), timeout=5)
    assert len(msgs) == len(bodies)
    await apply_messages(own, msgs, FAST)  # one flush

    found = await recipients(own, batch_id)
    assert [found[f"p{i}@example.com"]["status"] for i in range(4)] == ["sent"] * 3 + ["queued"]
    refused_by_pg = {"seq-out-of-range", "not-a-uuid", "not-json", "seq-text"}
    entries = await dead_letters(own)
    pg_entries = [e for e in entries if e["consumer"] == "results-pg"]
    assert sorted(e["data"] for e in pg_entries) == sorted(
        bodies[name].decode() for name in refused_by_pg
    )
    assert all(e["kind"] == "results" and e["reason"] for e in pg_entries)
    assert {e["tenant_id"] for e in pg_entries if e["data"] != "{not json"} == {tenant_id}
    reasons = {e["data"]: e["reason"] for e in pg_entries}
    assert "int32" in reasons[bodies["seq-out-of-range"].decode()]
    assert "not a results message" in reasons["{not json"]
    assert await nothing_waits(own, own.topology.results_stream, "results-pg")

    # results-ch: the rows ClickHouse cannot take are dead-lettered, the others written.
    writer = EventWriter(own, FAST)
    ch = await own.js.pull_subscribe_bind("results-ch", own.topology.results_stream)
    await writer.add(await ch.fetch(len(bodies), timeout=5))
    assert await writer.flush()
    writer.close()
    ch_entries = [e for e in await dead_letters(own) if e["consumer"] == "results-ch"]
    assert sorted(e["data"] for e in ch_entries) == sorted(
        bodies[name].decode() for name in ("seq-out-of-range", "seq-text")
    )
    assert await nothing_waits(own, own.topology.results_stream, "results-ch")
    clickhouse = ClickHouse(own.settings)
    try:
        rows = await asyncio.to_thread(
            clickhouse.query,  # (18.16 takes no query parameters; the id is a uuid)
            f"SELECT seq FROM {own.settings.clickhouse_database}.events"
            f" WHERE batch_id = '{uuid.UUID(batch_id)}' ORDER BY seq",
        )
    finally:
        clickhouse.close()
    assert [r[0] for r in rows] == [1, 2, 3]


class BrokenProvider:
    """An adapter with a bug: every call raises (the chunk fails as a whole)."""

    name = "mock"
    max_per_call = 100

    def __init__(self) -> None:
        self.calls = 0

    async def send(self, messages: list[Message]) -> list[SendResult]:
        self.calls += 1
        raise RuntimeError("adapter bug")

    async def close(self) -> None:
        pass


async def test_a_chunk_that_always_fails_ends_in_the_dlq_after_the_bound(
    own: Services, tenant: tuple[str, str]
) -> None:
    tenant_id, _ = tenant
    batch_id = await new_batch(own, tenant_id, [{"email": f"c{i}@example.com"} for i in range(30)])
    provider = BrokenProvider()
    async with worker_loops(own, Sender(own, {"mock": provider})):

        async def completed() -> bool:
            return await batch_status(own, batch_id) == "completed"

        await eventually(completed, 60, "the batch completed with its recipients failed")
        await eventually(
            lambda: nothing_waits(own, own.topology.send_stream, "send"), 10, "the chunk ended"
        )
        await asyncio.sleep(3 * FAST.max_delay)  # it would have come back by now
    assert provider.calls == FAST.max_deliveries  # one provider call per delivery, no more

    found = await recipients(own, batch_id)
    assert {r["status"] for r in found.values()} == {"failed"}
    assert all("RuntimeError: adapter bug" in r["error"] for r in found.values())
    assert all(f"{FAST.max_deliveries} deliveries" in r["error"] for r in found.values())
    [entry] = [e for e in await dead_letters(own) if e.get("batch_id") == batch_id]
    assert (entry["kind"], entry["tenant_id"], entry["provider"]) == ("send", tenant_id, "mock")
    assert sorted(f["seq"] for f in entry["failed"]) == list(range(1, 31))


async def test_a_malformed_chunk_is_dead_lettered_at_once(
    own: Services, tenant: tuple[str, str]
) -> None:
    tenant_id, _ = tenant
    body = orjson.dumps({"b": "not-a-uuid", "t": tenant_id, "p": "mock", "f": 1, "n": 10})
    await own.js.publish(own.topology.send_subject("mock"), body)
    async with worker_loops(own, Sender(own, {"mock": BrokenProvider()})):

        async def dead_lettered() -> list[dict[str, Any]]:
            return [e for e in await dead_letters(own) if e["kind"] == "chunk"]

        [entry] = await eventually(dead_lettered, 20, "the chunk dead-lettered")
    assert entry["tenant_id"] == tenant_id and "not a chunk message" in entry["reason"]
    assert entry["data"] == body.decode()
    assert await nothing_waits(own, own.topology.send_stream, "send")
