"""Resend: the batch send adapter, and its webhook's (Svix) check and parser.

An adapter is built from a provider account.

Sending: ``POST {base_url}/emails/batch`` with ``Authorization: Bearer <api_key>`` and a
JSON array of at most 100 emails ``{from, to: [address], subject, html, text, headers,
tags}`` (https://resend.com/docs/api-reference/emails/send-batch-emails), in permissive
validation mode (``x-batch-validation: permissive``: an invalid email fails alone, the
others are sent; https://resend.com/docs/dashboard/emails/batch-validation-modes). The
answer ``{"data": [{"id"}...], "errors": [{"index", "message"}...]}`` lists the created
emails in request order and the refused ones by index.

The ref travels as a tag (tag names and values may hold only ASCII letters, digits, "_"
and "-", at most 256 characters): ``ref`` = the ref with its one ":" written "_" when it
is ``<letters, digits, "-">:<letters, digits, "-">`` (the engine's ``<batch uuid>:<seq>``),
else ``ref_b64`` = its unpadded base64url (``encode_ref``/``decode_ref``).

Every request has an ``Idempotency-Key`` (https://resend.com/docs/dashboard/emails/
idempotency-keys): ``batchsender/<sha256 hex>`` of the chunk's refs, in order, and an
optional ``generation`` the engine may pass (``idempotency_key``). The same chunk sent
again within Resend's 24 hours (a redelivered chunk, a retry after a lost answer) gets
the first answer back and sends nothing; a chunk with other recipients has another key.
The same key with a different body is refused (409 ``invalid_idempotent_request``): the
chunk was sent before with other content, so it fails permanently rather than twice.

Errors (https://resend.com/docs/api-reference/errors):

=======================================  =============================================
429 ``daily_quota_exceeded``             ``hold`` (waits for the quota; not retried now)
429 ``monthly_quota_exceeded``           ``pause_reason`` (needs a plan change)
429 other (``rate_limit_exceeded``)      retryable, throttled; ``retry_after`` from
                                         ``retry-after`` (else ``ratelimit-reset``)
401/403 (``missing_api_key``,            ``pause_reason``
``invalid_api_key``,
``restricted_api_key``, unverified
domain)
409 ``concurrent_idempotent_requests``   retryable (the first request is under way)
409 ``invalid_idempotent_request``       permanent, with a clear text
400, 422 (validation), 451, other 4xx    permanent
5xx, timeouts, connection errors         retryable
=======================================  =============================================

Error texts never hold the API key or a recipient address.

Credentials check (``check``): ``GET {base_url}/domains``
(https://resend.com/docs/api-reference/domains/list-domains): 200 ``{"object": "list",
"data": [{"name", "status", ...}]}`` is a full-access key (ok; its verified domains are
counted); 401 ``restricted_api_key`` is a sending-access key, which works but may only send
(ok, with that note); 401 ``missing_api_key`` and 403 ``invalid_api_key`` are refused keys.

Webhooks are Svix-signed (https://resend.com/docs/dashboard/webhooks/verify-webhooks-
requests): ``svix-id``, ``svix-timestamp``, ``svix-signature`` (space-separated
``v1,<base64>``, any may match) over ``{id}.{timestamp}.{body}`` with the base64 secret
after ``whsec_``, 5 minutes of tolerance. ``verify_webhook`` leaves the check to the
``standardwebhooks`` package (by Svix; what ``svix.Webhook.verify`` itself calls), and
gives ``Signed(timestamp, signature=svix-id)``: the receiver's replay check refuses a
second post of the same message id.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import orjson
from standardwebhooks.webhooks import EmptyWebhookSecretError, WebhookVerificationError
from standardwebhooks.webhooks import Webhook as _StandardWebhook

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
    held,
    json_object,
    loads_webhook,
    mailbox,
    parse_retry_after,
    paused,
    retry_after,
    scrub,
    transport_reason,
)

DEFAULT_BASE_URL = "https://api.resend.com"
MAX_PER_CALL = 100  # emails per POST /emails/batch
REF_TAG = "ref"
REF_B64_TAG = "ref_b64"
ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER = "svix-id", "svix-timestamp", "svix-signature"

# The event ``parse_webhook`` yields (``WebhookEvent.event``) for each Resend event type.
_EVENT_NAMES = {
    "email.sent": "sent",
    "email.delivered": "delivered",
    "email.delivery_delayed": "deferred",
    "email.bounced": "bounced",  # "soft_bounced" when its bounce.type is "Transient"
    "email.complained": "complained",
    "email.opened": "opened",
    "email.clicked": "clicked",
    "email.failed": "failed",  # Resend did not send it (e.g. reached_daily_quota)
    "email.suppressed": "suppressed",  # on Resend's suppression list: not sent
}

_TAG_TEXT = re.compile(r"[A-Za-z0-9_-]{1,256}")
_PLAIN_REF = re.compile(r"([A-Za-z0-9-]+):([A-Za-z0-9-]+)")
_PLAIN_TAG = re.compile(r"([A-Za-z0-9-]+)_([A-Za-z0-9-]+)")
_SIGNATURE = re.compile(r"v1,[A-Za-z0-9+/]+={0,2}")
_PAUSE_NAMES = frozenset({"missing_api_key", "invalid_api_key", "restricted_api_key"})


class ResendProvider(HttpAdapter):
    """Sends chunks through Resend's batch endpoint over one pooled session.

    Built from an ``Account``: ``credentials["api_key"]`` (required), ``base_url``
    (default ``https://api.resend.com``; a test server's URL in tests).
    """

    name = "resend"
    max_per_call = MAX_PER_CALL
    check_call = "GET /domains"

    def __init__(self, account: Account, *, timeout: float = 30.0) -> None:
        key = account.credentials.get("api_key") or ""
        if not key:
            raise ValueError("a Resend account needs credentials['api_key']")
        super().__init__(timeout=timeout, resolver=account.resolver)
        self._key = key
        self._secrets = (key,)
        self._base_url = (account.base_url or DEFAULT_BASE_URL).rstrip("/")
        self._url = self._base_url + "/emails/batch"
        self._headers = {
            "Authorization": f"Bearer {key}",
            "Content-Type": "application/json",
            "Accept": "application/json",
            "x-batch-validation": "permissive",
        }

    def __repr__(self) -> str:
        return f"ResendProvider(url={self._url!r})"

    def _check_request(self) -> tuple[str, Mapping[str, str]]:
        return self._base_url + "/domains", {
            "Authorization": self._headers["Authorization"],
            "Accept": "application/json",
        }

    def _checked(self, answer: Answer) -> CheckResult:
        body = answer.json()
        name = str(body.get("name") or "") if body is not None else ""
        if answer.status == 401 and name == "restricted_api_key":
            return CheckResult(
                True,
                "the API key works; it has sending access only (it may send, but not list "
                "the account's domains)",
            )
        if answer.status != 200:
            message = self._detail(body).removeprefix(": ")
            detail = ": ".join(part for part in (name, message) if part)
            return check_refused(answer.status, detail, what="the API key")
        domains = (body or {}).get("data")
        if not isinstance(domains, list):
            return CheckResult(True, "the API key works (full access)")
        verified = [d for d in domains if isinstance(d, dict) and d.get("status") == "verified"]
        text = (
            f"the API key works (full access); {len(verified)} of {len(domains)} domains verified"
        )
        if not verified:
            text += (
                ": without a verified domain Resend sends only test mail to the account's own "
                "address"
            )
        return CheckResult(True, text)

    async def send(
        self, messages: list[Message], *, generation: str | None = None
    ) -> list[SendResult]:
        """Send one chunk: one result per message, in order. Never raises for provider or
        network failures. ``generation`` goes into the idempotency key (see
        ``idempotency_key``); the same chunk and generation are sent once."""
        results: list[SendResult] = []
        for start in range(0, len(messages), MAX_PER_CALL):
            results += await self._send_call(messages[start : start + MAX_PER_CALL], generation)
        return results

    async def _send_call(self, messages: list[Message], generation: str | None) -> list[SendResult]:
        emails: list[bytes] = []
        local: dict[int, SendResult] = {}  # refused before sending
        for index, message in enumerate(messages):
            try:
                emails.append(orjson.dumps(to_wire(message)))
            except (TypeError, ValueError) as exc:  # orjson: a lone surrogate, say
                local[index] = failed(message.ref, f"resend: cannot encode: {exc}")
        sendable = [m for i, m in enumerate(messages) if i not in local]
        answered = iter(await self._post(sendable, emails, generation) if sendable else [])
        return [local[i] if i in local else next(answered) for i in range(len(messages))]

    async def _post(
        self, messages: list[Message], emails: list[bytes], generation: str | None
    ) -> list[SendResult]:
        refs = [m.ref for m in messages]
        body = b"[" + b",".join(emails) + b"]"
        headers = {**self._headers, "Idempotency-Key": idempotency_key(refs, generation)}
        try:
            async with self._get_session().post(self._url, data=body, headers=headers) as resp:
                status, answer_headers, payload = resp.status, resp.headers, await resp.read()
        except TRANSPORT_ERRORS as exc:
            # Safe to retry: the same chunk has the same idempotency key.
            text = f"resend: {self._scrub(transport_reason(exc))}"
            return [failed(ref, text, retryable=True) for ref in refs]
        return self._results(refs, status, answer_headers, payload)

    def _results(
        self, refs: list[str], status: int, headers: Mapping[str, str], payload: bytes
    ) -> list[SendResult]:
        """Map one HTTP answer to the results of its emails."""
        if status == 200:
            return self._accepted(refs, payload)
        error = json_object(payload)
        name = str(error.get("name") or "") if error is not None else ""
        text = f"resend: HTTP {status}" + (f" {name}" if name else "") + self._detail(error)
        if status == 429:
            if name == "daily_quota_exceeded":
                wait = parse_retry_after(headers.get("retry-after"))
                return [held(ref, text, wait) for ref in refs]
            if name == "monthly_quota_exceeded":
                return [paused(ref, text) for ref in refs]
            wait = retry_after(headers, reset="ratelimit-reset")
            return [failed(ref, text, throttled=True, retry_after=wait) for ref in refs]
        if status in (401, 403) or name in _PAUSE_NAMES:
            return [paused(ref, text) for ref in refs]
        if status == 409:
            if name == "invalid_idempotent_request":
                text = (
                    "resend: HTTP 409 invalid_idempotent_request: this chunk was already "
                    "sent with other content under the same idempotency key; not sent again"
                )
                return [failed(ref, text) for ref in refs]
            wait = parse_retry_after(headers.get("retry-after")) or 1.0
            return [failed(ref, text, retryable=True, retry_after=wait) for ref in refs]
        if status >= 500:
            wait = parse_retry_after(headers.get("retry-after"))
            return [failed(ref, text, retryable=True, retry_after=wait) for ref in refs]
        return [failed(ref, text) for ref in refs]

    def _accepted(self, refs: list[str], payload: bytes) -> list[SendResult]:
        try:
            data = orjson.loads(payload)
        except orjson.JSONDecodeError:
            data = None
        created = data.get("data") if isinstance(data, dict) else None
        refused = (data.get("errors") if isinstance(data, dict) else None) or []
        by_index: dict[int, str] = {}
        if isinstance(refused, list):
            for item in refused:
                if isinstance(item, dict) and type(item.get("index")) is int:
                    message = item.get("message")
                    by_index[item["index"]] = message if isinstance(message, str) else ""
        if (
            not isinstance(created, list)
            or not isinstance(refused, list)
            or len(by_index) != len(refused)
            or any(not 0 <= i < len(refs) for i in by_index)
            or len(created) != len(refs) - len(by_index)
        ):
            # Retrying is safe: the same request gets the same answer, sends nothing twice.
            text = "resend: malformed response (retried under the same idempotency key)"
            return [failed(ref, text, retryable=True) for ref in refs]
        ids = iter(created)
        results = []
        for index, ref in enumerate(refs):
            if index in by_index:
                detail = self._scrub(by_index[index])[:200]
                results.append(failed(ref, "resend: refused" + (f": {detail}" if detail else "")))
                continue
            item = next(ids)
            email_id = item.get("id") if isinstance(item, dict) else None
            results.append(SendResult(ref, True, str(email_id) if email_id else None))
        return results

    def _detail(self, error: Mapping[str, Any] | None) -> str:
        message = error.get("message") if error is not None else None
        if not isinstance(message, str) or not message:
            return ""
        return ": " + self._scrub(message)[:200]

    def _scrub(self, text: str) -> str:
        return scrub(text, [self._key], "<key>")


def idempotency_key(refs: list[str], generation: str | None = None) -> str:
    """The ``Idempotency-Key`` of a request carrying ``refs`` (in order):
    ``batchsender/`` + the SHA-256 hex of ``[generation, refs]`` as JSON (76 characters;
    Resend takes up to 256). Deterministic, so a chunk sent again gets the same key; the
    engine may pass a ``generation`` (e.g. a resend counter) to send the same chunk anew
    on purpose."""
    digest = hashlib.sha256(orjson.dumps([generation, refs])).hexdigest()
    return f"batchsender/{digest}"


def encode_ref(ref: str) -> dict[str, str]:
    """The tag carrying ``ref`` (see the module docstring)."""
    match = _PLAIN_REF.fullmatch(ref)
    if match is not None and len(ref) <= 256:
        return {"name": REF_TAG, "value": f"{match[1]}_{match[2]}"}
    value = base64.urlsafe_b64encode(ref.encode()).rstrip(b"=").decode()
    if len(value) > 256:
        raise ValueError("the ref is too long for a Resend tag")
    return {"name": REF_B64_TAG, "value": value}


def decode_ref(name: str, value: str) -> str | None:
    """The ref a tag carries, or None when it carries none."""
    if name == REF_TAG:
        match = _PLAIN_TAG.fullmatch(value)
        return f"{match[1]}:{match[2]}" if match is not None else None
    if name == REF_B64_TAG and _TAG_TEXT.fullmatch(value):
        try:
            return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode()
        except (binascii.Error, ValueError):
            return None
    return None


def to_wire(message: Message) -> dict[str, Any]:
    """One email as Resend's batch endpoint takes it."""
    wire: dict[str, Any] = {
        "from": mailbox(message.from_name, message.from_email),
        "to": [message.to_email],
        "subject": header_safe(message.subject),
        "tags": [encode_ref(message.ref)],
    }
    if message.html is not None:
        wire["html"] = message.html
    if message.text is not None:
        wire["text"] = message.text
    if message.headers:
        wire["headers"] = {name: header_safe(value) for name, value in message.headers.items()}
    return wire


# --- webhooks -------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _webhook(secret: str) -> _StandardWebhook:
    return _StandardWebhook(secret)


def verify_webhook(body: bytes, headers: Mapping[str, str], secret: str) -> Signed | None:
    """``Signed(svix-timestamp, svix-id)`` when the Svix signature verifies for ``secret``
    (``whsec_<base64>``) and the timestamp is within 5 minutes of now; else None (a
    missing or malformed header, a body that is not UTF-8, a bad secret included)."""
    msg_id = header_value(headers, ID_HEADER)
    stamp = header_value(headers, TIMESTAMP_HEADER)
    signatures = header_value(headers, SIGNATURE_HEADER)
    if not (secret and msg_id and stamp and signatures):
        return None
    if not (msg_id.isascii() and stamp.isascii() and stamp.isdigit() and len(stamp) <= 12):
        return None
    # Only well-formed v1 entries: a malformed one must not hide a good one.
    entries = [e for e in signatures.split(" ") if _SIGNATURE.fullmatch(e)]
    if not entries:
        return None
    try:
        webhook = _webhook(secret)
    except (EmptyWebhookSecretError, RuntimeError, ValueError):  # not whsec_<base64>
        return None
    signed = {"webhook-id": msg_id, "webhook-timestamp": stamp}
    signed["webhook-signature"] = " ".join(entries)
    try:
        webhook.verify(body, signed, json_parse=False)
    except (WebhookVerificationError, ValueError):  # UnicodeDecodeError is a ValueError
        return None
    return Signed(int(stamp), msg_id)


def parse_webhook(body: bytes, *, event_id: str | None = None) -> list[WebhookEvent]:
    """The event of one webhook post (``{type, created_at, data}``), as a list.

    ``event_id`` is the post's ``svix-id`` where the caller has it; without it the event's
    own identity is used (``resend:<type>:<email_id>:<created_at>``, the same in every
    retry of the post). Raises ValueError when the body is not a JSON object, or an email
    event lacks its ``email_id`` or time. An event type not in ``_EVENT_NAMES`` (contacts,
    domains, ``email.received``, ...) or an email without our ref tag yields nothing.
    """
    data = loads_webhook(body)
    if not isinstance(data, dict):
        raise ValueError("webhook body must be a JSON object")
    kind = data.get("type")
    if not isinstance(kind, str):
        raise ValueError("'type' must be a string")
    event = _EVENT_NAMES.get(kind)
    if event is None:
        return []
    payload = data.get("data")
    if not isinstance(payload, dict):
        raise ValueError("'data' must be an object")
    email_id = payload.get("email_id")
    if not isinstance(email_id, str) or not email_id:
        raise ValueError("'data.email_id' must be a non-empty string")
    created_at = data.get("created_at")
    if not isinstance(created_at, str):
        raise ValueError("'created_at' must be an ISO 8601 time")
    try:
        timestamp = datetime.fromisoformat(created_at).timestamp()
    except ValueError:
        raise ValueError("'created_at' must be an ISO 8601 time") from None
    ref = _ref_of(payload.get("tags"))
    if ref is None:
        return []
    if kind == "email.bounced":
        bounce = payload.get("bounce")
        if isinstance(bounce, dict) and bounce.get("type") == "Transient":
            event = "soft_bounced"
    to = payload.get("to")
    email = to if isinstance(to, str) else (to[0] if isinstance(to, list) and to else None)
    return [
        WebhookEvent(
            ref=ref,
            event=event,
            provider_message_id=email_id,
            email=email if isinstance(email, str) else None,
            timestamp=timestamp,
            event_id=event_id or f"resend:{kind}:{email_id}:{created_at}",
        )
    ]


def _ref_of(tags: Any) -> str | None:
    """The ref among an email's tags: an object ``{name: value}`` (what the webhook
    events carry) or a list of ``{name, value}``."""
    if isinstance(tags, dict):
        pairs = list(tags.items())
    elif isinstance(tags, list):
        pairs = [(t.get("name"), t.get("value")) for t in tags if isinstance(t, dict)]
    else:
        return None
    for name, value in pairs:
        if isinstance(name, str) and isinstance(value, str):
            ref = decode_ref(name, value)
            if ref:
                return ref
    return None


# Svix retries a message under the same svix-id (the replay key), signed again with the
# attempt's timestamp: a repeat is its retry.
WEBHOOK = Webhook(
    verify=verify_webhook,
    parse=parse_webhook,
    headers=("svix-id", "svix-timestamp", "svix-signature"),
    scheme="Resend (Svix / Standard Webhooks): `svix-signature` holds `v1,<base64 "
    "HMAC-SHA256 of '<svix-id>.<svix-timestamp>.' + body>` under the base64 key after "
    "`whsec_` of the account's signing secret; 5 minutes' tolerance",
    repeat_is_retry=True,
)


SPEC = account_only(ResendProvider, WEBHOOK)
