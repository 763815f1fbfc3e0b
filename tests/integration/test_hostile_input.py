"""Hostile input at the batch intake (issue 8): each defect found by probing the live stack
from outside, as a regression test on the real API and services.

- stalled and trickling bodies get 408 and hold no database connection meanwhile;
  a tenant's concurrent uploads are bounded (429);
- templates that ask for unbounded work, and CSV that would parse quadratically, are
  refused with a clear error;
- a template that fails for the first recipients is named at intake (422, by row);
- malformed CSV is a 400 naming the line, and the rows accepted are the rows sent;
- bad input that used to answer 500 answers 4xx with the SPEC error body and stores nothing;
- an Idempotency-Key is bound to a digest of the whole request.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from api.app import create_app
from api.context import SERVICES
from engine.config import Settings
from engine.services import Services
from engine.tenants import create_key
from tests.integration.conftest import bearer
from tests.integration.test_api import FIELDS, error_body, people, stored

CSV_QUERY = {k: v for k, v in FIELDS.items() if k != "html"} | {"text": "Hi {{ name }}"}


@pytest.fixture(scope="module")
async def strict(migrated: Settings) -> AsyncIterator[TestClient]:
    """The API with short body deadlines and two uploads per tenant."""
    settings = dataclasses.replace(
        migrated, body_timeout_seconds=0.5, body_min_rate=100_000, tenant_max_uploads=2
    )
    async with TestClient(TestServer(create_app(settings), host="127.0.0.1")) as test_client:
        yield test_client


async def new_tenant(services: Services) -> tuple[str, str]:
    tenant_id = f"h{uuid.uuid4().hex[:10]}"
    return tenant_id, await create_key(services.pool, tenant_id)


async def stalled_upload(
    client: TestClient, key: str, kind: str = "text/csv", sent: bytes = b"email\n"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A request whose body starts and then never goes on (Content-Length promises more)."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    query = "&".join(f"{k}={v.replace(' ', '%20')}" for k, v in CSV_QUERY.items())
    writer.write(
        f"POST /api/batches?{query} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: {kind}\r\nContent-Length: 1000000\r\n\r\n".encode()
        + sent
    )
    await writer.drain()
    return reader, writer


async def answer_status(reader: asyncio.StreamReader) -> int:
    line = await asyncio.wait_for(reader.readline(), 30)  # bound the test, not the server
    return int(line.split()[1])


# --- defect 2: bodies have deadlines; uploads hold no database connection; bounded -------


@pytest.mark.parametrize(
    ("kind", "sent"), [("text/csv", b"email\n"), ("application/json", b'{"name": ')]
)
async def test_a_stalled_body_gets_408(
    strict: TestClient, services: Services, kind: str, sent: bytes
) -> None:
    tenant_id, key = await new_tenant(services)
    reader, writer = await stalled_upload(strict, key, kind, sent)
    try:
        assert await answer_status(reader) == 408
    finally:
        writer.close()
    assert await stored(services, tenant_id) == (0, 0)


async def test_a_trickling_body_gets_408(strict: TestClient, services: Services) -> None:
    _, key = await new_tenant(services)
    reader, writer = await stalled_upload(strict, key)
    try:
        for _ in range(20):  # a byte every 0.2 s: never idle for 0.5 s, far below the rate
            writer.write(b"a")
            await writer.drain()
            await asyncio.sleep(0.2)
            if reader.at_eof() or reader._buffer:  # noqa: SLF001 - the answer has come
                break
        assert await answer_status(reader) == 408
    finally:
        writer.close()


async def test_stalled_uploads_hold_no_database_connection(
    client: TestClient, services: Services
) -> None:
    """22 unfinished uploads (more than the API's pool of 20) from many tenants: other
    tenants' requests and /health still work, and no pool connection is in use."""
    open_uploads = []
    try:
        for _ in range(11):
            _, key = await new_tenant(services)
            open_uploads += [await stalled_upload(client, key) for _ in range(2)]
        await asyncio.sleep(0.3)
        pool = client.app[SERVICES].pool
        _, other = await new_tenant(services)
        response = await client.post(
            "/api/batches", json={**FIELDS, "recipients": people(3)}, headers=bearer(other)
        )
        assert response.status == 201, await response.text()
        health = await client.get("/health")
        assert health.status == 200
        assert (await health.json())["checks"]["postgres"] == "ok"
        assert pool.get_size() - pool.get_idle_size() == 0
    finally:
        for _, writer in open_uploads:
            writer.close()


async def test_concurrent_uploads_per_tenant_are_bounded(
    strict: TestClient, services: Services
) -> None:
    _, key = await new_tenant(services)
    _, other = await new_tenant(services)
    open_uploads = [await stalled_upload(strict, key) for _ in range(2)]
    try:
        await asyncio.sleep(0.1)
        response = await strict.post(
            "/api/batches", json={**FIELDS, "recipients": people(1)}, headers=bearer(key)
        )
        await error_body(response, 429, "too_many_uploads")
        assert response.headers["Retry-After"]
        response = await strict.post(  # another tenant is not affected
            "/api/batches", json={**FIELDS, "recipients": people(1)}, headers=bearer(other)
        )
        assert response.status == 201
    finally:
        for _, writer in open_uploads:
            writer.close()
    for _ in range(50):  # the slots are given back when the uploads end
        response = await strict.post(
            "/api/batches", json={**FIELDS, "recipients": people(1)}, headers=bearer(key)
        )
        if response.status == 201:
            break
        await asyncio.sleep(0.1)
    assert response.status == 201


# --- defect 3 and 4: bounded templates; failing templates named at intake ----------------


@pytest.mark.parametrize(
    "subject",
    [
        "{{ 7**6000000 }}",
        "{{ 10**5000 }}",
        "{% for i in range(9000) %}{% for j in range(9000) %}x{% endfor %}{% endfor %}",
        "{{ 'a' * 10**9 }}",
        "{{ 1/0 }}",
        "{{ name.__class__ }}",
        "{{ code + 1 }}",
    ],
)
async def test_templates_that_fail_for_the_first_recipients_are_refused(
    client: TestClient, services: Services, subject: str
) -> None:
    tenant_id, key = await new_tenant(services)
    body = {**FIELDS, "subject": subject, "recipients": people(20)}
    response = await client.post("/api/batches", json=body, headers=bearer(key))
    error = await error_body(response, 422, "invalid_recipients")
    rows = error["details"]["errors"]
    assert [r["row"] for r in rows] == list(range(1, 11))  # the first ten are rendered
    assert {r["field"] for r in rows} == {"template"}
    assert await stored(services, tenant_id) == (0, 0)


async def test_templates_that_cannot_be_bounded_are_refused(
    client: TestClient, services: Services
) -> None:
    _, key = await new_tenant(services)
    body = {**FIELDS, "html": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
            "recipients": people(1)}  # fmt: skip
    response = await client.post("/api/batches", json=body, headers=bearer(key))
    error = await error_body(response, 422, "invalid_template")
    assert error["details"] == {"field": "html"}


# --- defect 6: CSV rows are never lost ---------------------------------------------------


async def post_csv(client: TestClient, key: str, text: str, **headers: str) -> Any:
    return await client.post(
        "/api/batches", params=CSV_QUERY, data=text.encode(),
        headers={**bearer(key), "Content-Type": "text/csv", **headers},
    )  # fmt: skip


async def test_a_quote_inside_a_field_keeps_every_row(
    client: TestClient, services: Services
) -> None:
    tenant_id, key = await new_tenant(services)
    text = 'email,name\na@x.example,Ann\nb@x.example,Jo"hn\nc@x.example,Cy\nd@x.example,Di\n'
    response = await post_csv(client, key, text)
    assert response.status == 201, await response.text()
    assert (await response.json())["total_recipients"] == 4
    assert await stored(services, tenant_id) == (1, 4)
    names = await services.pool.fetch(
        "SELECT r.name FROM recipients r JOIN batches b ON b.id = r.batch_id"
        " WHERE b.tenant_id = $1 ORDER BY r.seq",
        tenant_id,
    )
    assert [r["name"] for r in names] == ["Ann", 'Jo"hn', "Cy", "Di"]


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ('email,name\na@x.example,"Jo"hn\nb@x.example,B\n', 2),  # text after a closing quote
        ('email,name\na@x.example,A\nb@x.example,"B\n' + "c@x.example,C\n" * 30_000, 3),
        ('email,name\na@x.example,A\nb@x.example,"never closed', 3),
        ('email,name\n"a@x.example,A\n', 2),
        ('email,name\na@x.example,"A""\n', 2),  # two stray quotes
        ("email,name\na@x.example,A\nb@x.example," + "x" * 140_000 + "\n", 3),  # field > 128 KiB
        ("email,name\na@x.example,A\x00B\n", 2),
    ],
)
async def test_malformed_csv_is_a_400_naming_the_line(
    client: TestClient, services: Services, text: str, line: int
) -> None:
    tenant_id, key = await new_tenant(services)
    response = await post_csv(client, key, text)
    error = await error_body(response, 400, "invalid_csv")
    assert error["details"] == {"line": line}
    assert f"line {line}" in error["message"]
    assert await stored(services, tenant_id) == (0, 0)


async def test_a_draft_append_of_malformed_csv_adds_nothing(
    client: TestClient, services: Services
) -> None:
    tenant_id, key = await new_tenant(services)
    response = await client.post(
        "/api/batches", json={**FIELDS, "draft": True}, headers=bearer(key)
    )
    batch_id = (await response.json())["id"]
    response = await client.post(
        f"/api/batches/{batch_id}/recipients", data=b'email\na@x.example\n"b@x.example\n',
        headers={**bearer(key), "Content-Type": "text/csv"},
    )  # fmt: skip
    await error_body(response, 400, "invalid_csv")
    assert await stored(services, tenant_id) == (1, 0)


# --- defect 7: bad input is a 4xx with the SPEC body, never a 500 ------------------------


def cursor(value: Any) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(value)).decode()


NESTED = "$nested"  # JSON nested 1,000 deep, too deep for orjson to write: spliced in


def json_bytes(body: dict[str, Any]) -> bytes:
    return orjson.dumps(body).replace(b'"$nested"', b'{"a":' * 1000 + b"{}" + b"}" * 1000)


BAD_CREATES: list[tuple[str, dict[str, Any], int]] = [
    ("NUL in the name", {"name": "a\x00b"}, 422),
    ("NUL in the subject", {"subject": "Hi\x00"}, 422),
    ("NUL in from_name", {"from_name": "\x00"}, 422),
    ("NUL in a recipient's name", {"recipients": [{"email": "a@x.example", "name": "\x00"}]}, 422),
    ("NUL in a var", {"recipients": [{"email": "a@x.example", "vars": {"code": "\x00"}}]}, 422),
    ("NUL in metadata", {"metadata": {"k": "a\x00"}}, 422),
    ("year 1 with an offset", {"scheduled_at": "0001-01-01T00:00:00+05:00"}, 422),
    ("year 9999 with an offset", {"scheduled_at": "9999-12-31T23:59:59-05:00"}, 422),
    ("a huge power", {"subject": "{{ 10**5000 }}"}, 422),
    ("metadata 1,000 deep", {"metadata": NESTED}, 422),
    (
        "vars 1,000 deep",
        {"recipients": [{"email": "a@x.example", "vars": {"code": NESTED}}]},
        422,
    ),  # fmt: skip
    ("metadata too large", {"metadata": {"k": "x" * 20_000}}, 422),
    ("a name too long", {"recipients": [{"email": "a@x.example", "name": "n" * 201}]}, 422),
]


@pytest.mark.parametrize(
    ("what", "overrides", "status"), BAD_CREATES, ids=[c[0] for c in BAD_CREATES]
)
async def test_bad_json_creates_are_4xx_and_store_nothing(
    client: TestClient, services: Services, what: str, overrides: dict[str, Any], status: int
) -> None:
    tenant_id, key = await new_tenant(services)
    body = {**FIELDS, "recipients": people(2), **overrides}
    response = await client.post("/api/batches", data=json_bytes(body),
                                 headers={**bearer(key), "Content-Type": "application/json"})  # fmt: skip
    await error_body(response, status)
    assert await stored(services, tenant_id) == (0, 0)


async def test_nul_in_an_ndjson_line_names_the_row(client: TestClient, services: Services) -> None:
    tenant_id, key = await new_tenant(services)
    lines = [orjson.dumps({**{k: v for k, v in FIELDS.items()}})] + [
        orjson.dumps({"email": "a@x.example", "vars": {"code": "1"}}),
        orjson.dumps({"email": "b@x.example", "name": "B\x00", "vars": {"code": "2"}}),
    ]
    response = await client.post("/api/batches", data=b"\n".join(lines),
                                 headers={**bearer(key), "Content-Type": "application/x-ndjson"})  # fmt: skip
    error = await error_body(response, 422, "invalid_recipients")
    assert error["details"]["errors"][0]["row"] == 2
    assert await stored(services, tenant_id) == (0, 0)


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/api/batches", {"status": "queued\x00"}),
        ("/api/batches", {"external_id": "x\x00"}),
        ("/api/batches", {"cursor": cursor("abc")}),
        ("/api/batches", {"cursor": cursor([1, 2])}),
        ("/api/batches", {"cursor": cursor(["not a date", "x"])}),
        ("/api/batches", {"cursor": "!!!"}),
        ("/api/batches", {"limit": "9" * 5000}),
        ("/api/suppressions/a%00b@x.example", {}),
    ],
)
async def test_bad_query_and_path_text_is_a_4xx(
    client: TestClient, services: Services, path: str, params: dict[str, str]
) -> None:
    _, key = await new_tenant(services)
    method = client.delete if path.startswith("/api/suppressions") else client.get
    response = await method(path, params=params, headers=bearer(key))
    assert 400 <= response.status < 500, await response.text()
    await error_body(response, response.status)


async def test_bad_recipient_cursors(client: TestClient, services: Services) -> None:
    _, key = await new_tenant(services)
    created = await (
        await client.post(
            "/api/batches", json={**FIELDS, "recipients": people(2)}, headers=bearer(key)
        )  # fmt: skip
    ).json()
    for bad in (cursor("abc"), cursor([1, 2]), cursor([2**40]), cursor(["1"])):
        response = await client.get(
            f"/api/batches/{created['id']}/recipients", params={"cursor": bad}, headers=bearer(key)
        )
        await error_body(response, 422)


@pytest.mark.parametrize("value", [b"\xff\xfe", "é".encode(), b"a b", b""])
async def test_a_bad_idempotency_key_is_a_422(
    client: TestClient, services: Services, value: bytes
) -> None:
    tenant_id, key = await new_tenant(services)
    reader, writer = await asyncio.open_connection(client.host, client.port)
    body = orjson.dumps({**FIELDS, "recipients": people(1)})
    writer.write(
        b"POST /api/batches HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key.encode()
        + b"\r\nIdempotency-Key: " + value + b"\r\nContent-Type: application/json\r\n"
        + b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
    )  # fmt: skip
    await writer.drain()
    try:
        status = await answer_status(reader)
    finally:
        writer.close()
    assert status in (400, 422)
    assert await stored(services, tenant_id) == (0, 0)


# --- defect 8: an Idempotency-Key is bound to the whole request --------------------------


async def test_same_key_with_a_different_csv_of_the_same_length_is_a_409(
    client: TestClient, services: Services
) -> None:
    tenant_id, key = await new_tenant(services)
    idem = {"Idempotency-Key": f"csv-{uuid.uuid4()}"}
    first = "email,name\na@x.example,Ann\nb@x.example,Bob\n"
    second = "email,name\nc@x.example,Ann\nd@x.example,Bob\n"
    assert len(first) == len(second)
    response = await post_csv(client, key, first, **idem)
    assert response.status == 201
    again = await post_csv(client, key, first, **idem)
    assert again.status == 201
    assert again.headers["Idempotent-Replayed"] == "true"
    assert (await again.json())["id"] == (await response.json())["id"]
    await error_body(await post_csv(client, key, second, **idem), 409, "idempotency_conflict")
    assert await stored(services, tenant_id) == (1, 2)


async def test_the_mock_provider_is_refused_where_it_is_not_enabled(
    migrated: Settings, services: Services
) -> None:
    tenant_id, key = await new_tenant(services)
    off = dataclasses.replace(migrated, mock_provider_enabled=False)
    async with TestClient(TestServer(create_app(off), host="127.0.0.1")) as prod_like:
        response = await prod_like.post(
            "/api/batches", json={**FIELDS, "recipients": people(1)}, headers=bearer(key)
        )
        error = await error_body(response, 422)
        [problem] = error["details"]["errors"]
        assert problem["field"] == "provider"
        assert problem["message"].startswith("no default account for it on this server")
    assert await stored(services, tenant_id) == (0, 0)


async def test_a_stalled_webhook_body_gets_408(strict: TestClient) -> None:
    reader, writer = await asyncio.open_connection(strict.host, strict.port)
    writer.write(b"POST /webhooks/mock HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n[")  # fmt: skip
    await writer.drain()
    try:
        assert await answer_status(reader) == 408
    finally:
        writer.close()


async def test_uploads_go_on_unbounded_when_dragonfly_is_down(services: Services) -> None:
    """The per-tenant bound is Dragonfly's; without it intake goes on (and logs it)."""
    import redis.asyncio as aioredis

    from engine.uploads import upload_slot

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    down = aioredis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
    entered = False
    async with upload_slot(dataclasses.replace(services, redis=down), "any-tenant"):
        entered = True
    assert entered
    await down.aclose()
