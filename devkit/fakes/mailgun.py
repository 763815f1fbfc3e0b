"""A fake Mailgun messages API (batch sending) for tests and the dev stack, on 127.0.0.1.

It answers ``POST /v3/{domain}/messages`` as Mailgun documents it
(https://documentation.mailgun.com/docs/mailgun/api-reference/ and
https://documentation.mailgun.com/docs/mailgun/user-manual/sending-messages/batch-sending),
after checking:

- the method and path (anything else: 404 from the router) and the domain (not one of
  the fake's: 404 ``{"message": "Domain not found: ..."}``);
- HTTP basic auth ``api:<key>`` (else 401 ``Forbidden``; ``forbidden=True``: 403);
- ``multipart/form-data`` (what the adapter sends; else 400) and the size (more than
  ``max_bytes``: 413);
- the fields: ``from``; 1 to 1,000 ``to``, each ONE recipient (no lists in one field) and
  no address twice; ``subject``; ``text`` or ``html``; and ``recipient-variables``: present,
  a JSON object whose keys cover every ``to`` address, and defining every
  ``%recipient.<name>%`` the other fields use. Without recipient variables Mailgun would
  send one message with every address in ``To``: the fake refuses such a request (400)
  instead, so a test that passes proves every request kept its recipients apart.
  Addresses in ``invalid`` get Mailgun's 400 "'to' parameter is not a valid address".

It also answers ``GET /v3/domains/{domain}``, the adapter's credentials check: the same
basic auth check (401 ``Forbidden``), a domain not of the fake's is 404 ``{"message":
"Domain not found"}``, else 200 ``{"domain": {...}, "receiving_dns_records": [...],
"sending_dns_records": [...]}`` with the domain's ``state``: ``active``, or
``unverified`` for the domains in ``unverified`` (which may not send: 403).

A valid request is answered 200 ``{"id": "<...>", "message": "Queued. Thank you."}``.
What each recipient would receive (its recipient variables substituted into the subject,
bodies, ``h:`` headers and ``v:`` variables) is recorded in ``delivered``; every request in
``received``. Whole requests can be failed on demand (``fail``, ``rate_limited``).

``signed_post`` makes a webhook post signed as Mailgun signs them. Run with
``python -m devkit.fakes.mailgun --port 6131``.
"""

from __future__ import annotations

import base64
import re
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from email.utils import getaddresses
from typing import Any

import orjson
from aiohttp import web

from devkit.fakes import base
from devkit.fakes.base import ServedFake, arguments, run
from providers.mailgun import MAX_RECIPIENTS, signature

TEST_API_KEY = "key-fake-0123456789abcdef0123456789abcdef"
TEST_DOMAIN = "mg.example.test"
TEST_SIGNING_KEY = "whsk-fake-0123456789abcdef"
MAX_BYTES = 25_000_000
_PLACEHOLDER = re.compile(r"%recipient\.([A-Za-z0-9_-]+)%")


@dataclass(slots=True)
class Received:
    """One request as it arrived (its form fields in order), and the status it was answered."""

    domain: str
    headers: dict[str, str]
    fields: list[tuple[str, str]]
    status: int = 0

    def values(self, name: str) -> list[str]:
        return [value for key, value in self.fields if key == name]

    def value(self, name: str) -> str | None:
        found = self.values(name)
        return found[0] if found else None


@dataclass(slots=True, kw_only=True)
class Delivered(base.Delivered):
    """What one recipient of an accepted request would receive (``to``: the ``to`` field,
    as sent)."""

    address: str
    user_variables: dict[str, Any]


@dataclass(slots=True)
class Reply:
    status: int
    message: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


class FakeMailgun(ServedFake):
    """The fake server's state; ``async with FakeMailgun() as fake`` serves it at ``fake.url``."""

    def __init__(
        self,
        api_key: str = TEST_API_KEY,
        *,
        domains: tuple[str, ...] = (TEST_DOMAIN,),
        max_bytes: int = MAX_BYTES,
        invalid: frozenset[str] | set[str] = frozenset(),
        forbidden: bool = False,
        unverified: frozenset[str] | set[str] = frozenset(),
    ) -> None:
        self.api_key = api_key
        self.domains = set(domains) | set(unverified)
        self.unverified = set(unverified)
        self.max_bytes = max_bytes
        self.invalid = {address.lower() for address in invalid}
        self.forbidden = forbidden
        self.received: list[Received] = []
        self.delivered: list[Delivered] = []
        self._replies: deque[Reply] = deque()

    def fail(
        self,
        status: int,
        *,
        message: str | None = None,
        headers: dict[str, str] | None = None,
        times: int = 1,
    ) -> None:
        """Answer the next ``times`` requests with ``status`` (``{"message": ...}``, headers)."""
        for _ in range(times):
            self._replies.append(Reply(status, message, dict(headers or {})))

    def rate_limited(self, *, retry_after: int = 2, times: int = 1) -> None:
        self.fail(
            429, message="Too many requests", headers={"Retry-After": str(retry_after)}, times=times
        )

    @property
    def accepted(self) -> list[Received]:
        """The requests answered 200."""
        return [r for r in self.received if r.status == 200]

    def app(self) -> web.Application:
        size = max(self.max_bytes, MAX_BYTES) * 2
        try:  # a full batch has more fields (1,000 "to" and the others) than aiohttp's default
            app = web.Application(client_max_size=size, client_max_fields=MAX_RECIPIENTS + 1000)
        except TypeError:  # an aiohttp without that limit
            app = web.Application(client_max_size=size)
        app.router.add_post("/v3/{domain}/messages", self._messages)
        app.router.add_get("/v3/domains/{domain}", self._domain)
        return app

    async def _domain(self, request: web.Request) -> web.Response:
        domain = request.match_info["domain"]
        received = Received(domain, dict(request.headers), [])
        self.received.append(received)
        expected = "Basic " + base64.b64encode(f"api:{self.api_key}".encode()).decode()
        if self._replies:
            reply = self._replies.popleft()
            response = _message(reply.status, reply.message or "error", reply.headers)
        elif request.headers.get("Authorization") != expected:
            response = web.Response(status=401, text="Forbidden")
        elif domain not in self.domains:
            response = _message(404, "Domain not found")
        else:
            response = base.json_response(_domain_answer(domain, domain in self.unverified))
        received.status = response.status
        return response

    async def _messages(self, request: web.Request) -> web.Response:
        domain = request.match_info["domain"]
        received = Received(domain, dict(request.headers), [])
        self.received.append(received)
        response = await self._answer(request, domain, received)
        received.status = response.status
        return response

    async def _answer(self, request: web.Request, domain: str, received: Received) -> web.Response:
        if request.content_type == "multipart/form-data":
            form = await request.post()
            received.fields = [(k, v if isinstance(v, str) else "<file>") for k, v in form.items()]
        if self._replies:
            reply = self._replies.popleft()
            return _message(reply.status, reply.message or "error", reply.headers)
        expected = "Basic " + base64.b64encode(f"api:{self.api_key}".encode()).decode()
        if request.headers.get("Authorization") != expected:
            return web.Response(status=401, text="Forbidden")
        if self.forbidden:
            return _message(403, "Forbidden: this account may not send")
        if domain not in self.domains:
            return _message(404, f"Domain not found: {domain}")
        if domain in self.unverified:
            return _message(
                403,
                f"Domain {domain} is not allowed to send: The domain is unverified and requires "
                "DNS configuration. Log in to your control panel to view required DNS records.",
            )
        if request.content_type != "multipart/form-data":
            return _message(400, "the fake expects multipart/form-data")
        size = sum(len(k) + len(v.encode()) for k, v in received.fields)
        if size > self.max_bytes:
            return _message(413, "Request entity too large")
        problem = check(received, self.invalid)
        if problem:
            return _message(400, problem)
        message_id = f"{time.strftime('%Y%m%d%H%M%S')}.{secrets.token_hex(8)}@{domain}"
        self.delivered.extend(render(received, message_id))
        return _message(200, "Queued. Thank you.", extra={"id": f"<{message_id}>"})


def _domain_answer(domain: str, unverified: bool) -> dict[str, Any]:
    """A domain as ``GET /v3/domains/{domain}`` answers it."""
    state = "unverified" if unverified else "active"
    valid = "unknown" if unverified else "valid"
    return {
        "domain": {
            "created_at": "Tue, 01 Dec 2026 10:00:00 GMT",
            "id": secrets.token_hex(12),
            "is_disabled": False,
            "name": domain,
            "require_tls": False,
            "skip_verification": False,
            "smtp_login": f"postmaster@{domain}",
            "spam_action": "disabled",
            "state": state,
            "type": "custom",
            "web_prefix": "email",
            "web_scheme": "https",
            "wildcard": False,
        },
        "receiving_dns_records": [
            {"cached": [], "priority": "10", "record_type": "MX", "valid": valid,
             "value": "mxa.mailgun.org"},
        ],
        "sending_dns_records": [
            {"cached": [], "name": domain, "record_type": "TXT", "valid": valid,
             "value": "v=spf1 include:mailgun.org ~all"},
            {"cached": [], "name": f"email.{domain}", "record_type": "CNAME", "valid": valid,
             "value": "mailgun.org"},
        ],
    }  # fmt: skip


def _message(
    status: int,
    message: str,
    headers: dict[str, str] | None = None,
    extra: dict[str, str] | None = None,
) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps({**(extra or {}), "message": message}),
        content_type="application/json",
        headers=headers or {},
    )


def _recipient_variables(received: Received) -> tuple[dict[str, Any] | None, str | None]:
    raw = received.value("recipient-variables")
    if raw is None:
        return None, (
            "recipient-variables missing: Mailgun would send one message listing every "
            "recipient in To (the fake refuses it)"
        )
    try:
        variables = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None, "recipient-variables is not valid JSON"
    if not isinstance(variables, dict) or not all(isinstance(v, dict) for v in variables.values()):
        return None, "recipient-variables must be a JSON object of objects"
    return variables, None


def check(received: Received, invalid: set[str] | frozenset[str] = frozenset()) -> str | None:
    """What Mailgun (or, marked so, the fake's privacy checks) would refuse, else None."""
    if not received.value("from"):
        return "'from' parameter is missing"
    to = received.values("to")
    if not to:
        return "'to' parameter is missing"
    if len(to) > MAX_RECIPIENTS:
        return f"Too many recipients: at most {MAX_RECIPIENTS} per batch"
    addresses = []
    for value in to:
        parsed = getaddresses([value])
        if len(parsed) != 1 or "@" not in parsed[0][1] or "," in value.replace(parsed[0][0], ""):
            return "'to' parameter must name exactly one recipient per field (fake check)"
        address = parsed[0][1]
        if address.lower() in invalid:
            return "'to' parameter is not a valid address. please check documentation"
        addresses.append(address)
    if len({a.lower() for a in addresses}) != len(addresses):
        return (
            "an address is twice in 'to': recipient variables cannot tell them apart (fake check)"
        )
    if not received.value("subject"):
        return "'subject' parameter is missing"
    if not (received.value("text") or received.value("html")):
        return "Need at least one of 'text' or 'html' parameters specified"
    variables, problem = _recipient_variables(received)
    if variables is None:
        return problem
    missing = [a for a in addresses if a not in variables]
    if missing:
        return "recipient-variables does not cover every 'to' address (fake check)"
    used = {
        name
        for key, value in received.fields
        if key != "recipient-variables"
        for name in _PLACEHOLDER.findall(value)
    }
    for address in addresses:
        if not used <= variables[address].keys():
            return (
                "a %recipient.<name>% placeholder is not defined for every recipient (fake check)"
            )
    return None


def render(received: Received, message_id: str) -> list[Delivered]:
    """What every recipient of a valid request receives: its recipient variables
    substituted (once) into the subject, bodies, h: headers and v: variables."""
    variables, _ = _recipient_variables(received)
    assert variables is not None
    delivered = []
    for value in received.values("to"):
        address = getaddresses([value])[0][1]
        own = variables[address]

        def fill(text: str | None, own: dict[str, Any] = own) -> str | None:
            if text is None:
                return None
            return _PLACEHOLDER.sub(lambda m: str(own[m[1]]) if m[1] in own else m[0], text)

        headers = {k[2:]: fill(v) or "" for k, v in received.fields if k.startswith("h:")}
        user_variables: dict[str, Any] = {}
        for key, raw in received.fields:
            if key.startswith("v:"):
                filled = fill(raw) or ""
                try:
                    parsed = orjson.loads(filled)
                except orjson.JSONDecodeError:
                    parsed = filled
                user_variables[key[2:]] = parsed if isinstance(parsed, dict) else filled
        delivered.append(
            Delivered(
                to=value,
                address=address,
                subject=fill(received.value("subject")) or "",
                text=fill(received.value("text")),
                html=fill(received.value("html")),
                headers=headers,
                user_variables=user_variables,
                message_id=message_id,
            )
        )
    return delivered


# --- webhook posts, as Mailgun signs them ------------------------------------------------


def signed_post(
    event_data: dict[str, Any],
    signing_key: str = TEST_SIGNING_KEY,
    *,
    timestamp: int | None = None,
    token: str | None = None,
) -> bytes:
    """A webhook body for ``event_data``, signed now (or at ``timestamp``) with a new
    50-character token (or ``token``)."""
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    token = secrets.token_hex(25) if token is None else token
    return orjson.dumps(
        {
            "signature": {
                "timestamp": stamp,
                "token": token,
                "signature": signature(signing_key, stamp, token),
            },
            "event-data": event_data,
        }
    )


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__.splitlines()[0], 6131)
    parser.add_argument("--api-key", default=TEST_API_KEY)
    parser.add_argument("--domain", action="append", default=None)
    args = parser.parse_args(argv)
    fake = FakeMailgun(args.api_key, domains=tuple(args.domain or (TEST_DOMAIN,)))
    run(fake.app(), args.host, args.port)


if __name__ == "__main__":
    main()
