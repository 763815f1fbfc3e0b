"""SendGrid's Signed Event Webhook: the signature check and the event parser, on the
documented sample events (tests/fixtures/sendgrid) signed with a P-256 key made here."""

from __future__ import annotations

import base64
import time
from pathlib import Path
from types import SimpleNamespace

import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from devkit.fakes.sendgrid import new_signing_key, sign, signed_headers, verification_key
from engine.webhooks import TOLERANCE_SECONDS
from providers.base import WEBHOOK_EVENTS, Signed
from providers.sendgrid import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WEBHOOK,
    load_public_key,
    parse_webhook,
    verify_signature,
)
from tests.provider_support import ReplayGuard

BODY = (Path(__file__).parent.parent / "fixtures" / "sendgrid" / "events.json").read_bytes()
REF = "6f9619ff-8b86-4011-b42d-00c04fc964ff"
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return new_signing_key()


@pytest.fixture(scope="module")
def public(key: ec.EllipticCurvePrivateKey) -> str:
    return verification_key(key)


class Receiver(ReplayGuard):
    """A ReplayGuard for posts verified with ``public_key``."""

    def __init__(self, public_key: str) -> None:
        super().__init__()
        self.public_key = public_key

    def receive(self, body: bytes, headers: dict[str, str]) -> str:
        return self.judge(verify_signature(body, headers, self.public_key))


def test_a_documented_post_signed_by_sendgrid_verifies(
    public: str, key: ec.EllipticCurvePrivateKey
) -> None:
    headers = signed_headers(BODY, key)
    signed = verify_signature(BODY, headers, public)
    assert isinstance(signed, Signed)
    assert signed.timestamp == int(headers[TIMESTAMP_HEADER])
    assert (
        signed.signature.startswith("sendgrid:") and len(signed.signature) == len("sendgrid:") + 64
    )
    assert headers[SIGNATURE_HEADER] not in signed.signature  # the key is not the signature


def test_the_key_may_be_pem_and_header_names_any_case(key: ec.EllipticCurvePrivateKey) -> None:
    pem = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    headers = {k.lower(): v for k, v in signed_headers(BODY, key).items()}
    assert verify_signature(BODY, headers, pem) is not None
    text = verification_key(key)
    wrapped = "\n".join(text[i : i + 40] for i in range(0, len(text), 40))  # as pasted
    assert verify_signature(BODY, signed_headers(BODY, key), wrapped) is not None


def test_a_tampered_body_or_timestamp_does_not_verify(
    public: str, key: ec.EllipticCurvePrivateKey
) -> None:
    headers = signed_headers(BODY, key)
    assert verify_signature(BODY.replace(b'"bounce"', b'"delivered"', 1), headers, public) is None
    assert verify_signature(BODY + b" ", headers, public) is None
    later = {**headers, TIMESTAMP_HEADER: str(int(headers[TIMESTAMP_HEADER]) + 1)}
    assert verify_signature(BODY, later, public) is None


def test_another_key_or_a_broken_header_does_not_verify(
    public: str, key: ec.EllipticCurvePrivateKey
) -> None:
    headers = signed_headers(BODY, key)
    other = new_signing_key()
    assert verify_signature(BODY, headers, verification_key(other)) is None
    assert verify_signature(BODY, signed_headers(BODY, other), public) is None
    for broken in (
        {TIMESTAMP_HEADER: headers[TIMESTAMP_HEADER]},
        {SIGNATURE_HEADER: headers[SIGNATURE_HEADER]},
        {**headers, SIGNATURE_HEADER: "not base64!"},
        {**headers, SIGNATURE_HEADER: base64.b64encode(b"not DER").decode()},
        {**headers, SIGNATURE_HEADER: headers[SIGNATURE_HEADER] + "é"},
        {**headers, TIMESTAMP_HEADER: "12x"},
        {**headers, TIMESTAMP_HEADER: "١٢٣"},  # Unicode digits
        {**headers, TIMESTAMP_HEADER: "1" * 13},
        {},
    ):
        assert verify_signature(BODY, broken, public) is None


def test_a_key_that_is_not_p256_never_verifies(key: ec.EllipticCurvePrivateKey) -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    body, at = BODY, int(time.time())
    headers = {TIMESTAMP_HEADER: str(at), SIGNATURE_HEADER: sign(body, p384, at)}  # type: ignore[arg-type]
    assert verify_signature(body, headers, verification_key(p384)) is None  # type: ignore[arg-type]
    edwards = ed25519.Ed25519PrivateKey.generate().public_key()
    der = edwards.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for unusable in (
        base64.b64encode(der).decode(),
        "",
        "not a key",
        "-----BEGIN PUBLIC KEY-----\nxx\n",
    ):
        assert load_public_key(unusable) is None
        assert verify_signature(BODY, signed_headers(BODY, key), unusable) is None


def test_an_expired_post_is_refused_and_a_fresh_one_accepted(
    public: str, key: ec.EllipticCurvePrivateKey
) -> None:
    receiver = Receiver(public)
    old = int(time.time()) - TOLERANCE_SECONDS - 5
    assert verify_signature(BODY, signed_headers(BODY, key, old), public) is not None
    assert receiver.receive(BODY, signed_headers(BODY, key, old)) == "stale_signature"
    future = int(time.time()) + TOLERANCE_SECONDS + 5
    assert receiver.receive(BODY, signed_headers(BODY, key, future)) == "stale_signature"
    assert receiver.receive(BODY, signed_headers(BODY, key)) == "accepted"


def test_a_replay_is_refused_even_with_a_rewritten_signature(
    public: str, key: ec.EllipticCurvePrivateKey
) -> None:
    receiver = Receiver(public)
    headers = signed_headers(BODY, key)
    assert receiver.receive(BODY, headers) == "accepted"
    assert receiver.receive(BODY, dict(headers)) == "replayed_signature"
    # Anyone can turn an ECDSA signature (r, s) into (r, n - s), which verifies as well:
    # the replay key is what was signed, so this copy is refused too.
    r, s = decode_dss_signature(base64.b64decode(headers[SIGNATURE_HEADER]))
    twin = base64.b64encode(encode_dss_signature(r, P256_ORDER - s)).decode()
    assert twin != headers[SIGNATURE_HEADER]
    rewritten = {**headers, SIGNATURE_HEADER: twin}
    assert verify_signature(BODY, rewritten, public) is not None
    assert receiver.receive(BODY, rewritten) == "replayed_signature"
    # A new post of the same events (SendGrid's retry signs anew) is a new post.
    later = signed_headers(BODY, key, int(headers[TIMESTAMP_HEADER]) + 1)
    assert receiver.receive(BODY, later) == "accepted"


def test_every_documented_event_type_is_mapped() -> None:
    events = parse_webhook(BODY)
    assert [(e.ref, e.event) for e in events] == [
        (f"{REF}:1", "dropped"),
        (f"{REF}:2", "delivered"),
        (f"{REF}:3", "deferred"),
        (f"{REF}:4", "bounced"),  # "type": "bounce": a hard bounce
        (f"{REF}:5", "soft_bounced"),  # "type": "blocked"
        (f"{REF}:6", "opened"),
        (f"{REF}:7", "clicked"),
        (f"{REF}:8", "complained"),  # spamreport
        (f"{REF}:9", "unsubscribed"),
    ]  # processed and group (un)subscribes are skipped, and so is the event without a ref
    assert {e.event for e in events} <= WEBHOOK_EVENTS
    bounce = events[3]
    assert bounce.event_id == "6g4ZI7SA-xmRDv57GoPIPw=="
    assert bounce.provider_message_id == "14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.0"
    assert bounce.email == "example@test.com"
    assert bounce.timestamp == 1513299569.0
    assert len({e.event_id for e in events}) == len(events)


def test_what_is_not_ours_or_unknown_is_skipped() -> None:
    posts = [
        {"event": "delivered", "sg_event_id": "a", "timestamp": 1},  # no ref: not sent here
        {"event": "delivered", "sg_event_id": "b", "timestamp": 1, "ref": ""},
        {"event": "machine_opened", "sg_event_id": "c", "timestamp": 1, "ref": f"{REF}:1"},
        {"event": "processed", "sg_event_id": "d", "timestamp": 1, "ref": f"{REF}:1"},
        {"event": 7, "sg_event_id": "e", "timestamp": 1, "ref": f"{REF}:1"},
    ]
    assert parse_webhook(orjson.dumps(posts)) == []
    assert parse_webhook(b"[]") == []


def test_an_event_without_a_type_field_is_a_hard_bounce_and_timestamps_may_be_strings() -> None:
    post = [{"event": "bounce", "sg_event_id": "x", "timestamp": "1513299569", "ref": f"{REF}:3"}]
    (event,) = parse_webhook(orjson.dumps(post))
    assert (event.event, event.timestamp, event.provider_message_id, event.email) == (
        "bounced",
        1513299569.0,
        None,
        None,
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "not valid JSON"),
        (b'{"event": "delivered"}', "JSON array"),
        (b"[1]", "event 0: must be an object"),
        (orjson.dumps([{"event": "delivered", "timestamp": 1, "ref": "b:1"}]), "sg_event_id"),
        (
            orjson.dumps([{"event": "open", "sg_event_id": "", "timestamp": 1, "ref": "b:1"}]),
            "sg_event_id",
        ),
        (orjson.dumps([{"event": "open", "sg_event_id": "i", "ref": "b:1"}]), "timestamp"),
        (
            orjson.dumps([{"event": "open", "sg_event_id": "i", "timestamp": True, "ref": "b:1"}]),
            "timestamp",
        ),
        (
            orjson.dumps(
                [{"event": "open", "sg_event_id": "i", "timestamp": "soon", "ref": "b:1"}]
            ),
            "timestamp",
        ),
    ],
)
def test_a_malformed_post_is_refused(body: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_webhook(body)


def test_the_webhook_spec_verifies_with_an_accounts_key_only(
    public: str, key: ec.EllipticCurvePrivateKey
) -> None:
    assert WEBHOOK.secret(SimpleNamespace()) == ""  # no default account in the settings
    assert WEBHOOK.verify(BODY, signed_headers(BODY, key), "") is None
    assert WEBHOOK.verify(BODY, signed_headers(BODY, key), public) is not None
    assert WEBHOOK.parse(BODY) == parse_webhook(BODY)
    assert set(WEBHOOK.headers) == {SIGNATURE_HEADER, TIMESTAMP_HEADER}
