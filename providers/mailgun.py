"""The Mailgun provider: the batch-sending adapter and the webhook.

An adapter is built from a provider account
(``MailgunProvider(Account(..., domain="mg.example.com"))``); ``WEBHOOK`` is its webhook.

Sending: ``POST {base}/v3/{domain}/messages``, ``multipart/form-data``, HTTP basic auth
``api:<api key>`` (https://documentation.mailgun.com/docs/mailgun/api-reference/). ``base``
is ``https://api.mailgun.net``, or ``https://api.eu.mailgun.net`` for a domain in the EU
region (``Account.region="eu"`` or ``Account.base_url``).

Batch sending (https://documentation.mailgun.com/docs/mailgun/user-manual/sending-messages/batch-sending)
--------------------------------------------------------------------------------------------------
One request sends to up to 1,000 recipients: ``to`` is repeated, one recipient each, and
``recipient-variables`` is a JSON object keyed by each plain address. Mailgun then sends
every recipient a message of its own, addressed to it alone; WITHOUT recipient variables
every recipient would see every address in ``To``, so a request here always carries them,
covering every ``to`` (the fake server refuses one that does not, and a test proves it).

The messages come rendered, one subject and body per recipient, so the request's fields
are placeholders and every recipient's own values are its recipient variables:
``subject=%recipient.subject%``, ``text=%recipient.text%``, ``html=%recipient.html%``,
``h:<Header>=%recipient.h<n>%`` for each header (List-Unsubscribe and the others the
engine sets; Mailgun substitutes recipient variables in ``h:`` headers too, which is how
per-recipient List-Unsubscribe links are sent in batches) and ``v:ref=%recipient.ref%``,
the custom variable every webhook event carries back in ``user-variables`` (the
documented ``{'v:Recipient-Id': '%recipient.id%'}`` pattern). Mailgun documents no limit
on a recipient variable's size, only 25 MB per message; a request is kept under
``MAX_REQUEST_BYTES`` and split when larger. Messages of one request share the sender,
whether they have a text and an HTML part and their header names, and no address is in a
request twice (the k-th occurrence of an address in a chunk goes to the k-th request
round): recipient variables are keyed by address. A limit of the approach: the values are
the rendered bodies, substituted once; text in them that looks like a Mailgun variable
(``%recipient.x%``, ``%unsubscribe_url%``) is assumed to be left as it is.

Answers, per request: 200 ``{"id": "<...>", "message": "Queued. Thank you."}``: every
message of it is accepted with that id (without the angle brackets: webhook events carry
it so, in ``message.headers.message-id``). 400: permanent; when it is about a recipient
(``'to' parameter is not a valid address``) the request is split in halves to find it,
within a small budget of extra requests per chunk. 413: split in halves. 401/403:
``pause_reason`` (the key is refused / the account may not send), and 404 as well (the
domain is not on this account or in this region). 429: retryable and throttled
(``Retry-After`` or ``X-RateLimit-Reset``). 5xx, timeouts and connection errors:
retryable. Other 4xx: permanent. Error texts never hold an address or the API key.

Credentials check (``check``): ``GET {base}/v3/domains/{domain}`` with the same basic
auth (https://documentation.mailgun.com/docs/mailgun/api-reference/): 200 ``{"domain":
{"name", "state", "is_disabled", ...}, ...}`` is ok when the domain's ``state`` is
``active``; an ``unverified`` or disabled domain sends nothing (not ok); 401 is a refused
key, 404 ``{"message": "Domain not found"}`` a domain that is not on this account (or in
this region).

Webhook (https://documentation.mailgun.com/docs/mailgun/user-manual/webhooks/securing-webhooks):
a JSON body ``{"signature": {"timestamp", "token", "signature"}, "event-data": {...}}``,
one event per post; ``signature`` is the hex HMAC-SHA256 of ``timestamp + token`` under the
webhook signing key (``parent-signature`` for a subaccount's domain is accepted too). The
signature does not cover ``event-data``: what keeps a captured signature from carrying
other event data is that a token is accepted once. ``Signed.signature`` is the token, so
the engine's replay store (one key per signature for the tolerance window) refuses a
token seen before, whatever it comes with.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import formataddr
from typing import Any
from urllib.parse import quote

import aiohttp
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
)
from providers.http import (
    TRANSPORT_ERRORS,
    Answer,
    HttpAdapter,
    check_refused,
    failed,
    halves,
    loads_webhook,
    one_line,
    parse_retry_after,
    paused,
    retry_after,
    scrub,
    transport_reason,
)

US_API = "https://api.mailgun.net"
EU_API = "https://api.eu.mailgun.net"
MAX_RECIPIENTS = 1000  # per request (Mailgun's batch limit)
MAX_REQUEST_BYTES = 20_000_000  # a request body, under Mailgun's 25 MB message limit
REF_VAR = "ref"  # the custom variable (v:ref) holding Message.ref
BISECT_BUDGET = 32  # extra requests per chunk spent finding the recipients a 400 is about

_EVENT_NAMES = {
    "delivered": "delivered",
    "complained": "complained",
    "opened": "opened",
    "clicked": "clicked",
    "unsubscribed": "unsubscribed",
}
# A permanent failure for one of these reasons is not a bounce: Mailgun did not deliver
# because the address is on a suppression list, or gave up retrying ("old").
_DROPPED_REASONS = frozenset(
    {"suppress-bounce", "suppress-unsubscribe", "suppress-complaint", "old"}
)
# Besides these, "failed" is "bounced" (permanent), "dropped" (see above) or "deferred"
# (temporary: Mailgun retries).

_ABOUT_RECIPIENT = re.compile(r"\bto\b|recipient", re.IGNORECASE)
_HEX = frozenset("0123456789abcdef")


class MailgunProvider(HttpAdapter):
    """Sends chunks through Mailgun's messages API (batch sending) over one pooled session."""

    name = "mailgun"
    max_per_call = 1000  # messages per send() (the chunk size); more are sent in pieces

    def __init__(self, account: Account, *, timeout: float = 120.0, concurrency: int = 4) -> None:
        key = account.credentials.get("api_key") or ""
        if not key:
            raise ValueError("mailgun: the account has no api_key")
        if not account.domain:
            raise ValueError("mailgun: the account has no sending domain")
        super().__init__(timeout=timeout, resolver=account.resolver)
        base = account.base_url or (EU_API if (account.region or "").lower() == "eu" else US_API)
        self.base_url = base.rstrip("/")
        self.domain = account.domain
        self._url = f"{self.base_url}/v3/{quote(account.domain, safe='')}/messages"
        self._check_path = f"/v3/domains/{quote(account.domain, safe='')}"
        self.check_call = f"GET {self._check_path}"
        self._key = key
        token = base64.b64encode(f"api:{key}".encode()).decode()
        self._headers = {"Authorization": f"Basic {token}"}
        self._concurrency = max(1, concurrency)

    def __repr__(self) -> str:
        return f"MailgunProvider({self.base_url!r}, domain={self.domain!r})"

    def _check_request(self) -> tuple[str, Mapping[str, str]]:
        return self.base_url + self._check_path, {**self._headers, "Accept": "application/json"}

    def _checked(self, answer: Answer) -> CheckResult:
        domain = self.domain
        if answer.status == 404:
            return CheckResult(
                False,
                f"domain {domain} not found at Mailgun (HTTP 404): it is not on this account, "
                "or the account is in the other region (US/EU)",
            )
        if answer.status != 200:
            return check_refused(answer.status, _detail(answer.payload), what="the API key")
        found = (answer.json() or {}).get("domain")
        state = found.get("state") if isinstance(found, dict) else None
        if state == "disabled" or (isinstance(found, dict) and found.get("is_disabled") is True):
            return CheckResult(False, f"the API key works, but domain {domain} is disabled")
        if state == "unverified":
            return CheckResult(
                False,
                f"the API key works, but domain {domain} is unverified: Mailgun sends nothing "
                "from it until its DNS records verify",
            )
        if state == "active":
            return CheckResult(True, f"the API key works and domain {domain} is active")
        return CheckResult(True, f"the API key works and domain {domain} is known (state {state})")

    async def send(self, messages: list[Message]) -> list[SendResult]:
        """One result per message, in order; never raises for provider or network failures."""
        results: list[SendResult | None] = [None] * len(messages)
        valid: list[int] = []
        for index, message in enumerate(messages):
            if not (message.text or message.html):
                results[index] = failed(message.ref, "mailgun: the message has no body")
            else:
                valid.append(index)
        if valid:
            run = _Run(messages, results, asyncio.Semaphore(self._concurrency), [BISECT_BUDGET])
            await asyncio.gather(*(self._send(request, run) for request in plan(messages, valid)))
        return [
            r if r is not None else failed(m.ref, "mailgun: no answer", retryable=True)
            for r, m in zip(results, messages, strict=True)
        ]

    async def _send(self, request: _Request, run: _Run) -> None:
        try:
            async with (
                run.limit,
                self._get_session().post(
                    self._url, data=request.form(), headers=self._headers
                ) as resp,
            ):
                status, headers, payload = resp.status, resp.headers, await resp.read()
        except TRANSPORT_ERRORS as exc:
            reason = self._clean(transport_reason(exc))
            run.fail(request, f"mailgun: {reason}", retryable=True)
            return
        if 200 <= status < 300:
            message_id = _message_id(payload)
            for index in request.indices:
                run.results[index] = SendResult(
                    run.messages[index].ref, True, provider_message_id=message_id
                )
            return
        detail = _detail(payload)
        text = self._clean(f"mailgun: HTTP {status}" + (f": {detail}" if detail else ""))
        splittable = len(request) > 1 and bool(
            status == 413
            or (status == 400 and _ABOUT_RECIPIENT.search(detail) and run.budget[0] >= 2)
        )
        if splittable:
            if status == 400:
                run.budget[0] -= 2
            await asyncio.gather(*(self._send(half, run) for half in request.halves()))
        elif status in (401, 403, 404):
            why = {
                401: "the API key was refused",
                403: "the account may not send",
                404: "the domain is not on this account (or in this region)",
            }[status]
            reason = f"mailgun: {why} (HTTP {status})"
            for index in request.indices:
                run.results[index] = paused(run.messages[index].ref, text, reason)
        elif status == 429:
            run.fail(request, text, retry_after=retry_after(headers), throttled=True)
        elif status >= 500:
            run.fail(
                request,
                text,
                retryable=True,
                retry_after=parse_retry_after(headers.get("Retry-After")),
            )
        else:
            run.fail(request, text)

    def _clean(self, text: str) -> str:
        """An error text as it may be recorded: no address, no key, one short line."""
        return one_line(scrub(text, [self._key], "<api key>"))


@dataclass(slots=True)
class _Run:
    """One send() call: its messages, the results being filled in, the concurrency limit
    and what is left of the bisection budget."""

    messages: Sequence[Message]
    results: list[SendResult | None]
    limit: asyncio.Semaphore
    budget: list[int]

    def fail(
        self,
        request: _Request,
        error: str,
        *,
        retryable: bool = False,
        retry_after: float | None = None,
        throttled: bool = False,
    ) -> None:
        for index in request.indices:
            self.results[index] = failed(
                self.messages[index].ref,
                error,
                retryable=retryable,
                retry_after=retry_after,
                throttled=throttled,
            )


def _detail(payload: bytes) -> str:
    """The ``message`` of an error body (Mailgun answers ``{"message": ...}``), else its text."""
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return payload[:200].decode("utf-8", "replace").strip()
    if isinstance(data, dict) and isinstance(data.get("message"), str):
        return data["message"]
    return ""


def _message_id(payload: bytes) -> str | None:
    """The queued message's id without its angle brackets (as events carry it); None when
    the answer has none (the request was accepted all the same)."""
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    value = data.get("id") if isinstance(data, dict) else None
    if not isinstance(value, str) or not value.strip("<> "):
        return None
    return value.strip().removeprefix("<").removesuffix(">")


# --- planning: messages -> requests ------------------------------------------------------


@dataclass(slots=True)
class _Request:
    """One batch request: the fields all its recipients share and, per recipient (chunk
    position), its ``to`` value, address and recipient variables."""

    shared: list[tuple[str, str]]
    indices: list[int] = field(default_factory=list)
    to: list[str] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)
    variables: list[dict[str, str]] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.indices)

    def add(self, index: int, to: str, address: str, variables: dict[str, str]) -> None:
        self.indices.append(index)
        self.to.append(to)
        self.addresses.append(address)
        self.variables.append(variables)
        self.sizes.append(len(to) + len(orjson.dumps({address: variables})) + 120)

    def recipient_variables(self) -> bytes:
        return orjson.dumps(dict(zip(self.addresses, self.variables, strict=True)))

    def fields(self) -> list[tuple[str, str]]:
        """The form fields, in order: the shared ones, every ``to``, the variables."""
        fields = list(self.shared)
        fields.extend(("to", to) for to in self.to)
        fields.append(("recipient-variables", self.recipient_variables().decode()))
        return fields

    def form(self) -> aiohttp.FormData:
        return aiohttp.FormData(self.fields(), charset="utf-8", default_to_multipart=True)

    def _subset(self, start: int, stop: int) -> _Request:
        return _Request(
            self.shared,
            self.indices[start:stop],
            self.to[start:stop],
            self.addresses[start:stop],
            self.variables[start:stop],
            self.sizes[start:stop],
        )

    def halves(self) -> list[_Request]:
        return [self._subset(half.start, half.stop) for half in halves(range(len(self)))]

    def pieces(self) -> list[_Request]:
        """This request in pieces of at most MAX_RECIPIENTS and MAX_REQUEST_BYTES."""
        base = sum(len(name) + len(value.encode()) + 120 for name, value in self.shared)
        pieces, start, total = [], 0, 0
        for position, size in enumerate(self.sizes):
            count = position - start
            if count and (count >= MAX_RECIPIENTS or base + total + size > MAX_REQUEST_BYTES):
                pieces.append(self._subset(start, position))
                start, total = position, 0
            total += size
        pieces.append(self._subset(start, len(self)))
        return pieces


def plan(messages: Sequence[Message], indices: Sequence[int]) -> list[_Request]:
    """The batch requests that send ``messages[i]`` for every ``i`` of ``indices``."""
    requests: dict[tuple[Any, ...], _Request] = {}
    occurrences: dict[str, int] = {}
    for index in indices:
        message = messages[index]
        address = message.to_email
        round_ = occurrences.get(address.lower(), 0)
        occurrences[address.lower()] = round_ + 1
        names = tuple(message.headers)
        key = (
            round_,
            message.from_email,
            message.from_name or "",
            bool(message.text),
            bool(message.html),
            names,
        )
        request = requests.get(key)
        if request is None:
            request = requests[key] = _Request(_shared_fields(message, names))
        variables = {"subject": message.subject, REF_VAR: message.ref}
        if message.text:
            variables["text"] = message.text
        if message.html:
            variables["html"] = message.html
        for number, name in enumerate(names):
            variables[f"h{number}"] = message.headers[name]
        to = formataddr((message.to_name, address)) if message.to_name else address
        request.add(index, to, address, variables)
    return [piece for request in requests.values() for piece in request.pieces()]


def _shared_fields(message: Message, names: tuple[str, ...]) -> list[tuple[str, str]]:
    sender = (
        formataddr((message.from_name, message.from_email))
        if message.from_name
        else message.from_email
    )
    fields = [("from", sender), ("subject", "%recipient.subject%")]
    if message.text:
        fields.append(("text", "%recipient.text%"))
    if message.html:
        fields.append(("html", "%recipient.html%"))
    fields.extend((f"h:{name}", f"%recipient.h{number}%") for number, name in enumerate(names))
    fields.append((f"v:{REF_VAR}", f"%recipient.{REF_VAR}%"))
    return fields


# --- the webhook ---------------------------------------------------------------------------


def signature(signing_key: str, timestamp: str, token: str) -> str:
    """The hex HMAC-SHA256 of ``timestamp + token`` under the webhook signing key."""
    return hmac.new(
        signing_key.encode(), f"{timestamp}{token}".encode(), hashlib.sha256
    ).hexdigest()


def verify_signature(body: bytes, headers: Mapping[str, str], signing_key: str) -> Signed | None:
    """The signed timestamp and the token (the replay key) when the post's ``signature``
    object is signed with ``signing_key`` (constant-time compare); None when it is missing
    or malformed or the signature is wrong. ``headers`` are not used: Mailgun signs in the
    body. The age of the timestamp is the receiver's to judge."""
    if not signing_key:
        return None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    signed = data.get("signature") if isinstance(data, dict) else None
    if not isinstance(signed, dict):
        return None
    stamp, token = signed.get("timestamp"), signed.get("token")
    if isinstance(stamp, int) and not isinstance(stamp, bool):
        stamp = str(stamp)
    if not (
        isinstance(stamp, str)
        and stamp.isascii()
        and stamp.isdigit()
        and len(stamp) <= 12
        and isinstance(token, str)
        and token.isascii()
        and token.isprintable()
        and 0 < len(token) <= 512
    ):
        return None
    expected = signature(signing_key, stamp, token)
    for name in ("signature", "parent-signature"):
        given = signed.get(name)
        if (
            isinstance(given, str)
            and len(given) == len(expected)
            and set(given) <= _HEX
            and hmac.compare_digest(expected, given)
        ):
            return Signed(int(stamp), f"mailgun:{token}")
    return None


def parse_webhook(body: bytes) -> list[WebhookEvent]:
    """The event of a webhook post, when it is about a message sent here (its
    ``user-variables`` hold ``ref``) and of a type mapped here; else no event. Raises
    ``ValueError`` when the post is not ``{"event-data": {...}}`` or an event of ours has no
    ``id`` or a non-numeric ``timestamp``."""
    data = loads_webhook(body)
    event_data = data.get("event-data") if isinstance(data, dict) else None
    if not isinstance(event_data, dict):
        raise ValueError("webhook body must be an object with an 'event-data' object")
    name = _event_type(event_data)
    variables = event_data.get("user-variables")
    ref = variables.get(REF_VAR) if isinstance(variables, dict) else None
    if name is None or not isinstance(ref, str) or not ref:
        return []
    event_id = event_data.get("id")
    if not isinstance(event_id, str) or not event_id:
        raise ValueError("event-data: 'id' must be a non-empty string")
    timestamp = event_data.get("timestamp")
    if isinstance(timestamp, bool) or not isinstance(timestamp, int | float):
        raise ValueError("event-data: 'timestamp' must be a number")
    message = event_data.get("message")
    headers = message.get("headers") if isinstance(message, dict) else None
    message_id = headers.get("message-id") if isinstance(headers, dict) else None
    recipient = event_data.get("recipient")
    return [
        WebhookEvent(
            ref=ref,
            event=name,
            provider_message_id=message_id if isinstance(message_id, str) and message_id else None,
            email=recipient if isinstance(recipient, str) else None,
            timestamp=float(timestamp),
            event_id=event_id,
        )
    ]


def _event_type(event_data: dict[str, Any]) -> str | None:
    event = event_data.get("event")
    if event == "failed":
        if event_data.get("severity") == "temporary":
            return "deferred"
        return "dropped" if event_data.get("reason") in _DROPPED_REASONS else "bounced"
    return _EVENT_NAMES.get(event) if isinstance(event, str) else None


# An account's webhook secret is the HTTP webhook signing key. Mailgun asks receivers to
# accept a token once: a repeat is refused.
WEBHOOK = Webhook(
    verify=verify_signature,
    parse=parse_webhook,
    headers=(),
    scheme="Mailgun's webhook signature: the body's `signature.signature` is the hex "
    "HMAC-SHA256 of `signature.timestamp` + `signature.token` under the webhook signing key; "
    "a token is accepted once",
)


# Mailgun has no idempotency key, and a call of 1,000 recipients takes the longest of any
# provider here: at most 4 at once per account and worker process (and a 120 s timeout),
# so calls do not queue at Mailgun past the timeout and go again — a call that timed out
# after Mailgun took it is a duplicate (the fake, 1,000,000 recipients: with 64 calls in
# flight and 30 s, 211,000 duplicates; with 4, exactly once; bench/RESULTS.md).
SPEC = account_only(MailgunProvider, WEBHOOK, max_in_flight=4)
