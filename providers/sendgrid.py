"""The SendGrid v3 provider: the Mail Send adapter and the Signed Event Webhook.

An adapter is built from a provider account (``SendGridProvider(Account(...))``);
``WEBHOOK`` is its webhook.

Sending: ``POST {base}/v3/mail/send`` with ``Authorization: Bearer <api key>`` and a JSON body
(https://www.twilio.com/docs/sendgrid/api-reference/mail-send/mail-send). ``base`` is
``https://api.sendgrid.com``, or ``https://api.eu.sendgrid.com`` for EU regional subusers
(``Account.region="eu"`` or ``Account.base_url``).

How one chunk of rendered messages becomes requests
---------------------------------------------------
The engine hands over messages that are already rendered, one subject and body per
recipient, while a Mail Send request has one ``content`` (text and HTML) shared by all of
its ``personalizations`` (up to 1,000, one per recipient here: ``to``, ``subject``,
``headers`` such as List-Unsubscribe, and ``custom_args.ref`` = ``Message.ref``, which the
Event Webhook posts back at the top level of every event). So:

* recipients whose rendered text and HTML are identical share a request whose content is
  that body;
* the others share one request whose content is a template: the text all of their
  bodies have in common, with a substitution tag wherever they differ, and each
  personalization's ``substitutions`` hold its own text for every tag. What they share is
  found as their common prefix and suffix, and then again on both sides of a run of text
  that occurs in all of the differing middles (a few levels deep), so a greeting at the
  top and an unsubscribe link at the bottom of a long newsletter become two small slots:
  1,000 recipients of a 47 KB body make one request of about 400 KB, planned in ~35 ms.
  The API reference limits a personalization's substitutions to 10,000 bytes in total
  (the Substitution Tags guide says 50,000; the smaller figure is used), so a recipient
  whose own text would be larger is sent in a request of its own with its whole body as
  the content. Each body is, by construction, the shared text and its own values put
  back together in order, whatever was found in common.

The tags are random per request and are checked not to occur in any subject, header or
body part of the request, so SendGrid substitutes nothing else: every recipient receives
exactly its rendered subject, text and HTML (the fake server renders what each recipient
would receive, and the tests compare).

A request also holds no address twice (SendGrid rejects it; the k-th occurrence of an
address in a chunk goes to the k-th round of requests), at most ``MAX_PERSONALIZATIONS``
personalizations and about ``MAX_REQUEST_BYTES`` (SendGrid's documented limit is 30 MB).

Answers, per request: 2xx: every message of it is accepted, with the ``X-Message-Id``
header as ``provider_message_id`` (events carry ``sg_message_id``, which starts with it;
webhooks are matched by ``ref``). 400 ``{"errors": [{"field", "message"}]}``: permanent;
errors that name a personalization fail that recipient only and the rest is sent again
without it; 413: the request is split in halves, retried (a single message that is still
too large fails permanently); 401/403: ``pause_reason`` (the key is refused / may not
send); 429: retryable and throttled, ``retry_after`` from ``X-RateLimit-Reset`` (epoch
seconds) or ``Retry-After``; 5xx, timeouts and connection errors: retryable; any other
4xx: permanent. Error texts name fields, never an address or the API key.

Credentials check (``check``): ``GET {base}/v3/scopes``, which any API key may call and
which answers the key's own scopes (``{"scopes": [...]}``,
https://www.twilio.com/docs/sendgrid/api-reference/api-key-permissions/retrieve-a-list-of-scopes-for-which-this-user-has-access):
ok when ``mail.send`` is among them; a key without it works but cannot send (not ok); 401
is a refused key.

Webhook: the Signed Event Webhook
(https://www.twilio.com/docs/sendgrid/for-developers/tracking-events/getting-started-event-webhook-security-features):
``X-Twilio-Email-Event-Webhook-Signature`` is the base64 DER ECDSA P-256/SHA-256
signature of ``X-Twilio-Email-Event-Webhook-Timestamp`` + the raw body, checked with the
account's verification key (base64 DER SubjectPublicKeyInfo as SendGrid shows it, or PEM).
``Signed.signature`` (the engine's replay key) is a digest of what was signed, not the
signature itself: an ECDSA signature can be rewritten into another valid one ((r, s) to
(r, n - s)) without the private key, so a replay under a different signature is still
the same signed content. The body is a JSON array of events, mapped by ``parse_webhook``
(https://www.twilio.com/docs/sendgrid/for-developers/tracking-events/event).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from providers.base import (
    Account,
    CheckResult,
    Message,
    SendResult,
    Signed,
    Webhook,
    WebhookEvent,
    account_only,
    header_value,
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

US_API = "https://api.sendgrid.com"
EU_API = "https://api.eu.sendgrid.com"
SEND_PATH = "/v3/mail/send"
SCOPES_PATH = "/v3/scopes"  # the credentials check
SEND_SCOPE = "mail.send"
MAX_PERSONALIZATIONS = 1000  # per request (and recipients: one per personalization)
MAX_SUBSTITUTION_BYTES = 10_000  # per personalization, keys and values
MAX_REQUEST_BYTES = 20_000_000  # a request body, well under SendGrid's 30 MB
# Headers SendGrid does not let a personalization set (the API reference); not sent.
RESERVED_HEADERS = frozenset(
    {
        "x-sg-id",
        "x-sg-eid",
        "received",
        "dkim-signature",
        "content-type",
        "content-transfer-encoding",
        "to",
        "from",
        "subject",
        "reply-to",
        "cc",
        "bcc",
    }
)
REF_ARG = "ref"  # the custom argument holding Message.ref
SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"

# Webhook event -> WebhookEvent.event. "bounce" is split by its "type" (see _event_type).
_EVENT_NAMES = {
    "delivered": "delivered",
    "dropped": "dropped",  # SendGrid did not send it (suppressed, invalid, ...)
    "deferred": "deferred",  # the receiving server said try later; SendGrid retries
    "spamreport": "complained",
    "open": "opened",
    "click": "clicked",
    "unsubscribe": "unsubscribed",
}
# Besides these, a "bounce" is "bounced" or, of type "blocked", "soft_bounced": not
# delivered, the address is not known to be bad (not to be suppressed).
# Posted but not about a recipient's fate here (processed; groups, which are not used).
IGNORED_EVENTS = frozenset({"processed", "group_unsubscribe", "group_resubscribe"})

_PERSONALIZATION_FIELD = re.compile(r"^personalizations[.\[](\d+)\]?\.?")
_TEXT, _HTML = "text/plain", "text/html"


class SendGridProvider(HttpAdapter):
    """Sends chunks through SendGrid's v3 Mail Send API over one pooled session."""

    name = "sendgrid"
    max_per_call = 1000  # messages per send() (the chunk size); more are sent in pieces
    check_call = f"GET {SCOPES_PATH}"

    def __init__(self, account: Account, *, timeout: float = 30.0, concurrency: int = 4) -> None:
        key = account.credentials.get("api_key") or ""
        if not key:
            raise ValueError("sendgrid: the account has no api_key")
        super().__init__(timeout=timeout, resolver=account.resolver)
        base = account.base_url or (EU_API if (account.region or "").lower() == "eu" else US_API)
        self.base_url = base.rstrip("/")
        self._url = self.base_url + SEND_PATH
        self._key = key
        self._headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        self._concurrency = max(1, concurrency)

    def __repr__(self) -> str:
        return f"SendGridProvider({self.base_url!r})"

    def _check_request(self) -> tuple[str, Mapping[str, str]]:
        return self.base_url + SCOPES_PATH, {
            "Authorization": self._headers["Authorization"],
            "Accept": "application/json",
        }

    def _checked(self, answer: Answer) -> CheckResult:
        if answer.status != 200:
            detail = "; ".join(t for _, t in _errors(answer.payload))
            return check_refused(answer.status, detail, what="the API key")
        scopes = (answer.json() or {}).get("scopes")
        if not isinstance(scopes, list):
            return CheckResult(True, "the API key works (its scopes could not be read)")
        if SEND_SCOPE not in scopes:
            return CheckResult(
                False, f"the API key works but lacks the {SEND_SCOPE} scope: it cannot send mail"
            )
        return CheckResult(True, f"the API key works and may send mail ({SEND_SCOPE})")

    async def send(self, messages: list[Message]) -> list[SendResult]:
        """One result per message, in order; never raises for provider or network failures."""
        results: list[SendResult | None] = [None] * len(messages)
        valid: list[int] = []
        for index, message in enumerate(messages):
            if _bodies(message) == (None, None):
                results[index] = failed(message.ref, "sendgrid: the message has no body")
            else:
                valid.append(index)
        if valid:
            limit = asyncio.Semaphore(self._concurrency)
            await asyncio.gather(
                *(self._run(request, messages, results, limit) for request in plan(messages, valid))
            )
        return [r if r is not None else _missing(m) for r, m in zip(results, messages, strict=True)]

    async def _run(
        self,
        request: _Request,
        messages: list[Message],
        results: list[SendResult | None],
        limit: asyncio.Semaphore,
    ) -> None:
        try:
            async with (
                limit,
                self._get_session().post(
                    self._url, data=request.body(), headers=self._headers
                ) as resp,
            ):
                status, headers, payload = resp.status, resp.headers, await resp.read()
        except TRANSPORT_ERRORS as exc:
            reason = self._clean(transport_reason(exc))
            self._fail(request, messages, results, f"sendgrid: {reason}", retryable=True)
            return
        if 200 <= status < 300:
            message_id = headers.get("X-Message-Id")
            for index in request.indices:
                results[index] = SendResult(
                    messages[index].ref, True, provider_message_id=message_id
                )
        elif status == 413 and len(request) > 1:
            await asyncio.gather(
                *(self._run(half, messages, results, limit) for half in request.halves())
            )
        elif status == 400:
            await self._rejected(request, messages, results, limit, payload)
        else:
            self._answer_failed(request, messages, results, status, headers, payload)

    async def _rejected(
        self,
        request: _Request,
        messages: list[Message],
        results: list[SendResult | None],
        limit: asyncio.Semaphore,
        payload: bytes,
    ) -> None:
        """A 400: fail the personalizations its errors name and send the others again;
        when an error names none of them, the request as a whole is rejected."""
        errors = _errors(payload)
        named: dict[int, list[str]] = {}
        for field, text in errors:
            match = _PERSONALIZATION_FIELD.match(field or "")
            if match is None or int(match[1]) >= len(request):
                named = {}
                break
            rest = field[match.end() :]
            named.setdefault(int(match[1]), []).append(
                f"personalization{'.' + rest if rest else ''}: {text}"
            )
        if not named:
            detail = "; ".join(f"{f}: {t}" if f else t for f, t in errors) or _raw(payload)
            self._fail(request, messages, results, self._clean(f"sendgrid: HTTP 400: {detail}"))
            return
        for position, texts in named.items():
            index = request.indices[position]
            results[index] = failed(
                messages[index].ref, self._clean(f"sendgrid: HTTP 400: {'; '.join(texts)}")
            )
        if len(named) < len(request):
            await self._run(request.without(set(named)), messages, results, limit)

    def _answer_failed(
        self,
        request: _Request,
        messages: list[Message],
        results: list[SendResult | None],
        status: int,
        headers: Mapping[str, str],
        payload: bytes,
    ) -> None:
        detail = "; ".join(t for _, t in _errors(payload)) or _raw(payload)
        text = self._clean(f"sendgrid: HTTP {status}" + (f": {detail}" if detail else ""))
        if status in (401, 403):
            why = "the API key was refused" if status == 401 else "the API key may not send mail"
            reason = self._clean(f"sendgrid: {why} (HTTP {status})")
            for index in request.indices:
                results[index] = paused(messages[index].ref, text, reason)
        elif status == 429:
            wait = retry_after(headers, reset_first=True)
            self._fail(request, messages, results, text, retry_after=wait, throttled=True)
        elif status >= 500:
            wait = parse_retry_after(headers.get("Retry-After"))
            self._fail(request, messages, results, text, retryable=True, retry_after=wait)
        elif status == 413:
            self._fail(request, messages, results, "sendgrid: HTTP 413: the message is too large")
        else:
            self._fail(request, messages, results, text)

    def _fail(
        self,
        request: _Request,
        messages: list[Message],
        results: list[SendResult | None],
        error: str,
        *,
        retryable: bool = False,
        retry_after: float | None = None,
        throttled: bool = False,
    ) -> None:
        for index in request.indices:
            results[index] = failed(
                messages[index].ref,
                error,
                retryable=retryable,
                retry_after=retry_after,
                throttled=throttled,
            )

    def _clean(self, text: str) -> str:
        """An error text as it may be recorded: no address, no key, one short line."""
        return one_line(scrub(text, [self._key], "<api key>"))


def _missing(message: Message) -> SendResult:  # pragma: no cover - every path sets one
    return failed(message.ref, "sendgrid: no answer", retryable=True)


def _raw(payload: bytes) -> str:
    return payload[:200].decode("utf-8", "replace").strip()


def _errors(payload: bytes) -> list[tuple[str | None, str]]:
    """The ``errors`` of an error body as (field, message), fields ``None`` when absent."""
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return []
    items = data.get("errors") if isinstance(data, dict) else None
    if not isinstance(items, list):
        return []
    errors = []
    for item in items:
        if isinstance(item, dict):
            field = item.get("field")
            field = field if isinstance(field, str) and field not in ("", "null") else None
            errors.append((field, str(item.get("message") or "error")))
    return errors


# --- planning: messages -> requests ------------------------------------------------------


@dataclass(slots=True)
class _Request:
    """One Mail Send request: the chunk positions it sends, their personalizations (same
    order) and encoded sizes, and the sender and content they share."""

    indices: list[int]
    personalizations: list[dict[str, Any]]
    sizes: list[int]
    sender: dict[str, str]
    content: list[dict[str, str]]

    def __len__(self) -> int:
        return len(self.indices)

    def body(self) -> bytes:
        return orjson.dumps(
            {
                "personalizations": self.personalizations,
                "from": self.sender,
                "content": self.content,
            }
        )

    def base_size(self) -> int:
        return len(orjson.dumps({"from": self.sender, "content": self.content})) + 24

    def _subset(self, keep: Sequence[int]) -> _Request:
        return _Request(
            [self.indices[i] for i in keep],
            [self.personalizations[i] for i in keep],
            [self.sizes[i] for i in keep],
            self.sender,
            self.content,
        )

    def halves(self) -> list[_Request]:
        return [self._subset(half) for half in halves(range(len(self)))]

    def without(self, positions: set[int]) -> _Request:
        return self._subset([i for i in range(len(self)) if i not in positions])

    def pieces(self) -> list[_Request]:
        """This request in pieces of at most MAX_PERSONALIZATIONS and MAX_REQUEST_BYTES."""
        base, pieces, start, total = self.base_size(), [], 0, 0
        for position, size in enumerate(self.sizes):
            count = position - start
            if count and (count >= MAX_PERSONALIZATIONS or base + total + size > MAX_REQUEST_BYTES):
                pieces.append(self._subset(range(start, position)))
                start, total = position, 0
            total += size + 1
        pieces.append(self._subset(range(start, len(self))))
        return pieces


def _bodies(message: Message) -> tuple[str | None, str | None]:
    """The message's (text, html); an empty part counts as absent (SendGrid refuses it)."""
    return (message.text or None, message.html or None)


def plan(messages: Sequence[Message], indices: Sequence[int]) -> list[_Request]:
    """The requests that send ``messages[i]`` for every ``i`` of ``indices`` (each has a
    text or an HTML body). See the module docstring."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    occurrences: dict[str, int] = {}
    for index in indices:
        message = messages[index]
        address = message.to_email.lower()
        round_ = occurrences.get(address, 0)
        occurrences[address] = round_ + 1
        text, html = _bodies(message)
        key = (round_, message.from_email, message.from_name or "", text is None, html is None)
        groups.setdefault(key, []).append(index)
    requests: list[_Request] = []
    for members in groups.values():
        requests.extend(_plan_group(messages, members))
    return [piece for request in requests for piece in request.pieces()]


def _plan_group(messages: Sequence[Message], members: list[int]) -> list[_Request]:
    """Requests for messages of one sender and body shape, no address twice."""
    by_body: dict[tuple[str | None, str | None], list[int]] = {}
    for index in members:
        by_body.setdefault(_bodies(messages[index]), []).append(index)
    requests: list[_Request] = []
    pool: list[int] = []
    for same in by_body.values():
        if len(same) > 1:
            requests.append(_literal(messages, same))
        else:
            pool.append(same[0])
    if len(pool) > 1:
        template = _Template.of(messages, pool)
        keep = [k for k, size in enumerate(template.sizes) if size <= MAX_SUBSTITUTION_BYTES]
        if len(keep) < len(pool):  # too much of their own: alone, with their body as it is
            kept = set(keep)
            requests.extend(_literal(messages, [i]) for k, i in enumerate(pool) if k not in kept)
            if len(keep) > 1:  # without them the others may share more; a template stays
                rest = [pool[k] for k in keep]  # exact for any subset of its members
                better = _Template.of(messages, rest)
                if max(better.sizes) <= MAX_SUBSTITUTION_BYTES:
                    template, pool, keep = better, rest, list(range(len(rest)))
        if len(keep) > 1:
            requests.append(template.request(messages, [pool[k] for k in keep], keep))
        elif keep:
            requests.append(_literal(messages, [pool[keep[0]]]))
    elif pool:
        requests.append(_literal(messages, pool))
    return requests


def _sender(message: Message) -> dict[str, str]:
    sender = {"email": message.from_email}
    if message.from_name:
        sender["name"] = message.from_name
    return sender


def _personalization(message: Message, substitutions: dict[str, str] | None) -> dict[str, Any]:
    to = {"email": message.to_email}
    if message.to_name:
        to["name"] = message.to_name
    item: dict[str, Any] = {
        "to": [to],
        "subject": message.subject,
        "custom_args": {REF_ARG: message.ref},
    }
    headers = {k: v for k, v in message.headers.items() if k.lower() not in RESERVED_HEADERS}
    if headers:
        item["headers"] = headers
    if substitutions:
        item["substitutions"] = substitutions
    return item


def _content(text: str | None, html: str | None) -> list[dict[str, str]]:
    content = []  # text/plain first, as SendGrid requires
    if text is not None:
        content.append({"type": _TEXT, "value": text})
    if html is not None:
        content.append({"type": _HTML, "value": html})
    return content


def _request(
    messages: Sequence[Message],
    indices: list[int],
    content: list[dict[str, str]],
    substitutions: Sequence[dict[str, str] | None],
) -> _Request:
    items = [
        _personalization(messages[i], subs) for i, subs in zip(indices, substitutions, strict=True)
    ]
    return _Request(
        indices,
        items,
        [len(orjson.dumps(item)) for item in items],
        _sender(messages[indices[0]]),
        content,
    )


def _literal(messages: Sequence[Message], indices: list[int]) -> _Request:
    """Recipients with the same body: the body is the content, nothing is substituted."""
    return _request(
        messages, indices, _content(*_bodies(messages[indices[0]])), [None] * len(indices)
    )


# A body part of several recipients as a template: shared text (str) and slots (one value
# per member, list[str]), in order, so that member i's text is the concatenation of the
# shared parts and its value of every slot.
_Piece = str | list[str]
ANCHOR = 48  # characters of a middle looked for in every other middle, to split there
SPLIT_DEPTH = 4  # at most 2 ** 4 slots per body part
SMALL_MIDDLE = 256  # a slot no value of which is longer is not split further


def _shortest(starts: list[int], ends: list[int]) -> int:
    return min(range(len(starts)), key=lambda i: ends[i] - starts[i])


def _common_prefix(values: list[str], starts: list[int], ends: list[int]) -> str:
    """The longest text every ``values[i][starts[i]:ends[i]]`` starts with (no copies)."""
    ref = _shortest(starts, ends)
    prefix = values[ref][starts[ref] : ends[ref]]
    for value, start, end in zip(values, starts, ends, strict=True):
        if not value.startswith(prefix, start, end):
            low, high = 0, len(prefix)  # the longest prefix[:n] that the window starts with
            while low < high:
                middle = (low + high + 1) // 2
                if value.startswith(prefix[:middle], start, end):
                    low = middle
                else:
                    high = middle - 1
            prefix = prefix[:low]
            if not prefix:
                break
    return prefix


def _common_suffix(values: list[str], starts: list[int], ends: list[int]) -> str:
    """The longest text every ``values[i][starts[i]:ends[i]]`` ends with (no copies)."""
    ref = _shortest(starts, ends)
    suffix = values[ref][starts[ref] : ends[ref]]
    for value, start, end in zip(values, starts, ends, strict=True):
        if not value.endswith(suffix, start, end):
            low, high = 0, len(suffix)  # the longest suffix[-n:] that the window ends with
            while low < high:
                middle = (low + high + 1) // 2
                if value.endswith(suffix[len(suffix) - middle :], start, end):
                    low = middle
                else:
                    high = middle - 1
            suffix = suffix[len(suffix) - low :]
            if not suffix:
                break
    return suffix


def _factor(
    values: list[str],
    starts: list[int] | None = None,
    ends: list[int] | None = None,
    depth: int = SPLIT_DEPTH,
) -> list[_Piece]:
    """``values`` (their windows ``[starts[i]:ends[i]]``) as shared text and slots (see
    ``_Piece``): their common prefix and suffix around what differs, which is split again
    (up to ``depth`` times) where a run of ``ANCHOR`` characters of one of them occurs in
    all of them. Only the slots' values are copied out of ``values``."""
    starts = [0] * len(values) if starts is None else starts
    ends = [len(value) for value in values] if ends is None else ends
    prefix = _common_prefix(values, starts, ends)
    starts = [start + len(prefix) for start in starts]
    suffix = _common_suffix(values, starts, ends)
    ends = [end - len(suffix) for end in ends]
    longest = max(end - start for start, end in zip(starts, ends, strict=True))
    at = _split(values, starts, ends) if depth and longest > SMALL_MIDDLE else None
    if at is None:
        middle: list[_Piece] = [[v[s:e] for v, s, e in zip(values, starts, ends, strict=True)]]
    else:
        middle = _factor(values, starts, at, depth - 1) + _factor(values, at, ends, depth - 1)
    return _merged([prefix, *middle, suffix])


def _split(values: list[str], starts: list[int], ends: list[int]) -> list[int] | None:
    """Where to cut every window: at the first occurrence of a run of ``ANCHOR``
    characters taken from the shortest one, when it occurs in all of them."""
    ref = _shortest(starts, ends)
    length = ends[ref] - starts[ref]
    if length < 2 * ANCHOR:
        return None
    for offset in (length // 2, length // 4, 3 * length // 4):
        anchor = values[ref][starts[ref] + offset : starts[ref] + offset + ANCHOR]
        found = [v.find(anchor, s, e) for v, s, e in zip(values, starts, ends, strict=True)]
        if min(found) >= 0:
            return found
    return None


def _merged(pieces: list[_Piece]) -> list[_Piece]:
    """Adjacent shared texts joined; a slot whose values are all the same is shared text."""
    merged: list[_Piece] = []
    for piece in pieces:
        if isinstance(piece, list) and all(value == piece[0] for value in piece):
            piece = piece[0]
        if isinstance(piece, str):
            if not piece:
                continue
            if merged and isinstance(merged[-1], str):
                merged[-1] += piece
                continue
        merged.append(piece)
    return merged


@dataclass(slots=True)
class _Template:
    """The bodies of several recipients as shared content with tags where they differ;
    each recipient's values for the tags are its substitutions."""

    parts: list[tuple[str, list[_Piece]]]  # (mime type, pieces) per body part
    tags: list[list[str]]  # per body part, one per slot
    sizes: list[int]  # substitution bytes per member

    @classmethod
    def of(cls, messages: Sequence[Message], members: list[int]) -> _Template:
        bodies = [_bodies(messages[i]) for i in members]
        parts: list[tuple[str, list[_Piece]]] = []
        for position, mime in ((0, _TEXT), (1, _HTML)):
            values = [body[position] for body in bodies]
            if values[0] is not None:
                parts.append((mime, _factor(values)))  # type: ignore[arg-type]
        slots = [[p for p in pieces if isinstance(p, list)] for _, pieces in parts]
        tags = _tags([len(s) for s in slots], messages, members, parts)
        sizes = [0] * len(members)
        for part_slots, part_tags in zip(slots, tags, strict=True):
            for slot, tag in zip(part_slots, part_tags, strict=True):
                for member, value in enumerate(slot):
                    sizes[member] += len(tag.encode()) + len(value.encode())
        return cls(parts, tags, sizes)

    def request(
        self, messages: Sequence[Message], members: list[int], positions: list[int]
    ) -> _Request:
        """The request for ``members``: the template's members at ``positions``."""
        content = []
        substitutions: list[dict[str, str]] = [{} for _ in members]
        for (mime, pieces), tags in zip(self.parts, self.tags, strict=True):
            value, slot = [], iter(tags)
            for piece in pieces:
                if isinstance(piece, str):
                    value.append(piece)
                    continue
                tag = next(slot)
                value.append(tag)
                for member, position in enumerate(positions):
                    substitutions[member][tag] = piece[position]
            content.append({"type": mime, "value": "".join(value)})
        return _request(messages, members, content, substitutions)


def _tags(
    counts: list[int],
    messages: Sequence[Message],
    members: list[int],
    parts: list[tuple[str, list[_Piece]]],
) -> list[list[str]]:
    """Random tags, ``counts[k]`` for body part ``k``, that occur nowhere in what the
    request carries, so SendGrid substitutes them and nothing else."""
    texts: list[str] = []
    for _, pieces in parts:
        for piece in pieces:
            texts.extend([piece] if isinstance(piece, str) else piece)
    for index in members:
        texts.append(messages[index].subject)
        texts.extend(messages[index].headers.values())
    while True:
        token = secrets.token_hex(8)
        tags = [[f"-bs{token}{k}x{n}-" for n in range(count)] for k, count in enumerate(counts)]
        if not any(tag in text for part in tags for tag in part for text in texts):
            return tags


# --- the webhook ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def load_public_key(key: str) -> ec.EllipticCurvePublicKey | None:
    """The P-256 verification key from SendGrid's base64 DER (SubjectPublicKeyInfo) or
    PEM text; None when it is neither or not a P-256 key."""
    text = key.strip()
    try:
        if text.startswith("-----BEGIN"):
            loaded = serialization.load_pem_public_key(text.encode())
        else:
            loaded = serialization.load_der_public_key(
                base64.b64decode("".join(text.split()), validate=True)
            )
    except (ValueError, TypeError, binascii.Error, UnsupportedAlgorithm):
        return None
    if not isinstance(loaded, ec.EllipticCurvePublicKey) or not isinstance(
        loaded.curve, ec.SECP256R1
    ):
        return None
    return loaded


def verify_signature(body: bytes, headers: Mapping[str, str], public_key: str) -> Signed | None:
    """The signed timestamp and the replay key (a digest of timestamp + body) when the
    Event Webhook headers sign ``body`` with ``public_key``; None when a header is missing
    or malformed, the key unusable or the signature wrong. The age of the timestamp is the
    receiver's to judge."""
    signature = header_value(headers, SIGNATURE_HEADER) or ""
    stamp = header_value(headers, TIMESTAMP_HEADER) or ""
    if not (
        signature.isascii()
        and 0 < len(signature) <= 512
        and stamp.isascii()
        and stamp.isdigit()
        and len(stamp) <= 12
    ):
        return None
    key = load_public_key(public_key)
    if key is None:
        return None
    try:
        der = base64.b64decode(signature, validate=True)
        key.verify(der, stamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    except (binascii.Error, InvalidSignature, ValueError):
        return None
    digest = hashlib.sha256(stamp.encode() + body).hexdigest()
    return Signed(int(stamp), f"sendgrid:{digest}")


def parse_webhook(body: bytes) -> list[WebhookEvent]:
    """The events of an Event Webhook post (a JSON array) about messages sent here.

    Events without the ``ref`` custom argument (mail sent by something else on the
    account), ``processed``, group (un)subscribes and event types not known here are
    skipped; a post that is not an array of objects, or an event of ours without
    ``sg_event_id`` or a numeric ``timestamp``, raises ``ValueError``.
    """
    data = loads_webhook(body)
    if not isinstance(data, list):
        raise ValueError("webhook body must be a JSON array of events")
    events: list[WebhookEvent] = []
    for index, item in enumerate(data):
        if not isinstance(item, dict):
            raise ValueError(f"event {index}: must be an object")
        name = _event_type(item)
        ref = item.get(REF_ARG)
        if name is None or not isinstance(ref, str) or not ref:
            continue
        event_id = item.get("sg_event_id")
        if not isinstance(event_id, str) or not event_id:
            raise ValueError(f"event {index}: 'sg_event_id' must be a non-empty string")
        message_id = item.get("sg_message_id")
        email = item.get("email")
        events.append(
            WebhookEvent(
                ref=ref,
                event=name,
                provider_message_id=message_id
                if isinstance(message_id, str) and message_id
                else None,
                email=email if isinstance(email, str) else None,
                timestamp=_timestamp(index, item.get("timestamp")),
                event_id=event_id,
            )
        )
    return events


def _event_type(item: dict[str, Any]) -> str | None:
    event = item.get("event")
    if event == "bounce":  # "type": "bounce" is a hard bounce, "blocked" a block
        return "soft_bounced" if item.get("type") == "blocked" else "bounced"
    return _EVENT_NAMES.get(event) if isinstance(event, str) else None


def _timestamp(index: int, value: Any) -> float:
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return float(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"event {index}: 'timestamp' must be a number")
    return float(value)


# An account's webhook secret is the Signed Event Webhook's verification key. The replay
# key covers the signed timestamp, so a repeat is a copy (refused).
WEBHOOK = Webhook(
    verify=verify_signature,
    parse=parse_webhook,
    headers=(TIMESTAMP_HEADER, SIGNATURE_HEADER),
    scheme=f"SendGrid's Signed Event Webhook: `{SIGNATURE_HEADER}` (base64 ECDSA P-256 "
    f"SHA-256 signature of `{TIMESTAMP_HEADER}` + body, checked with the verification key)",
)


SPEC = account_only(SendGridProvider, WEBHOOK)
