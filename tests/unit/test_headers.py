"""providers.base.header_safe and the messages the engine builds (engine.sender): header
values that cannot smuggle a line break.

The decisive check is the email package itself: whatever ``header_safe`` returns, written
as a header by the stdlib and read back, is one header with no line break in its value.
"""

from __future__ import annotations

import time
from email import message_from_bytes, policy
from email.message import EmailMessage

import pytest

from engine.sender import BatchInfo, build_message
from engine.suppressions import links
from engine.templates import BatchTemplate
from providers.base import Message, check_address, header_safe

INJECTION = "=?utf-8?q?Ann=0D=0AX-Injected:_x?="

HOSTILE = [
    INJECTION,
    "Hi " + INJECTION + " there",
    "=?utf-8?q?Ann=0D=0A=0D=0Abody?=",  # ends the header block
    "=?utf-8?b?QW5uDQpYLUluamVjdGVkOiB4?=",  # base64
    "=?UTF-8?Q?Ann=0AX-Injected:_x?=",  # upper case, LF only
    "=?utf-8*en?q?Ann=0D=0AX-Injected:_x?=",  # RFC 2231 language
    "=?utf-7?q?Ann+AA0ACg-X-Injected:_x?=",  # CR LF spelled in UTF-7
    "=?unknown-8bit?q?Ann=0D=0AX-Injected:_x?=",  # a charset Python does not know
    "=?utf-8?q?=0D=0AX-Injected:_x?=",  # text starting with an escape
    "a=?utf-8?q?=0D=0AX-Injected:_x?=b",  # inside a word
    "=?u?q?=zz =?=x?q?=0D=0AX-Injected:_x?=",  # overlapping with a harmless one
    "=?x?q?=3D=3Futf-8=3Fq=3F=0D=0AX-Injected:_x=3F=3D?=",  # an encoded word in one
    "=?utf-8?q?a=E2=80=A8X-Injected:_x?=",  # U+2028 LINE SEPARATOR
    "=?utf-8?q?a=0BX-Injected:_x?=",  # vertical tab: a line break to str.splitlines
    "Ann\r\nX-Injected: x",
    "Ann\nX-Injected: x",
    "Ann\rX-Injected: x",
    "Ann\x85X-Injected: x",
    "Ann\u2028X-Injected: x",
    "Ann\x00\x1b[31m\tx",
]


def written(name: str, value: str) -> EmailMessage:
    email = EmailMessage()
    email[name] = value
    email["X-After"] = "still a header"
    email.set_content("body")
    parsed = message_from_bytes(email.as_bytes(policy=policy.SMTP), policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_values_become_one_harmless_line(value: str) -> None:
    safe = header_safe(value)
    assert safe.isprintable()
    parsed = written("Subject", safe)
    assert parsed["X-Injected"] is None
    assert parsed["X-After"] == "still a header"
    assert "\r" not in parsed["Subject"] and "\n" not in parsed["Subject"]
    assert parsed.get_content().strip() == "body"
    assert header_safe(safe) == safe  # idempotent


def test_the_issue_payload_reads_as_its_text() -> None:
    assert header_safe("Hi " + INJECTION) == "Hi Ann X-Injected: x"
    assert header_safe("a\r\nb") == "a b"  # a line break reads as one space (unfolding)
    assert header_safe("a\r\n\r\n\tb") == "a b"
    assert header_safe("=?utf-8?q?a=0D=0Ab?= and =?utf-8?q?J=C3=B6rg?=") == "a b and Jörg"


@pytest.mark.parametrize(
    "value",
    [
        "Your offer #1234",
        "Jörg, 50% off — ☕ 🎉",
        "Price =? ask us",  # "=?" that starts no encoded word
        "=?utf-8?q?J=C3=B6rg?=",  # a clean encoded word is left to the email package
        "What? Why?=",
        "nb\u00a0sp and soft\u00adhyphen",
        "",
    ],
)
def test_clean_values_are_unchanged(value: str) -> None:
    assert header_safe(value) == value


def test_clean_value_is_the_same_object() -> None:
    value = "Hello Ada, your offer"
    assert header_safe(value) is value


def build(first: str, *, name: str | None = "Ann", email: str = "ann@example.com") -> Message:
    """The message ``engine.sender`` builds for a recipient whose ``first`` is ``first``."""
    template = BatchTemplate("Hi {{ first }}", "<p>{{ first }}</p>", "Hello {{ first }}")
    info = BatchInfo("0b0e6a52-5c4c-4f7e-9d8c-5f3c1e2a9b10", "acme", "mock",
                     "news@shop.example", "Shop", template, False, "queued", 0, None, 0.0)  # fmt: skip
    row = {"seq": 7, "email": email, "name": name, "vars": {"first": first}}
    return build_message(info, row, links("https://bs.example", "s" * 32, info.id))


def test_the_engine_builds_messages_with_safe_header_fields() -> None:
    message = build(INJECTION, name="Ann " + INJECTION)
    assert message.subject == "Hi Ann X-Injected: x"
    assert message.to_name == "Ann Ann X-Injected: x"
    assert message.text == "Hello " + INJECTION  # bodies are not headers
    assert message.html == "<p>" + INJECTION + "</p>"
    for value in message.headers.values():
        assert header_safe(value) == value
    assert message.headers["List-Unsubscribe"].startswith("<https://bs.example/unsubscribe/")
    assert build("Ann\r\nBcc: spy@evil.test").subject == "Hi Ann Bcc: spy@evil.test"


def test_a_clean_message_keeps_its_values() -> None:
    message = build("Jörg", name="Jörg Müller")
    assert (message.subject, message.to_name) == ("Hi Jörg", "Jörg Müller")


@pytest.mark.parametrize(
    "address", ["=?utf-8?q?=0D=0Abcc?=@example.com", "ann@example.com\r\nBcc: spy@evil.test"]
)
def test_addresses_that_cannot_be_written_are_refused(address: str) -> None:
    with pytest.raises(ValueError, match="address"):
        check_address(address)
    with pytest.raises(ValueError, match="address"):
        build("x", email=address)


@pytest.mark.parametrize("address", ["ann@example.com", "a=?b@example.com", "what?@example.com"])
def test_writable_addresses_pass(address: str) -> None:
    assert check_address(address) is address


@pytest.mark.parametrize(
    "value",
    ["=?a?q?" * 40_000, "=?" * 100_000, "=?u?q?" + "=0D" * 50_000, ("\r\n" + "x" * 10) * 20_000],
)
def test_long_hostile_values_take_linear_time(value: str) -> None:
    started = time.perf_counter()
    safe = header_safe(value)
    assert time.perf_counter() - started < 2.0
    assert safe.isprintable()
