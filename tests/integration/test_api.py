"""The real API application in-process (aiohttp test server on 127.0.0.1), real services."""

from __future__ import annotations

import dataclasses
import socket
import uuid
from typing import Any

import orjson
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from api.app import create_app
from engine.config import Settings
from engine.intake.decoders import list_rows
from engine.intake.fields import parse_batch_fields
from engine.intake.store import create_batch
from engine.services import Services
from engine.tenants import create_key
from tests.integration.conftest import bearer

FIELDS = {
    "name": "API test",
    "from_email": "news@shop.example",
    "subject": "Hello {{ name }}",
    "html": "<p>Code {{ code }}</p>",
    "provider": "mock",
}


def people(count: int) -> list[dict[str, Any]]:
    return [
        {"email": f"p{i}@example.com", "name": f"P{i}", "vars": {"code": f"c{i}"}}
        for i in range(1, count + 1)
    ]


async def error_body(response: Any, status: int, code: str | None = None) -> dict[str, Any]:
    """Assert the SPEC error body and status; return the inner ``error`` object."""
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body = await response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"code", "message", "details"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["code"] == error["code"].lower() and " " not in error["code"]
    if code is not None:
        assert error["code"] == code
    return error


async def create_json(client: TestClient, key: str, **overrides: Any) -> dict[str, Any]:
    body = {**FIELDS, "recipients": people(3), **overrides}
    response = await client.post("/api/batches", json=body, headers=bearer(key))
    assert response.status == 201, await response.text()
    return await response.json()


async def stored(services: Services, tenant_id: str) -> tuple[int, int]:
    """(batches of any status, recipients) of a tenant in PostgreSQL."""
    return (
        await services.pool.fetchval(
            "SELECT count(*) FROM batches WHERE tenant_id = $1", tenant_id
        ),
        await services.pool.fetchval(
            "SELECT count(*) FROM recipients r JOIN batches b ON b.id = r.batch_id"
            " WHERE b.tenant_id = $1",
            tenant_id,
        ),
    )


# --- public routes ---------------------------------------------------------------------


async def test_health_all_ok(client: TestClient) -> None:
    response = await client.get("/health")
    assert response.status == 200
    body = await response.json()
    assert body == {
        "status": "ok",
        "checks": {"postgres": "ok", "nats": "ok", "dragonfly": "ok", "clickhouse": "ok"},
    }


async def test_health_live(client: TestClient) -> None:
    response = await client.get("/health/live")
    assert response.status == 200
    assert (await response.json())["status"] == "ok"


async def test_health_names_clickhouse_when_it_is_down(migrated: Settings) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    broken = dataclasses.replace(migrated, clickhouse_url=f"http://127.0.0.1:{port}")
    async with TestClient(TestServer(create_app(broken), host="127.0.0.1")) as down_client:
        response = await down_client.get("/health")
        assert response.status == 503
        body = await response.json()
        assert body["status"] == "down"
        assert body["down"] == ["clickhouse"]
        assert body["checks"]["clickhouse"] != "ok"
        assert {k: v for k, v in body["checks"].items() if k != "clickhouse"} == {
            "postgres": "ok", "nats": "ok", "dragonfly": "ok",
        }  # fmt: skip
        assert (await down_client.get("/health/live")).status == 200


def samples(text: str) -> dict[str, list[dict[str, str]]]:
    """Sample name -> label sets, parsed from the Prometheus text format."""
    found: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append(dict(sample.labels))
    return found


async def test_metrics(client: TestClient, services: Services) -> None:
    assert (await client.get("/health/live")).status == 200
    response = await client.get("/api/metrics")
    assert response.status == 200
    assert response.content_type == "text/plain"
    text = await response.text()
    assert "nats_queue_depth{" in text
    assert "batchsender_http_requests_total" in text
    found = samples(text)
    depth = found["nats_queue_depth"]
    assert {(s["stream"], s["consumer"]) for s in depth} == set(services.topology.consumers())
    assert {"route": "/health/live", "status": "200"} in found["batchsender_http_requests_total"]
    assert {"route": "/health/live"} in found["batchsender_http_request_seconds_count"]
    assert {s["status"] for s in found["batchsender_batches"]} >= {"queued", "completed"}
    assert "@" not in text  # no e-mail addresses


async def test_openapi_lists_every_route(client: TestClient) -> None:
    response = await client.get("/api/openapi.json")
    assert response.status == 200
    document = await response.json()
    assert document["openapi"].startswith("3.")
    assert document["info"]["title"]
    paths = document["paths"]
    served = {
        (route.resource.canonical, route.method.lower())
        for route in client.app.router.routes()
        if route.method not in ("HEAD", "OPTIONS")
    }
    assert served, "the app has routes"
    documented = {(path, method) for path, item in paths.items() for method in item}
    assert served == documented


async def test_public_routes_need_no_key(client: TestClient) -> None:
    for path in ("/health", "/health/live", "/api/metrics", "/api/openapi.json"):
        assert (await client.get(path)).status == 200, path


# --- authentication --------------------------------------------------------------------


async def test_missing_and_bad_keys(client: TestClient, tenant: tuple[str, str]) -> None:
    _, key = tenant
    for headers in (
        {},
        bearer("bsk_not-a-real-key"),
        bearer(key + "x"),
        {"X-API-Key": "nope"},
        {"Authorization": f"Basic {key}"},
        {"Authorization": "Bearer "},
    ):
        await error_body(await client.get("/api/batches", headers=headers), 401, "unauthorized")
    body = {**FIELDS, "recipients": people(1)}
    await error_body(await client.post("/api/batches", json=body), 401, "unauthorized")
    await error_body(await client.get(f"/api/batches/{uuid.uuid4()}"), 401, "unauthorized")


async def test_bearer_and_x_api_key_both_work(client: TestClient, tenant: tuple[str, str]) -> None:
    _, key = tenant
    created = await create_json(client, key)
    for headers in (bearer(key), {"Authorization": f"bearer {key}"}, {"X-API-Key": key}):
        response = await client.get(f"/api/batches/{created['id']}", headers=headers)
        assert response.status == 200
        assert (await response.json())["id"] == created["id"]


async def test_revoked_key_is_refused(
    client: TestClient, services: Services, tenant: tuple[str, str]
) -> None:
    tenant_id, _ = tenant
    key = await create_key(services.pool, tenant_id)
    await services.pool.execute(
        "UPDATE api_keys SET revoked_at = now() WHERE tenant_id = $1 AND prefix = $2",
        tenant_id,
        key[:10],
    )
    await error_body(await client.get("/api/batches", headers=bearer(key)), 401, "unauthorized")


# --- creating --------------------------------------------------------------------------


async def test_create_json(client: TestClient, services: Services, tenant: tuple[str, str]) -> None:
    tenant_id, key = tenant
    created = await create_json(client, key, recipients=people(250), metadata={"k": "v"})
    assert created["status"] == "queued"
    assert created["total_recipients"] == 250
    assert created["suppressed"] == 0
    uuid.UUID(created["id"])
    assert await stored(services, tenant_id) == (1, 250)
    response = await client.get(f"/api/batches/{created['id']}", headers=bearer(key))
    batch = await response.json()
    assert batch["metadata"] == {"k": "v"}
    assert batch["counts"]["queued"] == 250


async def test_create_ndjson_with_header_line(
    client: TestClient, services: Services, tenant: tuple[str, str]
) -> None:
    tenant_id, key = tenant
    lines = [orjson.dumps({**FIELDS, "name": "from header"})] + [orjson.dumps(p) for p in people(4)]
    response = await client.post(
        "/api/batches",
        data=b"\n".join(lines) + b"\n",
        headers={**bearer(key), "Content-Type": "application/x-ndjson"},
    )
    assert response.status == 201, await response.text()
    created = await response.json()
    assert (created["status"], created["total_recipients"]) == ("queued", 4)
    batch = await (await client.get(f"/api/batches/{created['id']}", headers=bearer(key))).json()
    assert batch["name"] == "from header"
    rows = await services.pool.fetch(
        "SELECT seq, email, name, vars FROM recipients WHERE batch_id = $1 ORDER BY seq",
        uuid.UUID(created["id"]),
    )
    assert [(r["seq"], r["email"], r["name"], r["vars"]) for r in rows] == [
        (i, f"p{i}@example.com", f"P{i}", {"code": f"c{i}"}) for i in range(1, 5)
    ]


async def test_create_ndjson_with_query_fields(
    client: TestClient, services: Services, tenant: tuple[str, str]
) -> None:
    tenant_id, key = tenant
    body = b"\n".join(orjson.dumps(p) for p in people(3))
    response = await client.post(
        "/api/batches",
        params={**FIELDS, "dry_run": "true", "metadata": '{"via": "query"}'},
        data=body,
        headers={**bearer(key), "Content-Type": "application/x-ndjson"},
    )
    assert response.status == 201, await response.text()
    created = await response.json()
    assert created["total_recipients"] == 3
    batch = await (await client.get(f"/api/batches/{created['id']}", headers=bearer(key))).json()
    assert batch["dry_run"] is True
    assert batch["metadata"] == {"via": "query"}
    assert await stored(services, tenant_id) == (1, 3)


async def test_create_csv_with_query_fields(
    client: TestClient, services: Services, tenant: tuple[str, str]
) -> None:
    tenant_id, key = tenant
    csv = "\n".join(
        [
            "email,name,code",
            "ann@example.com,Ann,A1",
            'bob@example.com,,"B,2"',
            "cat@example.com,Cat,C3",
        ]
    )
    response = await client.post(
        "/api/batches",
        params=FIELDS,
        data=csv.encode(),
        headers={**bearer(key), "Content-Type": "text/csv"},
    )
    assert response.status == 201, await response.text()
    created = await response.json()
    assert (created["status"], created["total_recipients"]) == ("queued", 3)
    rows = await services.pool.fetch(
        "SELECT email, name, vars FROM recipients WHERE batch_id = $1 ORDER BY seq",
        uuid.UUID(created["id"]),
    )
    assert [tuple(r) for r in rows] == [
        ("ann@example.com", "Ann", {"code": "A1"}),
        ("bob@example.com", None, {"code": "B,2"}),
        ("cat@example.com", "Cat", {"code": "C3"}),
    ]


async def test_idempotency_key_over_http(
    client: TestClient, services: Services, tenant: tuple[str, str]
) -> None:
    tenant_id, key = tenant
    headers = {**bearer(key), "Idempotency-Key": f"idem-{uuid.uuid4()}"}
    body = {**FIELDS, "recipients": people(2)}
    first = await client.post("/api/batches", json=body, headers=headers)
    assert first.status == 201
    assert "Idempotent-Replayed" not in first.headers
    again = await client.post("/api/batches", json=body, headers=headers)
    assert again.status == 201
    assert again.headers["Idempotent-Replayed"] == "true"
    assert (await again.json())["id"] == (await first.json())["id"]
    changed = await client.post("/api/batches", json={**body, "name": "different"}, headers=headers)
    await error_body(changed, 409, "idempotency_conflict")
    assert await stored(services, tenant_id) == (1, 2)


# --- reading ---------------------------------------------------------------------------


async def test_list_with_status_filter_and_cursor_paging(
    client: TestClient, tenant: tuple[str, str]
) -> None:
    _, key = tenant
    queued = [await create_json(client, key) for _ in range(3)]
    draft = await create_json(client, key, draft=True)
    everything = {b["id"] for b in queued} | {draft["id"]}

    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {"limit": "1"} | ({"cursor": cursor} if cursor else {})
        response = await client.get("/api/batches", params=params, headers=bearer(key))
        assert response.status == 200
        page = await response.json()
        assert len(page["data"]) <= 1
        seen += [b["id"] for b in page["data"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert pages < 10
    assert len(seen) == len(set(seen)) == 4
    assert set(seen) == everything
    assert seen[0] == draft["id"]  # newest first

    response = await client.get("/api/batches", params={"limit": "2"}, headers=bearer(key))
    assert [b["id"] for b in (await response.json())["data"]] == seen[:2]

    response = await client.get("/api/batches", params={"status": "draft"}, headers=bearer(key))
    data = (await response.json())["data"]
    assert [(b["id"], b["status"]) for b in data] == [(draft["id"], "draft")]

    response = await client.get("/api/batches", params={"status": "queued"}, headers=bearer(key))
    assert {b["id"] for b in (await response.json())["data"]} == {b["id"] for b in queued}

    response = await client.get("/api/batches", params={"status": "done"}, headers=bearer(key))
    await error_body(response, 422)
    response = await client.get("/api/batches", params={"limit": "0"}, headers=bearer(key))
    await error_body(response, 422)
    response = await client.get("/api/batches", params={"limit": "x"}, headers=bearer(key))
    await error_body(response, 422)
    response = await client.get("/api/batches", params={"cursor": "!!"}, headers=bearer(key))
    await error_body(response, 422)


async def test_list_by_external_id(
    client: TestClient, services: Services, tenant: tuple[str, str]
) -> None:
    tenant_id, key = tenant
    msg_id = f"nats-{uuid.uuid4()}"
    created = await create_batch(
        services, tenant_id, parse_batch_fields(FIELDS), list_rows(people(1)), external_id=msg_id
    )
    await create_json(client, key)
    response = await client.get("/api/batches", params={"external_id": msg_id}, headers=bearer(key))
    data = (await response.json())["data"]
    assert [(b["id"], b["external_id"]) for b in data] == [(created.id, msg_id)]


async def test_get_one_with_counts(
    client: TestClient, services: Services, tenant: tuple[str, str]
) -> None:
    tenant_id, key = tenant
    await services.pool.execute(
        "INSERT INTO suppressions (tenant_id, email, reason) VALUES ($1, 'p2@example.com', 'x')",
        tenant_id,
    )
    created = await create_json(client, key, recipients=people(5))
    assert created["suppressed"] == 1
    response = await client.get(f"/api/batches/{created['id']}", headers=bearer(key))
    assert response.status == 200
    batch = await response.json()
    assert batch["id"] == created["id"]
    assert batch["status"] == "queued"
    assert batch["total_recipients"] == 5
    assert batch["suppressed"] == 1
    assert batch["counts"]["queued"] == 4
    assert batch["counts"]["suppressed"] == 1
    assert sum(batch["counts"].values()) == 5
    assert batch["progress"]["final"] == 1
    assert batch["progress"]["percent"] == 20.0
    assert batch["created_at"] and batch["queued_at"]
    assert batch["completed_at"] is None


async def test_get_recipients_with_status_filter_and_paging(
    client: TestClient, services: Services, tenant: tuple[str, str]
) -> None:
    tenant_id, key = tenant
    await services.pool.execute(
        "INSERT INTO suppressions (tenant_id, email, reason) VALUES ($1, 'p4@example.com', 'x')",
        tenant_id,
    )
    created = await create_json(client, key, recipients=people(5))
    url = f"/api/batches/{created['id']}/recipients"

    seqs: list[list[int]] = []
    cursor = None
    while True:
        params = {"limit": "2"} | ({"cursor": cursor} if cursor else {})
        page = await (await client.get(url, params=params, headers=bearer(key))).json()
        seqs.append([r["seq"] for r in page["data"]])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seqs == [[1, 2], [3, 4], [5]]

    page = await (
        await client.get(url, params={"status": "suppressed"}, headers=bearer(key))
    ).json()
    assert [(r["seq"], r["email"], r["status"]) for r in page["data"]] == [
        (4, "p4@example.com", "suppressed")
    ]
    assert page["next_cursor"] is None
    page = await (await client.get(url, params={"status": "queued"}, headers=bearer(key))).json()
    assert [r["seq"] for r in page["data"]] == [1, 2, 3, 5]
    await error_body(await client.get(url, params={"status": "x"}, headers=bearer(key)), 422)


async def test_another_tenants_batch_is_not_found(
    client: TestClient, services: Services, tenant: tuple[str, str]
) -> None:
    _, key = tenant
    other_key = await create_key(services.pool, f"o{uuid.uuid4().hex[:10]}")
    theirs = await create_json(client, other_key)
    for path in (f"/api/batches/{theirs['id']}", f"/api/batches/{theirs['id']}/recipients"):
        await error_body(await client.get(path, headers=bearer(key)), 404, "not_found")
        assert (await client.get(path, headers=bearer(other_key))).status == 200
    listed = await (await client.get("/api/batches", headers=bearer(key))).json()
    assert theirs["id"] not in {b["id"] for b in listed["data"]}
    for path in (f"/api/batches/{uuid.uuid4()}", "/api/batches/not-a-uuid"):
        await error_body(await client.get(path, headers=bearer(key)), 404, "not_found")


# --- bad input: 4xx with the error body, nothing created --------------------------------


async def post_json_bytes(client: TestClient, key: str, body: bytes) -> Any:
    return await client.post(
        "/api/batches", data=body, headers={**bearer(key), "Content-Type": "application/json"}
    )


async def test_malformed_json(
    client: TestClient, services: Services, tenant: tuple[str, str]
) -> None:
    tenant_id, key = tenant
    response = await post_json_bytes(client, key, b'{"name": "x", "recipients": [')
    await error_body(response, 400, "invalid_json")
    assert await stored(services, tenant_id) == (0, 0)


async def test_wrong_types(client: TestClient, services: Services, tenant: tuple[str, str]) -> None:
    tenant_id, key = tenant
    response = await client.post(
        "/api/batches",
        json={**FIELDS, "name": 5, "dry_run": "perhaps", "recipients": people(1)},
        headers=bearer(key),
    )
    error = await error_body(response, 422, "validation_error")
    assert {e["field"] for e in error["details"]["errors"]} == {"name", "dry_run"}
    response = await client.post(
        "/api/batches", json={**FIELDS, "recipients": {"email": "a@example.com"}},
        headers=bearer(key),
    )  # fmt: skip
    await error_body(response, 422)
    response = await client.post("/api/batches", json=[FIELDS], headers=bearer(key))
    await error_body(response, 422)
    assert await stored(services, tenant_id) == (0, 0)


async def test_invalid_emails_name_the_rows(
    client: TestClient, services: Services, tenant: tuple[str, str]
) -> None:
    tenant_id, key = tenant
    recipients = people(6)
    recipients[1]["email"] = "nobody"
    recipients[4]["email"] = "x@y"
    response = await client.post(
        "/api/batches", json={**FIELDS, "recipients": recipients}, headers=bearer(key)
    )
    error = await error_body(response, 422, "invalid_recipients")
    assert [(e["row"], e["field"]) for e in error["details"]["errors"]] == [
        (2, "email"), (5, "email"),
    ]  # fmt: skip
    assert error["details"]["invalid_rows"] == 2
    assert "recipient 2" in error["message"]
    assert await stored(services, tenant_id) == (0, 0)


async def test_invalid_rows_in_streams_name_the_rows(
    client: TestClient, services: Services, tenant: tuple[str, str]
) -> None:
    tenant_id, key = tenant
    csv = b"email,name,code\na@example.com,A,1\nbroken,B,2\nc@example.com,C\n"
    response = await client.post(
        "/api/batches", params=FIELDS, data=csv,
        headers={**bearer(key), "Content-Type": "text/csv"},
    )  # fmt: skip
    error = await error_body(response, 422, "invalid_recipients")
    assert [e["row"] for e in error["details"]["errors"]] == [2, 3]
    ndjson = b'{"email": "a@example.com", "vars": {"code": 1}}\n{oops\n'
    response = await client.post(
        "/api/batches", params=FIELDS, data=ndjson,
        headers={**bearer(key), "Content-Type": "application/x-ndjson"},
    )  # fmt: skip
    error = await error_body(response, 422, "invalid_recipients")
    assert [e["row"] for e in error["details"]["errors"]] == [2]
    assert await stored(services, tenant_id) == (0, 0)


async def test_unknown_provider(
    client: TestClient, services: Services, tenant: tuple[str, str]
) -> None:
    tenant_id, key = tenant
    for provider in ("pigeon", "ses"):
        response = await client.post(
            "/api/batches",
            json={**FIELDS, "provider": provider, "recipients": people(1)},
            headers=bearer(key),
        )
        error = await error_body(response, 422, "validation_error")
        assert [e["field"] for e in error["details"]["errors"]] == ["provider"]
    assert await stored(services, tenant_id) == (0, 0)


async def test_unknown_template_variable_names_the_rows(
    client: TestClient, services: Services, tenant: tuple[str, str]
) -> None:
    tenant_id, key = tenant
    recipients = people(4)
    recipients[2]["vars"] = {"cod": "typo"}
    response = await client.post(
        "/api/batches",
        json={**FIELDS, "html": "<p>{{ code }} {{ city }}</p>", "recipients": recipients},
        headers=bearer(key),
    )
    error = await error_body(response, 422, "invalid_recipients")
    rows = {e["row"]: e for e in error["details"]["errors"]}
    assert sorted(rows) == [1, 2, 3, 4]  # nobody has {{ city }}
    assert "city" in rows[1]["message"] and "code" not in rows[1]["message"]
    assert "code" in rows[3]["message"] and "city" in rows[3]["message"]
    assert await stored(services, tenant_id) == (0, 0)


async def test_template_syntax_error(
    client: TestClient, services: Services, tenant: tuple[str, str]
) -> None:
    tenant_id, key = tenant
    response = await client.post(
        "/api/batches",
        json={**FIELDS, "subject": "{% if %}", "recipients": people(1)},
        headers=bearer(key),
    )
    error = await error_body(response, 422, "invalid_template")
    assert error["details"] == {"field": "subject"}
    assert await stored(services, tenant_id) == (0, 0)


async def test_oversize_json_body(
    migrated: Settings, services: Services, tenant: tuple[str, str]
) -> None:
    tenant_id, key = tenant
    small = dataclasses.replace(migrated, max_body_bytes=2048)
    async with TestClient(TestServer(create_app(small), host="127.0.0.1")) as small_client:
        body = {**FIELDS, "recipients": people(200)}
        assert len(orjson.dumps(body)) > 2048
        response = await small_client.post("/api/batches", json=body, headers=bearer(key))
        error = await error_body(response, 413, "payload_too_large")
        assert "2048" in error["message"]
        fits = await small_client.post(
            "/api/batches", json={**FIELDS, "recipients": people(2)}, headers=bearer(key)
        )
        assert fits.status == 201
    assert await stored(services, tenant_id) == (1, 2)


async def test_empty_recipient_list(
    client: TestClient, services: Services, tenant: tuple[str, str]
) -> None:
    tenant_id, key = tenant
    response = await client.post(
        "/api/batches", json={**FIELDS, "recipients": []}, headers=bearer(key)
    )
    await error_body(response, 422, "no_recipients")
    response = await client.post(
        "/api/batches", params=FIELDS, data=b"email,name\n",
        headers={**bearer(key), "Content-Type": "text/csv"},
    )  # fmt: skip
    await error_body(response, 422, "no_recipients")
    assert await stored(services, tenant_id) == (0, 0)


async def test_unsupported_content_type(
    client: TestClient, services: Services, tenant: tuple[str, str]
) -> None:
    tenant_id, key = tenant
    for kind in ("text/plain", "application/xml", "multipart/form-data"):
        response = await client.post(
            "/api/batches", data=b"a@example.com", headers={**bearer(key), "Content-Type": kind}
        )
        await error_body(response, 415, "unsupported_media_type")
    assert await stored(services, tenant_id) == (0, 0)
