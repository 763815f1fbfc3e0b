"""The suppression list API and the one-click unsubscribe links, on the real API and
PostgreSQL; suppressed addresses are skipped by later batches."""

from __future__ import annotations

import base64
import time
import uuid
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


async def sent_batch(client: TestClient, key: str, *emails: str) -> str:
    """A batch of these recipients (seq 1, 2, ...): the links of its messages name them."""
    body = {"name": "u", "from_email": "a@example.com", "subject": "Hi", "text": "x",
            "provider": "mock", "recipients": [{"email": e} for e in emails]}  # fmt: skip
    response = await client.post("/api/batches", headers=bearer(key), json=body)
    assert response.status == 201
    return (await response.json())["id"]


async def test_one_click_unsubscribe(client: TestClient, tenant: tuple[str, str], migrated) -> None:
    tenant_id, key = tenant
    batch_id = await sent_batch(client, key, "Bob@example.com", "Ann@Example.com")
    made = links(migrated.public_url, migrated.unsubscribe_secret, batch_id)
    headers = made.headers(2, "ref")
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


async def test_a_forged_or_broken_link_is_not_found(
    client: TestClient, tenant: tuple[str, str], migrated, services
) -> None:
    _, key = tenant
    batch_id = await sent_batch(client, key, "x@example.com")
    secret = migrated.unsubscribe_secret
    good = unsubscribe_token(secret, batch_id, 1)
    assert await read_token(services.pool, secret, good) == (tenant[0], "x@example.com")
    forged = unsubscribe_token("another-secret", batch_id, 1)
    no_recipient = unsubscribe_token(secret, batch_id, 2)  # a good tag, nobody at seq 2
    flipped = good[:20] + ("A" if good[20] != "A" else "B") + good[21:]
    for token in (forged, no_recipient, good[:-2], flipped, "garbage", good + "AAAA", "%00",
                  "\u00e9t\u00e9", "x" * 2000, "Ag", "AQ"):  # fmt: skip
        with pytest.raises(NotFound):
            await read_token(services.pool, secret, token)
        response = await client.post(f"/unsubscribe/{quote(token)}")
        assert response.status == 404, token
        assert (await response.json())["error"]["code"] == "not_found"
    listed = await (await client.get("/api/suppressions", headers=bearer(key))).json()
    assert listed["data"] == []


async def test_the_token_is_opaque_and_expires(
    client: TestClient, tenant: tuple[str, str], services
) -> None:
    secret = "s" * 8 + "ecret-of-the-test-01234567"
    batch_id = await sent_batch(client, tenant[1], "Ann.Person@Example.com")
    token = unsubscribe_token(secret, batch_id, 1)
    decoded = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    for clear in (b"ann", tenant[0].encode(), b"example", b"person"):
        assert clear not in decoded.lower()  # neither the address nor the tenant readable
    assert "ann" not in token.lower() and len(token) < 80
    assert await read_token(services.pool, secret, token) == (tenant[0], "ann.person@example.com")
    day = 86_400
    now = time.time()
    assert await read_token(services.pool, secret, token, now=now + (LINK_DAYS - 1) * day) == (
        tenant[0],
        "ann.person@example.com",
    )
    with pytest.raises(Gone):
        await read_token(services.pool, secret, token, now=now + (LINK_DAYS + 1) * day)
    old = unsubscribe_token(secret, batch_id, 1, now=now - (LINK_DAYS + 1) * day)
    with pytest.raises(Gone):
        await read_token(services.pool, secret, old)


# A link of the first version (the tenant and the address sealed), made on 2026-12-01 with
# the secret above by the code of that day: still read until it expires (2027-03-01).
V1_TOKEN = "AQBRjmnkPnjxtdhLBn9gPrtY9ym_uW9aeD_1HW3kEneys-yr1-rE7MGwp_QzBzk"
V1_MADE = 1796083200.0


async def test_a_link_of_the_first_version_is_still_read(services) -> None:
    secret = "s" * 8 + "ecret-of-the-test-01234567"
    assert await read_token(services.pool, secret, V1_TOKEN, now=V1_MADE) == (
        "acme",
        "ann.person@example.com",
    )
    with pytest.raises(NotFound):
        await read_token(services.pool, "another-secret", V1_TOKEN, now=V1_MADE)
    with pytest.raises(Gone):
        await read_token(services.pool, secret, V1_TOKEN, now=V1_MADE + (LINK_DAYS + 1) * 86_400)


async def test_an_expired_link_answers_410_and_changes_nothing(
    client: TestClient, tenant: tuple[str, str], migrated
) -> None:
    _, key = tenant
    batch_id = await sent_batch(client, key, "late@example.com")
    old = unsubscribe_token(migrated.unsubscribe_secret, batch_id, 1,
                            now=time.time() - (LINK_DAYS + 1) * 86_400)  # fmt: skip
    for method in ("GET", "POST"):
        response = await client.request(method, f"/unsubscribe/{old}")
        assert response.status == 410
        assert (await response.json())["error"]["code"] == "link_expired"
    listed = await (await client.get("/api/suppressions", headers=bearer(key))).json()
    assert listed["data"] == []


async def test_a_link_of_an_unknown_batch_is_not_found(client: TestClient, migrated) -> None:
    token = unsubscribe_token(migrated.unsubscribe_secret, str(uuid.uuid4()), 1)
    response = await client.post(f"/unsubscribe/{token}")
    assert response.status == 404
    assert (await response.json())["error"]["code"] == "not_found"
