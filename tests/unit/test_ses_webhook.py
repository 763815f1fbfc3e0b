"""providers.ses webhook: SNS signature verification (v1 and v2), subscription
confirmation and parsing of SES notifications, on AWS's documented sample payloads
(tests/fixtures/ses/README.md names their sources) signed with a test key made here."""

from __future__ import annotations

import base64
import copy
import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from providers.base import Signed
from providers.ses import (
    MAX_AGE,
    REF_HEADER,
    REF_TAG,
    CertCache,
    fetch_signing_cert,
    parse_sns,
    ref_tag,
    sns_timestamp,
    sns_url_ok,
    string_to_sign,
    subscribe_url,
    verify_sns,
)
from tests.provider_support import CertFetcher as Fetcher
from tests.provider_support import documented_string_to_sign, make_cert
from tests.provider_support import sign_sns as sign

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "ses"
TOPIC = "arn:aws:sns:us-west-2:123456789012:MyTopic"
CERT_URL = (
    "https://sns.us-west-2.amazonaws.com/"
    "SimpleNotificationService-f3ecfb7224c7233fe7bb5f59f96de52f.pem"
)
REF = "0b7c1f4e-5d7a-4c1e-9f0e-2a6d3c4b5a69:17"


def load(name: str) -> dict[str, Any]:
    return orjson.loads((FIXTURES / name).read_bytes())


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def pem(key: rsa.RSAPrivateKey) -> bytes:
    """Valid from 2010 to 2040: the documented samples date from 2012 to 2020."""
    return make_cert(
        key,
        not_before=dt.datetime(2010, 1, 1, tzinfo=dt.UTC),
        not_after=dt.datetime(2040, 1, 1, tzinfo=dt.UTC),
    )


@pytest.fixture
def fetcher(pem: bytes) -> Fetcher:
    return Fetcher(pem)


def body(message: dict[str, Any]) -> bytes:
    return orjson.dumps(message)


def at(message: dict[str, Any], seconds: float = 60) -> float:
    """A clock ``seconds`` after the message's Timestamp."""
    return sns_timestamp(message["Timestamp"]) + seconds


def headers_for(message: dict[str, Any]) -> dict[str, str]:
    return {
        "x-amz-sns-message-type": message["Type"],
        "x-amz-sns-message-id": message["MessageId"],
        "x-amz-sns-topic-arn": message["TopicArn"],
    }


async def verify(
    message: dict[str, Any],
    fetcher: Callable[[str], Any],
    *,
    now: float | None = None,
    topics: set[str] | None = None,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
) -> Signed | None:
    return await verify_sns(
        raw if raw is not None else body(message),
        headers_for(message) if headers is None else headers,
        allowed_topics={TOPIC} if topics is None else topics,
        fetch_cert=fetcher,
        now=at(message) if now is None else now,
    )


SNS_SAMPLES = [
    "sns-notification.json",
    "sns-subscription-confirmation.json",
    "sns-unsubscribe-confirmation.json",
]


def test_the_string_to_sign_is_the_documented_one() -> None:
    # The example of "Verifying the signature of an Amazon SNS message when using HTTP
    # query-based requests" (docs.aws.amazon.com/sns/latest/dg/sns-verify-signature-of-
    # message-verify-message-signature.html), Notification and SubscriptionConfirmation.
    notification = {
        "Type": "Notification",
        "MessageId": "4d4dc071-ddbf-465d-bba8-08f81c89da64",
        "TopicArn": "arn:aws:sns:us-east-2:123456789012:s4-MySNSTopic-1G1WEFCOXTC0P",
        "Subject": "My subject",
        "Message": "My Test Message",
        "Timestamp": "2019-01-31T04:37:04.321Z",
        "SignatureVersion": "1",
        "Signature": "x",
        "SigningCertURL": CERT_URL,
        "UnsubscribeURL": "https://sns.us-east-2.amazonaws.com/?Action=Unsubscribe",
    }
    assert string_to_sign(notification) == (
        b"Message\nMy Test Message\n"
        b"MessageId\n4d4dc071-ddbf-465d-bba8-08f81c89da64\n"
        b"Subject\nMy subject\n"
        b"Timestamp\n2019-01-31T04:37:04.321Z\n"
        b"TopicArn\narn:aws:sns:us-east-2:123456789012:s4-MySNSTopic-1G1WEFCOXTC0P\n"
        b"Type\nNotification\n"
    )
    del notification["Subject"]  # "Subject (if included in the message)"
    assert b"Subject" not in string_to_sign(notification)
    confirmation = {
        "Type": "SubscriptionConfirmation",
        "MessageId": "3d891288-136d-417f-bc05-901c108273ee",
        "Token": "233",
        "TopicArn": "arn:aws:sns:us-east-2:123456789012:s4-MySNSTopic-1G1WEFCOXTC0P",
        "Message": "My Test Message",
        "SubscribeURL": "https://sns.us-east-2.amazonaws.com/?Action=ConfirmSubscription",
        "Timestamp": "2019-01-31T19:25:13.719Z",
    }
    assert string_to_sign(confirmation) == (
        b"Message\nMy Test Message\n"
        b"MessageId\n3d891288-136d-417f-bc05-901c108273ee\n"
        b"SubscribeURL\nhttps://sns.us-east-2.amazonaws.com/?Action=ConfirmSubscription\n"
        b"Timestamp\n2019-01-31T19:25:13.719Z\n"
        b"Token\n233\n"
        b"TopicArn\narn:aws:sns:us-east-2:123456789012:s4-MySNSTopic-1G1WEFCOXTC0P\n"
        b"Type\nSubscriptionConfirmation\n"
    )
    for sample in SNS_SAMPLES:
        assert string_to_sign(load(sample)) == documented_string_to_sign(load(sample))


@pytest.mark.parametrize("version", ["1", "2"])
@pytest.mark.parametrize("sample", SNS_SAMPLES)
async def test_a_signed_documented_sample_verifies(
    sample: str, version: str, key: rsa.RSAPrivateKey, fetcher: Fetcher
) -> None:
    message = sign(load(sample), key, version)
    signed = await verify(message, fetcher)
    assert signed == Signed(int(sns_timestamp(message["Timestamp"])), message["Signature"])
    assert fetcher.urls == [CERT_URL]
    # Headers are optional; without them the body alone decides.
    assert await verify(message, fetcher, headers={}) == signed


@pytest.mark.parametrize("version", ["1", "2"])
async def test_a_tampered_body_is_refused(
    version: str, key: rsa.RSAPrivateKey, fetcher: Fetcher
) -> None:
    message = sign(load("sns-notification.json"), key, version)
    assert await verify(message, fetcher) is not None
    for field, value in [
        ("Message", "Hello world?"),
        ("Subject", "My Second Message"),
        ("MessageId", "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf325"),
        ("Timestamp", "2012-05-02T00:54:07.655Z"),
        ("Type", "SubscriptionConfirmation"),
    ]:
        assert await verify(dict(message, **{field: value}), fetcher, headers={}) is None, field
    without_subject = {k: v for k, v in message.items() if k != "Subject"}
    assert await verify(without_subject, fetcher) is None
    other = "1" if version == "2" else "2"  # the signature of one version under the other
    assert await verify(dict(message, SignatureVersion=other), fetcher) is None
    signature = bytearray(base64.b64decode(message["Signature"]))
    signature[10] ^= 1
    flipped = dict(message, Signature=base64.b64encode(signature).decode())
    assert await verify(flipped, fetcher) is None


async def test_a_signature_by_another_key_is_refused(key: rsa.RSAPrivateKey, pem: bytes) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    message = sign(load("sns-notification.json"), other)
    assert await verify(message, Fetcher(pem)) is None


async def test_only_configured_topics_pass(key: rsa.RSAPrivateKey, fetcher: Fetcher) -> None:
    message = sign(load("sns-notification.json"), key)
    assert await verify(message, fetcher, topics=set()) is None
    assert await verify(message, fetcher, topics={TOPIC + "2"}) is None
    # A topic signed for but not the one the headers name, or another message type.
    wrong_header = dict(headers_for(message), **{"X-Amz-Sns-Topic-Arn": TOPIC + "2"})
    del wrong_header["x-amz-sns-topic-arn"]
    assert await verify(message, fetcher, headers=wrong_header) is None
    wrong_type = dict(headers_for(message), **{"x-amz-sns-message-type": "Other"})
    assert await verify(message, fetcher, headers=wrong_type) is None
    assert fetcher.urls == []  # refused before any certificate is fetched


BAD_CERT_URLS = [
    "https://sns.us-east-1.amazonaws.com.evil.com/x.pem",
    "http://sns.us-east-1.amazonaws.com/x.pem",
    "https://evil.com/sns.us-east-1.amazonaws.com/x.pem",
    "https://sns.us-east-1.amazonaws.com@evil.com/x.pem",
    "https://evil.com@sns.us-east-1.amazonaws.com/x.pem",
    "https://user:pw@sns.us-east-1.amazonaws.com/x.pem",
    "https://sns.us-east-1.amazonaws.com:443/x.pem",
    "https://sns.us-east-1.amazonaws.com:8443/x.pem",
    "https://sns.us-east-1.amazonaws.com\\@evil.com/x.pem",
    "https://sns.us-east-1.amazonaws.com/x.pem?x=1",
    "https://sns.us-east-1.amazonaws.com/x.pem#x",
    "https://sns.us-east-1.amazonaws.com/x.txt",
    "https://sns.us-east-1.amazonaws.com/",
    "https://sns.us-east-1.amazonaws.com/a/../x.pem",
    "https://sns.us-east-1.amazonaws.com/%2e%2e/x.pem",
    "https://sns.evil.com/x.pem",
    "https://sns.us-east-1.amazonaws.co/x.pem",
    "https://xsns.us-east-1.amazonaws.com/x.pem",
    "https://sns.us-east-1.amazonaws.com./x.pem",
    "https://sns.us-east-1.evil.amazonaws.com/x.pem",
    "https://sns.us-east-1.amazonaws.com%2eevil.com/x.pem",
    "https://sns.us-east-1.amazonaws.com /x.pem",
    "https://SNS.US-EAST-1.AMAZONAWS.COM/x.pem",
    "ftp://sns.us-east-1.amazonaws.com/x.pem",
    "//sns.us-east-1.amazonaws.com/x.pem",
    "https://sns.us-east-1.amazonaws.com/x.pem\n",
    "https://sns.üs-east-1.amazonaws.com/x.pem",
    "",
    None,
    42,
]


@pytest.mark.parametrize("url", BAD_CERT_URLS)
async def test_a_certificate_url_off_sns_is_refused_without_fetching(
    url: object, key: rsa.RSAPrivateKey, fetcher: Fetcher
) -> None:
    # The URL is not part of what SNS signs: an attacker may change it freely.
    message = sign(load("sns-notification.json"), key)
    message["SigningCertURL"] = url
    assert not sns_url_ok(url)
    assert await verify(message, fetcher) is None
    assert fetcher.urls == []
    with pytest.raises(ValueError):
        await fetch_signing_cert(url)  # type: ignore[arg-type]


def test_sns_certificate_urls_that_pass() -> None:
    assert sns_url_ok(CERT_URL)
    assert sns_url_ok("https://sns.eu-west-1.amazonaws.com/SimpleNotificationService-a1.pem")
    assert sns_url_ok("https://sns.us-gov-west-1.amazonaws.com/SimpleNotificationService-b.pem")
    assert sns_url_ok("https://sns.cn-north-1.amazonaws.com.cn/SimpleNotificationService-c.pem")
    assert not sns_url_ok(CERT_URL, kind="subscribe")


async def test_old_and_future_timestamps_are_refused(
    key: rsa.RSAPrivateKey, fetcher: Fetcher
) -> None:
    message = sign(load("sns-notification.json"), key, "2")
    sent = sns_timestamp(message["Timestamp"])
    assert await verify(message, fetcher, now=sent + MAX_AGE - 1) is not None
    assert await verify(message, fetcher, now=sent + MAX_AGE + 1) is None  # a replay
    assert await verify(message, fetcher, now=sent - 60) is not None  # small clock skew
    assert await verify(message, fetcher, now=sent - 3600) is None
    for stamp in ("2012-05-02 00:54:06.655Z", "2012-05-02T00:54:06.655+00:00", "yesterday"):
        resigned = sign(dict(message, Timestamp=stamp), key, "2")
        assert await verify(resigned, fetcher, now=sent) is None


async def test_a_certificate_out_of_its_validity_is_refused(key: rsa.RSAPrivateKey) -> None:
    expired = make_cert(
        key,
        not_before=dt.datetime(2000, 1, 1, tzinfo=dt.UTC),
        not_after=dt.datetime(2011, 1, 1, tzinfo=dt.UTC),
    )
    message = sign(load("sns-notification.json"), key)
    assert await verify(message, Fetcher(expired)) is None


async def test_unusable_certificates_and_fetch_failures_are_refused(
    key: rsa.RSAPrivateKey,
) -> None:
    message = sign(load("sns-notification.json"), key)

    async def unreachable(_url: str) -> bytes:
        raise OSError("connection refused")

    assert await verify(message, unreachable) is None
    assert await verify(message, Fetcher(b"not a certificate")) is None
    ec_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    ec_cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ec_key.public_key())
        .serial_number(1)
        .not_valid_before(dt.datetime(2010, 1, 1, tzinfo=dt.UTC))
        .not_valid_after(dt.datetime(2040, 1, 1, tzinfo=dt.UTC))
        .sign(ec_key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    assert await verify(message, Fetcher(ec_cert)) is None
    good = make_cert(
        key,
        not_before=dt.datetime(2010, 1, 1, tzinfo=dt.UTC),
        not_after=dt.datetime(2040, 1, 1, tzinfo=dt.UTC),
    )
    assert await verify(message, lambda _url: good) is not None  # a sync fetcher works too


async def test_malformed_posts_are_refused(key: rsa.RSAPrivateKey, fetcher: Fetcher) -> None:
    message = sign(load("sns-notification.json"), key)
    for raw in (b"", b"not json", b"[]", b'"x"', b"{}", b"\xff\xfe", b" " * (2 * 1024 * 1024)):
        assert await verify(message, fetcher, raw=raw) is None
    for change in (
        {"SignatureVersion": "3"},
        {"SignatureVersion": None},
        {"Signature": "not base64!"},
        {"Signature": None},
        {"Message": {"not": "a string"}},
        {"MessageId": None},
        {"TopicArn": None},
        {"Type": "Other"},
    ):
        assert await verify(dict(message, **change), fetcher, headers={}) is None, change
    for missing in ("Signature", "SigningCertURL", "Timestamp", "Message", "MessageId"):
        stripped = {k: v for k, v in message.items() if k != missing}
        assert await verify(stripped, fetcher, headers={}, now=at(message)) is None, missing


async def test_the_subscribe_url_comes_only_from_a_signed_confirmation(
    key: rsa.RSAPrivateKey, fetcher: Fetcher
) -> None:
    sample = load("sns-subscription-confirmation.json")
    message = sign(sample, key, "2")

    async def url_of(msg: dict[str, Any], **kwargs: Any) -> str | None:
        return await subscribe_url(
            body(msg),
            headers_for(msg),
            allowed_topics=kwargs.get("topics", {TOPIC}),
            fetch_cert=fetcher,
            now=at(msg),
        )

    assert await url_of(message) == sample["SubscribeURL"]
    assert await url_of(sample) is None  # its EXAMPLE signature does not verify
    assert await url_of(message, topics={TOPIC + "2"}) is None
    tampered = dict(message, SubscribeURL=sample["SubscribeURL"].replace("us-west-2", "us-east-1"))
    assert await url_of(tampered) is None
    # Even signed by a key we accept, a SubscribeURL off SNS (SSRF) or for another topic
    # or action is not given out.
    for url in (
        "https://sns.us-west-2.amazonaws.com.evil.com/?Action=ConfirmSubscription"
        f"&TopicArn={TOPIC}&Token=1",
        f"http://sns.us-west-2.amazonaws.com/?Action=ConfirmSubscription&TopicArn={TOPIC}",
        f"https://169.254.169.254/?Action=ConfirmSubscription&TopicArn={TOPIC}",
        f"https://sns.us-west-2.amazonaws.com@evil.com/?Action=ConfirmSubscription&TopicArn={TOPIC}",
        f"https://sns.us-west-2.amazonaws.com/?Action=Unsubscribe&TopicArn={TOPIC}",
        "https://sns.us-west-2.amazonaws.com/?Action=ConfirmSubscription"
        f"&TopicArn={TOPIC}2&Token=1",
        f"https://sns.us-west-2.amazonaws.com/evil?Action=ConfirmSubscription&TopicArn={TOPIC}",
    ):
        assert await url_of(sign(dict(sample, SubscribeURL=url), key, "2")) is None, url
    # Not for the other two types.
    for other in ("sns-unsubscribe-confirmation.json", "sns-notification.json"):
        assert await url_of(sign(load(other), key)) is None
    assert await url_of(dict(message, Timestamp="2012-04-26T20:45:05.751Z")) is None


async def test_the_certificate_cache_fetches_each_url_once(
    key: rsa.RSAPrivateKey, pem: bytes
) -> None:
    upstream = Fetcher(pem)
    cache = CertCache(upstream, size=2)
    message = sign(load("sns-notification.json"), key)
    for _ in range(3):
        assert await verify(message, cache) is not None
    assert upstream.urls == [CERT_URL]
    other = "https://sns.eu-west-1.amazonaws.com/SimpleNotificationService-2.pem"
    third = "https://sns.eu-west-1.amazonaws.com/SimpleNotificationService-3.pem"
    for url in (other, third, CERT_URL):
        await cache(url)
    assert upstream.urls == [CERT_URL, other, third, CERT_URL]  # size 2: the first went
    bad = CertCache(Fetcher(b"junk"))
    with pytest.raises(ValueError):
        await bad(CERT_URL)
    assert await verify(message, bad) is None


# --- parsing -------------------------------------------------------------------------


def with_ref(ses: dict[str, Any], *, how: str = "header") -> dict[str, Any]:
    ses = copy.deepcopy(ses)
    mail = ses["mail"]
    if how == "header":
        mail.setdefault("headers", []).append({"name": REF_HEADER, "value": REF})
    else:
        mail.setdefault("tags", {})[REF_TAG] = [ref_tag(REF)]
    return ses


def envelope(ses: dict[str, Any], message_id: str = "sns-1") -> bytes:
    sample = load("sns-notification.json")
    sample.pop("Subject")
    return body(dict(sample, MessageId=message_id, Message=orjson.dumps(ses).decode()))


MID = "EXAMPLE7c191be45-e9aedb9a-02f9-4d12-a87d-dd0099a07f8a-000000"
PARSED = [
    # sample, event, message id, recipients, timestamp
    (
        "notification-bounce.json",
        "bounced",
        "00000138111222aa-33322211-cccc-cccc-cccc-ddddaaaa0680-000000",
        ["jane@example.com"],
        "2016-01-27T14:59:38.237Z",
    ),
    (
        "notification-complaint.json",
        "complained",
        "000001378603177f-7a5433e7-8edb-42ae-af10-f0181f34d6ee-000000",
        ["richard@example.com"],
        "2016-01-27T14:59:38.237Z",
    ),
    (
        "notification-delivery.json",
        "delivered",
        "0000014644fe5ef6-9a483358-9170-4cb4-a269-f5dcdf415321-000000",
        ["jane@example.com"],
        "2016-01-27T14:59:38.237Z",
    ),
    ("event-bounce.json", "bounced", MID, ["recipient@example.com"], "2017-08-05T00:41:02.669Z"),
    (
        "event-complaint.json",
        "complained",
        MID,
        ["recipient@example.com"],
        "2017-08-05T00:41:02.669Z",
    ),
    (
        "event-delivery.json",
        "delivered",
        MID,
        ["recipient@example.com"],
        "2016-10-19T23:21:04.133Z",
    ),
    ("event-send.json", "sent", MID, ["recipient@example.com"], "2016-10-14T05:02:16.645Z"),
    ("event-reject.json", "rejected", MID, ["sender@example.com"], "2016-10-14T17:38:15.211Z"),
    ("event-open.json", "opened", MID, ["recipient@example.com"], "2017-08-09T22:00:19.652Z"),
    ("event-click.json", "clicked", MID, ["recipient@example.com"], "2017-08-09T23:51:25.570Z"),
    (
        "event-delivery-delay.json",
        "deferred",
        MID,
        ["recipient@example.com"],
        "2020-06-16T00:25:40.095Z",
    ),
]


@pytest.mark.parametrize(("sample", "event", "message_id", "emails", "stamp"), PARSED)
@pytest.mark.parametrize("how", ["header", "tag"])
def test_every_documented_sample_parses_into_its_events(
    sample: str, event: str, message_id: str, emails: list[str], stamp: str, how: str
) -> None:
    events = parse_sns(envelope(with_ref(load(sample), how=how), "sns-42"))
    assert [(e.ref, e.event, e.provider_message_id, e.email) for e in events] == [
        (REF, event, message_id, email) for email in emails
    ]
    assert all(e.timestamp == sns_timestamp(stamp) for e in events)
    assert [e.event_id for e in events] == [f"sns-42:{email}" for email in emails]


def test_one_event_per_recipient_and_bounce_types() -> None:
    ses = with_ref(load("notification-bounce.json"))
    ses["bounce"]["bouncedRecipients"].append({"emailAddress": "Mary@Example.com"})
    events = parse_sns(envelope(ses))
    assert [e.email for e in events] == ["jane@example.com", "Mary@Example.com"]
    assert len({e.event_id for e in events}) == 2
    assert events[1].event_id == "sns-1:mary@example.com"
    for bounce_type, event in (("Transient", "soft_bounced"), ("Undetermined", "soft_bounced")):
        ses["bounce"]["bounceType"] = bounce_type
        assert {e.event for e in parse_sns(envelope(ses))} == {event}
    # The same SNS message again (SNS retries keep the MessageId) gives the same ids.
    assert [e.event_id for e in parse_sns(envelope(ses))] == [e.event_id for e in events]


def test_the_header_ref_wins_and_mail_without_a_ref_gives_no_event() -> None:
    ses = with_ref(with_ref(load("event-delivery.json")), how="tag")
    ses["mail"]["tags"][REF_TAG] = [ref_tag("other:1")]
    assert [e.ref for e in parse_sns(envelope(ses))] == [REF]
    for sample, *_ in PARSED:
        assert parse_sns(envelope(load(sample))) == []  # as documented: not our mail
    ses = load("event-delivery.json")
    ses["mail"]["headers"].append({"name": "x-batchsender-ref", "value": " b:1 "})
    assert [e.ref for e in parse_sns(envelope(ses))] == ["b:1"]
    ses = load("event-delivery.json")
    ses["mail"]["tags"][REF_TAG] = ["!!!"]
    assert parse_sns(envelope(ses)) == []


def test_confirmations_and_messages_about_no_mail_give_no_events() -> None:
    for sample in ("sns-subscription-confirmation.json", "sns-unsubscribe-confirmation.json"):
        assert parse_sns(body(load(sample))) == []
    assert parse_sns(envelope(with_ref(load("event-rendering-failure.json")))) == []
    succeeded = {
        "notificationType": "AmazonSnsSubscriptionSucceeded",
        "message": "You have successfully subscribed your Amazon SNS topic to receive "
        "'Bounce' notifications from Amazon SES for identity 'example.com'.",
    }
    assert parse_sns(envelope(succeeded)) == []
    future = with_ref(load("event-send.json"))
    future["eventType"] = "SomethingNew"
    assert parse_sns(envelope(future)) == []


def _broken(change: Callable[[dict[str, Any]], None]) -> bytes:
    ses = with_ref(load("notification-bounce.json"))
    change(ses)
    return envelope(ses)


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[]",
        body({"Type": "Other"}),
        body({"Type": "Notification", "MessageId": "1", "Message": "Hello world!"}),
        body({"Type": "Notification", "MessageId": "1", "Message": "[]"}),
        body({"Type": "Notification", "Message": "{}"}),
        body({"Type": "Notification", "MessageId": "1", "Message": 3}),
        envelope({"mail": {}}),
        _broken(lambda s: s.pop("mail")),
        _broken(lambda s: s["mail"].pop("messageId")),
        _broken(lambda s: s.pop("bounce")),
        _broken(lambda s: s["bounce"].update(bounceType="Sideways")),
        _broken(lambda s: s["bounce"].update(bouncedRecipients=[])),
        _broken(lambda s: s["bounce"].update(bouncedRecipients=[{"emailAddress": "nobody"}])),
        _broken(lambda s: s["bounce"].update(bouncedRecipients=[{}])),
        _broken(lambda s: s["bounce"].update(timestamp="27 Jan 2016")),
        _broken(lambda s: (s["bounce"].pop("timestamp"), s["mail"].pop("timestamp"))),
    ],
)
def test_malformed_notifications_raise_value_error(raw: bytes) -> None:
    with pytest.raises(ValueError):
        parse_sns(raw)
