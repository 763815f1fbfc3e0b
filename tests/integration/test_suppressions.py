"""The suppression list API and the one-click unsubscribe links, on the real API and
PostgreSQL; suppressed addresses are skipped by later batches."""

from __future__ import annotations

import base64
import time
from urllib.parse import quote

import pytest
from aiohttp.test_utils import TestClient

from engine.errors import Gone, NotFound
from engine.suppressions import LINK_DAYS, links, read_token, unsubscribe_token
from tests.integration.conftest import bearer


async def test_add_list_remove(client: TestClient, tenant: tuple[str, str]) -> None:
    _, key = tenant
    response = await client.post("/api/suppressions", headers=bearer(key),
                                  json={"emails": ["B@Example.com", "a@example.com", "b@example.com"]})  # fmt: skip
    assert response.status == 201 and await response.json() == {"added": 2}
    response = await client.get("/api/suppressions?limit=1", headers=bearer(key))
    page = await response.json()
    assert [s["email"] for s in page["data"]] == ["a@example.com"] and page["next_cursor"]
    response = await client.get(
        f"/api/suppressions?cursor={page['next_cursor']}", headers=bearer(key)
    )
    assert [s["email"] for s in (await response.json())["data"]] == ["b@example.com"]
    assert (
        await client.delete("/api/suppressions/A@example.com", headers=bearer(key))
    ).status == 204
    missing = await client.delete("/api/suppressions/a@example.com", headers=bearer(key))
    assert missing.status == 404 and (await missing.json())["error"]["code"] == "not_found"


async def test_bad_input_changes_nothing(client: TestClient, tenant: tuple[str, str]) -> None:
    _, key = tenant
    for body in ({"emails": ["ok@example.com", "nope"]}, {"emails": []}, {"emails": "x@example.com"},
                 {"emails": ["ok@example.com"], "reason": 5}):  # fmt: skip
        response = await client.post("/api/suppressions", headers=bearer(key), json=body)
        assert response.status == 422, body
    assert (await client.post("/api/suppressions", headers=bearer(key), data=b"{")).status == 400
    response = await client.get("/api/suppressions", headers=bearer(key))
    assert (await response.json())["data"] == []
    assert (await client.get("/api/suppressions")).status == 401


async def test_suppressed_addresses_are_skipped_by_later_batches(client, tenant) -> None:
    _, key = tenant
    await client.post(
        "/api/suppressions", headers=bearer(key), json={"emails": ["gone@example.com"]}
    )
    body = {"name": "s", "from_email": "a@example.com", "subject": "Hi", "text": "x", "provider": "mock",
            "recipients": [{"email": "Gone@example.com"}, {"email": "here@example.com"}]}  # fmt: skip
    response = await client.post("/api/batches", headers=bearer(key), json=body)
    created = await response.json()
    assert created["suppressed"] == 1 and created["total_recipients"] == 2
    batch = await (await client.get(f"/api/batches/{created['id']}", headers=bearer(key))).json()
    assert batch["counts"]["suppressed"] == 1 and batch["counts"]["queued"] == 1


async def test_one_click_unsubscribe(client: TestClient, tenant: tuple[str, str], migrated) -> None:
    tenant_id, key = tenant
    made = links(migrated.public_url, migrated.unsubscribe_secret, tenant_id)
    headers = made.headers("Ann@Example.com", "ref")
    assert headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    link = headers["List-Unsubscribe"].strip("<>")
    assert link.startswith(f"{migrated.public_url}/unsubscribe/")
    path = link[len(migrated.public_url) :]
    page = await client.get(path)  # a link scanner: shows a button, changes nothing
    assert page.status == 200 and "ann@example.com" in await page.text()
    listed = await (await client.get("/api/suppressions", headers=bearer(key))).json()
    assert listed["data"] == []
    done = await client.post(path, data="List-Unsubscribe=One-Click",
                             headers={"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
    assert done.status == 200
    again = await client.post(path, data="List-Unsubscribe=One-Click")
    assert again.status == 200  # idempotent
    listed = await (await client.get("/api/suppressions", headers=bearer(key))).json()
    assert [(s["email"], s["reason"]) for s in listed["data"]] == [
        ("ann@example.com", "unsubscribed")
    ]


async def test_a_forged_or_broken_link_is_not_found(client: TestClient, migrated) -> None:
    good = unsubscribe_token(migrated.unsubscribe_secret, "acme", "x@example.com")
    forged = unsubscribe_token("another-secret", "acme", "x@example.com")
    assert read_token(migrated.unsubscribe_secret, good) == ("acme", "x@example.com")
    flipped = good[:20] + ("A" if good[20] != "A" else "B") + good[21:]
    for token in (forged, good[:-2], flipped, "garbage", good + "AAAA", "%00", "\u00e9t\u00e9",
                  "x" * 2000):  # fmt: skip
        with pytest.raises(NotFound):
            read_token(migrated.unsubscribe_secret, token)
        response = await client.post(f"/unsubscribe/{quote(token)}")
        assert response.status == 404, token
        assert (await response.json())["error"]["code"] == "not_found"


def test_the_token_is_opaque_and_expires() -> None:
    secret = "s" * 8 + "ecret-of-the-test-01234567"
    token = unsubscribe_token(secret, "acme", "Ann.Person@Example.com")
    decoded = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    for clear in (b"ann", b"acme", b"example", b"person"):
        assert clear not in decoded.lower()  # neither the address nor the tenant readable
    assert "ann" not in token.lower() and len(token) < 160
    assert read_token(secret, token) == ("acme", "ann.person@example.com")
    day = 86_400
    now = time.time()
    assert read_token(secret, token, now=now + (LINK_DAYS - 1) * day) == (
        "acme",
        "ann.person@example.com",
    )
    with pytest.raises(Gone):
        read_token(secret, token, now=now + (LINK_DAYS + 1) * day)
    old = unsubscribe_token(secret, "acme", "ann@example.com", now=now - (LINK_DAYS + 1) * day)
    with pytest.raises(Gone):
        read_token(secret, old)


async def test_an_expired_link_answers_410_and_changes_nothing(
    client: TestClient, tenant: tuple[str, str], migrated
) -> None:
    tenant_id, key = tenant
    old = unsubscribe_token(migrated.unsubscribe_secret, tenant_id, "late@example.com",
                            now=time.time() - (LINK_DAYS + 1) * 86_400)  # fmt: skip
    for method in ("GET", "POST"):
        response = await client.request(method, f"/unsubscribe/{old}")
        assert response.status == 410
        assert (await response.json())["error"]["code"] == "link_expired"
    listed = await (await client.get("/api/suppressions", headers=bearer(key))).json()
    assert listed["data"] == []


async def test_a_link_of_an_unknown_tenant_is_not_found(client: TestClient, migrated) -> None:
    token = unsubscribe_token(migrated.unsubscribe_secret, "no-such-tenant", "x@example.com")
    response = await client.post(f"/unsubscribe/{token}")
    assert response.status == 404
    assert (await response.json())["error"]["code"] == "not_found"
