"""SMTP provider: sends each chunk over a small pool of reused aiosmtplib connections.

It has no webhook route (``SPEC.webhook`` is None).

``check`` tests an account's login without sending: it opens a connection of its own as a
send does (TLS from the first byte for ``smtps://``; STARTTLS as configured, or whenever
the server offers it), authenticates with the account's username and password by the
mechanisms aiosmtplib knows, in its order (CRAM-MD5, PLAIN, LOGIN; the first the server
accepts is named), then QUITs. A login over a connection without TLS is still ok, with a
note that the password crossed the network in clear.

Every header value written passes ``header_safe`` here too (the engine's messages already
did; this keeps the adapter safe for any caller, at the cost of nothing at SMTP speeds).
Custom headers with an ASCII value (``List-Unsubscribe``, ``List-Unsubscribe-Post``, ...)
are written as given, folded at spaces only: the email package would turn a long URL into
RFC 2047 encoded words, which one-click unsubscribe (RFC 8058) clients do not decode.
Anything the email package refuses while it builds or writes a message (``ValueError``,
``HeaderWriteError`` on Pythons that check what they fold) fails that message
permanently, not the chunk.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from dataclasses import dataclass
from email.errors import MessageError
from email.message import EmailMessage
from email.policy import Policy
from email.utils import formataddr, formatdate, make_msgid
from typing import Any, Protocol, cast
from urllib.parse import urlsplit

import aiosmtplib
from aiosmtplib import (
    SMTPAuthenticationError,
    SMTPException,
    SMTPRecipientsRefused,
    SMTPResponseException,
    SMTPServerDisconnected,
)

from providers.base import (
    CHECK_TIMEOUT,
    Account,
    CheckResult,
    Message,
    ProviderError,
    ProviderSpec,
    SendResult,
    header_safe,
    unreachable,
)
from providers.http import one_line, scrub

# Headers a caller may not set: they would break the MIME structure or leak recipients.
_PROTECTED_HEADERS = frozenset({"content-type", "content-transfer-encoding", "mime-version", "bcc"})
# The email package refusing what it is given (a bad address, a header it cannot write):
# the message itself is at fault, so the failure is permanent.
_MESSAGE_ERRORS = (MessageError, ValueError, TypeError, LookupError)
_SEND_ERRORS = (SMTPException, OSError, TimeoutError, *_MESSAGE_ERRORS)
_MAX_LINE = 998  # RFC 5322: characters per header line, CRLF excluded
_FIELD_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322: printable ASCII except ":"
CHECK_CALL = "SMTP EHLO, AUTH, QUIT"  # what the credentials check does


class _Verbatim(str):
    """A header value written as given: never re-encoded, folded at spaces past the
    policy's line length (78; a longer word stays whole, up to RFC 5322's 998). The email
    package takes an object with a ``name`` as a ready header and calls its ``fold``."""

    name: str

    def __new__(cls, name: str, value: str) -> _Verbatim:
        if not value.isprintable():  # written as is: nothing may break the line
            raise ValueError(f"{name}: control characters in a header value")
        if len(name) + 2 + max(map(len, value.split(" "))) > _MAX_LINE:
            raise ValueError(f"{name}: a word too long for a header line")
        header = super().__new__(cls, value)
        header.name = name
        return header

    def fold(self, *, policy: Policy) -> str:
        limit = policy.max_line_length or _MAX_LINE
        first, *rest = self.split(" ")
        lines, line = [], f"{self.name}: {first}"  # the first word stays beside the name
        for word in rest:
            if word and len(line) + 1 + len(word) > limit:  # no line of spaces only
                lines.append(line)
                line = ""
            line += " " + word
        lines.append(line)
        return policy.linesep.join(lines) + policy.linesep


def build_email(message: Message) -> EmailMessage:
    """The RFC 5322 message for one ``Message`` (text part and/or html alternative)."""
    email = EmailMessage()
    email["From"] = formataddr((header_safe(message.from_name or ""), message.from_email))
    email["To"] = formataddr((header_safe(message.to_name or ""), message.to_email))
    email["Subject"] = header_safe(message.subject)
    domain = message.from_email.rpartition("@")[2] or "localhost"
    email["Message-ID"] = make_msgid(domain=domain)
    email["Date"] = formatdate(usegmt=True)
    for name, value in message.headers.items():
        if name.lower() in _PROTECTED_HEADERS:
            continue
        if _FIELD_NAME.fullmatch(name) is None:
            raise ValueError(f"invalid header name: {name!r}")
        del email[name]
        value = header_safe(value)
        email[name] = _Verbatim(name, value) if value.isascii() else value
    _set_body(email, message.text, message.html)
    return email


def _set_body(email: EmailMessage, text: str | None, html: str | None) -> None:
    if text is not None:
        email.set_content(text)
        if html is not None:
            email.add_alternative(html, subtype="html")
    elif html is not None:
        email.set_content(html, subtype="html")
    else:
        email.set_content("")


def classify(exc: BaseException) -> tuple[str, bool]:
    """``(error text, retryable)``: 5xx replies are permanent; 4xx and network errors retry;
    anything else (the email package refusing the message) is permanent."""
    if isinstance(exc, SMTPRecipientsRefused):
        if not exc.recipients:
            return "recipient refused", False
        refused = exc.recipients[0]
        return f"{refused.code} {refused.message}", not 500 <= refused.code < 600
    if isinstance(exc, SMTPResponseException):
        return f"{exc.code} {exc.message}", not 500 <= exc.code < 600
    if isinstance(exc, OSError | TimeoutError):  # includes disconnects and connect errors
        return str(exc) or type(exc).__name__, True
    return f"{type(exc).__name__}: {exc}", False


class _ConnectFailed(Exception):
    """Opening an SMTP session failed; ``error`` says whether to retry."""

    def __init__(self, error: ProviderError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass(slots=True)
class _Job:
    """One ``send`` call: work shared by the connections that take part."""

    work: deque[tuple[int, Message]]
    results: list[SendResult | None]
    connect_error: ProviderError | None = None


class SmtpProvider:
    """Sends chunks over up to ``pool_size`` open SMTP connections, reused across calls."""

    name = "smtp"
    max_per_call = 50  # messages per send call: the engine's chunk size too (SPEC)

    def __init__(
        self,
        host: str,
        port: int,
        *,
        username: str | None = None,
        password: str | None = None,
        use_tls: bool = False,
        start_tls: bool | None = None,
        timeout: float = 30.0,
        pool_size: int = 4,
        resolver: Any = None,
    ) -> None:
        if pool_size < 1:
            raise ValueError("pool_size must be >= 1")
        self._where = f"{host}:{port}"
        self._connection = {
            "hostname": host,
            "port": port,
            "use_tls": use_tls,
            "start_tls": start_tls,
            "timeout": timeout,
        }
        self._login = (username, password or "") if username else None
        self._resolver = resolver  # Account.resolver: the host is checked before each connect
        self._clients = [
            aiosmtplib.SMTP(username=username, password=password, **self._connection)
            for _ in range(pool_size)
        ]
        self._idle: asyncio.Queue[aiosmtplib.SMTP] = asyncio.Queue()
        for client in self._clients:
            self._idle.put_nowait(client)

    async def send(self, messages: list[Message]) -> list[SendResult]:
        """Send a chunk concurrently over the pool; results come back in input order."""
        job = _Job(deque(enumerate(messages)), [None] * len(messages))
        workers = min(len(self._clients), len(messages))
        await asyncio.gather(*(self._work(job) for _ in range(workers)))
        error = job.connect_error or ProviderError("smtp: no connection", retryable=True)
        while job.work:  # every connection failed to open: the rest shares the error
            index, message = job.work.popleft()
            job.results[index] = _failed(message, str(error), error.retryable)
        return cast(list[SendResult], job.results)

    async def _work(self, job: _Job) -> None:
        """Take messages from the job one by one over one pooled connection."""
        client = await self._idle.get()
        try:
            while job.work:
                index, message = job.work.popleft()
                try:
                    job.results[index] = await self._send_one(client, message)
                except _ConnectFailed as exc:
                    job.work.appendleft((index, message))  # another connection may take it
                    job.connect_error = exc.error
                    return
        except BaseException:
            client.close()  # cancelled mid-transaction: the session state is unknown
            raise
        finally:
            self._idle.put_nowait(client)

    async def _send_one(self, client: aiosmtplib.SMTP, message: Message) -> SendResult:
        try:
            email = build_email(message)
        except _MESSAGE_ERRORS as exc:
            return _failed(message, f"invalid message: {exc}", retryable=False)
        try:
            # The message is written before the SMTP transaction starts, so an email
            # package error there leaves the connection usable.
            await _transmit(client, email, message, self._resolver)
        except _SEND_ERRORS as exc:
            if isinstance(exc, OSError | TimeoutError):  # the session state is unknown
                client.close()
            error, retryable = classify(exc)
            return _failed(message, f"smtp: {error}", retryable)
        return SendResult(message.ref, True, provider_message_id=str(email["Message-ID"]))

    async def close(self) -> None:
        """Quit every open connection."""
        await asyncio.gather(*(_quit(client) for client in self._clients))

    async def check(self) -> CheckResult:
        """Connect, TLS as a send would, AUTH with the account's login, QUIT (see the
        module docstring); nothing is sent."""
        timeout = min(float(self._connection["timeout"] or CHECK_TIMEOUT), CHECK_TIMEOUT)
        client = aiosmtplib.SMTP(**{**self._connection, "timeout": timeout})
        try:
            text, ok = await self._check(client)
        except BaseException:
            client.close()  # cancelled (the caller's time bound): no QUIT
            raise
        await _quit(client)
        secrets = [secret for secret in self._login or () if len(secret) >= 4]
        return CheckResult(ok, one_line(scrub(text, secrets)), call=CHECK_CALL)

    async def _check(self, client: aiosmtplib.SMTP) -> tuple[str, bool]:
        try:
            await _resolvable(client, self._resolver)
            await client.connect()  # the greeting, EHLO, STARTTLS (as a send does)
            if client.is_ehlo_or_helo_needed:  # again after STARTTLS
                await client.ehlo()
        except _SEND_ERRORS as exc:
            return f"{self._where}: {_check_failure(exc)}", False
        over = "without TLS" if client.get_transport_info("sslcontext") is None else "over TLS"
        if self._login is None:
            return f"connected {over}; the account has no login to test", True
        if not client.supports_extension("auth"):
            return f"the server offers no login (AUTH) {over}", False
        try:
            mechanism = await _authenticate(client, *self._login)
        except _SEND_ERRORS as exc:
            return f"the server refused the login {over}: {_check_failure(exc)}", False
        text = f"the server accepted the login (AUTH {mechanism.upper()}) {over}"
        if over == "without TLS":
            text += ": the password crossed the network in clear"
        return text, True


def _check_failure(exc: BaseException) -> str:
    """Why a check's step failed: the server's reply, or why there was none."""
    if isinstance(exc, SMTPResponseException):
        return f"{exc.code} {exc.message}"
    if isinstance(exc, OSError | TimeoutError):
        return unreachable(exc)
    return str(exc) or type(exc).__name__


async def _transmit(
    client: aiosmtplib.SMTP, email: EmailMessage, message: Message, resolver: Any
) -> None:
    """Send over ``client``; a reused connection the server dropped is reopened once."""
    reused = client.is_connected
    if not reused:
        await _connect(client, resolver)
    try:
        await _deliver(client, email, message)
    except SMTPServerDisconnected:
        if not reused:
            raise
        client.close()
        await _connect(client, resolver)
        await _deliver(client, email, message)


async def _resolvable(client: aiosmtplib.SMTP, resolver: Any) -> None:
    """``OSError`` when ``resolver`` refuses the server's host (it resolves to an address
    the account may not reach). The client resolves the name again as it connects: a name
    that changes its answer in between is not caught here, unlike an HTTP adapter's."""
    if resolver is not None and client.hostname is not None:
        await resolver.resolve(client.hostname, client.port or 0)


async def _connect(client: aiosmtplib.SMTP, resolver: Any) -> None:
    try:
        await _resolvable(client, resolver)
        await client.connect()
    except _SEND_ERRORS as exc:
        error, retryable = classify(exc)
        raise _ConnectFailed(ProviderError(f"smtp: {error}", retryable=retryable)) from exc


async def _deliver(client: aiosmtplib.SMTP, email: EmailMessage, message: Message) -> None:
    await client.send_message(email, sender=message.from_email, recipients=[message.to_email])


async def _authenticate(client: aiosmtplib.SMTP, username: str, password: str) -> str:
    """Log in by the first mechanism, in aiosmtplib's order (what ``login`` tries), that
    the server accepts; its name. Raises the refusal of the last one tried."""
    refused: SMTPAuthenticationError | None = None
    for mechanism in client.supported_auth_methods:
        try:
            await getattr(client, "auth_" + mechanism.replace("-", ""))(username, password)
        except SMTPAuthenticationError as exc:
            refused = exc
        else:
            return mechanism
    raise refused or SMTPException("the server offers no AUTH mechanism aiosmtplib knows")


async def _quit(client: aiosmtplib.SMTP) -> None:
    if not client.is_connected:
        return
    try:
        await client.quit(timeout=5.0)
    except _SEND_ERRORS:
        client.close()


def _failed(message: Message, error: str, retryable: bool) -> SendResult:
    return SendResult(message.ref, False, error=error, retryable=retryable)


class SmtpSettings(Protocol):
    """The settings the SMTP provider reads."""

    smtp_host: str
    smtp_port: int
    smtp_username: str  # "": no authentication
    smtp_password: str
    smtp_tls: bool  # STARTTLS


def _build(settings: SmtpSettings) -> SmtpProvider:
    return SmtpProvider(
        settings.smtp_host,
        settings.smtp_port,
        username=settings.smtp_username or None,
        password=settings.smtp_password or None,
        start_tls=settings.smtp_tls,
    )


def for_account(account: Account) -> SmtpProvider:
    """The adapter of a tenant's SMTP account: ``base_url`` ``smtp://host:port`` (STARTTLS
    whenever the server offers it) or ``smtps://host:port`` (TLS from the first byte); its
    username and password."""
    parts = urlsplit(account.base_url or "")
    if parts.scheme not in ("smtp", "smtps") or not parts.hostname or parts.port is None:
        raise ValueError("smtp: the account needs base_url smtp://host:port or smtps://host:port")
    creds = account.credentials
    return SmtpProvider(
        parts.hostname,
        parts.port,
        username=creds.get("username") or None,
        password=creds.get("password") or None,
        use_tls=parts.scheme == "smtps",
        resolver=account.resolver,
    )


SPEC = ProviderSpec(
    name=SmtpProvider.name,
    max_per_call=SmtpProvider.max_per_call,
    settings=SmtpSettings,
    build=_build,
    for_account=for_account,
)
