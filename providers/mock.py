"""The "mock" provider: HTTP client adapter, webhook helpers and its ``SPEC``.

The server side lives in ``devkit.mock_provider``. Wire format of ``POST /v1/send``:
request ``{"messages": [{"ref", "to", "to_name", "from", "from_name", "subject", "html",
"text", "headers"}]}``, answer ``{"results": [{"ref", "status": "accepted", "id"} |
{"ref", "status": "rejected", "error", "retryable"}]}`` in request order. It has no
credentials: its check (``check``) is that its server answers ``GET /health``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from time import time
from typing import Any, Protocol

import orjson

from providers.base import (
    WEBHOOK_EVENTS,
    CheckResult,
    Message,
    ProviderError,
    ProviderSpec,
    SendResult,
    Signed,
    Webhook,
    WebhookEvent,
    failed_all,
)
from providers.http import (
    TRANSPORT_ERRORS,
    Answer,
    HttpAdapter,
    check_refused,
    loads_webhook,
    parse_retry_after,
    transport_reason,
)

SIGNATURE_HEADER = "X-Mock-Signature"
TIMESTAMP_HEADER = "X-Mock-Timestamp"
_JSON_HEADERS = {"Content-Type": "application/json"}


class MockProvider(HttpAdapter):
    """Sends chunks to the mock provider's ``POST /v1/send`` over one pooled session."""

    name = "mock"
    max_per_call = 100  # messages per POST /v1/send: the engine's chunk size too (SPEC)
    connector_limit = 256
    check_call = "GET /health"

    def __init__(self, base_url: str, *, timeout: float = 10.0) -> None:
        super().__init__(timeout=timeout)
        self._base_url = base_url.rstrip("/")
        self._url = self._base_url + "/v1/send"

    def _check_request(self) -> tuple[str, Mapping[str, str]]:
        return self._base_url + "/health", {"Accept": "application/json"}

    def _checked(self, answer: Answer) -> CheckResult:
        if answer.status == 200:
            return CheckResult(True, "the mock provider answers (it needs no credentials)")
        return check_refused(answer.status, answer.payload[:200].decode("utf-8", "replace"))

    async def send(self, messages: list[Message]) -> list[SendResult]:
        """Send one chunk; never raises for provider or network failures."""
        if not messages:
            return []
        body = orjson.dumps({"messages": [_to_wire(m) for m in messages]})
        try:
            async with self._get_session().post(
                self._url, data=body, headers=_JSON_HEADERS
            ) as resp:
                payload = await resp.read()
                return _results_for(messages, resp.status, resp.headers, payload)
        except TRANSPORT_ERRORS as exc:
            reason = transport_reason(exc)
            return failed_all(messages, ProviderError(f"mock: {reason}", retryable=True))


def _to_wire(message: Message) -> dict[str, Any]:
    return {
        "ref": message.ref,
        "to": message.to_email,
        "to_name": message.to_name,
        "from": message.from_email,
        "from_name": message.from_name,
        "subject": message.subject,
        "html": message.html,
        "text": message.text,
        "headers": message.headers,
    }


def _results_for(
    messages: list[Message], status: int, headers: Mapping[str, str], payload: bytes
) -> list[SendResult]:
    """Map one HTTP answer to per-message results."""
    if status == 200:
        try:
            return _parse_results(messages, payload)
        except ValueError as exc:
            return failed_all(messages, ProviderError(f"mock: {exc}", retryable=True))
    detail = payload[:200].decode("utf-8", "replace")
    error_text = f"mock: HTTP {status}: {detail}"
    if status == 429 or status >= 500:
        retry_after = parse_retry_after(headers.get("Retry-After"))
        error = ProviderError(
            error_text, retryable=True, retry_after=retry_after, throttled=status == 429
        )
    else:
        error = ProviderError(error_text, retryable=not 400 <= status < 500)
    return failed_all(messages, error)


def _parse_results(messages: list[Message], payload: bytes) -> list[SendResult]:
    data = orjson.loads(payload)
    items = data.get("results") if isinstance(data, dict) else None
    if not isinstance(items, list) or len(items) != len(messages):
        raise ValueError("malformed response: results do not match the request")
    return [_parse_result(m, item) for m, item in zip(messages, items, strict=True)]


def _parse_result(message: Message, item: Any) -> SendResult:
    if not isinstance(item, dict) or item.get("ref") != message.ref:
        raise ValueError(f"malformed response: no result for ref {message.ref!r}")
    if item.get("status") == "accepted":
        return SendResult(message.ref, True, provider_message_id=item.get("id"))
    return SendResult(
        message.ref,
        False,
        error=str(item.get("error") or "rejected"),
        retryable=bool(item.get("retryable", False)),
    )


def sign(body: bytes, secret: str, timestamp: int) -> str:
    """The ``X-Mock-Signature`` value: HMAC-SHA256 over ``"<timestamp>." + body``, so a
    signature holds for one timestamp only (the receiver bounds its age and refuses a
    signature it has seen)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode(), hashlib.sha256)
    mac.update(body)
    return "sha256=" + mac.hexdigest()


def signed_headers(body: bytes, secret: str, timestamp: int | None = None) -> dict[str, str]:
    """The headers of one webhook post: signed now (or at ``timestamp``)."""
    at = int(time()) if timestamp is None else timestamp
    return {TIMESTAMP_HEADER: str(at), SIGNATURE_HEADER: sign(body, secret, at)}


def verify_signature(body: bytes, headers: Mapping[str, str], secret: str) -> Signed | None:
    """The signed timestamp when ``headers`` sign ``body`` (constant-time compare); None
    when a header is missing, malformed (non-ASCII bytes included) or the signature is
    wrong. The age of the timestamp is the receiver's to judge."""
    signature = headers.get(SIGNATURE_HEADER) or ""
    stamp = headers.get(TIMESTAMP_HEADER) or ""
    if not (signature.isascii() and stamp.isascii() and stamp.isdigit() and len(stamp) <= 12):
        return None
    expected = sign(body, secret, int(stamp))
    if not hmac.compare_digest(expected.encode(), signature.encode()):
        return None
    return Signed(int(stamp), signature)


def parse_webhook(body: bytes) -> list[WebhookEvent]:
    """Parse a webhook body (JSON array of events, each named in the provider event
    vocabulary ``WEBHOOK_EVENTS``, so the mock can stand in for any provider); raise
    ValueError when malformed."""
    data = loads_webhook(body)
    if not isinstance(data, list):
        raise ValueError("webhook body must be a JSON array of events")
    events: list[WebhookEvent] = []
    append, known = events.append, WEBHOOK_EVENTS
    for index, item in enumerate(data):  # one inlined test per good event (500 per post)
        if type(item) is dict:
            ref, event, eid = item.get("ref"), item.get("event"), item.get("event_id")
            pmid, email, at = item.get("message_id"), item.get("email"), item.get("timestamp")
            if (
                type(ref) is str
                and ref
                and type(eid) is str
                and eid
                and type(event) is str
                and event in known
                and (pmid is None or type(pmid) is str)
                and (email is None or type(email) is str)
                and type(at) in (int, float)
            ):
                append(WebhookEvent(ref, event, pmid, email, float(at), eid))
                continue
        append(_parse_event(index, item))  # names what is wrong with it
    return events


def _parse_event(index: int, item: Any) -> WebhookEvent:
    if not isinstance(item, dict):
        raise ValueError(f"event {index}: must be an object")
    event = _required_str(index, item, "event")
    if event not in WEBHOOK_EVENTS:
        raise ValueError(f"event {index}: unknown event type {event!r}")
    timestamp = item.get("timestamp")
    if isinstance(timestamp, bool) or not isinstance(timestamp, int | float):
        raise ValueError(f"event {index}: 'timestamp' must be a number")
    return WebhookEvent(
        ref=_required_str(index, item, "ref"),
        event=event,
        provider_message_id=_optional_str(index, item, "message_id"),
        email=_optional_str(index, item, "email"),
        timestamp=float(timestamp),
        event_id=_required_str(index, item, "event_id"),
    )


def _required_str(index: int, item: dict[str, Any], key: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"event {index}: {key!r} must be a non-empty string")
    return value


def _optional_str(index: int, item: dict[str, Any], key: str) -> str | None:
    value = item.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"event {index}: {key!r} must be a string or null")
    return value


class MockSettings(Protocol):
    """The settings the mock provider reads."""

    mock_provider_enabled: bool  # MOCK_PROVIDER_ENABLED: its place at intake, its webhook
    mock_provider_url: str
    mock_webhook_secret: str


def _build(settings: MockSettings) -> MockProvider:
    return MockProvider(settings.mock_provider_url)


def _enabled(settings: MockSettings) -> bool:
    return settings.mock_provider_enabled


def _webhook_secret(settings: MockSettings) -> str:
    return settings.mock_webhook_secret


SPEC = ProviderSpec(
    name=MockProvider.name,
    max_per_call=MockProvider.max_per_call,
    settings=MockSettings,
    build=_build,
    enabled=_enabled,
    webhook=Webhook(
        verify=verify_signature,
        parse=parse_webhook,
        secret=_webhook_secret,
        headers=(TIMESTAMP_HEADER, SIGNATURE_HEADER),
        scheme=f"`{TIMESTAMP_HEADER}` (Unix seconds) and `{SIGNATURE_HEADER}: sha256=<hex "
        "HMAC-SHA256 of '<timestamp>.' + body>` (only where MOCK_PROVIDER_ENABLED)",
    ),
)
