"""A fake Amazon SES (API v2) server for tests and the dev stack, on 127.0.0.1.

It answers ``SendEmail`` (``POST /v2/email/outbound-emails``) as SES does, after checking
each request as the SES v2 API reference and the SigV4 documentation describe:

- the method and path (any other operation: 404 ``UnknownOperationException``);
- the ``Authorization`` header (``AWS4-HMAC-SHA256 Credential=<key>/<date>/<region>/ses/
  aws4_request, SignedHeaders=..., Signature=...``): known access key id, scope date equal
  to ``X-Amz-Date``'s, the server's region, service ``ses``, ``host`` and ``x-amz-date``
  signed, ``X-Amz-Security-Token`` signed and right when the credentials have one, and the
  signature itself, recomputed with botocore's ``SigV4Auth`` from the known credentials
  over exactly the signed headers (403 ``InvalidSignatureException`` and friends);
- ``X-Amz-Date`` (``YYYYMMDDTHHMMSSZ``, at most 5 minutes off the server's clock);
- ``Content-Type: application/json`` and a JSON body valid for botocore's own SESv2
  model of ``SendEmailRequest`` (members, types, required members, and the model's
  min/max/pattern constraints, e.g. at most 15 ``Headers``), plus what the reference says
  in prose: ``FromEmailAddress``, one of ``Simple``/``Raw``/``Template``, 1 to 50
  recipients across To/Cc/Bcc with ASCII local parts, tag names and values of
  ``[A-Za-z0-9_-]`` (400 ``BadRequestException``).

It also answers ``GetAccount`` (``GET /v2/email/account``), the adapter's credentials
check, after the same signature check: ``{"SendingEnabled", "ProductionAccessEnabled",
"EnforcementStatus", "SendQuota": {"Max24HourSend", "MaxSendRate", "SentLast24Hours"},
...}`` from the fake's account (``sending_enabled``, ``production_access``,
``max_24_hour_send``, ``max_send_rate``; ``SentLast24Hours`` counts what it accepted).
An account whose sending is disabled or paused (``sending_enabled=False``, ``fail("paused")``)
says ``SendingEnabled: false`` and refuses ``SendEmail`` with ``SendingPausedException``;
``fail("suspended")`` also says ``EnforcementStatus: SHUTDOWN``; ``fail`` of
``throttle``, ``error`` or ``unavailable`` answers ``GetAccount`` so too. Operations in
``denied`` (``{"GetAccount"}``: a send-only IAM policy) are 403 ``AccessDeniedException``.

A good request gets 200 ``{"MessageId": ...}``; failures are set with ``FakeSes.fail``
(all requests, or those to one recipient) and answered with SES's status, the code in the
``x-amzn-ErrorType`` header and ``{"message": ...}`` (or the code as ``__type`` in the
body: ``error_style``). Everything received is recorded (``received``, ``refused``).
Control routes for the dev stack: ``GET /_fake/received``, ``POST /_fake/fail``
(``{"kind": ..., "to": ...}``), ``POST /_fake/reset``.
Run with ``python -m devkit.fakes.ses --port 6110``.
"""

from __future__ import annotations

import asyncio
import hmac
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import botocore.session
import orjson
from aiohttp import web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.model import ListShape, Shape, StructureShape
from botocore.validate import ParamValidator

from devkit.fakes.base import arguments, run

SEND_EMAIL = "/v2/email/outbound-emails"
GET_ACCOUNT = "/v2/email/account"
TEST_REGION = "eu-west-1"
# The fake's own test credentials (not AWS ones): what tests build their Account from.
TEST_CREDENTIALS = {
    "access_key_id": "AKIAFAKESES0TEST0KEY",
    "secret_access_key": "fake/ses/secret+key/for+tests/only/0123456",
}
MAX_RECIPIENTS = 50
MAX_SKEW = 300.0  # seconds, as SigV4 allows
_AUTH = re.compile(
    r"AWS4-HMAC-SHA256 Credential=(?P<key>[^/\s]+)/(?P<date>\d{8})/(?P<region>[^/\s]+)/"
    r"(?P<service>[^/\s]+)/aws4_request, ?SignedHeaders=(?P<headers>[a-z0-9;-]+), ?"
    r"Signature=(?P<signature>[0-9a-f]{64})"
)
_AMZ_DATE = re.compile(r"\d{8}T\d{6}Z")
_TAG = re.compile(r"[A-Za-z0-9_-]{1,256}")

# What ``fail`` can make the fake answer: status, code, message (SES's own wording).
FAILURES: dict[str, tuple[int, str, str]] = {
    "throttle": (429, "TooManyRequestsException", "Maximum sending rate exceeded."),
    "quota": (400, "LimitExceededException", "Daily message quota exceeded."),
    "suspended": (
        400,
        "AccountSuspendedException",
        "Your account's ability to send email has been permanently restricted.",
    ),
    "paused": (
        400,
        "SendingPausedException",
        "Email sending is disabled for your account.",
    ),
    "reject": (
        400,
        "MessageRejected",
        "Email address is not verified. The following identities failed the check in "
        "region {region}: {sender}",
    ),
    "mail_from": (
        400,
        "MailFromDomainNotVerifiedException",
        "The MAIL FROM domain of {sender} is not verified.",
    ),
    "not_found": (404, "NotFoundException", "Configuration set <ConfigSet> does not exist."),
    "bad_request": (400, "BadRequestException", "Illegal address"),
    "error": (500, "InternalServiceErrorException", "An internal error occurred."),
    "unavailable": (503, "ServiceUnavailable", "Service unavailable."),
}


class Refused(Exception):
    """A request SES would refuse: its status, error code and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class FakeSes:
    """The fake's credentials, behaviour and record."""

    access_key_id: str = TEST_CREDENTIALS["access_key_id"]
    secret_access_key: str = field(default=TEST_CREDENTIALS["secret_access_key"], repr=False)
    session_token: str | None = field(default=None, repr=False)
    region: str = TEST_REGION
    clock: Callable[[], float] = time.time
    latency: float = 0.0  # seconds before each answer
    retry_after: str | None = None  # a Retry-After header on throttling and 5xx answers
    error_style: str = "header"  # "header": x-amzn-ErrorType; "body": __type; "both"
    # The account GetAccount describes.
    sending_enabled: bool = True
    production_access: bool = True
    max_24_hour_send: float = 50_000.0  # -1: no 24-hour limit
    max_send_rate: float = 14.0
    denied: frozenset[str] = frozenset()  # operations the credentials may not call
    received: list[dict[str, Any]] = field(default_factory=list)  # accepted requests
    refused: list[dict[str, Any]] = field(default_factory=list)  # {status, code, message}
    requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    _fail_all: str | None = None
    _fail_to: dict[str, str] = field(default_factory=dict)

    def fail(self, kind: str | None, *, to: str | None = None) -> None:
        """Answer ``kind`` (a ``FAILURES`` key; None: stop failing) to every request, or to
        requests with recipient ``to`` only."""
        if kind is not None and kind not in FAILURES:
            raise ValueError(f"unknown failure {kind!r}; one of {sorted(FAILURES)}")
        if to is None:
            self._fail_all = kind
        elif kind is None:
            self._fail_to.pop(to.lower(), None)
        else:
            self._fail_to[to.lower()] = kind

    def reset(self) -> None:
        self.received.clear()
        self.refused.clear()
        self.requests = self.max_in_flight = 0
        self._fail_all = None
        self._fail_to.clear()

    def by_ref(self) -> dict[str, dict[str, Any]]:
        """The accepted requests by their ``X-BatchSender-Ref`` header."""
        out = {}
        for item in self.received:
            headers = item["request"]["Content"].get("Simple", {}).get("Headers", [])
            for header in headers:
                if header["Name"].lower() == "x-batchsender-ref":
                    out[header["Value"]] = item
        return out

    def failure_for(self, request: dict[str, Any]) -> str | None:
        destination = request.get("Destination") or {}
        for key in ("ToAddresses", "CcAddresses", "BccAddresses"):
            for address in destination.get(key) or ():
                kind = self._fail_to.get(_bare(address).lower())
                if kind:
                    return kind
        return self._fail_all


STATE = web.AppKey("fake_ses", FakeSes)
_MODEL = botocore.session.get_session().get_service_model("sesv2")
_SEND_EMAIL_INPUT = _MODEL.operation_model("SendEmail").input_shape


def _bare(address: str) -> str:
    """The address of ``Name <address>`` (or the value itself)."""
    start, end = address.rfind("<"), address.rfind(">")
    return address[start + 1 : end] if 0 <= start < end else address.strip()


def check_signature(request: web.Request, body: bytes, fake: FakeSes) -> None:
    """``Refused`` unless ``request`` carries a valid SigV4 signature of the fake's
    credentials, region and service ``ses``."""
    auth = request.headers.get("Authorization")
    if not auth:
        raise Refused(403, "MissingAuthenticationTokenException", "Missing Authentication Token")
    match = _AUTH.fullmatch(auth.strip())
    if match is None:
        raise Refused(403, "IncompleteSignatureException", "Authorization header is malformed.")
    if not hmac.compare_digest(match["key"], fake.access_key_id):
        raise Refused(
            403,
            "UnrecognizedClientException",
            "The security token included in the request is invalid.",
        )
    amz_date = request.headers.get("X-Amz-Date", "")
    if not _AMZ_DATE.fullmatch(amz_date):
        raise Refused(403, "IncompleteSignatureException", "X-Amz-Date is missing or malformed.")
    signed_at = datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
    if abs(fake.clock() - signed_at) > MAX_SKEW:
        raise Refused(403, "InvalidSignatureException", "Signature expired.")
    if match["date"] != amz_date[:8] or match["service"] != "ses":
        raise Refused(403, "InvalidSignatureException", "Credential scope is not valid.")
    if match["region"] != fake.region:
        raise Refused(
            403,
            "InvalidSignatureException",
            f"Credential should be scoped to a valid region, not '{match['region']}'.",
        )
    names = match["headers"].split(";")
    if "host" not in names or "x-amz-date" not in names or names != sorted(set(names)):
        raise Refused(403, "InvalidSignatureException", "SignedHeaders must include host.")
    token = request.headers.get("X-Amz-Security-Token")
    if fake.session_token is not None and (
        token != fake.session_token or "x-amz-security-token" not in names
    ):
        raise Refused(
            403,
            "UnrecognizedClientException",
            "The security token included in the request is invalid.",
        )
    headers = {}
    for name in names:
        values = request.headers.getall(name, None) if name != "host" else [request.host]
        if not values:
            raise Refused(
                403, "InvalidSignatureException", f"Signed header {name} is not in the request."
            )
        headers[name] = ",".join(values)
    expected = _signature(request, body, headers, amz_date, fake)
    if not hmac.compare_digest(expected, match["signature"]):
        raise Refused(
            403,
            "InvalidSignatureException",
            "The request signature we calculated does not match the signature you provided. "
            "Check your AWS Secret Access Key and signing method.",
        )


def _signature(
    request: web.Request, body: bytes, headers: dict[str, str], amz_date: str, fake: FakeSes
) -> str:
    """The signature botocore computes for this request with the fake's credentials."""
    creds = Credentials(fake.access_key_id, fake.secret_access_key, fake.session_token)
    signer = SigV4Auth(creds, "ses", fake.region)
    url = f"{request.scheme}://{request.host}{request.raw_path}"
    aws_request = AWSRequest(method=request.method, url=url, data=body, headers=headers)
    aws_request.context["timestamp"] = amz_date
    canonical = signer.canonical_request(aws_request)
    return signer.signature(signer.string_to_sign(aws_request, canonical), aws_request)


def check_send_email(body: bytes) -> dict[str, Any]:
    """The ``SendEmail`` request in ``body``; ``Refused`` where SES would refuse it."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise Refused(400, "SerializationException", "The body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise Refused(400, "SerializationException", "The body must be a JSON object.")
    report = ParamValidator().validate(data, _SEND_EMAIL_INPUT)
    problems = [report.generate_report()] if report.has_errors() else []
    _constraints(data, _SEND_EMAIL_INPUT, "", problems)
    if problems:
        raise Refused(400, "BadRequestException", "; ".join(problems)[:1000])
    _check_prose_rules(data)
    return data


def _constraints(value: Any, shape: Shape, path: str, problems: list[str]) -> None:
    """The model's min/max/pattern metadata (botocore's validator checks only types,
    required members and minimums of some)."""
    meta = shape.metadata
    if isinstance(shape, StructureShape) and isinstance(value, dict):
        for name, member in shape.members.items():
            if name in value:
                _constraints(value[name], member, f"{path}.{name}".lstrip("."), problems)
    elif isinstance(shape, ListShape) and isinstance(value, list):
        if "max" in meta and len(value) > meta["max"]:
            problems.append(f"{path}: at most {meta['max']} items")
        for index, item in enumerate(value):
            _constraints(item, shape.member, f"{path}[{index}]", problems)
    elif shape.type_name == "string" and isinstance(value, str):
        if "max" in meta and len(value) > meta["max"]:
            problems.append(f"{path}: at most {meta['max']} characters")
        if "min" in meta and len(value) < meta["min"]:
            problems.append(f"{path}: at least {meta['min']} characters")
        pattern = meta.get("pattern")
        if pattern and not re.fullmatch(pattern, value):
            problems.append(f"{path}: does not match {pattern}")


def _check_prose_rules(data: dict[str, Any]) -> None:
    content = data.get("Content") or {}
    if sum(key in content for key in ("Simple", "Raw", "Template")) != 1:
        raise Refused(400, "BadRequestException", "Content needs one of Simple, Raw, Template.")
    if not data.get("FromEmailAddress") and "Raw" not in content:
        raise Refused(400, "BadRequestException", "Missing FromEmailAddress.")
    simple = content.get("Simple")
    if simple is not None:
        simple_body = simple["Body"]
        if "Text" not in simple_body and "Html" not in simple_body:
            raise Refused(400, "BadRequestException", "Body needs Text or Html.")
        for header in simple.get("Headers") or ():
            if len(header["Name"]) + len(header["Value"]) > 996:
                raise Refused(400, "BadRequestException", "Header line too long.")
    destination = data.get("Destination") or {}
    addresses = [
        a
        for key in ("ToAddresses", "CcAddresses", "BccAddresses")
        for a in destination.get(key) or ()
    ]
    if not addresses:
        raise Refused(400, "BadRequestException", "Missing recipients.")
    if len(addresses) > MAX_RECIPIENTS:
        raise Refused(400, "BadRequestException", f"Recipient count exceeds {MAX_RECIPIENTS}.")
    for address in [*addresses, data.get("FromEmailAddress") or "x@x"]:
        local, at, domain = _bare(address).rpartition("@")
        if not at or not local or not domain:
            raise Refused(400, "BadRequestException", "Missing final '@domain'")
        if not (local + domain).isascii():
            raise Refused(400, "BadRequestException", "Local address contains non-ASCII.")
    for tag in data.get("EmailTags") or ():
        if not (_TAG.fullmatch(tag["Name"]) and _TAG.fullmatch(tag["Value"])):
            raise Refused(400, "BadRequestException", "Invalid tag name or value.")


def _new_message_id() -> str:
    """An id shaped like SES's: 16 hex digits, a UUID, ``-000000``."""
    return f"{time.time_ns() // 1_000_000:016x}-{uuid.uuid4()}-000000"


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(data),
        status=status,
        headers={"x-amzn-RequestId": str(uuid.uuid4()), **(headers or {})},
        content_type="application/json",
    )


def _error(fake: FakeSes, refused: Refused) -> web.Response:
    fake.refused.append(
        {"status": refused.status, "code": refused.code, "message": refused.message}
    )
    headers, body = {}, {"message": refused.message}
    if fake.error_style in ("header", "both"):
        headers["x-amzn-ErrorType"] = f"{refused.code}:"
    if fake.error_style in ("body", "both"):
        body["__type"] = f"com.amazonaws.sesv2#{refused.code}"
    if fake.retry_after and (refused.status == 429 or refused.status >= 500):
        headers["Retry-After"] = fake.retry_after
    return _json(body, refused.status, headers)


async def _send_email(request: web.Request) -> web.Response:
    fake = request.app[STATE]
    fake.requests += 1
    fake.in_flight += 1
    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
    try:
        body = await request.read()
        if fake.latency:
            await asyncio.sleep(fake.latency)
        check_signature(request, body, fake)
        if request.content_type != "application/json":
            raise Refused(400, "BadRequestException", "Content-Type must be application/json.")
        if "SendEmail" in fake.denied:
            raise _denied(fake, "SendEmail")
        data = check_send_email(body)
        kind = fake.failure_for(data) or (None if fake.sending_enabled else "paused")
        if kind is not None:
            status, code, text = FAILURES[kind]
            sender = _bare(data.get("FromEmailAddress") or "")
            raise Refused(status, code, text.format(region=fake.region.upper(), sender=sender))
    except Refused as refused:
        return _error(fake, refused)
    finally:
        fake.in_flight -= 1
    message_id = _new_message_id()
    fake.received.append({"MessageId": message_id, "request": data})
    return _json({"MessageId": message_id})


def _denied(fake: FakeSes, operation: str) -> Refused:
    return Refused(
        403,
        "AccessDeniedException",
        f"User: arn:aws:iam::123456789012:user/batchsender is not authorized to perform: "
        f"ses:{operation} on resource: arn:aws:ses:{fake.region}:123456789012:*",
    )


async def _get_account(request: web.Request) -> web.Response:
    fake = request.app[STATE]
    fake.requests += 1
    try:
        check_signature(request, await request.read(), fake)
        if "GetAccount" in fake.denied:
            raise _denied(fake, "GetAccount")
        if fake._fail_all in ("throttle", "error", "unavailable"):
            status, code, text = FAILURES[fake._fail_all]
            raise Refused(status, code, text)
    except Refused as refused:
        return _error(fake, refused)
    sending = fake.sending_enabled and fake._fail_all not in ("paused", "suspended")
    return _json(
        {
            "DedicatedIpAutoWarmupEnabled": False,
            "EnforcementStatus": "SHUTDOWN" if fake._fail_all == "suspended" else "HEALTHY",
            "ProductionAccessEnabled": fake.production_access,
            "SendQuota": {
                "Max24HourSend": fake.max_24_hour_send,
                "MaxSendRate": fake.max_send_rate,
                "SentLast24Hours": float(len(fake.received)),
            },
            "SendingEnabled": sending,
            "SuppressionAttributes": {"SuppressedReasons": ["BOUNCE", "COMPLAINT"]},
        }
    )


async def _unknown(request: web.Request) -> web.Response:
    return _error(
        request.app[STATE], Refused(404, "UnknownOperationException", "Unknown operation.")
    )


async def _control_received(request: web.Request) -> web.Response:
    fake = request.app[STATE]
    return _json({"received": fake.received, "refused": fake.refused, "requests": fake.requests})


async def _control_fail(request: web.Request) -> web.Response:
    try:
        data = orjson.loads(await request.read() or b"{}")
        request.app[STATE].fail(data.get("kind"), to=data.get("to"))
    except (orjson.JSONDecodeError, AttributeError, ValueError) as exc:
        return _json({"error": str(exc)}, 400)
    return _json({"ok": True})


async def _control_reset(request: web.Request) -> web.Response:
    request.app[STATE].reset()
    return _json({"ok": True})


def build_app(fake: FakeSes | None = None) -> web.Application:
    """The fake SES server as an aiohttp application (its state: ``app[STATE]``)."""
    app = web.Application(client_max_size=40 * 1024 * 1024)  # SES: 40 MB per message
    app[STATE] = fake or FakeSes()
    app.router.add_post(SEND_EMAIL, _send_email)
    app.router.add_get(GET_ACCOUNT, _get_account)
    app.router.add_get("/_fake/received", _control_received)
    app.router.add_post("/_fake/fail", _control_fail)
    app.router.add_post("/_fake/reset", _control_reset)
    app.router.add_route("*", "/{tail:.*}", _unknown)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = arguments("Fake Amazon SES v2 server.", 6110)
    parser.add_argument("--region", default=TEST_REGION)
    args = parser.parse_args(argv)
    run(build_app(FakeSes(region=args.region)), args.host, args.port)


if __name__ == "__main__":
    main()
