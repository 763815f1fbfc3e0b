"""What the provider adapter tests share: a closed loopback port, closing an adapter after
use, the checks that results (and credentials checks) leak no address or secret and that
a fake delivered every message exactly once, what engine.webhooks.receive does with a verified post, and posts
signed as SNS (a test key and a self-signed certificate) and Svix (Resend) sign them."""

from __future__ import annotations

import base64
import datetime as dt
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any, Protocol, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID
from standardwebhooks.webhooks import Webhook as StandardWebhook

from engine.webhooks import TOLERANCE_SECONDS
from providers.base import CheckResult, Message, SendResult, Signed


class _Closable(Protocol):
    async def close(self) -> None: ...


P = TypeVar("P", bound=_Closable)
D = TypeVar("D")


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@asynccontextmanager
async def closing(provider: P) -> AsyncIterator[P]:
    """``provider`` while inside, closed after."""
    try:
        yield provider
    finally:
        await provider.close()


def assert_no_secrets(
    results: Iterable[SendResult], *secrets: str, pause_reason: bool = False
) -> None:
    """No result's error (and, with ``pause_reason``, pause reason) names an address or
    one of ``secrets``."""
    for result in results:
        texts = [result.error or ""] + ([result.pause_reason or ""] if pause_reason else [])
        for text in texts:
            assert "@" not in text, text
            for secret in secrets:
                assert secret not in text, text


def checked(result: CheckResult, ok: bool, *secrets: str, call: str | None = None) -> str:
    """``result`` is ``ok`` (or not), names its ``call``, and its detail (returned) holds
    no address and none of ``secrets``."""
    assert result.ok is ok, result
    assert result.detail and "@" not in result.detail, result.detail
    for secret in secrets:
        assert secret not in result.detail and secret not in repr(result), result
    if call is not None:
        assert result.call == call
    return result.detail


def assert_delivered_exactly(
    delivered: Iterable[D],
    messages: list[Message],
    results: list[SendResult],
    ref_of: Callable[[D], str],
    check: Callable[[Message, SendResult, D], None],
) -> None:
    """Every accepted message reached its recipient once: ``delivered`` holds one record
    per ref (``ref_of``), each as ``check`` expects for its message and result."""
    by_ref: dict[str, D] = {}
    for record in delivered:
        ref = ref_of(record)
        assert ref not in by_ref, f"{ref} was delivered twice"
        by_ref[ref] = record
    assert [r.ref for r in results] == [m.ref for m in messages]
    for message, result in zip(messages, results, strict=True):
        assert result.ok, result.error
        check(message, result, by_ref[message.ref])
    assert len(by_ref) == len(messages)


class ReplayGuard:
    """What engine.webhooks.receive does with a verified post: refuse it when its
    timestamp is out of tolerance, and when its replay key (its signature) was seen
    before."""

    def __init__(self, tolerance: float = TOLERANCE_SECONDS) -> None:
        self.tolerance = tolerance
        self.seen: set[str] = set()

    def judge(self, signed: Signed | None) -> str:
        if signed is None:
            return "bad_signature"
        if abs(time.time() - signed.timestamp) > self.tolerance:
            return "stale_signature"
        if signed.signature in self.seen:
            return "replayed_signature"
        self.seen.add(signed.signature)
        return "accepted"


# --- SNS (SES) -------------------------------------------------------------------------


def make_cert(key: rsa.RSAPrivateKey, *, not_before: dt.datetime, not_after: dt.datetime) -> bytes:
    """A self-signed PEM certificate for ``key``, standing in for SNS's signing certificate."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.amazonaws.com")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


class CertFetcher:
    """A ``fetch_cert`` that serves one PEM and records the URLs asked for."""

    def __init__(self, pem: bytes) -> None:
        self.pem = pem
        self.urls: list[str] = []

    async def __call__(self, url: str) -> bytes:
        self.urls.append(url)
        return self.pem


def documented_string_to_sign(message: dict[str, Any]) -> bytes:
    """The string to sign written out from the SNS documentation, independently of
    providers.ses: name, newline, value, newline, for the fields of the type."""
    if message["Type"] == "Notification":
        names = ["Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"]
    else:
        names = ["Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"]
    return "".join(f"{n}\n{message[n]}\n" for n in names if n in message).encode()


def sign_sns(message: dict[str, Any], key: rsa.RSAPrivateKey, version: str = "1") -> dict[str, Any]:
    """``message`` with ``SignatureVersion`` and the ``Signature`` SNS would give it."""
    signed = dict(message, SignatureVersion=version)
    algorithm = hashes.SHA1() if version == "1" else hashes.SHA256()
    raw = key.sign(documented_string_to_sign(signed), padding.PKCS1v15(), algorithm)
    signed["Signature"] = base64.b64encode(raw).decode()
    return signed


# --- Svix (Resend) -----------------------------------------------------------------------


def svix_headers(body: bytes, secret: str, msg_id: str, at: float | None = None) -> dict[str, str]:
    """The svix-* headers Resend (Svix) sends with ``body``, signed now (or at ``at``)."""
    when = dt.datetime.fromtimestamp(time.time() if at is None else at, tz=dt.UTC)
    signature = StandardWebhook(secret).sign(msg_id, when, body.decode())
    return {
        "svix-id": msg_id,
        "svix-timestamp": str(int(when.timestamp())),
        "svix-signature": signature,
    }
