"""A fake Postmark batch API for tests and the dev stack, on 127.0.0.1.

It answers ``POST /email/batch`` as Postmark documents it
(https://postmarkapp.com/developer/user-guide/send-email-with-api/batch-emails,
https://postmarkapp.com/developer/api/overview), after checking each request:

- the method and path (anything else: 404);
- ``X-Postmark-Server-Token`` (missing or not the fake's token: HTTP 401, ErrorCode 10);
- ``Accept`` and ``Content-Type`` both ``application/json`` (else HTTP 422, ErrorCode
  409 "JSON required");
- the size (more than 50 MB: HTTP 413), the JSON (HTTP 422, ErrorCode 402 invalid JSON,
  403 not an array) and the count (more than 500: HTTP 422, ErrorCode 410);
- each message: ``From``, ``To``, ``Subject``, ``HtmlBody`` or ``TextBody``, ``Headers``
  as ``[{Name, Value}]``, ``Metadata`` (at most 10 string fields, names up to 20 and
  values up to 80 characters), ``MessageStream``. A message that fails gets its own
  result with ErrorCode 300 in the HTTP 200 answer, as Postmark does.

It also answers ``GET /server`` (https://postmarkapp.com/developer/api/server-api), the
adapter's credentials check: the same token check (HTTP 401, ErrorCode 10) and ``Accept``
check (HTTP 422, ErrorCode 409), then the token's server as Postmark shows it (``Name``
``server_name``, ``DeliveryType`` ``delivery_type``: ``Live`` or ``Sandbox``, and, as
Postmark does, its ``ApiTokens``).

Recipients choose their fate by the local part of their address: ``inactive...``
→ ErrorCode 406 (inactive recipient), ``throttled...`` → 429 (rate limit exceeded),
``invalid...`` or no ``@`` → 300 (invalid email request); any other is accepted with a
new ``MessageID``. Whole requests can be failed with ``FakePostmark.fail`` (HTTP 401,
422 with an ErrorCode, 429, 500, 503, ...). Every request is recorded (``received``),
every accepted message too (``sent``, ``sent_refs``: by ``Metadata.ref``).
Control routes for the dev stack: ``GET /_fake/received``, ``POST /_fake/fail``
(``{"status": ..., "error_code": ..., "times": ...}``), ``POST /_fake/reset``.
Run with ``python -m devkit.fakes.postmark --port 6120``.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
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

BATCH_PATH = "/email/batch"
SERVER_PATH = "/server"
TEST_SERVER_TOKEN = "pm-fake-server-token-0123456789"
MAX_MESSAGES = 500
MAX_BYTES = 50_000_000
MAX_METADATA_FIELDS = 10
MAX_METADATA_KEY = 20
MAX_METADATA_VALUE = 80

# Postmark's own wording for the errors the fake answers.
MESSAGES = {
    10: "No Account or Server API tokens were supplied in the HTTP headers. Please add a "
    "header for either X-Postmark-Server-Token or X-Postmark-Account-Token.",
    100: "Postmark is currently undergoing maintenance.",
    300: "Invalid email request",
    402: "Received invalid JSON input.",
    403: "The JSON input you provided is syntactically correct, but still not the one we expect.",
    405: "You are not allowed to send. You have run out of credits.",
    406: "You tried to send to a recipient that has been marked as inactive. Found "
    "inactive addresses: {to}. Inactive recipients are ones that have generated a hard "
    "bounce, a spam complaint, or a manual suppression.",
    409: "JSON data required. Please set the Content-Type and Accept headers to application/json.",
    410: "Too many batch messages. You may only send up to 500 messages per batch.",
    412: "Your account is pending approval.",
    413: "Your account may not send.",
    429: "Rate limit exceeded.",
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


@dataclass
class FakePostmark:
    """The fake's state: its token, what it received and sent, the failures to answer."""

    server_token: str = TEST_SERVER_TOKEN
    max_bytes: int = MAX_BYTES
    latency: float = 0.0  # seconds before each answer
    server_name: str = "BatchSender fake"
    delivery_type: str = "Live"  # or "Sandbox"
    received: list[Received] = field(default_factory=list)
    sent: list[dict[str, Any]] = field(default_factory=list)
    _failures: Failures = field(default_factory=Failures)

    def fail(
        self,
        status: int,
        *,
        error_code: int | None = None,
        message: str | None = None,
        headers: dict[str, str] | None = None,
        times: int = 1,
    ) -> None:
        """Answer the next ``times`` requests (-1: all) that pass the token check with
        ``status`` and ``{ErrorCode, Message}`` (Postmark's message for the code unless
        ``message``)."""
        code = 0 if error_code is None else error_code
        text = message if message is not None else MESSAGES.get(code, "Error")
        body = {"ErrorCode": code, "Message": text}
        self._failures.add(status, body, headers, times)

    def reset(self) -> None:
        self.received.clear()
        self.sent.clear()
        self._failures.clear()

    def sent_refs(self) -> Counter[str]:
        """How many times each ref was accepted (a duplicate shows as 2)."""
        return Counter(m.get("Metadata", {}).get("ref") for m in self.sent)

    def requests(self, path: str = BATCH_PATH) -> list[Received]:
        return [r for r in self.received if r.path == path]

    def _next_failure(self) -> Failure | None:
        return self._failures.next()


FAKE = web.AppKey("fake_postmark", FakePostmark)


_json = json_response


def _api_error(status: int, code: int) -> web.Response:
    return _json({"ErrorCode": code, "Message": MESSAGES[code]}, status=status)


def _is_json_type(value: str | None) -> bool:
    return (value or "").split(";")[0].strip().lower() == "application/json"


async def _batch(request: web.Request) -> web.Response:
    fake = request.app[FAKE]
    body = await request.read()
    record = Received(request.method, request.path, dict(request.headers), body)
    fake.received.append(record)
    response = _answer(fake, request, body)
    if fake.latency:
        await asyncio.sleep(fake.latency)
    record.status = response.status
    return response


def _answer(fake: FakePostmark, request: web.Request, body: bytes) -> web.Response:
    if request.headers.get("X-Postmark-Server-Token") != fake.server_token:
        return _api_error(401, 10)
    failure = fake._next_failure()
    if failure is not None:
        return _json(failure.body, failure.status, failure.headers)
    if not (
        _is_json_type(request.headers.get("Content-Type"))
        and _is_json_type(request.headers.get("Accept"))
    ):
        return _api_error(422, 409)
    if len(body) > fake.max_bytes:
        return _json({"ErrorCode": 0, "Message": "Payload Too Large"}, status=413)
    try:
        messages = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _api_error(422, 402)
    if not isinstance(messages, list):
        return _api_error(422, 403)
    if len(messages) > MAX_MESSAGES:
        return _api_error(422, 410)
    return _json([_process(fake, message) for message in messages])


async def _server(request: web.Request) -> web.Response:
    fake = request.app[FAKE]
    record = Received(request.method, request.path, dict(request.headers), b"")
    fake.received.append(record)
    response = _server_answer(fake, request)
    record.status = response.status
    return response


def _server_answer(fake: FakePostmark, request: web.Request) -> web.Response:
    if request.headers.get("X-Postmark-Server-Token") != fake.server_token:
        return _api_error(401, 10)
    failure = fake._next_failure()
    if failure is not None:
        return _json(failure.body, failure.status, failure.headers)
    if not _is_json_type(request.headers.get("Accept")):
        return _api_error(422, 409)
    return _json(
        {
            "ID": 1,
            "Name": fake.server_name,
            "ApiTokens": [fake.server_token],
            "Color": "blue",
            "SmtpApiActivated": True,
            "RawEmailEnabled": False,
            "DeliveryType": fake.delivery_type,
            "ServerLink": "https://account.postmarkapp.com/servers/1/streams",
            "InboundAddress": "0123456789abcdef@inbound.postmarkapp.com",
            "InboundHookUrl": "",
            "BounceHookUrl": "",
            "OpenHookUrl": "",
            "DeliveryHookUrl": "",
            "PostFirstOpenOnly": False,
            "InboundDomain": "",
            "InboundHash": "0123456789abcdef",
            "InboundSpamThreshold": 0,
            "TrackOpens": False,
            "TrackLinks": "None",
            "IncludeBounceContentInHook": True,
            "ClickHookUrl": "",
            "EnableSmtpApiErrorHooks": False,
        }
    )


def check_message(message: Any) -> str | None:
    """What is wrong with one batch message (Postmark's 300 text), or None."""
    if not isinstance(message, dict):
        return "Invalid email request: each message must be an object."
    for key in ("From", "To"):
        value = message.get(key)
        if not isinstance(value, str) or not value.strip():
            return f"Invalid '{key}' address: it is required."
    if not isinstance(message.get("Subject"), str):
        return "Invalid email request: 'Subject' must be a string."
    html, text = message.get("HtmlBody"), message.get("TextBody")
    if not (isinstance(html, str) and html) and not (isinstance(text, str) and text):
        return "Provide either email TextBody or HtmlBody or both."
    headers = message.get("Headers", [])
    if not isinstance(headers, list) or not all(
        isinstance(h, dict)
        and isinstance(h.get("Name"), str)
        and h["Name"]
        and isinstance(h.get("Value"), str)
        for h in headers
    ):
        return "Invalid 'Headers': expected a list of {Name, Value}."
    metadata = message.get("Metadata", {})
    if not isinstance(metadata, dict) or len(metadata) > MAX_METADATA_FIELDS:
        return "Invalid 'Metadata': at most 10 fields."
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY or not isinstance(value, str):
            return "Invalid 'Metadata': field names up to 20 characters, string values."
        if len(value) > MAX_METADATA_VALUE:
            return "Invalid 'Metadata': values up to 80 characters."
    stream = message.get("MessageStream", "outbound")
    if not isinstance(stream, str) or not stream:
        return "Invalid 'MessageStream'."
    return None


def _address(mailbox: str) -> str:
    """The address of ``Name <address>`` or of a bare address."""
    if mailbox.endswith(">") and "<" in mailbox:
        return mailbox[mailbox.rindex("<") + 1 : -1]
    return mailbox.strip()


def _process(fake: FakePostmark, message: Any) -> dict[str, Any]:
    problem = check_message(message)
    to = _address(message["To"]) if problem is None else ""
    local, at, _domain = to.rpartition("@")
    if problem is None and not (at and local):
        problem = f"Error parsing 'To': Illegal email address '{to}'. It must contain '@'."
    if problem is not None:
        return {"ErrorCode": 300, "Message": problem}
    lowered = local.lower()
    if lowered.startswith("invalid"):
        return {"ErrorCode": 300, "Message": f"Invalid 'To' address: '{to}'."}
    if lowered.startswith("inactive"):
        return {"ErrorCode": 406, "Message": MESSAGES[406].format(to=to)}
    if lowered.startswith("throttled"):
        return {"ErrorCode": 429, "Message": MESSAGES[429]}
    fake.sent.append(message)
    return {
        "ErrorCode": 0,
        "Message": "OK",
        "MessageID": str(uuid.uuid4()),
        "SubmittedAt": datetime.now(UTC).isoformat(),
        "To": message["To"],
    }


async def _unknown(request: web.Request) -> web.Response:
    fake = request.app[FAKE]
    fake.received.append(
        Received(request.method, request.path, dict(request.headers), await request.read(), 404)
    )
    return _json({"ErrorCode": 0, "Message": "Not found"}, status=404)


def _fail(fake: FakePostmark, data: dict[str, Any]) -> None:
    fake.fail(
        int(data["status"]),
        error_code=data.get("error_code"),
        message=data.get("message"),
        headers=data.get("headers"),
        times=int(data.get("times", 1)),
    )


def build_app(fake: FakePostmark | None = None) -> web.Application:
    """The fake as an aiohttp application (its state at ``app[FAKE]``)."""
    state = fake or FakePostmark()
    app = web.Application(client_max_size=state.max_bytes + 1024 * 1024)
    app[FAKE] = state
    app.router.add_post(BATCH_PATH, _batch)
    app.router.add_get(SERVER_PATH, _server)
    add_control_routes(app, FAKE, _fail, "expected {status, error_code?, message?, times?}")
    app.router.add_route("*", "/{tail:.*}", _unknown)
    return app


@contextlib.asynccontextmanager
async def serving(fake: FakePostmark | None = None) -> AsyncIterator[tuple[str, FakePostmark]]:
    """Run the fake on a free 127.0.0.1 port; yield its base URL and its state."""
    app = build_app(fake)
    async with running(app) as url:
        yield url, app[FAKE]


def main(argv: list[str] | None = None) -> None:
    parser = arguments("A fake Postmark batch API.", 6120)
    parser.add_argument("--server-token", default=TEST_SERVER_TOKEN)
    args = parser.parse_args(argv)
    run(build_app(FakePostmark(server_token=args.server_token)), args.host, args.port)


if __name__ == "__main__":
    main()
