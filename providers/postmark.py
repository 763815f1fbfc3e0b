"""Postmark: the batch send adapter, and its webhook's check and parser.

An adapter is built from a provider account.

Sending: ``POST {base_url}/email/batch`` with ``X-Postmark-Server-Token``, a JSON array of
at most 500 messages and at most 50 MB (a chunk larger than either is split here, in
order) — https://postmarkapp.com/developer/user-guide/send-email-with-api/batch-emails.
Each message carries ``Metadata: {"ref": <Message.ref>}``, which Postmark hands back in
every webhook, and a ``MessageStream`` (``Account.credentials["message_stream"]``,
default ``"broadcast"``: bulk mail belongs on a Broadcast stream).

The answer is HTTP 200 with one result per message, in request order, each
``{ErrorCode, Message, MessageID, SubmittedAt, To}``; ``ErrorCode`` 0 is accepted. API
error codes (https://postmarkapp.com/developer/api/overview#error-codes) map so:

=====================================  ===============================================
406 inactive recipient                 permanent; the error text starts with
                                       ``SUPPRESS_PREFIX`` (``is_suppression``): the
                                       engine should suppress the address
429 rate limit exceeded                retryable, throttled
100 maintenance                        retryable
10 bad or missing token,               ``pause_reason`` (the account cannot send: the
400/401 sender signature not found or  batch is paused, the recipient stays queued)
not confirmed, 405 not allowed to
send, 412 account pending, 413 account
may not send
300 invalid email request and others   permanent
=====================================  ===============================================

HTTP errors of the whole request: 401 → pause; 422 ``{ErrorCode, Message}`` → as the code
above, for every message of the request; 413 (payload too large) → the request is split
in two and each half sent again (a single message too large fails permanently); 429 →
retryable, throttled (``Retry-After`` when given); 5xx, timeouts and connection errors →
retryable; any other status → permanent. Postmark has no idempotency key: a retried
request that had in fact been accepted is sent twice (the engine's cells bound this).

Error texts never hold the server token or a recipient address: Postmark's own message
is included with addresses and quoted values replaced.

Credentials check (``check``): ``GET {base_url}/server`` with the server token and
``Accept: application/json`` (https://postmarkapp.com/developer/api/server-api): 200 is the
token's server (its ``Name``; a ``DeliveryType`` of ``Sandbox`` accepts mail but delivers
none, said in the detail); 401 (``ErrorCode`` 10) is a refused token. The answer also holds
the server's ``ApiTokens``: nothing of it but the name and delivery type is read.

Webhooks (https://postmarkapp.com/developer/webhooks/webhooks-overview) are not signed.
A webhook is protected by HTTP basic auth in its URL (``https://user:password@host/...``)
and/or a custom header set on it (``HttpHeaders``); ``verify`` checks them in constant
time against the secret (``webhook_secret`` builds it). There is no signed timestamp, so
a verified post is given the time of its arrival, and its ``Signed.signature`` (what the
receiver's replay check remembers) is the identity of the event it carries (record type,
message id, time of the event): a copy of a post is refused, like a replayed signature.

Events: Delivery → ``delivered``; Bounce → ``bounced`` (hard: HardBounce,
BadEmailAddress, ManuallyDeactivated, or any bounce that left the address inactive) or
``soft_bounced`` (soft: SoftBounce, Transient, DnsError, ...); SpamComplaint → ``complained``;
Open → ``opened``; Click → ``clicked``; SubscriptionChange → ``bounced`` / ``complained``
/ ``unsubscribed`` by its SuppressionReason, ``resubscribed`` when sending is allowed
again. Postmark posts Bounce webhooks for Transactional streams only: on a Broadcast
stream (the default here) hard bounces and complaints arrive as SubscriptionChange, so
that trigger must be enabled on the webhook. ``ref`` is ``Metadata.ref``,
``provider_message_id`` the ``MessageID``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from providers.base import (
    Account,
    CheckResult,
    Message,
    SendResult,
    Signed,
    Webhook,
    WebhookEvent,
    account_only,
    header_safe,
    header_value,
)
from providers.http import (
    TRANSPORT_ERRORS,
    Answer,
    HttpAdapter,
    check_refused,
    failed,
    halves,
    json_object,
    loads_webhook,
    mailbox,
    parse_retry_after,
    paused,
    scrub,
    transport_reason,
)

DEFAULT_BASE_URL = "https://api.postmarkapp.com"
DEFAULT_MESSAGE_STREAM = "broadcast"
MAX_PER_CALL = 500  # messages per POST /email/batch
MAX_REQUEST_BYTES = 50_000_000  # "up to 50 MB payload size" per batch request
TOKEN_HEADER = "X-Postmark-Server-Token"

# The error text of a recipient Postmark will not send to again (406, inactive: it hard
# bounced, complained or was suppressed): the engine should add it to its suppressions.
SUPPRESS_PREFIX = "suppress: "

# Postmark API error codes (https://postmarkapp.com/developer/api/overview#error-codes).
_DESCRIPTIONS = {
    10: "bad or missing server token",
    100: "maintenance",
    300: "invalid email request",
    400: "sender signature not found",
    401: "sender signature not confirmed",
    402: "invalid JSON",
    403: "incompatible JSON",
    405: "not allowed to send",
    406: "inactive recipient",
    409: "JSON required",
    410: "too many batch messages",
    411: "forbidden attachment type",
    412: "account is pending",
    413: "account may not send",
    429: "rate limit exceeded",
}
_PAUSE_CODES = frozenset({10, 400, 401, 405, 412, 413})
_RETRY_CODES = frozenset({100, 429})
_INACTIVE = 406
_RATE_LIMITED = 429

_QUOTED = re.compile(r"'([^']*)'|\"([^\"]*)\"")
_FIELD = re.compile(r"[A-Za-z][A-Za-z0-9]{0,30}")
_FIELD_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322: printable ASCII except ":"


class PostmarkProvider(HttpAdapter):
    """Sends chunks through Postmark's batch endpoint over one pooled session.

    Built from an ``Account``: ``credentials["server_token"]`` (required),
    ``credentials["message_stream"]`` (optional, default ``"broadcast"``), ``base_url``
    (default ``https://api.postmarkapp.com``; a test server's URL in tests).
    """

    name = "postmark"
    max_per_call = MAX_PER_CALL
    check_call = "GET /server"

    def __init__(
        self,
        account: Account,
        *,
        timeout: float = 30.0,
        max_request_bytes: int = MAX_REQUEST_BYTES,
    ) -> None:
        token = account.credentials.get("server_token") or ""
        if not token:
            raise ValueError("a Postmark account needs credentials['server_token']")
        super().__init__(timeout=timeout, resolver=account.resolver)
        self._token = token
        self._secrets = (token,)
        self._stream = account.credentials.get("message_stream") or DEFAULT_MESSAGE_STREAM
        self._base_url = (account.base_url or DEFAULT_BASE_URL).rstrip("/")
        self._url = self._base_url + "/email/batch"
        self._headers = {
            TOKEN_HEADER: token,
            "Accept": "application/json",
            "Content-Type": "application/json",
        }
        self._max_bytes = max_request_bytes

    def __repr__(self) -> str:
        return f"PostmarkProvider(url={self._url!r}, stream={self._stream!r})"

    @property
    def message_stream(self) -> str:
        return self._stream

    def _check_request(self) -> tuple[str, Mapping[str, str]]:
        return self._base_url + "/server", {
            TOKEN_HEADER: self._token,
            "Accept": "application/json",
        }

    def _checked(self, answer: Answer) -> CheckResult:
        body = answer.json()
        if answer.status == 401:
            return CheckResult(False, "Postmark refused the server token (HTTP 401)")
        if answer.status == 422 and body is not None and isinstance(body.get("ErrorCode"), int):
            code = body["ErrorCode"]
            what = _DESCRIPTIONS.get(code, "error")
            return CheckResult(False, f"Postmark error {code} {what}{self._detail(body)}")
        if answer.status != 200:
            detail = self._detail(body).removeprefix(": ")
            return check_refused(answer.status, detail, what="the server token")
        name = (body or {}).get("Name")
        text = "the server token works" + (f" (server {name!r})" if isinstance(name, str) else "")
        if (body or {}).get("DeliveryType") == "Sandbox":
            text += "; it is a Sandbox server: Postmark accepts its mail but delivers none"
        return CheckResult(True, text)

    async def send(self, messages: list[Message]) -> list[SendResult]:
        """Send one chunk: one result per message, in order. Never raises for provider or
        network failures."""
        results: list[SendResult | None] = [None] * len(messages)
        bodies: list[bytes] = []
        for index, message in enumerate(messages):
            try:
                bodies.append(orjson.dumps(to_wire(message, self._stream)))
            except (TypeError, ValueError) as exc:  # orjson: a lone surrogate, say
                results[index] = failed(message.ref, f"postmark: cannot encode: {exc}")
                bodies.append(b"")
            else:
                if len(bodies[index]) + 2 > self._max_bytes:
                    text = "postmark: message too large for one request"
                    results[index] = failed(message.ref, text)
        for group in _groups(bodies, results, self._max_bytes):
            for index, result in await self._post(messages, bodies, group):
                results[index] = result
        return [r for r in results if r is not None]

    async def _post(
        self, messages: list[Message], bodies: list[bytes], group: list[int]
    ) -> list[tuple[int, SendResult]]:
        """POST one request of ``group`` (indexes); its results by index."""
        body = b"[" + b",".join(bodies[i] for i in group) + b"]"
        try:
            async with self._get_session().post(
                self._url, data=body, headers=self._headers
            ) as resp:
                status, headers, payload = resp.status, resp.headers, await resp.read()
        except TRANSPORT_ERRORS as exc:
            text = f"postmark: {_scrub(transport_reason(exc), self._token)}"
            return [(i, failed(messages[i].ref, text, retryable=True)) for i in group]
        if status == 413 and len(group) > 1:  # payload too large: send each half
            first, second = halves(group)
            return [
                *await self._post(messages, bodies, list(first)),
                *await self._post(messages, bodies, list(second)),
            ]
        refs = [messages[i].ref for i in group]
        return list(zip(group, self._results(refs, status, headers, payload), strict=True))

    def _results(
        self, refs: list[str], status: int, headers: Mapping[str, str], payload: bytes
    ) -> list[SendResult]:
        """Map one HTTP answer to the results of its messages."""
        if status == 200:
            try:
                items = orjson.loads(payload)
            except orjson.JSONDecodeError:
                items = None
            if not isinstance(items, list) or len(items) != len(refs):
                # Postmark took the request: sending again could send twice.
                text = "postmark: malformed response to an accepted request (not retried)"
                return [failed(ref, text) for ref in refs]
            return [self._item(ref, item) for ref, item in zip(refs, items, strict=True)]
        error = json_object(payload)
        if status == 401:
            text = f"postmark: HTTP 401 unauthorized{self._detail(error)}"
            return [paused(ref, text) for ref in refs]
        if status == 422 and error is not None and isinstance(error.get("ErrorCode"), int):
            return [_for_code(ref, error["ErrorCode"], self._detail(error)) for ref in refs]
        if status == 429:
            text = f"postmark: HTTP 429 rate limited{self._detail(error)}"
            retry_after = parse_retry_after(headers.get("Retry-After"))
            return [
                failed(ref, text, retryable=True, throttled=True, retry_after=retry_after)
                for ref in refs
            ]
        if status == 413:
            return [failed(ref, "postmark: HTTP 413 message too large") for ref in refs]
        text = f"postmark: HTTP {status}{self._detail(error)}"
        retryable = status >= 500
        retry_after = parse_retry_after(headers.get("Retry-After")) if retryable else None
        return [failed(ref, text, retryable=retryable, retry_after=retry_after) for ref in refs]

    def _item(self, ref: str, item: Any) -> SendResult:
        if not isinstance(item, dict) or not isinstance(item.get("ErrorCode"), int):
            return failed(ref, "postmark: malformed result in an accepted request")
        code = item["ErrorCode"]
        if code == 0:
            message_id = item.get("MessageID")
            return SendResult(ref, True, str(message_id) if message_id else None)
        return _for_code(ref, code, self._detail(item))

    def _detail(self, error: Mapping[str, Any] | None) -> str:
        message = error.get("Message") if error is not None else None
        if not isinstance(message, str) or not message:
            return ""
        return ": " + _scrub(message, self._token)[:200]


def to_wire(message: Message, stream: str = DEFAULT_MESSAGE_STREAM) -> dict[str, Any]:
    """One message as Postmark's batch endpoint takes it."""
    wire: dict[str, Any] = {
        "From": mailbox(message.from_name, message.from_email),
        "To": mailbox(message.to_name, message.to_email),
        "Subject": header_safe(message.subject),
        "MessageStream": stream,
        "Metadata": {"ref": message.ref},
    }
    if message.html is not None:
        wire["HtmlBody"] = message.html
    if message.text is not None:
        wire["TextBody"] = message.text
    if message.headers:
        wire["Headers"] = [
            {"Name": name, "Value": header_safe(value)} for name, value in message.headers.items()
        ]
    return wire


def is_suppression(result: SendResult) -> bool:
    """True when Postmark refused the recipient as inactive: the address should be
    suppressed (the error text starts with ``SUPPRESS_PREFIX``)."""
    return not result.ok and (result.error or "").startswith(SUPPRESS_PREFIX)


def _groups(
    bodies: list[bytes], results: list[SendResult | None], max_bytes: int
) -> Iterator[list[int]]:
    """The indexes of the messages still to send, in order, in groups of at most
    ``MAX_PER_CALL`` whose JSON array fits ``max_bytes`` (a message too large alone is a
    group of its own)."""
    group: list[int] = []
    size = 2  # "[" and "]"
    for index, body in enumerate(bodies):
        if results[index] is not None:
            continue
        extra = len(body) + (1 if group else 0)
        if group and (len(group) >= MAX_PER_CALL or size + extra > max_bytes):
            yield group
            group, size, extra = [], 2, len(body)
        group.append(index)
        size += extra
    if group:
        yield group


def _for_code(ref: str, code: int, detail: str) -> SendResult:
    """The result of a message Postmark refused with API error ``code``."""
    what = _DESCRIPTIONS.get(code, "error")
    text = f"postmark: error {code} {what}{detail}"
    if code == _INACTIVE:
        return failed(ref, SUPPRESS_PREFIX + text)
    if code in _PAUSE_CODES:
        return paused(ref, text)
    if code in _RETRY_CODES:
        return failed(ref, text, retryable=True, throttled=code == _RATE_LIMITED)
    return failed(ref, text)


def _scrub(text: str, secret: str = "") -> str:
    """``text`` without addresses, quoted values (a field name in quotes stays) or
    ``secret``."""
    return _QUOTED.sub(_quoted, scrub(text, [secret], "<token>"))


def _quoted(match: re.Match[str]) -> str:
    inner = match[1] if match[1] is not None else match[2]
    return match[0] if _FIELD.fullmatch(inner) or inner == "<address>" else "'…'"


# --- webhooks -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WebhookAuth:
    """What a Postmark webhook post must carry: basic-auth credentials (those in the
    webhook's URL) and/or one custom header (the webhook's ``HttpHeaders``)."""

    username: str | None = None
    password: str | None = None
    header: str | None = None
    header_value: str | None = None

    def __repr__(self) -> str:  # credentials are secrets
        return f"WebhookAuth(basic={self.username is not None}, header={self.header!r})"


def webhook_secret(
    *,
    username: str | None = None,
    password: str | None = None,
    header: str | None = None,
    header_value: str | None = None,
) -> str:
    """The secret string ``verify`` takes: ``"user:password"`` for basic auth alone, else
    a JSON object ``{"username", "password", "header", "value"}`` (one setting, e.g.
    ``POSTMARK_WEBHOOK_SECRET``)."""
    auth = WebhookAuth(username, password, header, header_value)
    _check_auth(auth)
    if header is None:
        return f"{username}:{password}"
    data = {"header": header, "value": header_value}
    if username is not None:
        data |= {"username": username, "password": password}
    return orjson.dumps(data).decode()


def parse_webhook_secret(secret: str) -> WebhookAuth:
    """The ``WebhookAuth`` a secret describes (see ``webhook_secret``); ``ValueError``
    when it describes none. A username may not contain ":" (RFC 7617)."""
    if secret.startswith("{"):
        try:
            data = orjson.loads(secret)
        except orjson.JSONDecodeError:
            raise ValueError("the Postmark webhook secret is not valid JSON") from None
        if not isinstance(data, dict) or not all(
            isinstance(data.get(k), str | None) for k in ("username", "password", "header", "value")
        ):
            raise ValueError("the Postmark webhook secret must be an object of strings")
        auth = WebhookAuth(
            data.get("username"), data.get("password"), data.get("header"), data.get("value")
        )
    else:
        username, colon, password = secret.partition(":")
        if not colon:
            raise ValueError("the Postmark webhook secret must be 'user:password' or JSON")
        auth = WebhookAuth(username, password)
    _check_auth(auth)
    return auth


def _check_auth(auth: WebhookAuth) -> None:
    basic = auth.username is not None or auth.password is not None
    if basic and not (auth.username and auth.password and ":" not in auth.username):
        raise ValueError("basic auth needs a username (without ':') and a password")
    custom = auth.header is not None or auth.header_value is not None
    if custom and not (auth.header and auth.header_value and _FIELD_NAME.fullmatch(auth.header)):
        raise ValueError("a webhook header needs a name and a value")
    if not (basic or custom):
        raise ValueError("the Postmark webhook secret names no credentials")


def verify_webhook(body: bytes, headers: Mapping[str, str], secret: str) -> Signed | None:
    """``Signed`` when the post carries the credentials ``secret`` describes (constant-time
    comparisons), else None (None too when ``secret`` describes no credentials).

    ``Signed.timestamp`` is now (Postmark signs no time); ``Signed.signature`` is the
    identity of the post's event(s) (``event_id``), or a digest of a body that is not
    JSON (``parse_webhook`` refuses it), so the receiver's replay check refuses a copy.
    """
    try:
        auth = parse_webhook_secret(secret)
    except ValueError:
        return None
    if auth.username is not None and not _basic_matches(headers, auth):
        return None
    if auth.header is not None:
        value = header_value(headers, auth.header)
        expected = (auth.header_value or "").encode()
        if value is None or not hmac.compare_digest(value.encode("utf-8", "replace"), expected):
            return None
    return Signed(int(time.time()), "postmark:" + _identity(body))


def _basic_matches(headers: Mapping[str, str], auth: WebhookAuth) -> bool:
    value = header_value(headers, "Authorization") or ""
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        given = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    expected = f"{auth.username}:{auth.password}".encode()
    return hmac.compare_digest(given, expected)


def _identity(body: bytes) -> str:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "body:" + hashlib.sha256(body).hexdigest()
    records = data if isinstance(data, list) else [data]
    ids = [event_id(r) if isinstance(r, dict) else "?" for r in records]
    return ",".join(ids) if len(ids) <= 10 else "body:" + hashlib.sha256(body).hexdigest()


def event_id(record: Mapping[str, Any]) -> str:
    """The identity of one webhook record: its type, message id, the bounce's own id
    where it has one, the time of the event and, for a click, the link. Postmark posts a
    record again (its retries) with the same identity."""
    kind = record.get("RecordType")
    parts = [str(kind), str(record.get("MessageID"))]
    if kind in ("Bounce", "SpamComplaint") and record.get("ID") is not None:
        parts.append(str(record.get("ID")))
    parts.append(str(record.get(_TIME_FIELD.get(str(kind), "ReceivedAt"))))
    if kind == "Click":
        parts.append(hashlib.sha256(str(record.get("OriginalLink")).encode()).hexdigest()[:16])
    if kind == "SubscriptionChange":
        parts.append(str(record.get("SuppressSending")))
    return ":".join(parts)


_TIME_FIELD = {
    "Delivery": "DeliveredAt",
    "Bounce": "BouncedAt",
    "SpamComplaint": "BouncedAt",
    "Open": "ReceivedAt",
    "Click": "ReceivedAt",
    "SubscriptionChange": "ChangedAt",
}
# Bounce types (https://postmarkapp.com/developer/api/bounce-api#bounce-types).
_HARD_BOUNCES = frozenset({"HardBounce", "BadEmailAddress", "ManuallyDeactivated"})
_SOFT_BOUNCES = frozenset(
    {
        "SoftBounce",
        "Transient",
        "DnsError",
        "Unknown",
        "Blocked",
        "SMTPApiError",
        "DMARCPolicy",
        "TemplateRenderingFailed",
    }
)
_COMPLAINTS = frozenset({"SpamComplaint"})
# Also: AutoResponder, AddressChange, Subscribe, ChallengeVerification, OpenRelayTest,
# VirusNotification, SpamNotification, InboundError, Unconfirmed: not about delivery,
# no event. "Unsubscribe" (a list-unsubscribe reply) is "unsubscribed".
_SUPPRESSIONS = {"HardBounce": "bounced", "SpamComplaint": "complained"}


def parse_webhook(body: bytes) -> list[WebhookEvent]:
    """The events of one webhook post (one record object, or an array of them).

    Raises ValueError when the body is not JSON, a record is not an object or a record
    of a known type lacks its message id or time. A record that is not about one of our
    messages (no ``Metadata.ref``: sent by something else, a suppression made by hand)
    or whose type carries no delivery outcome yields nothing.
    """
    data = loads_webhook(body)
    records = data if isinstance(data, list) else [data]
    events: list[WebhookEvent] = []
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"record {index}: must be an object")
        event = _event_of(index, record)
        if event is not None:
            events.append(event)
    return events


def _event_of(index: int, record: dict[str, Any]) -> WebhookEvent | None:
    kind = record.get("RecordType")
    if kind not in _TIME_FIELD:
        return None  # Inbound, or a type this parser does not know: nothing to apply
    name = _event_name(kind, record)
    if name is None:
        return None
    metadata = record.get("Metadata")
    ref = metadata.get("ref") if isinstance(metadata, dict) else None
    if not isinstance(ref, str) or not ref:
        return None
    message_id = record.get("MessageID")
    if not isinstance(message_id, str) or not message_id:
        raise ValueError(f"record {index}: 'MessageID' must be a non-empty string")
    email = record.get("Email") if kind in ("Bounce", "SpamComplaint") else record.get("Recipient")
    if email is not None and not isinstance(email, str):
        raise ValueError(f"record {index}: the recipient must be a string")
    return WebhookEvent(
        ref=ref,
        event=name,
        provider_message_id=message_id,
        email=email,
        timestamp=_timestamp(index, record, _TIME_FIELD[kind]),
        event_id="postmark:" + event_id(record),
    )


def _event_name(kind: str, record: dict[str, Any]) -> str | None:
    if kind == "Delivery":
        return "delivered"
    if kind == "SpamComplaint":
        return "complained"
    if kind == "Open":
        return "opened"
    if kind == "Click":
        return "clicked"
    if kind == "SubscriptionChange":
        if record.get("SuppressSending") is False:
            return "resubscribed"
        if record.get("SuppressSending") is True:
            return _SUPPRESSIONS.get(str(record.get("SuppressionReason")), "unsubscribed")
        return None
    bounce_type = record.get("Type")
    if bounce_type in _COMPLAINTS:
        return "complained"
    if bounce_type in _HARD_BOUNCES:
        return "bounced"
    if bounce_type in _SOFT_BOUNCES:
        # Postmark deactivates an address after repeated soft bounces: then it is hard.
        return "bounced" if record.get("Inactive") is True else "soft_bounced"
    if bounce_type == "Unsubscribe":
        return "unsubscribed"
    return None


def _timestamp(index: int, record: dict[str, Any], field: str) -> float:
    value = record.get(field)
    if not isinstance(value, str):
        raise ValueError(f"record {index}: {field!r} must be an ISO 8601 time")
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise ValueError(f"record {index}: {field!r} must be an ISO 8601 time") from None


# Postmark retries a record with the same identity (the replay key): a repeat is its retry.
WEBHOOK = Webhook(
    verify=verify_webhook,
    parse=parse_webhook,
    headers=("Authorization",),
    scheme="Postmark: the basic-auth credentials of the webhook URL "
    "(`https://user:password@.../webhooks/postmark/<account>`) and/or a custom header "
    "set on the webhook, as the account's webhook secret describes them",
    repeat_is_retry=True,
)


SPEC = account_only(PostmarkProvider, WEBHOOK)
