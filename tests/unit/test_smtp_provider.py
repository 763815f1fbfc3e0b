"""SmtpProvider against a real aiosmtpd server on 127.0.0.1: sending, and the credentials
check (a login, with and without STARTTLS)."""

from __future__ import annotations

import dataclasses
import datetime
import email.errors
import ipaddress
import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from engine.sender import BatchInfo, build_message
from engine.suppressions import links
from engine.templates import BatchTemplate
from providers import smtp
from providers.base import Account, CheckResult, Message, SendResult
from providers.smtp import SmtpProvider, build_email

# Raised by Pythons whose email package refuses to write a header it cannot fold safely.
HeaderWriteError = getattr(
    email.errors, "HeaderWriteError", type("HeaderWriteError", (email.errors.MessageError,), {})
)


class RecordingHandler:
    """Records delivered envelopes and counts SMTP sessions; ``replies`` refuse recipients."""

    def __init__(self, replies: dict[str, str] | None = None) -> None:
        self.replies = replies or {}
        self.sessions = 0
        self.delivered: list[tuple[str, list[str], EmailMessage]] = []
        self.raw: dict[str, bytes] = {}  # by first recipient: the bytes as received

    async def handle_EHLO(  # noqa: N802 - aiosmtpd hook name
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        self.sessions += 1
        session.host_name = hostname
        return responses

    async def handle_RCPT(  # noqa: N802 - aiosmtpd hook name
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        if address in self.replies:
            return self.replies[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(  # noqa: N802 - aiosmtpd hook name
        self, server: Any, session: Any, envelope: Any
    ) -> str:
        parsed = message_from_bytes(envelope.original_content, policy=policy.default)
        assert isinstance(parsed, EmailMessage)
        self.delivered.append((envelope.mail_from, list(envelope.rcpt_tos), parsed))
        self.raw[envelope.rcpt_tos[0]] = envelope.original_content
        return "250 Message accepted for delivery"

    def by_recipient(self) -> dict[str, EmailMessage]:
        return {rcpts[0]: msg for _, rcpts, msg in self.delivered}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def smtp_server(handler: RecordingHandler, port: int | None = None) -> Iterator[int]:
    """Run an aiosmtpd server on 127.0.0.1; yield its port."""
    port = port or free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield port
    finally:
        controller.stop()


def personalised(count: int, *, prefix: str = "c1") -> list[Message]:
    return [
        Message(
            ref=f"{prefix}:{i}",
            to_email=f"{prefix}-user{i}@example.com",
            to_name=f"Ünïcode User {i}",
            from_email="news@sender.test",
            from_name="Sender Team",
            subject=f"Your offer #{i}",
            html=f"<p>Dear user {i}, here is your offer.</p>",
            text=f"Dear user {i}, here is your offer.",
            headers={
                "List-Unsubscribe": f"<https://unsub.test/{prefix}/{i}>",
                "X-Campaign": prefix,
            },
        )
        for i in range(count)
    ]


async def test_batch_delivered_once_each_over_reused_connections() -> None:
    handler = RecordingHandler()
    with smtp_server(handler) as port:
        provider = SmtpProvider("127.0.0.1", port, pool_size=4, timeout=5)
        try:
            messages = personalised(20)
            results = await provider.send(messages)
            second = await provider.send(personalised(8, prefix="c2"))
        finally:
            await provider.close()

    assert [r.ref for r in results] == [m.ref for m in messages]
    assert all(r.ok and r.error is None for r in results + second)
    assert len(handler.delivered) == 28
    assert handler.sessions <= 4  # both calls reused the pool's connections

    received = handler.by_recipient()
    for message, result in zip(messages, results, strict=True):
        email = received[message.to_email]
        assert email["From"].addresses[0].display_name == "Sender Team"
        assert email["From"].addresses[0].addr_spec == "news@sender.test"
        assert email["To"].addresses[0].display_name == message.to_name
        assert email["To"].addresses[0].addr_spec == message.to_email
        assert email["Subject"] == message.subject
        assert email["List-Unsubscribe"] == message.headers["List-Unsubscribe"]
        assert email["X-Campaign"] == "c1"
        assert email["Message-ID"] == result.provider_message_id
        assert email["Message-ID"].endswith("@sender.test>")
        assert email["Date"]
        plain = email.get_body(("plain",))
        html = email.get_body(("html",))
        assert plain is not None and html is not None
        assert plain.get_content().strip() == message.text
        assert html.get_content().strip() == message.html
    senders = {mail_from for mail_from, _, _ in handler.delivered}
    assert senders == {"news@sender.test"}
    assert len({r.provider_message_id for r in results}) == 20


async def test_550_is_permanent_for_that_message_only() -> None:
    messages = personalised(6)
    handler = RecordingHandler({messages[2].to_email: "550 5.1.1 No such user here"})
    with smtp_server(handler) as port:
        provider = SmtpProvider("127.0.0.1", port, pool_size=2, timeout=5)
        try:
            results = await provider.send(messages)
        finally:
            await provider.close()

    assert [r.ok for r in results] == [True, True, False, True, True, True]
    failed = results[2]
    assert failed.retryable is False
    assert "550" in (failed.error or "") and "No such user" in (failed.error or "")
    assert messages[2].to_email not in handler.by_recipient()
    assert len(handler.delivered) == 5


async def test_451_is_retryable() -> None:
    messages = personalised(3)
    handler = RecordingHandler({messages[1].to_email: "451 4.3.0 Try again later"})
    with smtp_server(handler) as port:
        provider = SmtpProvider("127.0.0.1", port, pool_size=1, timeout=5)
        try:
            results = await provider.send(messages)
        finally:
            await provider.close()

    assert [r.ok for r in results] == [True, False, True]
    assert results[1].retryable is True and "451" in (results[1].error or "")
    assert handler.sessions == 1  # the refusal did not cost the connection


async def test_closed_port_gives_retryable_failures() -> None:
    provider = SmtpProvider("127.0.0.1", free_port(), pool_size=3, timeout=2)
    try:
        results = await provider.send(personalised(7))
    finally:
        await provider.close()
    assert len(results) == 7
    assert all(not r.ok and r.retryable and r.error for r in results)


async def test_reconnects_after_server_closed_connections() -> None:
    handler = RecordingHandler()
    port = free_port()
    provider = SmtpProvider("127.0.0.1", port, pool_size=2, timeout=5)
    try:
        with smtp_server(handler, port):
            assert all(r.ok for r in await provider.send(personalised(4)))
        with smtp_server(handler, port):  # the old connections were closed by the server
            assert all(r.ok for r in await provider.send(personalised(4, prefix="c2")))
    finally:
        await provider.close()
    assert len(handler.delivered) == 8


def test_build_email_variants() -> None:
    base = personalised(1)[0]
    base.html = None
    text_only = build_email(base)
    assert text_only.get_content_type() == "text/plain"

    base.text, base.html = None, "<b>hi</b>"
    base.headers = {"Content-Type": "text/evil", "Bcc": "spy@x.test", "Reply-To": "r@x.test"}
    html_only = build_email(base)
    assert html_only.get_content_type() == "text/html"
    assert html_only["Bcc"] is None and html_only["Reply-To"] == "r@x.test"

    base.headers = {"X-Bad": "a\r\nBcc: spy@x.test"}  # one line: no Bcc header
    written = build_email(base)
    assert written["X-Bad"] == "a Bcc: spy@x.test" and written["Bcc"] is None

    base.headers = {"Bcc: spy@x.test\r\nX-Bad": "v"}
    with pytest.raises(ValueError, match="header name"):
        build_email(base)


def header_block(raw: bytes) -> list[str]:
    """The header lines of a message as received, unfolded, in order."""
    head = raw.split(b"\r\n\r\n", 1)[0].decode("ascii")
    return head.replace("\r\n ", " ").replace("\r\n\t", " ").split("\r\n")


UNSUBSCRIBE = (
    "<https://unsubscribe.sender.test/u/dGFiY2RlZmdoaWoKYW5uLmxvbmduYW1lQGV4YW1wbGUuY29tCg"
    ".c2lnbmF0dXJlc2lnbmF0dXJlMTI>"
)


@pytest.mark.parametrize("built_by", ["engine", "caller"])
@pytest.mark.parametrize(
    "first",
    ["=?utf-8?q?Ann=0D=0AX-Injected:_x?=", "=?utf-8?q?Ann=0D=0AX-Injected:_x=0D=0A=0D=0Abody?="],
)
async def test_encoded_crlf_in_a_variable_stays_inside_the_subject(
    first: str, built_by: str
) -> None:
    """Issue 8, defect 1: the exact payload, rendered into the subject by ``{{ first }}``,
    in a message the engine built (``build_message``) or one a caller built as it liked
    (the adapter makes its headers safe itself)."""
    info = BatchInfo("0b0e6a52-5c4c-4f7e-9d8c-5f3c1e2a9b10", "acme", "smtp", "news@sender.test",
                     "Sender", BatchTemplate("Hi {{ first }}", None, "The body."), False,
                     "queued", 0, None, 0.0)  # fmt: skip
    row = {"seq": 1, "email": "ann@example.com", "name": "Ann", "vars": {"first": first}}
    message = build_message(info, row, links("https://unsubscribe.sender.test", "s" * 32, info.id))
    if built_by == "caller":
        rendered = info.template.render("ann@example.com", "Ann", {"first": first})
        message = dataclasses.replace(message, subject=rendered.subject)
        assert "=0D=0A" in message.subject
    [result], handler = await send_over_one_connection([message])

    assert result.ok, result.error
    lines = header_block(handler.raw["ann@example.com"])
    names = [line.split(":", 1)[0].lower() for line in lines]
    assert "x-injected" not in names
    assert names.count("subject") == 1
    assert {"from", "to", "subject", "message-id", "date", "list-unsubscribe",
            "list-unsubscribe-post", "content-type", "mime-version"} <= set(names)  # fmt: skip
    received = handler.by_recipient()["ann@example.com"]
    assert received["Subject"].startswith("Hi Ann X-Injected: x")
    assert received["X-Injected"] is None
    assert received["Message-ID"] == result.provider_message_id
    assert received["List-Unsubscribe"] == message.headers["List-Unsubscribe"]
    assert received.get_content().strip() == "The body."


async def send_over_one_connection(
    messages: list[Message],
) -> tuple[list[SendResult], RecordingHandler]:
    """``messages`` sent over one connection to a fresh recording server."""
    handler = RecordingHandler()
    with smtp_server(handler) as port:
        provider = SmtpProvider("127.0.0.1", port, pool_size=1, timeout=5)
        try:
            return await provider.send(messages), handler
        finally:
            await provider.close()


async def test_list_unsubscribe_goes_out_as_a_plain_url() -> None:
    """Issue 8, defect 10: RFC 8058 clients read the URL as it is, never an encoded word."""
    [message] = personalised(1)
    message = dataclasses.replace(message, headers={
        "List-Unsubscribe": UNSUBSCRIBE, "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        "X-Two": f"{UNSUBSCRIBE}, <mailto:unsubscribe@sender.test?subject=unsubscribe>",
    })  # fmt: skip
    assert len("List-Unsubscribe: " + UNSUBSCRIBE) > 78  # longer than a folded line
    [result], handler = await send_over_one_connection([message])

    assert result.ok, result.error
    raw = handler.raw[message.to_email]
    assert f"\r\nList-Unsubscribe: {UNSUBSCRIBE}\r\n".encode() in raw
    assert b"\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n" in raw
    # Folded at the space between the two URLs, each whole and unencoded.
    assert f"\r\nX-Two: {UNSUBSCRIBE},\r\n <mailto:".encode() in raw
    lines = header_block(raw)
    assert not [line for line in lines if line.startswith(("List-", "X-Two")) and "=?" in line]
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))


async def test_an_email_package_error_fails_only_that_message(monkeypatch) -> None:
    """``HeaderWriteError`` (raised when the message is written, by patched Pythons) is a
    permanent failure of that message; the connection and the other messages go on."""

    class Unwritable(str):
        name = "X-Unwritable"

        def fold(self, *, policy: Any) -> str:
            raise HeaderWriteError("folded header contains newline")

    def build(message: Message) -> EmailMessage:
        built = build_email(message)
        if message.ref == "c1:1":
            built["X-Unwritable"] = Unwritable("x")
        return built

    monkeypatch.setattr(smtp, "build_email", build)
    messages = personalised(3)
    results, handler = await send_over_one_connection(messages)

    assert [r.ok for r in results] == [True, False, True]
    assert results[1].retryable is False
    assert "HeaderWriteError" in (results[1].error or "")
    assert sorted(handler.by_recipient()) == sorted([messages[0].to_email, messages[2].to_email])
    assert handler.sessions == 1  # the connection was not lost over it


def test_verbatim_headers_refuse_what_would_break_the_line() -> None:
    [message] = personalised(1)
    message.headers = {"List-Unsubscribe": "<https://u.test/" + "x" * 1000 + ">"}
    with pytest.raises(ValueError, match="too long"):
        build_email(message)


# --- the credentials check (connect, TLS, AUTH, QUIT) -------------------------------------

USERNAME, PASSWORD = "mailer@sender.test", "smtp-password-0123456789"


class LoginHandler(RecordingHandler):
    """Records the AUTH attempts (mechanism, login) and the QUITs of each session."""

    def __init__(self) -> None:
        super().__init__()
        self.logins: list[tuple[str, str, bool]] = []
        self.quits = 0

    def authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        good = (data.login, data.password) == (USERNAME.encode(), PASSWORD.encode())
        self.logins.append((mechanism, data.login.decode(), good))
        return AuthResult(success=good, handled=False)

    async def handle_QUIT(  # noqa: N802 - aiosmtpd hook name
        self, server: Any, session: Any, envelope: Any
    ) -> str:
        self.quits += 1
        return "221 Bye"


@contextmanager
def login_server(handler: LoginHandler, **options: Any) -> Iterator[int]:
    """An aiosmtpd server that takes a login (``options``: aiosmtpd's SMTP settings)."""
    port = free_port()
    controller = Controller(
        handler, hostname="127.0.0.1", port=port, authenticator=handler.authenticate, **options
    )
    controller.start()
    try:
        yield port
    finally:
        controller.stop()


def tls_files(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (PEM files in ``folder``)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def account_adapter(port: int, password: str = PASSWORD) -> SmtpProvider:
    return smtp.for_account(
        Account(
            "smtp",
            {"username": USERNAME, "password": password},
            base_url=f"smtp://127.0.0.1:{port}",
        )
    )


def assert_clean(result: CheckResult) -> str:
    assert PASSWORD not in result.detail and USERNAME not in result.detail, result.detail
    assert result.call == "SMTP EHLO, AUTH, QUIT"
    return result.detail


async def test_check_logs_in_with_auth_login_and_quits() -> None:
    handler = LoginHandler()
    with login_server(handler, auth_require_tls=False, auth_exclude_mechanism=["PLAIN"]) as port:
        provider = account_adapter(port)
        try:
            result = await provider.check()
        finally:
            await provider.close()
    assert result.ok, result
    assert assert_clean(result) == (
        "the server accepted the login (AUTH LOGIN) without TLS: the password crossed the "
        "network in clear"
    )
    assert handler.logins == [("LOGIN", USERNAME, True)]
    assert handler.quits == 1 and handler.delivered == []  # nothing sent


async def test_check_a_refused_password() -> None:
    handler = LoginHandler()
    with login_server(handler, auth_require_tls=False) as port:
        provider = account_adapter(port, password="not-the-password")
        try:
            result = await provider.check()
        finally:
            await provider.close()
    assert not result.ok
    detail = assert_clean(result)
    assert detail.startswith("the server refused the login without TLS: 535 ")
    assert "not-the-password" not in detail
    assert handler.quits == 1


async def test_check_over_starttls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """STARTTLS when the server offers it, as a send does (and AUTH only after it, as
    aiosmtpd requires by default): a certificate the client does not trust fails with that
    reason; once trusted, the login is checked over TLS."""
    cert_file, key_file = tls_files(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    handler = LoginHandler()
    with login_server(handler, tls_context=context) as port:
        provider = account_adapter(port)
        try:
            untrusted = await provider.check()
            monkeypatch.setenv("SSL_CERT_FILE", str(cert_file))  # read when a context is made
            trusted = await provider.check()
        finally:
            await provider.close()
    assert not untrusted.ok
    assert "TLS certificate is not trusted" in assert_clean(untrusted)
    assert trusted.ok, trusted
    assert assert_clean(trusted) == "the server accepted the login (AUTH PLAIN) over TLS"
    assert handler.logins == [("PLAIN", USERNAME, True)]


async def test_check_without_auth_or_a_server() -> None:
    handler = LoginHandler()
    with login_server(handler) as port:  # AUTH only over TLS, and it offers no STARTTLS
        provider = account_adapter(port)
        try:
            result = await provider.check()
        finally:
            await provider.close()
    assert not result.ok
    assert assert_clean(result) == "the server offers no login (AUTH) without TLS"
    port = free_port()
    provider = account_adapter(port)
    try:
        result = await provider.check()
    finally:
        await provider.close()
    assert not result.ok
    assert assert_clean(result) == f"127.0.0.1:{port}: connection refused"
