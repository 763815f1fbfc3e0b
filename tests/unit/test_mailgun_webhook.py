"""Mailgun's webhook: the signature check and the event parser, on the documented sample
payloads (tests/fixtures/mailgun) signed with a test signing key."""

from __future__ import annotations

import hashlib
import hmac
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from devkit.fakes.mailgun import TEST_SIGNING_KEY, signed_post
from engine.webhooks import TOLERANCE_SECONDS
from providers.base import WEBHOOK_EVENTS, Signed
from providers.mailgun import WEBHOOK, parse_webhook, signature, verify_signature
from tests.provider_support import ReplayGuard

FIXTURES = Path(__file__).parent.parent / "fixtures" / "mailgun"
REF = "6f9619ff-8b86-4011-b42d-00c04fc964ff"
KEY = TEST_SIGNING_KEY


def sample(name: str) -> dict[str, Any]:
    return orjson.loads((FIXTURES / f"{name}.json").read_bytes())


def post(event_data: dict[str, Any], **signing: Any) -> bytes:
    return signed_post(event_data, KEY, **signing)


class Receiver(ReplayGuard):
    """A ReplayGuard for posts verified with ``key`` (the replay key: the token)."""

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key

    def receive(self, body: bytes) -> str:
        return self.judge(verify_signature(body, {}, self.key))


def test_the_signature_is_the_documented_hmac() -> None:
    documented = sample("signature")
    stamp, token = documented["timestamp"], documented["token"]
    expected = hmac.new(KEY.encode(), (stamp + token).encode(), hashlib.sha256).hexdigest()
    assert signature(KEY, stamp, token) == expected
    # The documented example's signature is a placeholder: it verifies under no key.
    body = orjson.dumps({"signature": documented, "event-data": sample("delivered")})
    assert verify_signature(body, {}, KEY) is None


def test_a_signed_documented_post_verifies() -> None:
    token = "e0b5477167110d68991efc6b9f89f0a11066af27834600e123"
    body = post(sample("delivered"), token=token)
    signed = verify_signature(body, {}, KEY)
    assert isinstance(signed, Signed)
    assert signed.signature == f"mailgun:{token}"
    assert abs(signed.timestamp - time.time()) < 5


def test_an_integer_timestamp_and_a_subaccount_parent_signature_verify() -> None:
    stamp, token = int(time.time()), "t" * 50
    parent_key = "parent-account-signing-key"
    signed = {
        "timestamp": stamp,
        "token": token,
        "signature": signature("a subaccount's key", str(stamp), token),
        "parent-signature": signature(parent_key, str(stamp), token),
    }
    body = orjson.dumps({"signature": signed, "event-data": sample("opened")})
    assert verify_signature(body, {}, parent_key) == Signed(stamp, f"mailgun:{token}")
    assert verify_signature(body, {}, KEY) is None


def tampered(body: bytes, **changes: Any) -> bytes:
    data = orjson.loads(body)
    data["signature"].update(changes)
    return orjson.dumps(data)


def test_a_wrong_or_tampered_signature_does_not_verify() -> None:
    body = post(sample("delivered"))
    original = orjson.loads(body)["signature"]
    assert verify_signature(body, {}, "another key") is None
    assert verify_signature(body, {}, "") is None
    sig = original["signature"]
    flipped = ("0" if sig[0] != "0" else "1") + sig[1:]
    for changed in (
        tampered(body, signature=flipped),
        tampered(body, signature=sig.upper()),
        tampered(body, signature=sig[:-1]),
        tampered(body, signature="zz" + sig[2:]),
        tampered(body, token=original["token"] + "x"),
        tampered(body, timestamp=str(int(original["timestamp"]) + 1)),
        tampered(body, timestamp="12x"),
        tampered(body, timestamp=True),
        tampered(body, timestamp="1" * 13),
        tampered(body, token=""),
        tampered(body, token="é" * 10),
        tampered(body, token=7),
        tampered(body, signature=None),
    ):
        assert verify_signature(changed, {}, KEY) is None
    for broken in (b"not json", b"[]", b"{}", orjson.dumps({"signature": "x"})):
        assert verify_signature(broken, {}, KEY) is None


def test_an_expired_post_is_refused() -> None:
    receiver = Receiver(KEY)
    old = post(sample("delivered"), timestamp=int(time.time()) - TOLERANCE_SECONDS - 5)
    assert verify_signature(old, {}, KEY) is not None  # the signature itself is right
    assert receiver.receive(old) == "stale_signature"
    assert receiver.receive(
        post(sample("delivered"), timestamp=int(time.time()) + TOLERANCE_SECONDS + 5)
    ) == ("stale_signature")
    assert receiver.receive(post(sample("delivered"))) == "accepted"


def test_a_token_is_accepted_once_whatever_it_comes_with() -> None:
    receiver = Receiver(KEY)
    first = post(sample("delivered"))
    assert receiver.receive(first) == "accepted"
    assert receiver.receive(first) == "replayed_signature"
    # The signature covers timestamp + token only: a captured one pasted onto other event
    # data verifies, and only the token store stops it.
    forged = orjson.loads(first)
    forged["event-data"] = sample("complained")
    forged_body = orjson.dumps(forged)
    assert verify_signature(forged_body, {}, KEY) is not None
    assert receiver.receive(forged_body) == "replayed_signature"
    assert receiver.receive(post(sample("delivered"))) == "accepted"  # a new token


@pytest.mark.parametrize(
    ("name", "event", "number", "message_id"),
    [
        ("delivered", "delivered", 0, "20260203192030.53383e583ab41f62@sample.mailgun.com"),
        ("failed-permanent", "bounced", 1, "20260212174255.58bbb7ce85a423e5@mailgun.com"),
        ("failed-temporary", "deferred", 2, "20260212180106.5c8f35804ae3fd54@sample.mailgun.com"),
        ("opened", "opened", 3, "20260205213049.8e3a7bf607f78309@sample.mailgun.com"),
        ("clicked", "clicked", 4, "20260205213049.8e3a7bf607f78309@sample.mailgun.com"),
        ("unsubscribed", "unsubscribed", 5, "20260205213049.8e3a7bf607f78309@sample.mailgun.com"),
        ("complained", "complained", 6, "20260212182531.0d5ed3254c319957@sample.mailgun.com"),
    ],
)
def test_every_documented_event_type_is_mapped(
    name: str, event: str, number: int, message_id: str
) -> None:
    data = sample(name)
    (parsed,) = parse_webhook(post(data))
    assert parsed.event == event and event in WEBHOOK_EVENTS
    assert parsed.ref == f"{REF}:{number}"
    assert parsed.event_id == data["id"]
    assert parsed.provider_message_id == message_id
    assert parsed.email == data["recipient"]
    assert parsed.timestamp == data["timestamp"]


@pytest.mark.parametrize(
    ("reason", "event"),
    [
        ("bounce", "bounced"),
        ("generic", "bounced"),
        ("suppress-bounce", "dropped"),
        ("suppress-unsubscribe", "dropped"),
        ("suppress-complaint", "dropped"),
        ("old", "dropped"),
    ],
)
def test_a_permanent_failure_is_a_bounce_unless_mailgun_did_not_try(
    reason: str, event: str
) -> None:
    data = sample("failed-permanent")
    data["reason"] = reason
    assert [e.event for e in parse_webhook(post(data))] == [event]
    data["severity"] = "temporary"
    assert [e.event for e in parse_webhook(post(data))] == ["deferred"]


def test_what_is_not_ours_or_not_mapped_gives_no_event() -> None:
    assert parse_webhook(post(sample("accepted"))) == []  # not a delivery outcome
    for variables in ([], {}, {"ref": ""}, {"ref": 5}, {"other": "x"}, None):
        data = sample("delivered")
        data["user-variables"] = variables
        assert parse_webhook(post(data)) == []
    data = sample("delivered")
    data["event"] = "list_member_uploaded"
    assert parse_webhook(post(data)) == []


def test_an_event_may_lack_its_message_and_recipient() -> None:
    data = sample("opened")
    del data["message"], data["recipient"]
    (event,) = parse_webhook(post(data))
    assert (event.provider_message_id, event.email) == (None, None)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"id": ""}, "'id'"),
        ({"id": None}, "'id'"),
        ({"timestamp": "1770146431"}, "'timestamp'"),
        ({"timestamp": True}, "'timestamp'"),
    ],
)
def test_a_malformed_event_of_ours_is_refused(change: dict[str, Any], message: str) -> None:
    data = {**sample("delivered"), **change}
    with pytest.raises(ValueError, match=message):
        parse_webhook(post(data))


@pytest.mark.parametrize("body", [b"not json", b"[]", b'{"signature": {}}', b'{"event-data": []}'])
def test_a_post_without_event_data_is_refused(body: bytes) -> None:
    with pytest.raises(ValueError):
        parse_webhook(body)


def test_the_webhook_spec_verifies_with_an_accounts_key_only() -> None:
    body = post(sample("clicked"))
    assert WEBHOOK.secret(SimpleNamespace()) == ""  # no default account in the settings
    assert WEBHOOK.verify(body, {}, "") is None
    assert WEBHOOK.verify(body, {}, KEY) is not None  # an account's signing key
    assert not WEBHOOK.repeat_is_retry  # a token is used once
    assert WEBHOOK.parse(body) == parse_webhook(body)
    assert WEBHOOK.headers == ()
