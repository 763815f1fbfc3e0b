"""A fake Resend batch API for tests and the dev stack, on 127.0.0.1.

It answers ``POST /emails/batch`` as Resend documents it
(https://resend.com/docs/api-reference/emails/send-batch-emails,
https://resend.com/docs/api-reference/errors), after checking each request:

- the method and path (anything else: 404 ``not_found``);
- ``Authorization: Bearer <key>`` (missing: 401 ``missing_api_key``; another key: 403
  ``invalid_api_key``);
- ``Content-Type: application/json`` and a JSON array of at most 100 emails (else 422
  ``validation_error``);
- ``Idempotency-Key`` (https://resend.com/docs/dashboard/emails/idempotency-keys): 1 to
  256 characters (else 400 ``invalid_idempotency_key``; required unless
  ``require_idempotency_key=False``). A key seen with the same body is answered with the
  first answer and sends nothing; with another body: 409 ``invalid_idempotent_request``;
  while its first request is still being answered: 409 ``concurrent_idempotent_requests``;
- each email: ``from``, ``to`` (a string or 1 to 50 strings), ``subject``, ``html`` or
  ``text``, ``headers`` (an object of strings), ``tags`` (``[{name, value}]`` of
  ``[A-Za-z0-9_-]``, up to 256 characters). ``x-batch-validation: strict`` (the default)
  refuses the whole request for one bad email (422 ``validation_error``); ``permissive``
  sends the others and lists the bad ones in ``errors`` (``{index, message}``)
  (https://resend.com/docs/dashboard/emails/batch-validation-modes).

It also answers ``GET /domains`` (https://resend.com/docs/api-reference/domains/
list-domains), the adapter's credentials check: the same key check, then 200 ``{"object":
"list", "has_more": false, "data": [{"id", "name", "status", "created_at", "region"}]}``
for the fake's ``domains`` (``{name: status}``). A key of
``restricted_api_keys`` has sending access only: it sends, and ``/domains`` answers it 401
``restricted_api_key``, as Resend does (https://resend.com/docs/api-reference/errors).

A recipient whose local part starts with ``invalid`` is a bad email. A good request
gets 200 ``{"data": [{"id"}...]}`` and the rate-limit headers (``ratelimit-limit``,
``ratelimit-remaining``, ``ratelimit-reset``); whole requests can be failed with
``FakeResend.fail`` (e.g. 429 ``rate_limit_exceeded`` with ``retry-after``, 429
``daily_quota_exceeded``). Every request is recorded (``received``), every email sent
too (``sent``, ``sent_refs``: by the ``ref`` tag).
Control routes for the dev stack: ``GET /_fake/received``, ``POST /_fake/fail``
(``{"status", "name", "message"?, "headers"?, "times"?}``), ``POST /_fake/reset``.
Run with ``python -m devkit.fakes.resend --port 6121``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from devkit.fakes.base import (
    Failure,
    Failures,
    add_control_routes,
    arguments,
    json_response,
    run,
    running,
)

BATCH_PATH = "/emails/batch"
DOMAINS_PATH = "/domains"
TEST_API_KEY = "re_fake_0123456789abcdef"
MAX_EMAILS = 100
MAX_RECIPIENTS = 50
RATE_LIMIT = 5  # requests per second, as the headers say
_TAG = re.compile(r"[A-Za-z0-9_-]{1,256}")

# Resend's own wording for the errors the fake answers.
MESSAGES = {
    "missing_api_key": "Missing API key in the authorization header.",
    "invalid_api_key": "API key is invalid.",
    "restricted_api_key": "This API key is restricted to only send emails.",
    "invalid_idempotency_key": "The key must be between 1-256 chars.",
    "validation_error": "We found an error with one or more fields in the request.",
    "invalid_idempotent_request": "Same idempotency key used with a different request payload.",
    "concurrent_idempotent_requests": "Same idempotency key used while original request is "
    "still in progress.",
    "rate_limit_exceeded": "Too many requests. You can only make 5 requests per second.",
    "daily_quota_exceeded": "You have reached your daily email sending quota.",
    "monthly_quota_exceeded": "You have reached your monthly email sending quota.",
    "application_error": "An unexpected error occurred.",
    "internal_server_error": "An unexpected error occurred.",
    "not_found": "The requested endpoint does not exist.",
}


@dataclass(slots=True)
class Received:
    """One request as it arrived, and what it was answered."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int = 0

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass(slots=True)
class _Stored:
    digest: str
    status: int
    body: Any


@dataclass
class FakeResend:
    """The fake's state: its key, what it received and sent, idempotency keys, failures."""

    api_key: str = TEST_API_KEY
    restricted_api_keys: frozenset[str] = frozenset()  # sending access only
    domains: dict[str, str] = field(default_factory=lambda: {"example.test": "verified"})
    require_idempotency_key: bool = True
    latency: float = 0.0  # seconds before each answer (lets requests overlap)
    received: list[Received] = field(default_factory=list)
    sent: list[dict[str, Any]] = field(default_factory=list)
    idempotency: dict[str, _Stored] = field(default_factory=dict)
    _in_flight: set[str] = field(default_factory=set)
    _failures: Failures = field(default_factory=Failures)

    def fail(
        self,
        status: int,
        name: str,
        *,
        message: str | None = None,
        headers: dict[str, str] | None = None,
        times: int = 1,
    ) -> None:
        """Answer the next ``times`` requests (-1: all) that pass the key check with
        ``status`` and ``{statusCode, name, message}``."""
        body = {"statusCode": status, "name": name, "message": message or MESSAGES.get(name, "")}
        self._failures.add(status, body, headers, times)

    def reset(self) -> None:
        self.received.clear()
        self.sent.clear()
        self.idempotency.clear()
        self._failures.clear()

    def sent_refs(self) -> Counter[str]:
        """How many times each ``ref`` tag value was sent (a duplicate shows as 2)."""
        return Counter(_tag(email, "ref") or _tag(email, "ref_b64") for email in self.sent)

    def requests(self, path: str = BATCH_PATH) -> list[Received]:
        return [r for r in self.received if r.path == path]

    def _next_failure(self) -> Failure | None:
        return self._failures.next()


FAKE = web.AppKey("fake_resend", FakeResend)


def _tag(email: dict[str, Any], name: str) -> str | None:
    for tag in email.get("tags") or []:
        if isinstance(tag, dict) and tag.get("name") == name:
            return tag.get("value")
    return None


def _rate_headers() -> dict[str, str]:
    return {
        "ratelimit-limit": str(RATE_LIMIT),
        "ratelimit-remaining": str(RATE_LIMIT - 1),
        "ratelimit-reset": "1",
    }


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return json_response(data, status, {**_rate_headers(), **(headers or {})})


def _error(status: int, name: str, message: str | None = None) -> web.Response:
    body = {"statusCode": status, "name": name, "message": message or MESSAGES[name]}
    return _json(body, status=status)


async def _batch(request: web.Request) -> web.Response:
    fake = request.app[FAKE]
    body = await request.read()
    record = Received(request.method, request.path, dict(request.headers), body)
    fake.received.append(record)
    response = await _answer(fake, request, body)
    record.status = response.status
    return response


def _refused_key(fake: FakeResend, request: web.Request) -> web.Response | None:
    """The answer to a request without a key the fake knows (None: it has one)."""
    authorization = request.headers.get("Authorization")
    if not authorization:
        return _error(401, "missing_api_key")
    scheme, _, key = authorization.partition(" ")
    if scheme != "Bearer" or (key != fake.api_key and key not in fake.restricted_api_keys):
        return _error(403, "invalid_api_key")
    return None


async def _domains(request: web.Request) -> web.Response:
    fake = request.app[FAKE]
    record = Received(request.method, request.path, dict(request.headers), b"")
    fake.received.append(record)
    response = _refused_key(fake, request)
    if response is None and request.headers["Authorization"].partition(" ")[2] != fake.api_key:
        response = _error(401, "restricted_api_key")
    failure = fake._next_failure() if response is None else None
    if failure is not None:
        response = _json(failure.body, failure.status, failure.headers)
    if response is None:
        data = [
            {
                "id": str(uuid.uuid5(uuid.NAMESPACE_DNS, name)),
                "name": name,
                "status": status,
                "created_at": "2026-12-01 10:00:00.000000+00",
                "region": "us-east-1",
            }
            for name, status in fake.domains.items()
        ]
        response = _json({"object": "list", "has_more": False, "data": data})
    record.status = response.status
    return response


async def _answer(fake: FakeResend, request: web.Request, body: bytes) -> web.Response:
    refused = _refused_key(fake, request)
    if refused is not None:
        return refused
    failure = fake._next_failure()
    if failure is not None:
        if fake.latency:
            await asyncio.sleep(fake.latency)
        return _json(failure.body, failure.status, failure.headers)
    content_type = (request.headers.get("Content-Type") or "").split(";")[0].strip().lower()
    if content_type != "application/json":
        return _error(422, "validation_error", "Content-Type must be application/json.")
    idempotency_key = request.headers.get("Idempotency-Key")
    if idempotency_key is None and fake.require_idempotency_key:
        return _error(400, "invalid_idempotency_key", "This fake requires an Idempotency-Key.")
    if idempotency_key is not None and not 1 <= len(idempotency_key) <= 256:
        return _error(400, "invalid_idempotency_key")
    mode = (request.headers.get("x-batch-validation") or "strict").lower()
    if mode not in ("strict", "permissive"):
        return _error(422, "validation_error", "x-batch-validation: strict or permissive.")
    try:
        emails = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _error(422, "validation_error", "The body is not valid JSON.")
    if not isinstance(emails, list) or not emails:
        return _error(422, "validation_error", "The body must be an array of emails.")
    if len(emails) > MAX_EMAILS:
        return _error(422, "validation_error", "The batch contains more than 100 emails.")
    # The digest of what was asked: the body and the mode (the headers that change it).
    digest = hashlib.sha256(mode.encode() + b"\n" + body).hexdigest()
    if idempotency_key is not None:
        stored = fake.idempotency.get(idempotency_key)
        if idempotency_key in fake._in_flight:
            return _error(409, "concurrent_idempotent_requests")
        if stored is not None:
            if stored.digest != digest:
                return _error(409, "invalid_idempotent_request")
            return _json(stored.body, stored.status)
        fake._in_flight.add(idempotency_key)
    try:
        if fake.latency:
            await asyncio.sleep(fake.latency)
        status, answer = _process(fake, emails, permissive=mode == "permissive")
        if status == 200 and idempotency_key is not None:
            fake.idempotency[idempotency_key] = _Stored(digest, status, answer)
    finally:
        if idempotency_key is not None:
            fake._in_flight.discard(idempotency_key)
    return _json(answer, status)


def _process(fake: FakeResend, emails: list[Any], *, permissive: bool) -> tuple[int, Any]:
    problems = {i: p for i, email in enumerate(emails) if (p := check_email(email)) is not None}
    if problems and not permissive:
        index, problem = next(iter(problems.items()))
        return 422, {
            "statusCode": 422,
            "name": "validation_error",
            "message": f"emails[{index}]: {problem}",
        }
    data = []
    for index, email in enumerate(emails):
        if index not in problems:
            fake.sent.append(email)
            data.append({"id": str(uuid.uuid4())})
    answer: dict[str, Any] = {"data": data}
    if permissive:
        answer["errors"] = [{"index": i, "message": p} for i, p in problems.items()]
    return 200, answer


def check_email(email: Any) -> str | None:
    """What is wrong with one email of a batch, or None."""
    if not isinstance(email, dict):
        return "Each email must be an object."
    sender = email.get("from")
    if not isinstance(sender, str) or "@" not in sender:
        return "The `from` field is missing or invalid."
    to = email.get("to")
    recipients = [to] if isinstance(to, str) else to
    if not isinstance(recipients, list) or not 1 <= len(recipients) <= MAX_RECIPIENTS:
        return "The `to` field must hold 1 to 50 addresses."
    for recipient in recipients:
        if not isinstance(recipient, str):
            return "The `to` field must hold strings."
        local, at, _domain = recipient.rpartition("@")
        if not (at and local) or local.lower().startswith("invalid"):
            return (
                "Invalid `to` field. The email address needs to follow the "
                f"`email@example.com` or `Name <email@example.com>` format: {recipient}"
            )
    if not isinstance(email.get("subject"), str) or not email["subject"]:
        return "The `subject` field is missing."
    html, text = email.get("html"), email.get("text")
    if not (isinstance(html, str) and html) and not (isinstance(text, str) and text):
        return "Provide `html` or `text`."
    headers = email.get("headers", {})
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        return "The `headers` field must be an object of strings."
    tags = email.get("tags", [])
    if not isinstance(tags, list):
        return "The `tags` field must be an array."
    for tag in tags:
        if not (
            isinstance(tag, dict)
            and isinstance(tag.get("name"), str)
            and _TAG.fullmatch(tag["name"])
            and isinstance(tag.get("value", ""), str)
            and (tag.get("value") is None or _TAG.fullmatch(tag["value"]))
        ):
            return (
                "Tags should only contain ASCII letters, numbers, underscores, or dashes, "
                "up to 256 characters."
            )
    return None


async def _unknown(request: web.Request) -> web.Response:
    fake = request.app[FAKE]
    fake.received.append(
        Received(request.method, request.path, dict(request.headers), await request.read(), 404)
    )
    return _error(404, "not_found")


def _fail(fake: FakeResend, data: dict[str, Any]) -> None:
    fake.fail(
        int(data["status"]),
        str(data["name"]),
        message=data.get("message"),
        headers=data.get("headers"),
        times=int(data.get("times", 1)),
    )


def build_app(fake: FakeResend | None = None) -> web.Application:
    """The fake as an aiohttp application (its state at ``app[FAKE]``)."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[FAKE] = fake or FakeResend()
    app.router.add_post(BATCH_PATH, _batch)
    app.router.add_get(DOMAINS_PATH, _domains)
    add_control_routes(
        app, FAKE, _fail, "expected {status, name, message?, headers?, times?}", _json
    )
    app.router.add_route("*", "/{tail:.*}", _unknown)
    return app


@contextlib.asynccontextmanager
async def serving(fake: FakeResend | None = None) -> AsyncIterator[tuple[str, FakeResend]]:
    """Run the fake on a free 127.0.0.1 port; yield its base URL and its state."""
    app = build_app(fake)
    async with running(app) as url:
        yield url, app[FAKE]


def main(argv: list[str] | None = None) -> None:
    parser = arguments("A fake Resend batch API.", 6121)
    parser.add_argument("--api-key", default=TEST_API_KEY)
    args = parser.parse_args(argv)
    run(build_app(FakeResend(api_key=args.api_key)), args.host, args.port)


if __name__ == "__main__":
    main()
