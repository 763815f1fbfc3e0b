"""``/api/queue`` on the real API and NATS: dead letters read in batches and only the
tenant's, replay selections validated, stats without other tenants' totals."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from api.context import SERVICES
from engine import deadletters
from engine.services import Services
from engine.tenants import create_key
from tests.integration.conftest import bearer
from tests.integration.test_api import error_body


async def dead_letter(services: Services, tenant_id: str, msg_id: str) -> None:
    """A dead letter as the intake consumer writes one (engine.worker)."""
    await services.js.publish(
        services.topology.dlq_subject("intake"),
        orjson.dumps(
            {
                "kind": "intake",
                "tenant_id": tenant_id,
                "reason": "the body is not valid JSON",
                "code": "invalid_json",
                "details": None,
                "subject": services.topology.intake_subject(tenant_id),
                "msg_id": msg_id,
                "data": "{not json",
            }
        ),  # fmt: skip
    )


async def two_tenants(services: Services) -> tuple[tuple[str, str], tuple[str, str]]:
    mine, other = f"q{uuid.uuid4().hex[:10]}", f"q{uuid.uuid4().hex[:10]}"
    return (mine, await create_key(services.pool, mine)), (
        other,
        await create_key(services.pool, other),
    )


async def get(client: TestClient, key: str, path: str) -> Any:
    response = await client.get(path, headers=bearer(key))
    assert response.status == 200, await response.text()
    return await response.json()


async def test_dead_letters_are_read_in_batches_and_only_the_tenants(
    client: TestClient, services: Services
) -> None:
    (mine, key), (other, other_key) = await two_tenants(services)
    for i in range(250):
        await dead_letter(services, mine if i % 2 else other, f"m{i}")
    nc = client.app[SERVICES].nc
    sent_before = nc.stats["out_msgs"]
    first = await get(client, key, "/api/queue/dlq?limit=100")
    requests = nc.stats["out_msgs"] - sent_before
    assert requests < 20, f"{requests} NATS requests for one page of 100 (of 250 scanned)"
    assert len(first["data"]) == 100 and first["next_cursor"]
    assert {e["tenant_id"] for e in first["data"]} == {mine}
    rest = await get(client, key, f"/api/queue/dlq?limit=100&cursor={first['next_cursor']}")
    assert len(rest["data"]) == 25 and rest["next_cursor"] is None
    entries = first["data"] + rest["data"]
    assert [e["msg_id"] for e in entries] == [f"m{i}" for i in range(1, 250, 2)]
    assert [e["seq"] for e in entries] == sorted(e["seq"] for e in entries)
    assert all(e["reason"] and e["time"] for e in entries)
    theirs = await get(client, other_key, "/api/queue/dlq?limit=500")
    assert len(theirs["data"]) == 125 and {e["tenant_id"] for e in theirs["data"]} == {other}


async def test_a_page_scans_a_bounded_number_of_messages(
    client: TestClient, services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    (mine, key), (other, _) = await two_tenants(services)
    for i in range(30):
        await dead_letter(services, other, f"o{i}")
    await dead_letter(services, mine, "mine")
    monkeypatch.setattr(deadletters, "DLQ_SCAN", 10)
    pages, cursor, found = 0, None, []
    while True:
        page = await get(client, key, "/api/queue/dlq" + (f"?cursor={cursor}" if cursor else ""))
        pages += 1
        found += page["data"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert pages < 100, "the cursor must move on"
    assert [e["msg_id"] for e in found] == ["mine"] and pages >= 3


@pytest.mark.parametrize(
    "body",
    [
        {"seqs": [0]},
        {"seqs": [-1]},
        {"seqs": [1, 0]},
        {"seqs": [1.5]},
        {"seqs": [True]},
        {"seqs": ["1"]},
        {"seqs": []},
        {"seqs": list(range(1, 1002))},
        {"seqs": [1], "all": True},
        {"all": False},
        {},
        [1, 2],
    ],
)
async def test_replay_takes_positive_sequence_numbers_only(
    client: TestClient, tenant: tuple[str, str], body: Any
) -> None:
    response = await client.post("/api/queue/dlq/replay", json=body, headers=bearer(tenant[1]))
    await error_body(response, 422, "validation_error")


@pytest.mark.parametrize("cursor", ["-5", "abc", "99999999999999999999999", "9223372036854775807"])
async def test_crafted_dlq_cursors_answer_422(
    client: TestClient, tenant: tuple[str, str], cursor: str
) -> None:
    response = await client.get(f"/api/queue/dlq?cursor={cursor}", headers=bearer(tenant[1]))
    await error_body(response, 422, "validation_error")


async def test_stats_show_the_tenants_own_counts_and_no_other_totals(
    client: TestClient, services: Services
) -> None:
    (mine, key), (other, other_key) = await two_tenants(services)
    await dead_letter(services, mine, "a")
    await dead_letter(services, mine, "b")
    await dead_letter(services, other, "c")
    stats = await get(client, key, "/api/queue/stats")
    assert set(stats) == {"consumers", "intake"}  # no DLQ total of every tenant
    assert {c["consumer"] for c in stats["consumers"]} == {
        "intake", "send", "results-pg", "results-ch", "results-hooks",
    }  # fmt: skip
    assert stats["intake"] == {"waiting": 0}

    # Replayed, the intake messages wait in the intake stream (no worker runs here).
    seqs = [e["seq"] for e in (await get(client, key, "/api/queue/dlq"))["data"]]
    response = await client.post("/api/queue/dlq/replay", json={"seqs": seqs}, headers=bearer(key))
    assert response.status == 200 and await response.json() == {"replayed": 2}
    assert (await get(client, key, "/api/queue/stats"))["intake"] == {"waiting": 2}
    assert (await get(client, other_key, "/api/queue/stats"))["intake"] == {"waiting": 0}
    assert (await get(client, key, "/api/queue/dlq"))["data"] == []  # they left the DLQ
    # another tenant's seqs are not replayed
    theirs = [e["seq"] for e in (await get(client, other_key, "/api/queue/dlq"))["data"]]
    response = await client.post(
        "/api/queue/dlq/replay", json={"seqs": theirs}, headers=bearer(key)
    )
    assert await response.json() == {"replayed": 0}
    response = await client.post(
        "/api/queue/dlq/replay", json={"all": True}, headers=bearer(other_key)
    )
    assert await response.json() == {"replayed": 1}


async def test_a_results_dead_letter_is_replayed_onto_the_results_stream(
    client: TestClient, services: Services
) -> None:
    """A results message a consumer gave up on goes back to both results consumers; a
    malformed chunk (nothing to queue) stays in the DLQ."""
    from engine import results

    (mine, key), _ = await two_tenants(services)
    data = results.encode(mine, "mock", results.Columns())
    await deadletters.results(services, "results-pg", data, "refused by PostgreSQL")
    await deadletters.chunk(services, orjson.dumps({"t": mine}), "not a chunk message")
    page = await get(client, key, "/api/queue/dlq")
    by_kind = {entry["kind"]: entry["seq"] for entry in page["data"]}
    assert set(by_kind) == {"results", "chunk"}
    before = (await services.js.stream_info(services.topology.results_stream)).state.last_seq
    response = await client.post("/api/queue/dlq/replay", json={"all": True}, headers=bearer(key))
    assert response.status == 200
    assert await response.json() == {"replayed": 1}
    state = (await services.js.stream_info(services.topology.results_stream)).state
    assert state.last_seq == before + 1
    replayed = await services.js.get_msg(services.topology.results_stream, state.last_seq)
    assert replayed.data == data
    left = await get(client, key, "/api/queue/dlq")
    assert [entry["kind"] for entry in left["data"]] == ["chunk"]
