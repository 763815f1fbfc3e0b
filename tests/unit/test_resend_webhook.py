"""Resend webhooks: the Svix signature check (signed here with a test ``whsec_`` secret),
replay identity by svix-id, the parser on Resend's documented sample payloads
(tests/fixtures/resend), and the ref tag encoding."""

from __future__ import annotations

import base64
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from providers.base import WEBHOOK_EVENTS
from providers.resend import (
    decode_ref,
    encode_ref,
    idempotency_key,
    parse_webhook,
    verify_webhook,
)
from tests import provider_support
from tests.provider_support import svix_headers

FIXTURES = Path(__file__).parent.parent / "fixtures" / "resend"
REF = "4f3c2a1e-8b7d-4c6a-9e5f-1a2b3c4d5e6f:7"
TAG_TEXT = re.compile(r"[A-Za-z0-9_-]{1,256}")
SECRET = "whsec_" + base64.b64encode(b"batchsender-test-webhook-secret!").decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"some-other-webhook-secret-value!").decode()
MSG_ID = "msg_2mW0p8Xcq3jNfZ5yB1aKdE7rT9u"
EVENT_FILES = {
    "email_sent": "sent",
    "email_delivered": "delivered",
    "email_delivery_delayed": "deferred",
    "email_bounced": "bounced",
    "email_complained": "complained",
    "email_opened": "opened",
    "email_clicked": "clicked",
}


def fixture(name: str) -> dict[str, Any]:
    return orjson.loads((FIXTURES / f"{name}.json").read_bytes())


def signed_headers(
    body: bytes, *, secret: str = SECRET, msg_id: str = MSG_ID, at: float | None = None
) -> dict[str, str]:
    """The svix-* headers Resend (Svix) sends with ``body``."""
    return svix_headers(body, secret, msg_id, at)


# --- verify ---------------------------------------------------------------------------


def test_a_signed_post_verifies() -> None:
    body = (FIXTURES / "email_delivered.json").read_bytes()
    headers = signed_headers(body)
    signed = verify_webhook(body, headers, SECRET)
    assert signed is not None
    assert signed.timestamp == int(headers["svix-timestamp"])
    assert signed.signature == MSG_ID  # the replay check remembers the svix-id


def test_the_svix_package_and_this_check_agree() -> None:
    svix = pytest.importorskip("svix.webhooks")
    body = (FIXTURES / "email_bounced.json").read_bytes()
    now = datetime.now(tz=UTC)
    signature = svix.Webhook(SECRET).sign(MSG_ID, now, body.decode())
    headers = {
        "svix-id": MSG_ID,
        "svix-timestamp": str(int(now.timestamp())),
        "svix-signature": signature,
    }
    assert verify_webhook(body, headers, SECRET) is not None
    svix.Webhook(SECRET).verify(body, signed_headers(body))  # raises when it disagrees


def test_header_names_match_case_insensitively() -> None:
    body = (FIXTURES / "email_opened.json").read_bytes()
    headers = {k.upper(): v for k, v in signed_headers(body).items()}
    assert verify_webhook(body, headers, SECRET) is not None


def test_a_tampered_body_is_refused() -> None:
    body = (FIXTURES / "email_delivered.json").read_bytes()
    headers = signed_headers(body)
    tampered = body.replace(b"email.delivered", b"email.bounced")
    assert verify_webhook(tampered, headers, SECRET) is None
    assert verify_webhook(body + b" ", headers, SECRET) is None


def test_tampered_headers_are_refused() -> None:
    body = (FIXTURES / "email_delivered.json").read_bytes()
    headers = signed_headers(body)
    assert verify_webhook(body, headers | {"svix-id": "msg_other"}, SECRET) is None
    stamp = str(int(headers["svix-timestamp"]) - 1)
    assert verify_webhook(body, headers | {"svix-timestamp": stamp}, SECRET) is None
    assert verify_webhook(body, headers, OTHER_SECRET) is None


@pytest.mark.parametrize("age", [301, 3600, -301, -3600])
def test_an_expired_or_future_timestamp_is_refused(age: int) -> None:
    body = (FIXTURES / "email_sent.json").read_bytes()
    headers = signed_headers(body, at=time.time() - age)
    assert verify_webhook(body, headers, SECRET) is None


def test_a_timestamp_within_five_minutes_is_accepted() -> None:
    body = (FIXTURES / "email_sent.json").read_bytes()
    assert verify_webhook(body, signed_headers(body, at=time.time() - 250), SECRET) is not None


def test_any_of_several_signatures_may_match() -> None:
    body = (FIXTURES / "email_clicked.json").read_bytes()
    headers = signed_headers(body)
    good = headers["svix-signature"]
    wrong = signed_headers(body, secret=OTHER_SECRET)["svix-signature"]
    for signatures in (
        f"{wrong} {good}",
        f"{good} {wrong}",
        f"v1a,AAAA {good}",  # another scheme
        f"v1 {good}",  # malformed entries are skipped, not fatal
        f"v1,not*base64 {good}",
        f"v2,{good[3:]} {good}",
    ):
        assert verify_webhook(body, headers | {"svix-signature": signatures}, SECRET), signatures
    assert verify_webhook(body, headers | {"svix-signature": wrong}, SECRET) is None
    assert verify_webhook(body, headers | {"svix-signature": f"v2,{good[3:]}"}, SECRET) is None


@pytest.mark.parametrize(
    "change",
    [
        {"svix-id": ""},
        {"svix-timestamp": ""},
        {"svix-signature": ""},
        {"svix-timestamp": "12.5"},
        {"svix-timestamp": "nan"},
        {"svix-timestamp": "1" * 13},
        {"svix-signature": "garbage"},
        {"svix-id": "ünicode"},
    ],
)
def test_missing_or_malformed_headers_are_refused(change: dict[str, str]) -> None:
    body = (FIXTURES / "email_sent.json").read_bytes()
    assert verify_webhook(body, signed_headers(body) | change, SECRET) is None


def test_missing_headers_are_refused() -> None:
    body = (FIXTURES / "email_sent.json").read_bytes()
    headers = signed_headers(body)
    for name in headers:
        assert verify_webhook(body, {k: v for k, v in headers.items() if k != name}, SECRET) is None


@pytest.mark.parametrize("secret", ["", "whsec_", "whsec_!!!!", "not-a-secret"])
def test_a_bad_secret_refuses_everything(secret: str) -> None:
    body = (FIXTURES / "email_sent.json").read_bytes()
    assert verify_webhook(body, signed_headers(body), secret) is None


def test_a_body_that_is_not_utf8_is_refused() -> None:
    body = b'{"type": "email.sent", "x": "\xff"}'
    headers = signed_headers(b"{}")
    assert verify_webhook(body, headers, SECRET) is None


class ReplayGuard(provider_support.ReplayGuard):
    """A ``provider_support.ReplayGuard`` for posts verified here."""

    def accept(self, body: bytes, headers: dict[str, str]) -> str:
        return self.judge(verify_webhook(body, headers, SECRET))


def test_a_replay_is_refused_by_its_svix_id() -> None:
    guard = ReplayGuard()
    body = (FIXTURES / "email_complained.json").read_bytes()
    assert guard.accept(body, signed_headers(body)) == "accepted"
    assert guard.accept(body, signed_headers(body)) == "replayed_signature"
    # Signed again later with the same id (how Svix retries): still the same message.
    assert guard.accept(body, signed_headers(body, at=time.time() + 60)) == "replayed_signature"
    assert guard.accept(body, signed_headers(body, msg_id="msg_another")) == "accepted"


# --- parse ----------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "event"), sorted(EVENT_FILES.items()))
def test_documented_payloads_parse(name: str, event: str) -> None:
    body = (FIXTURES / f"{name}.json").read_bytes()
    (parsed,) = parse_webhook(body, event_id=MSG_ID)
    assert parsed.ref == REF
    assert parsed.event == event
    assert parsed.provider_message_id == "56761188-7520-42d8-8898-ff6fc54ce618"
    assert parsed.email == "delivered@resend.dev"
    assert parsed.timestamp == pytest.approx(
        datetime.fromisoformat("2024-02-22T23:41:12.126Z").timestamp()
    )
    assert parsed.event_id == MSG_ID


def test_without_a_svix_id_the_event_id_is_the_events_identity() -> None:
    ids = {
        parse_webhook((FIXTURES / f"{name}.json").read_bytes())[0].event_id for name in EVENT_FILES
    }
    assert len(ids) == len(EVENT_FILES)
    (event,) = parse_webhook((FIXTURES / "email_sent.json").read_bytes())
    assert event.event_id == (
        "resend:email.sent:56761188-7520-42d8-8898-ff6fc54ce618:2024-02-22T23:41:12.126Z"
    )


def test_every_event_type_is_produced() -> None:
    produced = {
        parse_webhook((FIXTURES / f"{name}.json").read_bytes())[0].event for name in EVENT_FILES
    }
    for kind in ("email.failed", "email.suppressed"):
        body = orjson.dumps(fixture("email_sent") | {"type": kind})
        produced |= {e.event for e in parse_webhook(body)}
    assert produced <= WEBHOOK_EVENTS
    assert produced == {
        "sent",
        "delivered",
        "deferred",
        "bounced",
        "complained",
        "opened",
        "clicked",
        "failed",
        "suppressed",
    }


def test_a_transient_bounce_is_soft_bounced() -> None:
    data = fixture("email_bounced")
    data["data"]["bounce"] = {
        "message": "Mailbox full",
        "subType": "MailboxFull",
        "type": "Transient",
    }
    assert [e.event for e in parse_webhook(orjson.dumps(data))] == ["soft_bounced"]


def test_tags_as_a_list_and_base64_refs() -> None:
    data = fixture("email_delivered")
    data["data"]["tags"] = [{"name": "category", "value": "x"}, encode_ref("odd ref:with:colons")]
    (event,) = parse_webhook(orjson.dumps(data))
    assert event.ref == "odd ref:with:colons"


@pytest.mark.parametrize(
    "tags", [None, {}, {"category": "confirm_email"}, {"ref": "no-underscore"}, [{"name": "ref"}]]
)
def test_an_email_without_our_ref_yields_nothing(tags: Any) -> None:
    data = fixture("email_delivered")
    data["data"]["tags"] = tags
    assert parse_webhook(orjson.dumps(data)) == []


@pytest.mark.parametrize(
    "kind", ["email.received", "email.scheduled", "contact.created", "domain.updated"]
)
def test_other_event_types_yield_nothing(kind: str) -> None:
    assert parse_webhook(orjson.dumps({"type": kind, "created_at": "x", "data": {}})) == []


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{", "not valid JSON"),
        (b"[]", "JSON object"),
        (b'{"data": {}}', "'type'"),
        (b'{"type": "email.sent", "created_at": "2024-02-22T23:41:12Z", "data": 1}', "'data'"),
        (b'{"type": "email.sent", "created_at": "2024-02-22T23:41:12Z", "data": {}}', "email_id"),
        (b'{"type": "email.sent", "created_at": "soon", "data": {"email_id": "e"}}', "created_at"),
        (b'{"type": "email.sent", "data": {"email_id": "e"}}', "created_at"),
    ],
)
def test_malformed_events_raise(body: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_webhook(body)


# --- the ref tag and the idempotency key ----------------------------------------------


def test_an_engine_ref_is_a_readable_tag() -> None:
    assert encode_ref(REF) == {"name": "ref", "value": "4f3c2a1e-8b7d-4c6a-9e5f-1a2b3c4d5e6f_7"}
    assert decode_ref("ref", "4f3c2a1e-8b7d-4c6a-9e5f-1a2b3c4d5e6f_7") == REF
    assert encode_ref("b1:0") == {"name": "ref", "value": "b1_0"}


@given(st.text(min_size=1, max_size=48))
def test_any_ref_round_trips_through_a_valid_tag(ref: str) -> None:
    tag = encode_ref(ref)
    assert TAG_TEXT.fullmatch(tag["name"]) and TAG_TEXT.fullmatch(tag["value"])
    assert decode_ref(tag["name"], tag["value"]) == ref


def test_a_ref_too_long_for_a_tag_is_refused() -> None:
    assert decode_ref(**{"name": "ref_b64", "value": "not base64 at all"}) is None
    encode_ref("é" * 96)  # 192 bytes: 256 base64 characters
    with pytest.raises(ValueError):
        encode_ref("é" * 97)


def test_idempotency_keys() -> None:
    refs = [f"b:{i}" for i in range(100)]
    key = idempotency_key(refs)
    assert key == idempotency_key(list(refs))
    assert key.startswith("batchsender/") and len(key) == 76 and len(key) <= 256
    assert idempotency_key(refs[:99]) != key
    assert idempotency_key(list(reversed(refs))) != key
    assert idempotency_key(refs, "2") != idempotency_key(refs)
    assert idempotency_key(["a", "b"]) != idempotency_key(["a,b"])
