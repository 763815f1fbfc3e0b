"""A fake SendGrid v3 Mail Send API for tests and the dev stack, on 127.0.0.1.

It answers ``POST /v3/mail/send`` as SendGrid documents it
(https://www.twilio.com/docs/sendgrid/api-reference/mail-send/mail-send and its errors page
https://www.twilio.com/docs/sendgrid/api-reference/mail-send/errors), after checking:

- the method and path (anything else: 404 from the router);
- ``Authorization: Bearer <key>`` (missing or another key: 401 "authorization required";
  a fake built with ``forbidden=True``: 403 "access forbidden");
- the size (more than ``max_bytes``: 413 "content too large");
- ``Content-Type: application/json`` and the JSON (400);
- the body: ``from.email``; ``content`` (type and non-empty value each, ``text/plain``
  first); a subject for every personalization; 1 to 1,000 ``personalizations``, each
  with ``to`` addresses, at most 1,000 recipients in all and no address twice in the
  request; ``substitutions`` and ``custom_args`` (string values, at most 10,000 bytes per
  personalization); ``headers`` (strings, none of the reserved ones). Errors are answered
  400 ``{"errors": [{"field", "message"}]}``, fields such as
  ``personalizations.3.to.0.email``; addresses in ``invalid`` are refused so.

It also answers ``GET /v3/scopes`` (https://www.twilio.com/docs/sendgrid/api-reference/
api-key-permissions/retrieve-a-list-of-scopes-for-which-this-user-has-access), the
adapter's credentials check: the same ``Authorization`` check (401 "authorization
required"), then 200 ``{"scopes": [...]}``, the key's scopes (``scopes``; without
``mail.send`` when built with ``forbidden=True``, a key that may not send).

A valid request is answered 202 with an empty body and ``X-Message-Id``. What each
recipient would receive (substitutions applied to the content and subject) is recorded
in ``delivered``; every request in ``received``. Whole requests can be failed on demand
(``fail``: 429 with ``X-RateLimit-*`` headers, 413, 400, 401, 500, ...).

``new_signing_key``, ``verification_key`` and ``signed_headers`` make Signed Event
Webhook posts as SendGrid signs them. Run with ``python -m devkit.fakes.sendgrid --port 6130``.
"""

from __future__ import annotations

import base64
import re
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from devkit.fakes import base
from devkit.fakes.base import ServedFake, arguments, run
from providers.sendgrid import (
    MAX_PERSONALIZATIONS,
    MAX_SUBSTITUTION_BYTES,
    RESERVED_HEADERS,
    SCOPES_PATH,
    SEND_PATH,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
)

TEST_API_KEY = "SG.fake-key.0123456789abcdefghijklmnopqrstuvwxyz"
MAX_BYTES = 30_000_000
MAX_CUSTOM_ARGS_BYTES = 10_000
# The scopes of a key with "Restricted Access" to mail sending and its statistics.
SCOPES = ("mail.send", "mail.batch.read", "stats.read", "suppression.read", "user.profile.read")


@dataclass(slots=True)
class Received:
    """One request as it arrived, and the status it was answered."""

    headers: dict[str, str]
    body: bytes
    json: Any
    status: int = 0


@dataclass(slots=True, kw_only=True)
class Delivered(base.Delivered):
    """What one recipient of an accepted request would receive."""

    name: str | None
    custom_args: dict[str, str]


@dataclass(slots=True)
class Reply:
    status: int
    errors: list[dict[str, Any]] | None = None
    headers: dict[str, str] = field(default_factory=dict)


class FakeSendGrid(ServedFake):
    """The fake server's state; ``async with FakeSendGrid() as fake`` serves it at ``fake.url``."""

    def __init__(
        self,
        api_key: str = TEST_API_KEY,
        *,
        max_bytes: int = MAX_BYTES,
        invalid: frozenset[str] | set[str] = frozenset(),
        forbidden: bool = False,
        scopes: tuple[str, ...] = SCOPES,
    ) -> None:
        self.api_key = api_key
        self.max_bytes = max_bytes
        self.invalid = {address.lower() for address in invalid}
        self.forbidden = forbidden
        self.scopes = tuple(s for s in scopes if not (forbidden and s == "mail.send"))
        self.received: list[Received] = []
        self.delivered: list[Delivered] = []
        self._replies: deque[Reply] = deque()

    def fail(
        self,
        status: int,
        *,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
        times: int = 1,
    ) -> None:
        """Answer the next ``times`` requests with ``status`` (and these errors and headers)."""
        for _ in range(times):
            self._replies.append(Reply(status, errors, dict(headers or {})))

    def rate_limited(self, *, reset_in: float = 2.0, times: int = 1) -> None:
        """Answer the next requests 429 as SendGrid does, with its rate-limit headers."""
        headers = {
            "X-RateLimit-Limit": "600",
            "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset": str(int(time.time() + reset_in)),
        }
        self.fail(
            429,
            errors=[{"field": None, "message": "too many requests"}],
            headers=headers,
            times=times,
        )

    @property
    def requests(self) -> list[dict[str, Any]]:
        """The JSON bodies of the requests that were accepted (202)."""
        return [r.json for r in self.received if r.status == 202]

    def app(self) -> web.Application:
        app = web.Application(client_max_size=max(self.max_bytes, MAX_BYTES) * 2)
        app.router.add_post(SEND_PATH, self._send)
        app.router.add_get(SCOPES_PATH, self._scopes)
        return app

    async def _scopes(self, request: web.Request) -> web.Response:
        received = Received(dict(request.headers), b"", None)
        self.received.append(received)
        if self._replies:
            reply = self._replies.popleft()
            response = _errors(
                reply.status, reply.errors or [{"field": None, "message": "error"}], reply.headers
            )
        elif request.headers.get("Authorization") != f"Bearer {self.api_key}":
            response = _errors(401, [{"field": None, "message": "authorization required"}])
        else:
            response = base.json_response({"scopes": list(self.scopes)})
        received.status = response.status
        return response

    async def _send(self, request: web.Request) -> web.Response:
        body = await request.read()
        received = Received(dict(request.headers), body, None)
        self.received.append(received)
        response = self._answer(request, body, received)
        received.status = response.status
        return response

    def _answer(self, request: web.Request, body: bytes, received: Received) -> web.Response:
        if self._replies:
            reply = self._replies.popleft()
            return _errors(
                reply.status, reply.errors or [{"field": None, "message": "error"}], reply.headers
            )
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return _errors(401, [{"field": None, "message": "authorization required"}])
        if self.forbidden:
            return _errors(403, [{"field": None, "message": "access forbidden"}])
        if len(body) > self.max_bytes:
            return _errors(413, [{"field": None, "message": "content too large"}])
        if request.content_type != "application/json":
            return _errors(
                400, [{"field": None, "message": "Content-Type should be application/json."}]
            )
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return _errors(400, [{"field": None, "message": "Bad Request"}])
        received.json = data
        problems = check(data, self.invalid)
        if problems:
            return _errors(400, [{"field": f, "message": m} for f, m in problems])
        message_id = secrets.token_urlsafe(16)[:22]
        self.delivered.extend(render(data, message_id))
        return web.Response(status=202, headers={"X-Message-Id": message_id})


def _errors(
    status: int, errors: list[dict[str, Any]], headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps({"errors": errors}),
        content_type="application/json",
        headers=headers or {},
    )


def _size(mapping: dict[str, Any]) -> int:
    return sum(len(str(k).encode()) + len(str(v).encode()) for k, v in mapping.items())


def check(
    data: Any, invalid: set[str] | frozenset[str] = frozenset()
) -> list[tuple[str | None, str]]:
    """What SendGrid would refuse in a Mail Send body, as (field, message)."""
    if not isinstance(data, dict):
        return [(None, "Bad Request")]
    problems: list[tuple[str | None, str]] = []
    sender = data.get("from")
    if not isinstance(sender, dict) or "@" not in str(sender.get("email", "")):
        problems.append(("from.email", "The from email does not contain a valid address."))
    content = data.get("content")
    if not isinstance(content, list) or not content:
        problems.append(
            (
                "content",
                "Unless a valid template_id is provided, the content parameter is required.",
            )
        )
    else:
        types = []
        for n, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or not part.get("type")
                or not isinstance(part.get("value"), str)
            ):
                problems.append(
                    (f"content.{n}", "Each content object must have a type and a value.")
                )
            elif not part["value"]:
                problems.append(
                    (
                        f"content.{n}.value",
                        "The content value must be a string at least one character in length.",
                    )
                )
            types.append(part.get("type") if isinstance(part, dict) else None)
        if "text/plain" in types and types[0] != "text/plain":
            problems.append(("content.0.type", "The text/plain content type must be first."))
    items = data.get("personalizations")
    if not isinstance(items, list) or not items:
        problems.append(("personalizations", "You must have at least one personalization."))
        return problems
    if len(items) > MAX_PERSONALIZATIONS:
        problems.append(
            (
                "personalizations",
                f"The personalization block is limited to 1000 personalizations per API request. "
                f"You have provided {len(items)} personalizations.",
            )
        )
    seen: set[str] = set()
    recipients = 0
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            problems.append((f"personalizations.{i}", "Each personalization must be an object."))
            continue
        to = item.get("to")
        if not isinstance(to, list) or not to:
            problems.append(
                (
                    f"personalizations.{i}.to",
                    "The to array is required for all personalization objects.",
                )
            )
            continue
        for j, entry in enumerate(to):
            recipients += 1
            email = entry.get("email") if isinstance(entry, dict) else None
            where = f"personalizations.{i}.to.{j}.email"
            if not isinstance(email, str) or "@" not in email or email.lower() in invalid:
                problems.append((where, "Does not contain a valid address."))
            elif email.lower() in seen:
                problems.append(
                    (
                        where,
                        "Each email address in the personalization block should be unique between to, "
                        f"cc, and bcc. We found the first duplicate instance of [{email}] in the "
                        f"personalizations.{i}.to field.",
                    )
                )
            else:
                seen.add(email.lower())
        subject = item.get("subject", data.get("subject"))
        if not isinstance(subject, str) or not subject:
            problems.append((f"personalizations.{i}.subject", "The subject is required."))
        for name, limit in (
            ("substitutions", MAX_SUBSTITUTION_BYTES),
            ("custom_args", MAX_CUSTOM_ARGS_BYTES),
        ):
            value = item.get(name, {})
            if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
                problems.append((f"personalizations.{i}.{name}", f"The {name} must be strings."))
            elif _size(value) > limit:
                problems.append(
                    (
                        f"personalizations.{i}.{name}",
                        f"The {name} of a personalization may not exceed {limit} bytes.",
                    )
                )
        headers = item.get("headers", {})
        if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
            problems.append((f"personalizations.{i}.headers", "The headers must be strings."))
        elif any(name.lower() in RESERVED_HEADERS for name in headers):
            problems.append((f"personalizations.{i}.headers", "A reserved header cannot be set."))
    if recipients > MAX_PERSONALIZATIONS:
        problems.append(
            (
                "personalizations",
                "There is a limit of 1000 total recipients (to + cc + bcc) per request.",
            )
        )
    return problems


def render(data: dict[str, Any], message_id: str) -> list[Delivered]:
    """What every recipient of a valid body receives: substitutions replace their tags
    (one pass, longest tag first) in the content and the subject."""
    contents = {part["type"]: part["value"] for part in data["content"]}
    delivered = []
    for n, item in enumerate(data["personalizations"]):
        subs: dict[str, str] = item.get("substitutions") or {}
        if subs:
            pattern = re.compile(
                "|".join(re.escape(t) for t in sorted(subs, key=len, reverse=True))
            )

            def apply(
                value: str | None, subs: dict[str, str] = subs, pattern: re.Pattern[str] = pattern
            ) -> str | None:
                return None if value is None else pattern.sub(lambda m: subs[m[0]], value)
        else:

            def apply(value: str | None) -> str | None:
                return value

        subject = apply(item.get("subject", data.get("subject")))
        for entry in item["to"]:
            delivered.append(
                Delivered(
                    to=entry["email"],
                    name=entry.get("name"),
                    subject=subject or "",
                    text=apply(contents.get("text/plain")),
                    html=apply(contents.get("text/html")),
                    headers=dict(item.get("headers") or {}),
                    custom_args=dict(item.get("custom_args") or {}),
                    message_id=f"{message_id}.fake.{n}",
                )
            )
    return delivered


# --- the Signed Event Webhook, as SendGrid signs it ----------------------------------------


def new_signing_key() -> ec.EllipticCurvePrivateKey:
    """A P-256 key pair like the one SendGrid generates for the Signed Event Webhook."""
    return ec.generate_private_key(ec.SECP256R1())


def verification_key(private_key: ec.EllipticCurvePrivateKey) -> str:
    """The public key as SendGrid shows it: base64 of the DER SubjectPublicKeyInfo."""
    der = private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode()


def sign(body: bytes, private_key: ec.EllipticCurvePrivateKey, timestamp: int) -> str:
    """The base64 DER ECDSA SHA-256 signature of ``timestamp`` + ``body``."""
    der = private_key.sign(str(timestamp).encode() + body, ec.ECDSA(hashes.SHA256()))
    return base64.b64encode(der).decode()


def signed_headers(
    body: bytes, private_key: ec.EllipticCurvePrivateKey, timestamp: int | None = None
) -> dict[str, str]:
    """The headers of one Event Webhook post, signed now (or at ``timestamp``)."""
    at = int(time.time()) if timestamp is None else timestamp
    return {
        "Content-Type": "application/json",
        TIMESTAMP_HEADER: str(at),
        SIGNATURE_HEADER: sign(body, private_key, at),
    }


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__.splitlines()[0], 6130)
    parser.add_argument("--api-key", default=TEST_API_KEY)
    args = parser.parse_args(argv)
    fake = FakeSendGrid(args.api_key)
    run(fake.app(), args.host, args.port)


if __name__ == "__main__":
    main()
