"""The processes' logs: one JSON line per event, with the ids that find a batch's and a
request's lines (``batch_id``, ``tenant_id``, ``trace_id``), and nothing of a recipient's,
a key's or a message's. (The ``stack`` fixture checks every line of the whole run when it
stops: tests/e2e/conftest.py, ``log_problems``.)"""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp
import orjson

from tests.e2e.conftest import BODY_MARKERS, FINAL, Client, eventually, log_problems

TRACE_ID = re.compile(r"[0-9a-f]{32}")


def entries(logs: Path, name: str) -> list[dict]:
    """The JSON lines of one process's log (``api``, ``worker``, ``mock``) so far."""
    path = logs / f"{name}.log"
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


async def post_batch(stack, key: str, body: dict, headers: dict[str, str]) -> tuple[int, dict, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{stack.api}/api/batches",
            data=orjson.dumps(body),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json",
                     **headers},
        ) as response,
    ):  # fmt: skip
        return (
            response.status,
            orjson.loads(await response.read()),
            response.headers.get("X-Request-Id", ""),
        )


async def test_a_batch_is_found_in_the_logs_by_its_ids_and_leaves_nothing_private(
    stack, tenant, client: Client
):
    tenant_id, key = tenant
    subject_marker, body_marker = BODY_MARKERS[1], BODY_MARKERS[0]
    emails = [f"log.reader+{i}@recipients.example.org" for i in range(20)]
    body = {
        "name": "logs",
        "from_email": "log.sender@senders.example.org",
        "subject": f"{subject_marker} {{{{ name }}}}",
        "text": f"{body_marker} for {{{{ name }}}}",
        "html": f"<p>{body_marker}</p>",
        "provider": "mock",
        "recipients": [{"email": e, "name": f"R{i}"} for i, e in enumerate(emails)],
    }
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    status, created, answered = await post_batch(
        stack, key, body, {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
    )
    assert status == 201, created
    assert answered == trace_id  # the caller's trace, named in X-Request-Id
    batch_id = created["id"]
    await client.until(batch_id, "all final", lambda b: b["status"] == "completed")

    async def completion_logged():
        return [
            e
            for e in entries(stack.logs, "worker")
            if e.get("batch_id") == batch_id and e["msg"] == "batch completed"
        ]

    (completed,) = await eventually(completion_logged, 30, what="the batch completed line")
    assert completed["tenant_id"] == tenant_id

    api = [e for e in entries(stack.logs, "api") if e.get("batch_id") == batch_id]
    assert api, "no API line names the batch"
    created_line = next(e for e in api if e["msg"] == "batch created")
    assert created_line["tenant_id"] == tenant_id and created_line["recipients"] == 20
    for entry in api:  # written while the request was handled: its trace id
        assert entry["trace_id"] == trace_id, entry

    # Every line that mentions the batch names it and its tenant in their fields.
    for name in ("api", "worker", "mock"):
        for entry in entries(stack.logs, name):
            if batch_id in orjson.dumps(entry).decode():
                assert entry.get("batch_id") == batch_id, (name, entry)
                assert entry.get("tenant_id") == tenant_id, (name, entry)

    assert log_problems(stack.logs) == []  # now, not only when the session ends
    everything = b"".join(path.read_bytes() for path in stack.logs.glob("*.log"))
    for secret in (key, *emails, body["from_email"], subject_marker, body_marker):
        assert secret.encode() not in everything, secret


async def test_every_answer_names_its_trace_id(stack, tenant):
    _tenant_id, key = tenant
    ids = set()
    for traceparent in (
        None,
        "not a traceparent",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # all-zero trace-id
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # version ff
    ):
        headers = {"Authorization": f"Bearer {key}"}
        if traceparent:
            headers["traceparent"] = traceparent
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{stack.api}/api/batches/nope", headers=headers) as response,
        ):
            assert response.status in (400, 404)  # an error answer names it too
            trace_id = response.headers["X-Request-Id"]
        assert TRACE_ID.fullmatch(trace_id) and trace_id != "0" * 32
        ids.add(trace_id)
    assert len(ids) == 4  # a new one for each request without a valid traceparent


async def test_a_refused_batch_logs_no_address(stack, tenant, client: Client):
    """A batch whose recipients fail at the provider: the failures are recorded, and the
    logs name no recipient."""
    await client.mock_config(failure_rate=1.0)
    emails = [f"refused.{i}@failing.example.org" for i in range(5)]
    batch_id = await client.create(5, emails=emails, subject=f"{BODY_MARKERS[1]}")
    await client.until(batch_id, "all final", lambda b: b["progress"]["final"] >= 5)
    batch = await client.batch(batch_id)
    assert {k for k, v in batch["counts"].items() if v} <= FINAL
    everything = b"".join(path.read_bytes() for path in stack.logs.glob("*.log"))
    for email in emails:
        assert email.encode() not in everything
    assert log_problems(stack.logs) == []
