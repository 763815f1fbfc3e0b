"""SmtpProvider against a real aiosmtpd server on 127.0.0.1."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from providers.base import Message
from providers.smtp import SmtpProvider, build_email


class RecordingHandler:
    """Records delivered envelopes and counts SMTP sessions; ``replies`` refuse recipients."""

    def __init__(self, replies: dict[str, str] | None = None) -> None:
        self.replies = replies or {}
        self.sessions = 0
        self.delivered: list[tuple[str, list[str], EmailMessage]] = []

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
            results = await provider.send_batch(messages)
            second = await provider.send_batch(personalised(8, prefix="c2"))
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
            results = await provider.send_batch(messages)
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
            results = await provider.send_batch(messages)
        finally:
            await provider.close()

    assert [r.ok for r in results] == [True, False, True]
    assert results[1].retryable is True and "451" in (results[1].error or "")
    assert handler.sessions == 1  # the refusal did not cost the connection


async def test_closed_port_gives_retryable_failures() -> None:
    provider = SmtpProvider("127.0.0.1", free_port(), pool_size=3, timeout=2)
    try:
        results = await provider.send_batch(personalised(7))
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
            assert all(r.ok for r in await provider.send_batch(personalised(4)))
        with smtp_server(handler, port):  # the old connections were closed by the server
            assert all(r.ok for r in await provider.send_batch(personalised(4, prefix="c2")))
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

    base.headers = {"X-Bad": "a\r\nBcc: spy@x.test"}
    with pytest.raises(ValueError):
        build_email(base)
