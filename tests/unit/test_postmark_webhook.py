"""Postmark webhooks: the basic-auth / custom-header check, replay identity and the parser,
with Postmark's documented sample payloads (tests/fixtures/postmark)."""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from providers.base import WEBHOOK_EVENTS
from providers.postmark import (
    WebhookAuth,
    event_id,
    parse_webhook,
    parse_webhook_secret,
    verify_webhook,
    webhook_secret,
)
from tests import provider_support

FIXTURES = Path(__file__).parent.parent / "fixtures" / "postmark"
REF = "4f3c2a1e-8b7d-4c6a-9e5f-1a2b3c4d5e6f:7"
SECRET = "hooks:s3cret-pa55:word"  # the password may hold ":"


def fixture(name: str) -> dict[str, Any]:
    return orjson.loads((FIXTURES / f"{name}.json").read_bytes())


def body_of(name: str, **changes: Any) -> bytes:
    return orjson.dumps(fixture(name) | changes)


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


# --- verify: credentials --------------------------------------------------------------


def test_basic_auth_verifies() -> None:
    body = body_of("delivery")
    before = int(time.time())
    signed = verify_webhook(body, basic("hooks", "s3cret-pa55:word"), SECRET)
    assert signed is not None
    assert before <= signed.timestamp <= int(time.time())  # no signed time: now
    assert signed.signature.startswith("postmark:Delivery:883953f4-")


@pytest.mark.parametrize(
    "headers",
    [
        {},
        basic("hooks", "wrong"),
        basic("other", "s3cret-pa55:word"),
        basic("hooks", "s3cret-pa55:wor"),
        {"Authorization": "Bearer aG9va3M6czNjcmV0"},
        {"Authorization": "Basic not base64!"},
        {"Authorization": "Basic"},
        {"Authorization": "Basic " + base64.b64encode(b"\xff\xfe").decode()},
    ],
)
def test_wrong_or_missing_credentials_are_refused(headers: dict[str, str]) -> None:
    assert verify_webhook(body_of("delivery"), headers, SECRET) is None


def test_header_names_match_case_insensitively() -> None:
    headers = {k.lower(): v for k, v in basic("hooks", "s3cret-pa55:word").items()}
    headers["authorization"] = headers["authorization"].replace("Basic", "basic")
    assert verify_webhook(body_of("delivery"), headers, SECRET) is not None


def test_custom_header_secret() -> None:
    secret = webhook_secret(header="X-Webhook-Token", header_value="tok-123")
    body = body_of("open")
    assert verify_webhook(body, {"x-webhook-token": "tok-123"}, secret) is not None
    assert verify_webhook(body, {"X-Webhook-Token": "tok-124"}, secret) is None
    assert verify_webhook(body, {"X-Webhook-Token": "tok-12"}, secret) is None
    assert verify_webhook(body, {"X-Webhook-Token": "tök-123"}, secret) is None
    assert verify_webhook(body, {}, secret) is None


def test_basic_auth_and_header_are_both_required() -> None:
    secret = webhook_secret(
        username="u", password="p", header="X-Webhook-Token", header_value="tok"
    )
    body = body_of("click")
    both = basic("u", "p") | {"X-Webhook-Token": "tok"}
    assert verify_webhook(body, both, secret) is not None
    assert verify_webhook(body, basic("u", "p"), secret) is None
    assert verify_webhook(body, {"X-Webhook-Token": "tok"}, secret) is None


@pytest.mark.parametrize(
    "secret", ["", "no-colon", ":password", "user:", "{", '{"header": "X-A"}', "{}", "[1]"]
)
def test_a_secret_without_credentials_refuses_everything(secret: str) -> None:
    headers = basic("user", "password") | {"X-A": "x"}
    assert verify_webhook(body_of("delivery"), headers, secret) is None
    with pytest.raises(ValueError):
        parse_webhook_secret(secret)


def test_webhook_secret_round_trips_and_hides_credentials() -> None:
    assert webhook_secret(username="u", password="p:w") == "u:p:w"
    assert parse_webhook_secret("u:p:w") == WebhookAuth("u", "p:w")
    secret = webhook_secret(
        username="hook-user", password="pw-XYZ", header="X-T", header_value="tok-XYZ"
    )
    auth = parse_webhook_secret(secret)
    assert auth == WebhookAuth("hook-user", "pw-XYZ", "X-T", "tok-XYZ")
    assert "XYZ" not in repr(auth) and "hook-user" not in repr(auth)
    with pytest.raises(ValueError):
        webhook_secret(username="a:b", password="p")
    with pytest.raises(ValueError):
        webhook_secret(header="Bad Header", header_value="v")


# --- replay identity ------------------------------------------------------------------


class ReplayGuard(provider_support.ReplayGuard):
    """A ``provider_support.ReplayGuard`` for posts verified here."""

    def accept(self, body: bytes, headers: dict[str, str], secret: str) -> str:
        return self.judge(verify_webhook(body, headers, secret))


def test_a_copy_of_a_post_is_refused_as_a_replay() -> None:
    guard, headers = ReplayGuard(), basic("hooks", "s3cret-pa55:word")
    body = body_of("bounce_hard")
    assert guard.accept(body, headers, SECRET) == "accepted"
    assert guard.accept(body, headers, SECRET) == "replayed_signature"
    # The same event re-serialised (Postmark's retry) is the same event.
    again = orjson.dumps(orjson.loads(body), option=orjson.OPT_INDENT_2)
    assert guard.accept(again, headers, SECRET) == "replayed_signature"
    # Another event of the same message is not a replay.
    assert guard.accept(body_of("delivery"), headers, SECRET) == "accepted"
    later = body_of("bounce_hard", BouncedAt="2019-11-06T10:00:00Z", ID=43)
    assert guard.accept(later, headers, SECRET) == "accepted"


def test_a_tampered_post_with_the_right_credentials_is_another_event() -> None:
    """Postmark signs nothing: the credentials are all there is. A changed body is read
    as what it says (and is its own event for the replay check)."""
    headers = basic("hooks", "s3cret-pa55:word")
    original = verify_webhook(body_of("delivery"), headers, SECRET)
    tampered = verify_webhook(
        body_of("delivery", DeliveredAt="2030-01-01T00:00:00Z"), headers, SECRET
    )
    assert original is not None and tampered is not None
    assert original.signature != tampered.signature
    # ... and without the credentials a tampered post is refused like any other.
    assert verify_webhook(body_of("delivery", Recipient="x@example.com"), {}, SECRET) is None


def test_a_body_that_is_not_json_verifies_but_does_not_parse() -> None:
    signed = verify_webhook(b"not json", basic("hooks", "s3cret-pa55:word"), SECRET)
    assert signed is not None and signed.signature.startswith("postmark:body:")
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_webhook(b"not json")


# --- parse ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "event", "email", "message_id", "at"),
    [
        ("delivery", "delivered", "john@example.com", "883953f4-6105-42a2-a16a-77a8eac79483", "2019-11-05T16:33:54.9070259Z"),
        ("bounce_hard", "bounced", "john@example.com", "883953f4-6105-42a2-a16a-77a8eac79483", "2019-11-05T16:33:54.9070259Z"),
        ("bounce_soft", "soft_bounced", "john@example.com", "883953f4-6105-42a2-a16a-77a8eac79483", "2019-11-05T16:33:54.9070259Z"),
        ("spam_complaint", "complained", "john@example.com", "00000000-0000-0000-0000-000000000000", "2019-11-05T16:33:54.9070259Z"),
        ("open", "opened", "john@example.com", "00000000-0000-0000-0000-000000000000", "2019-11-05T16:33:54.9070259Z"),
        ("click", "clicked", "john@example.com", "00000000-0000-0000-0000-000000000000", "2017-10-25T15:21:11.9065619Z"),
        ("subscription_change", "bounced", "bounced-address@wildbit.com", "883953f4-6105-42a2-a16a-77a8eac79483", "2020-02-01T10:53:34.416071Z"),
    ],
)  # fmt: skip
def test_documented_payloads_parse(
    name: str, event: str, email: str, message_id: str, at: str
) -> None:
    from datetime import datetime

    (parsed,) = parse_webhook((FIXTURES / f"{name}.json").read_bytes())
    assert parsed.ref == REF
    assert parsed.event == event
    assert parsed.email == email
    assert parsed.provider_message_id == message_id
    assert parsed.timestamp == pytest.approx(datetime.fromisoformat(at).timestamp())
    assert parsed.event_id == "postmark:" + event_id(fixture(name))


def test_event_ids_are_unique_and_stable() -> None:
    names = [p.stem for p in FIXTURES.glob("*.json") if p.stem != "batch_response"]
    ids = [parse_webhook((FIXTURES / f"{n}.json").read_bytes())[0].event_id for n in names]
    assert len(set(ids)) == len(ids) == 7
    again = [parse_webhook((FIXTURES / f"{n}.json").read_bytes())[0].event_id for n in names]
    assert again == ids


@pytest.mark.parametrize(
    ("changes", "event"),
    [
        ({"Type": "Transient", "Inactive": False}, "soft_bounced"),
        ({"Type": "DnsError", "Inactive": False}, "soft_bounced"),
        ({"Type": "SoftBounce", "Inactive": True}, "bounced"),  # deactivated: hard now
        ({"Type": "BadEmailAddress"}, "bounced"),
        ({"Type": "SpamComplaint"}, "complained"),
        ({"Type": "Unsubscribe"}, "unsubscribed"),
        ({"Type": "AutoResponder"}, None),
        ({"Type": "OpenRelayTest"}, None),
        ({"Type": "SomethingNew"}, None),
    ],
)
def test_bounce_types(changes: dict[str, Any], event: str | None) -> None:
    events = parse_webhook(body_of("bounce_hard", **changes))
    assert [e.event for e in events] == ([event] if event else [])


@pytest.mark.parametrize(
    ("changes", "event"),
    [
        ({"SuppressSending": True, "SuppressionReason": "HardBounce"}, "bounced"),
        ({"SuppressSending": True, "SuppressionReason": "SpamComplaint"}, "complained"),
        ({"SuppressSending": True, "SuppressionReason": "ManualSuppression"}, "unsubscribed"),
        ({"SuppressSending": False, "SuppressionReason": None}, "resubscribed"),
        ({"SuppressSending": "true"}, None),
    ],
)
def test_subscription_changes(changes: dict[str, Any], event: str | None) -> None:
    events = parse_webhook(body_of("subscription_change", **changes))
    assert [e.event for e in events] == ([event] if event else [])


def test_every_event_type_is_produced() -> None:
    produced = {
        e.event
        for name in ("delivery", "bounce_hard", "bounce_soft", "spam_complaint", "open", "click")
        for e in parse_webhook((FIXTURES / f"{name}.json").read_bytes())
    }
    for changes in (
        {"SuppressSending": True, "SuppressionReason": "ManualSuppression"},
        {"SuppressSending": False},
    ):
        produced |= {e.event for e in parse_webhook(body_of("subscription_change", **changes))}
    assert produced <= WEBHOOK_EVENTS
    assert produced == {
        "delivered",
        "bounced",
        "soft_bounced",
        "complained",
        "opened",
        "clicked",
        "unsubscribed",
        "resubscribed",
    }


def test_records_not_about_our_messages_yield_nothing() -> None:
    manual = body_of("subscription_change", MessageID=None, Metadata={})
    assert parse_webhook(manual) == []
    assert parse_webhook(body_of("delivery", Metadata={"other": "x"})) == []
    assert parse_webhook(body_of("delivery", Metadata=None)) == []
    assert parse_webhook(orjson.dumps({"RecordType": "Inbound", "MessageID": "m"})) == []
    assert parse_webhook(orjson.dumps({"RecordType": "SomethingNew"})) == []


def test_an_array_of_records_parses_in_order() -> None:
    body = orjson.dumps([fixture("delivery"), fixture("open"), fixture("click")])
    assert [e.event for e in parse_webhook(body)] == ["delivered", "opened", "clicked"]
    signed = verify_webhook(body, basic("hooks", "s3cret-pa55:word"), SECRET)
    assert signed is not None and signed.signature.count(",") == 2


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{", "not valid JSON"),
        (b"[1]", "must be an object"),
        (orjson.dumps(fixture("delivery") | {"MessageID": None}), "MessageID"),
        (orjson.dumps(fixture("delivery") | {"MessageID": 5}), "MessageID"),
        (orjson.dumps(fixture("delivery") | {"DeliveredAt": "yesterday"}), "DeliveredAt"),
        (orjson.dumps(fixture("delivery") | {"DeliveredAt": None}), "DeliveredAt"),
        (orjson.dumps(fixture("open") | {"Recipient": 7}), "recipient"),
    ],
)
def test_malformed_records_raise(body: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_webhook(body)
