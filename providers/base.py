"""What every provider adapter offers the engine, and what a provider module declares.

Each module ``providers/<name>.py`` has one ``SPEC`` (a ``ProviderSpec``): its name, its
batch limit, the settings it reads, how its adapter is built and how its webhook posts
are checked. ``providers.registry`` lists the modules; the engine knows providers only
through it.

A provider takes a list of already-personalised messages (one chunk) and answers one
result per message, in the same order. Errors are classified here, by the adapter that
understands the provider: ``retryable`` (timeouts, connection errors, 429, 5xx) or not.

``check`` asks the provider whether an account's credentials work without sending
anything: its cheapest documented authenticated read call (``CheckResult``; the calls
are listed on ``Provider.check``).

Header fields carry text from clients (a rendered subject, names), so every header value
a provider is given is one line: it passed ``header_safe`` (no control characters, no
encoded word that decodes to one: ``{{ first }}`` holding
``=?utf-8?q?Ann=0D=0AX-Injected:_x?=`` must not become a header), and its addresses
``check_address``. The engine builds every ``Message`` so (``engine.sender.build_message``);
an adapter that writes the MIME message itself applies them to what it writes as well.
"""

from __future__ import annotations

import base64
import binascii
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

# What may not appear in a header value: C0 and C1 controls (CR, LF, TAB, NUL, ...), the
# Unicode line and paragraph separators (str.splitlines() breaks lines there, and so does
# the email package) and lone surrogates (not encodable).
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]+")
# An RFC 2047 encoded word as the email package's parser accepts one: no "?" inside the
# charset or the text. (It also accepts whitespace inside, with a defect.)
_ENCODED_WORD = re.compile(r"=\?([^?]*)\?([qQbB])\?([^?]*)\?=")
_Q_ESCAPE = re.compile(rb"=([a-fA-F0-9]{2})")
_CTE = frozenset({"q?", "Q?", "b?", "B?"})


def header_safe(value: str) -> str:
    """``value`` made safe for a header: control characters and line breaks become one
    space each run (as unfolding would read them), and when an encoded word decodes to a
    control character, encoded words are replaced by their cleaned text and every other
    ``=?`` is broken up (``= ?``), so nothing is decoded from it again.

    A clean value (the common case) is returned as it is after ``_clean``.
    """
    if _clean(value):
        return value
    value = _CONTROLS.sub(" ", value)
    if "=?" in value and _smuggles(value):
        value = _ENCODED_WORD.sub(_cleaned_word, value).replace("=?", "= ?")
    return value


def _clean(value: str) -> bool:
    """The fast check, at C speed: nothing to replace and no encoded word to look into
    (``"?"`` is found by memchr; ``"=?"`` is searched for only when there is one)."""
    return value.isprintable() and ("?" not in value or "=?" not in value)


def _smuggles(value: str) -> bool:
    """True when an encoded word in ``value`` decodes to a control character.

    Every ``=?`` is tried as the start of one, overlapping ones included, since the parser
    may start one at any of them. Linear: each search stops at the next ``?``.
    """
    start = value.find("=?")
    while start >= 0:
        sep = value.find("?", start + 2)
        if sep < 0:
            return False
        if value[sep + 1 : sep + 3] in _CTE:
            end = value.find("?", sep + 3)
            if end < 0:
                return False
            if value[end + 1 : end + 2] == "=":
                text = _decoded(value[start + 2 : sep], value[sep + 1], value[sep + 3 : end])
                if text is not None and _CONTROLS.search(text):
                    return True
        start = value.find("=?", start + 1)
    return False


def _cleaned_word(match: re.Match[str]) -> str:
    text = _decoded(match[1], match[2], match[3])
    return match[0] if text is None else _CONTROLS.sub(" ", text)


def _decoded(charset: str, cte: str, text: str) -> str | None:
    """An encoded word's text decoded as the email package decodes it (None: it would not
    take it for one)."""
    try:
        raw = text.encode("ascii", "surrogateescape")
    except UnicodeEncodeError:
        return None
    if cte in "qQ":
        raw = _Q_ESCAPE.sub(lambda m: bytes.fromhex(m[1].decode()), raw.replace(b"_", b" "))
    else:
        raw = _b_decoded(raw)
    try:
        return raw.decode(charset.partition("*")[0], "surrogateescape")
    except (LookupError, ValueError, TypeError):  # unknown or odd charset: read as bytes
        return raw.decode("ascii", "surrogateescape")


def _b_decoded(raw: bytes) -> bytes:
    try:
        return base64.b64decode(raw + b"=" * (-len(raw) % 4), validate=True)
    except binascii.Error:
        pass
    for attempt in (raw, raw + b"=="):
        try:
            return base64.b64decode(attempt)
        except binascii.Error:
            pass
    return raw


def check_address(address: str) -> str:
    """``address`` when it can be written into a header as it is; ``ValueError`` when it
    holds a control character or an encoded word that decodes to one (an address is not
    text to clean: changed, it would be another address)."""
    if _clean(address) or header_safe(address) == address:
        return address
    raise ValueError(f"address cannot be written in a header: {address!r}")


@dataclass(slots=True)
class Message:
    """One personalised e-mail. ``ref`` is the engine's id of the recipient ("batch:seq");
    its header fields are header-safe (see the module docstring)."""

    ref: str
    to_email: str
    to_name: str | None
    from_email: str
    from_name: str | None
    subject: str
    html: str | None
    text: str | None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class SendResult:
    """The provider's answer for one message."""

    ref: str
    ok: bool
    provider_message_id: str | None = None
    error: str | None = None
    retryable: bool = False
    retry_after: float | None = None
    throttled: bool = False  # the provider said to slow down (e.g. HTTP 429); retryable
    # The account's daily quota is used up: the recipient waits (``queued``) until the quota
    # window reopens; it is neither retried now nor failed.
    hold: bool = False
    # The account cannot send at all (suspended, sending paused): the batch is paused with
    # this reason instead of burning the retry budget; the recipient stays ``queued``.
    pause_reason: str | None = None


@dataclass(frozen=True, slots=True)
class Account:
    """One provider account's connection details: what an HTTP provider adapter is built
    from (a tenant's provider account, or the environment's default one). Credentials are
    secrets: never logged, never part of an error text or a repr."""

    provider: str
    credentials: Mapping[str, str] = field(repr=False)  # e.g. {"api_key": ...}
    base_url: str | None = None  # the provider's API base (its EU/region URL, a test server)
    region: str | None = None  # where the provider has regions (SES: "eu-west-1")
    domain: str | None = None  # where the provider sends per domain (Mailgun)
    # How the adapter resolves the provider's host name for its connections (an aiohttp
    # ``AbstractResolver``; None: the system's). The engine gives one that refuses
    # non-public addresses when a tenant's account may not reach inside the deployment.
    resolver: Any = field(default=None, repr=False, compare=False)


# Seconds a check's own provider call (or SMTP command) may take; the engine bounds the
# whole check as well (``engine.accounts.CHECK_SECONDS``).
CHECK_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Quota:
    """What a provider says an account may send (SES: ``SendQuota``); None where it does
    not say (``per_day`` None also when there is no 24-hour limit)."""

    per_day: float | None = None
    per_second: float | None = None
    sent_last_24_hours: float | None = None


@dataclass(frozen=True, slots=True)
class CheckResult:
    """What ``Provider.check`` found.

    ``ok``: the provider accepted the credentials and said nothing that stops the account
    sending (a note on what limits it, such as SES's sandbox or a send-only key, may be in
    ``detail``). ``detail``: one secret-free sentence saying what was found, or why not
    (``"the provider refused the API key (HTTP 401)"``, ``"connection refused"``).
    ``call``: the request made (``"GET /v3/scopes"``). ``quota``: where the provider
    reports one.
    """

    ok: bool
    detail: str
    call: str = ""
    quota: Quota | None = None


def unreachable(exc: BaseException) -> str:
    """What a call that got no answer says, in a few words and without secrets:
    ``"connection refused"``, ``"timed out"``, ``"the host name does not resolve"``, a TLS
    failure, else the error's own text. Looks through what the HTTP and SMTP clients wrap
    (aiohttp's ``os_error`` and ``certificate_error``, an exception's cause)."""
    seen: list[BaseException] = []
    pending: list[BaseException | None] = [exc]
    while pending:
        item = pending.pop(0)
        if item is None or any(item is s for s in seen):
            continue
        seen.append(item)
        pending += [
            getattr(item, "certificate_error", None),
            getattr(item, "os_error", None),
            item.__cause__,
        ]
    for item in seen:
        if isinstance(item, ssl.SSLCertVerificationError):
            return f"the server's TLS certificate is not trusted ({item.verify_message})"
        if isinstance(item, ssl.SSLError):
            return f"the TLS handshake failed ({item.reason or type(item).__name__})"
        if isinstance(item, ConnectionRefusedError):
            return "connection refused"
        if isinstance(item, socket.gaierror):
            return "the host name does not resolve"
        if isinstance(item, TimeoutError):
            return "timed out"
        if isinstance(item, ConnectionResetError):
            return "the server closed the connection"
    return str(exc) or type(exc).__name__


class Provider(Protocol):
    """A provider adapter. ``max_per_call`` is how many messages one ``send`` call takes."""

    name: str
    max_per_call: int

    async def send(self, messages: list[Message]) -> list[SendResult]: ...

    async def check(self) -> CheckResult:
        """Whether the account's credentials work, by the provider's cheapest documented
        authenticated read call; nothing is sent. SendGrid ``GET /v3/scopes`` (and the
        ``mail.send`` scope among them), Mailgun ``GET /v3/domains/{domain}``, Postmark
        ``GET /server``, Resend ``GET /domains`` (a send-only key is ok, with that note),
        SES v2 ``GET /v2/email/account`` (``SendingEnabled`` and the quota), SMTP: connect,
        TLS as a send would, AUTH with the account's login, QUIT; mock: its server's
        ``GET /health``.

        Never raises for provider or network failures: they are a result that is not ok,
        with the reason. Each call is bounded by ``CHECK_TIMEOUT``; the caller bounds the
        whole (``engine.accounts.check``) and closes the adapter after."""
        ...

    async def close(self) -> None: ...


class ProviderError(Exception):
    """A whole call failed (connection refused, timeout, 5xx for the request)."""

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        retry_after: float | None = None,
        throttled: bool = False,
    ):
        super().__init__(message)
        self.retryable = retryable or throttled
        self.retry_after = retry_after
        self.throttled = throttled


def failed_all(messages: list[Message], error: ProviderError) -> list[SendResult]:
    """Every message of a call that failed as a whole gets the call's error."""
    return [
        SendResult(
            m.ref, False, None, str(error), error.retryable, error.retry_after, error.throttled
        )
        for m in messages
    ]


@dataclass(frozen=True, slots=True)
class Signed:
    """A webhook post whose signature verified: when it was signed, and the signature
    (unique per post, what a replay would repeat)."""

    timestamp: int
    signature: str


# The provider event vocabulary: every webhook parser names its events with these
# (``WebhookEvent.event``), whatever the provider calls them.
EVENT_MEANINGS: dict[str, str] = {
    "sent": "the provider took the message and is sending it",
    "delivered": "the receiving server accepted the message",
    "deferred": "a delay: the receiving server said try later, the provider retries",
    "bounced": "a hard bounce: the address does not work (suppress it)",
    "soft_bounced": "a soft bounce: not delivered, the address may work later",
    "dropped": "the provider refused to send it (suppressed or invalid there, gave up)",
    "failed": "the provider could not send it (e.g. its own quota)",
    "rejected": "the provider rejected the message (e.g. it carried a virus)",
    "suppressed": "not sent: the address is on the provider's suppression list",
    "complained": "the recipient marked it as spam",
    "opened": "the recipient opened it",
    "clicked": "the recipient clicked a link in it",
    "unsubscribed": "the recipient unsubscribed",
    "resubscribed": "sending to the address is allowed again",
}
WEBHOOK_EVENTS = frozenset(EVENT_MEANINGS)


def header_value(headers: Mapping[str, str], name: str) -> str | None:
    """A header's value, its name matched case-insensitively (in a plain dict as well)."""
    value = headers.get(name)
    if value is not None:
        return value
    lowered = name.lower()
    for key, item in headers.items():
        if key.lower() == lowered:
            return item
    return None


@dataclass(slots=True)
class WebhookEvent:
    """One delivery event a provider posted; ``ref`` is the ``Message.ref`` it is about."""

    ref: str
    event: str  # one of WEBHOOK_EVENTS
    provider_message_id: str | None
    email: str | None
    timestamp: float
    event_id: str


# Seconds a signed timestamp may be from the receiver's clock, unless ``Webhook.max_age``
# says otherwise for a provider.
SIGNATURE_TOLERANCE = 300


def no_default_secret(_settings: Any) -> str:
    """``Webhook.secret`` of a provider without a default account in the environment: no
    secret, so on ``/webhooks/{provider}`` nothing verifies; its posts come to each
    account's own route, checked with that account's secret."""
    return ""


@dataclass(frozen=True, slots=True)
class Webhook:
    """How a provider's webhook posts are checked and read, and how the receiver
    (``engine.webhooks``) treats their age and their repeats.

    ``verify`` may be a coroutine function (SNS fetches its signing certificates): the
    receiver awaits what it returns when that is awaitable.
    """

    # (body, headers, secret) -> the signature when it verifies, else None (or an
    # awaitable of that)
    verify: Callable[[bytes, Mapping[str, str], str], Signed | None | Awaitable[Signed | None]]
    parse: Callable[[bytes], list[WebhookEvent]]  # raises ValueError when malformed
    # The default account's secret, from the settings ("" when there is no default account).
    secret: Callable[[Any], str] = no_default_secret
    headers: tuple[str, ...] = ()  # the request headers the check reads
    scheme: str = ""  # how a post is signed, in one sentence (the API documentation)
    # How far (seconds) the signed timestamp may be from the receiver's clock. SNS re-sends
    # the message it signed once, timestamp included, for up to an hour.
    max_age: float = SIGNATURE_TOLERANCE
    # What a post with a replay key (``Signed.signature``) received before is. False: a
    # copy, refused (401): a key that a retry renews (the signed timestamp) or that must
    # be used once (Mailgun's token). True: the provider's own retry of a post it signed
    # once (SNS's signature, Svix's message id, Postmark's event identity), answered 200
    # and not handed on again; a 401 would only make the provider retry it again.
    repeat_is_retry: bool = False
    # A subscription handshake (SNS): (body, headers, secret) -> the URL the receiver GETs
    # to confirm a signed request to subscribe, only ever one on the provider's own hosts;
    # None for any other post.
    subscription: Callable[[bytes, Mapping[str, str], str], Awaitable[str | None]] | None = None


def _always(_settings: Any) -> bool:
    return True


def _never(_settings: Any) -> bool:
    return False


def _no_default(_settings: Any) -> Provider:
    raise RuntimeError("this provider has no default account; send through a provider account")


@dataclass(frozen=True, slots=True)
class ProviderSpec:
    """Everything the engine knows about one provider.

    The callables are given the engine's settings object, which has every attribute of
    ``settings`` (a Protocol; this package does not import the engine).
    """

    name: str
    max_per_call: int  # recipients per provider call, and so per chunk
    settings: type  # the settings this provider reads
    build: Callable[[Any], Provider]  # its send adapter for the default account (settings)
    enabled: Callable[[Any], bool] = _always  # whether the environment has a default account
    webhook: Webhook | None = None  # None: no webhook route
    # Its send adapter for a tenant's provider account (None: it has no accounts).
    for_account: Callable[[Account], Provider] | None = None
    # Provider calls at once per account and worker process (None: one per chunk in
    # flight). For a provider whose calls are large and not idempotent: queued at the
    # provider past the adapter's timeout, a call is sent again (a duplicate).
    max_in_flight: int | None = None


def account_only(
    adapter: type, webhook: Webhook, *, max_in_flight: int | None = None
) -> ProviderSpec:
    """The spec of a provider with no default account in the environment: a batch reaches
    it only through a tenant's provider account. ``adapter`` is the adapter class (its
    ``name`` and ``max_per_call``; built with the account)."""
    return ProviderSpec(
        name=adapter.name,
        max_per_call=adapter.max_per_call,
        settings=object,
        build=_no_default,
        enabled=_never,
        webhook=webhook,
        for_account=adapter,
        max_in_flight=max_in_flight,
    )
