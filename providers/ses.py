"""Amazon SES (API v2): the send adapter, and its webhook (Amazon SNS) check and parser.

Sending. The engine hands over already-rendered messages: each recipient has its own
subject, bodies, unsubscribe link and ref. ``SendBulkEmail`` (``POST
/v2/email/outbound-bulk-emails``) only personalises a *template* (stored, or inline in
``DefaultContent``) with per-entry replacement data; feeding it whole rendered bodies as
template data would hand our already-escaped HTML to SES's own template engine a second
time. So every message is one ``SendEmail`` (``POST /v2/email/outbound-emails``) with
``Content.Simple``: ``Subject``/``Body.Text``/``Body.Html`` (charset UTF-8), the message's
headers in ``Content.Simple.Headers`` (SES v2 ``MessageHeader``: at most 15, printable
ASCII, 995 characters; this carries ``List-Unsubscribe``, ``List-Unsubscribe-Post`` and
``X-BatchSender-Ref``), ``Destination.ToAddresses`` (one recipient) and
``FromEmailAddress``. One call of ``send`` (a chunk of at most ``max_per_call`` = 50,
SES's recipients-per-call limit) runs at most ``concurrency`` (10) requests at once over
one pooled aiohttp session. Every request is signed with botocore's ``SigV4Auth``
(service ``ses``, the account's region).

Results are one per message, in order; ``send`` never raises for SES or network
failures. How SES errors (``x-amzn-ErrorType`` header, else ``__type``/``code`` in the JSON
body) become results:

=================================================  =======================================
SES answer                                         ``SendResult``
=================================================  =======================================
200 ``{"MessageId"}``                              ok, ``provider_message_id`` = MessageId
``TooManyRequestsException``, ``Throttling*``,     retryable, ``throttled``, ``Retry-After``
HTTP 429, "Maximum sending rate exceeded"
``LimitExceededException``,                        ``hold`` (the 24-hour quota is used up)
``SendingQuotaExceeded``, "Daily message quota
exceeded"
``AccountSuspendedException``,                     ``pause_reason`` (the account cannot send)
``SendingPausedException``, HTTP 401/403
(credentials, signature, permissions)
``MessageRejected``, ``BadRequestException``,      permanent (not retryable)
``MailFromDomainNotVerifiedException``,
``NotFoundException``, any other 4xx
HTTP 5xx, timeouts, connection errors              retryable (``Retry-After`` honoured)
=================================================  =======================================

Once one request of a call is throttled, held or paused, the messages of that call not
yet sent are not sent: they get the same kind of result (SES would only refuse them too).
A 200 without a readable ``MessageId`` counts as sent (SES accepted it; retrying would send
it twice). Error texts never hold the credentials or an e-mail address (SES puts
addresses in some messages, e.g. "Email address is not verified ... sender@x"): both are
replaced before a text leaves this module. Were ``SendBulkEmail`` ever used (a chunk
whose messages share one template), its per-entry ``Status`` would map the same way:
``SUCCESS`` ok; ``ACCOUNT_THROTTLED``, ``TRANSIENT_FAILURE``, ``FAILED`` retryable;
``ACCOUNT_DAILY_QUOTA_EXCEEDED`` hold; ``ACCOUNT_SUSPENDED``, ``ACCOUNT_SENDING_PAUSED``,
``CONFIGURATION_SET_SENDING_PAUSED`` pause; ``MESSAGE_REJECTED``, ``INVALID_PARAMETER``,
``MAIL_FROM_DOMAIN_NOT_VERIFIED`` and the rest permanent.

Credentials check (``check``): ``GetAccount`` (``GET /v2/email/account``, signed the
same way): 200 ``{"SendingEnabled", "ProductionAccessEnabled", "EnforcementStatus",
"SendQuota": {"Max24HourSend", "MaxSendRate", "SentLast24Hours"}}`` is ok while
``SendingEnabled`` is true (the sandbox and an enforcement status other than ``HEALTHY``
are said in the detail; ``Max24HourSend`` -1 is no 24-hour limit), not ok when false. An
error is read as a send's is (``error_code``, ``classify``): credentials or signature
refused, throttled, SES's own error. ``AccessDeniedException`` means AWS authenticated the
credentials but they may not call ``ses:GetAccount`` (a send-only IAM policy): ok, with a
note that their sending permission and quota are unknown.

The ref. Each message carries the engine's ref in the ``X-BatchSender-Ref`` header (the
engine sets it; this adapter adds it when missing) and in the ``EmailTags`` tag
``batchsender-ref`` (tag values allow only ``[A-Za-z0-9_-]``, so the tag holds the ref in
unpadded base64url). SES returns both: headers in ``mail.headers`` (event publishing
always; identity notifications when "include original headers" is on) and tags in
``mail.tags`` (event publishing through a configuration set). ``parse_sns`` reads the
header first, then the tag.

Webhook. SES publishes to an SNS topic, SNS posts to our HTTPS endpoint (not raw message
delivery: the SNS envelope carries the signature). ``verify_sns`` checks a post exactly as
"Verifying the signatures of Amazon SNS messages" says
(https://docs.aws.amazon.com/sns/latest/dg/sns-verify-signature-of-message.html): the
string to sign is ``name\\nvalue\\n`` for ``Message``, ``MessageId``, ``Subject`` (if
present), ``Timestamp``, ``TopicArn``, ``Type`` (a ``Notification``), or ``Message``,
``MessageId``, ``SubscribeURL``, ``Timestamp``, ``Token``, ``TopicArn``, ``Type`` (the two
confirmations), in that (byte) order; ``SignatureVersion`` 1 is SHA1withRSA, 2
SHA256withRSA; the certificate comes from ``SigningCertURL`` only when that is
``https://sns.<region>.amazonaws.com[.cn]/<name>.pem`` (the host checked whole; no
userinfo, port, query or fragment), fetched over verified TLS and cached; only the
configured ``TopicArn`` values pass, and a ``Timestamp`` older than ``max_age`` (1 hour) or
more than 5 minutes ahead fails. ``subscribe_url`` gives the ``SubscribeURL`` of a signed
``SubscriptionConfirmation`` to GET, only when it is an SNS host too (no SSRF).
``parse_sns`` turns a notification into ``WebhookEvent`` values, one per recipient (see
``SES_EVENTS``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import inspect
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from email.utils import formataddr, parseaddr
from time import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import orjson
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from providers.base import (
    Account,
    CheckResult,
    Message,
    Quota,
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
    held,
    parse_retry_after,
    paused,
    transport_reason,
)
from providers.http import scrub as scrub_text

SEND_EMAIL_PATH = "/v2/email/outbound-emails"
ACCOUNT_PATH = "/v2/email/account"  # GetAccount: the credentials check
REF_HEADER = "X-BatchSender-Ref"
REF_TAG = "batchsender-ref"
MAX_HEADERS = 15  # SES v2 MessageHeaderList
MAX_HEADER_VALUE = 995  # SES v2 MessageHeaderValue
MAX_HEADER_LINE = 996  # name and value together
MAX_TAG_VALUE = 256  # SES v2 MessageTagValue
_HEADER_NAME = re.compile(r"[!-9;-~]{1,126}")  # SES v2 MessageHeaderName: ASCII 33-126 but ":"
_REGION = re.compile(r"[a-z]{2}(?:-[a-z]+)+-\d{1,2}")
_JSON = "application/json"

# Error codes (x-amzn-ErrorType / __type) by what they mean for the message.
_THROTTLED = frozenset(
    {"TooManyRequestsException", "ThrottlingException", "Throttling", "ThrottledException"}
)
_HOLD = frozenset(
    {"LimitExceededException", "SendingQuotaExceeded", "SendingQuotaExceededException"}
)
_PAUSE = {
    "AccountSuspendedException": "the SES account is suspended",
    "SendingPausedException": "sending is paused for the SES account or configuration set",
}
_AUTH = frozenset(
    {
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "IncompleteSignatureException",
        "MissingAuthenticationTokenException",
        "InvalidClientTokenId",
        "ExpiredTokenException",
        "AccessDeniedException",
        "AccessDenied",
    }
)
_KEY_TEXT = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{12,}\b")


class SesProvider(HttpAdapter):
    """Sends chunks to SES v2 ``SendEmail``, signed with SigV4, over one pooled session.

    Built from an ``Account``: ``credentials`` ``access_key_id``, ``secret_access_key``
    (and ``session_token`` for temporary credentials), ``region`` (``"eu-west-1"``) and,
    for tests, ``base_url`` instead of ``https://email.{region}.amazonaws.com``.
    ``configuration_set`` names the SES configuration set whose event destination
    publishes to SNS (None: the identity's default configuration set, if any).
    """

    name = "ses"
    max_per_call = 50  # SES: at most 50 recipients per call; the engine's chunk size too
    check_call = f"GET {ACCOUNT_PATH}"

    def __init__(
        self,
        account: Account,
        *,
        configuration_set: str | None = None,
        concurrency: int = 10,
        timeout: float = 10.0,
    ) -> None:
        creds = account.credentials
        key_id, secret = creds.get("access_key_id"), creds.get("secret_access_key")
        if not key_id or not secret:
            raise ValueError("ses: the account needs access_key_id and secret_access_key")
        region = account.region or ""
        if not _REGION.fullmatch(region):
            raise ValueError("ses: the account needs a region such as 'eu-west-1'")
        if concurrency < 1:
            raise ValueError("ses: concurrency must be at least 1")
        super().__init__(timeout=timeout, resolver=account.resolver)
        self.connector_limit = max(64, concurrency)
        base = (account.base_url or f"https://email.{region}.amazonaws.com").rstrip("/")
        self._url = base + SEND_EMAIL_PATH
        self._account_url = base + ACCOUNT_PATH
        self._region = region
        self._signer = SigV4Auth(
            Credentials(key_id, secret, creds.get("session_token") or None), "ses", region
        )
        self._secrets = tuple(
            s for s in (key_id, secret, creds.get("session_token")) if s and len(s) >= 4
        )
        self._configuration_set = configuration_set
        self._concurrency = concurrency

    def __repr__(self) -> str:
        return f"SesProvider({self._url!r})"

    async def send(self, messages: list[Message]) -> list[SendResult]:
        """Send one chunk: one ``SendEmail`` per message, ``concurrency`` at a time; one
        result per message in order; never raises for SES or network failures."""
        if not messages:
            return []
        call = _Call(asyncio.Semaphore(self._concurrency))
        session = self._get_session()
        return list(await asyncio.gather(*(self._send_one(session, call, m) for m in messages)))

    async def _send_one(
        self, session: aiohttp.ClientSession, call: _Call, message: Message
    ) -> SendResult:
        try:
            body = orjson.dumps(request_body(message, self._configuration_set))
        except ValueError as exc:
            return failed(message.ref, self._clean(f"ses: {exc}"))
        async with call.slots:
            if call.stop is not None:
                return replace(call.stop, ref=message.ref)
            try:
                async with session.post(
                    self._url, data=body, headers=self._signed_headers(body)
                ) as resp:
                    payload = await resp.read()
                    result = self._result(message.ref, resp.status, resp.headers, payload)
            except TRANSPORT_ERRORS as exc:
                reason = self._clean(transport_reason(exc))
                return failed(message.ref, f"ses: {reason}", retryable=True)
            call.refused(result)
            return result

    def _signed_headers(
        self, body: bytes, *, method: str = "POST", url: str | None = None
    ) -> dict[str, str]:
        """The headers of a request signed with SigV4 (``SendEmail`` unless told)."""
        headers = {"Content-Type": _JSON} if body else {}
        request = AWSRequest(method=method, url=url or self._url, data=body, headers=headers)
        self._signer.add_auth(request)
        return dict(request.headers.items())

    def _check_request(self) -> tuple[str, Mapping[str, str]]:
        return self._account_url, self._signed_headers(b"", method="GET", url=self._account_url)

    def _checked(self, answer: Answer) -> CheckResult:
        if answer.status != 200:
            return self._check_refused(answer)
        body = answer.json() or {}
        raw = body.get("SendQuota")
        quota = _quota(raw)
        notes = [] if quota is None else [_quota_text(quota, raw)]
        if body.get("ProductionAccessEnabled") is False:
            notes.append("in the SES sandbox: only verified addresses receive mail")
        status = body.get("EnforcementStatus")
        if isinstance(status, str) and status != "HEALTHY":
            notes.append(f"enforcement status {status}")
        where = f"in {self._region}"
        if body.get("SendingEnabled") is False:
            text = f"the credentials work, but sending is disabled for this SES account {where}"
            return CheckResult(False, "; ".join([text, *notes]), quota=quota)
        text = f"the credentials work and sending is enabled {where}"
        return CheckResult(True, "; ".join([text, *notes]), quota=quota)

    def _check_refused(self, answer: Answer) -> CheckResult:
        code, detail = error_code(answer.headers, answer.payload)
        said = f"HTTP {answer.status} {code or 'error'}" + (f": {detail}" if detail else "")
        if code in ("AccessDeniedException", "AccessDenied"):
            return CheckResult(
                True,
                "AWS accepted the credentials, but they may not call ses:GetAccount, so "
                f"their permission to send and their quota are unknown ({said})",
            )
        kind = classify(answer.status, code, detail)
        if kind == "pause":
            if code in _PAUSE:
                return CheckResult(False, f"{_PAUSE[code]} ({said})")
            if code in ("SignatureDoesNotMatch", "InvalidSignatureException"):
                return CheckResult(
                    False, f"SES refused the signature: is the secret access key right? ({said})"
                )
            return CheckResult(False, f"SES refused the credentials ({said})")
        if kind == "throttled":
            return CheckResult(False, f"SES is throttling the account; try again shortly ({said})")
        return check_refused(answer.status, f"{code or 'error'}: {detail}".rstrip(": "))

    def _result(
        self, ref: str, status: int, headers: Mapping[str, str], payload: bytes
    ) -> SendResult:
        if status == 200:
            return SendResult(ref, True, provider_message_id=_message_id(payload))
        code, detail = error_code(headers, payload)
        error = self._clean(f"ses: HTTP {status} {code or 'error'}: {detail}".rstrip(": "))
        kind = classify(status, code, detail)
        retry_after = parse_retry_after(header_value(headers, "Retry-After"))
        if kind == "throttled":
            return failed(ref, error, throttled=True, retry_after=retry_after)
        if kind == "hold":
            return held(ref, error, retry_after)
        if kind == "pause":
            reason = _PAUSE.get(code or "", "SES refused the account's credentials or signature")
            return paused(ref, error, f"ses: {reason} ({code})")
        if kind == "retry":
            return failed(ref, error, retryable=True, retry_after=retry_after)
        return failed(ref, error)

    def _clean(self, text: str) -> str:
        return scrub(text, self._secrets)


@dataclass(slots=True)
class _Call:
    """One ``send``: its request slots, and what the rest of it gets once SES throttled,
    held or paused one of its requests."""

    slots: asyncio.Semaphore
    stop: SendResult | None = None

    def refused(self, result: SendResult) -> None:
        if self.stop is None and (result.throttled or result.hold or result.pause_reason):
            reason = (result.error or "").removeprefix("ses: ")
            error = f"ses: not sent, SES refused an earlier request of the call: {reason}"
            self.stop = replace(result, ok=False, provider_message_id=None, error=error)


def _quota(value: Any) -> Quota | None:
    """``SendQuota`` of a ``GetAccount`` answer (``Max24HourSend`` -1: no 24-hour limit)."""
    if not isinstance(value, dict):
        return None

    def number(name: str) -> float | None:
        item = value.get(name)
        ok = isinstance(item, int | float) and not isinstance(item, bool) and item >= 0
        return float(item) if ok else None

    return Quota(number("Max24HourSend"), number("MaxSendRate"), number("SentLast24Hours"))


def _quota_text(quota: Quota, raw: Any) -> str:
    """The quota in words (``raw``: the ``SendQuota`` it was read from)."""

    def count(value: float | None) -> str:
        return "?" if value is None else f"{value:,.0f}" if value.is_integer() else f"{value:,}"

    if quota.per_day is None and isinstance(raw, dict) and raw.get("Max24HourSend") == -1:
        day = "no 24-hour limit"
    else:
        day = f"{count(quota.per_day)} per 24 h"
    sent = "" if quota.sent_last_24_hours is None else f" ({count(quota.sent_last_24_hours)} sent)"
    return f"quota {day}{sent}, {count(quota.per_second)} per second"


def request_body(message: Message, configuration_set: str | None = None) -> dict[str, Any]:
    """The ``SendEmail`` request of one message; ``ValueError`` when SES could not take it
    (a header SES refuses, an address with a non-ASCII local part)."""
    simple: dict[str, Any] = {
        "Subject": {"Data": message.subject, "Charset": "UTF-8"},
        "Body": _body(message),
    }
    headers = _headers(message)
    if headers:
        simple["Headers"] = headers
    body: dict[str, Any] = {
        "FromEmailAddress": _address(message.from_name, message.from_email, "sender"),
        "Destination": {"ToAddresses": [_address(message.to_name, message.to_email, "recipient")]},
        "Content": {"Simple": simple},
    }
    tag = ref_tag(message.ref)
    if len(tag) <= MAX_TAG_VALUE:  # else the header alone carries the ref
        body["EmailTags"] = [{"Name": REF_TAG, "Value": tag}]
    if configuration_set:
        body["ConfigurationSetName"] = configuration_set
    return body


def _body(message: Message) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if message.text is not None:
        body["Text"] = {"Data": message.text, "Charset": "UTF-8"}
    if message.html is not None:
        body["Html"] = {"Data": message.html, "Charset": "UTF-8"}
    if not body:
        body["Text"] = {"Data": "", "Charset": "UTF-8"}
    return body


def _headers(message: Message) -> list[dict[str, str]]:
    items = dict(message.headers)
    if not any(name.lower() == REF_HEADER.lower() for name in items):
        items[REF_HEADER] = message.ref
    if len(items) > MAX_HEADERS:
        raise ValueError(f"SES takes at most {MAX_HEADERS} headers, the message has {len(items)}")
    out = []
    for name, value in items.items():
        if not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"header name {name[:40]!r} is not one SES takes")
        written = value if _printable_ascii(value) else encoded_words(value)
        if len(written) > MAX_HEADER_VALUE or len(name) + len(written) > MAX_HEADER_LINE:
            raise ValueError(f"header {name}: value too long for SES")
        out.append({"Name": name, "Value": written})
    return out


def _printable_ascii(value: str) -> bool:
    return value.isascii() and value.isprintable()


def encoded_words(value: str) -> str:
    """``value`` as RFC 2047 encoded words (UTF-8, base64), each under 75 characters and
    separated by spaces, so a non-ASCII header value is printable ASCII on one line.
    Control characters become spaces (they cannot be in a header)."""
    text = "".join(c if c.isprintable() else " " for c in value)
    words, chunk, size = [], [], 0
    for char in text:
        width = len(char.encode("utf-8", "surrogatepass"))
        if size + width > 45:
            words.append("".join(chunk))
            chunk, size = [], 0
        chunk.append(char)
        size += width
    if chunk:
        words.append("".join(chunk))
    return " ".join(
        "=?utf-8?b?" + base64.b64encode(w.encode("utf-8", "replace")).decode() + "?=" for w in words
    )


def _address(name: str | None, address: str, role: str) -> str:
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise ValueError(f"the {role} address is not an address")
    if not local.isascii():
        raise ValueError(f"SES takes no non-ASCII local part (the {role} address)")
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError(f"the {role} address has a domain IDNA cannot encode") from None
    address = f"{local}@{domain}"
    return formataddr((name, address), charset="utf-8") if name else address


def ref_tag(ref: str) -> str:
    """The ``batchsender-ref`` tag value of a ref: unpadded base64url, which is exactly the
    alphabet SES allows in a tag value."""
    return base64.urlsafe_b64encode(ref.encode()).decode().rstrip("=")


def ref_from_tag(value: str) -> str | None:
    try:
        ref = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    return ref or None


def _message_id(payload: bytes) -> str | None:
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    value = data.get("MessageId") if isinstance(data, dict) else None
    return value if isinstance(value, str) and value else None


def error_code(headers: Mapping[str, str], payload: bytes) -> tuple[str | None, str]:
    """The SES error code and message of an error answer: the code from the
    ``x-amzn-ErrorType`` header (``Code:namespace``) or the body's ``__type``/``code``
    (``namespace#Code``), the message from the body's ``message``/``Message``."""
    code = (header_value(headers, "x-amzn-ErrorType") or "").split(":", 1)[0].strip() or None
    detail = ""
    try:
        data = orjson.loads(payload) if payload else None
    except orjson.JSONDecodeError:
        data = None
        detail = payload[:200].decode("utf-8", "replace")
    if isinstance(data, dict):
        if code is None:
            raw = data.get("__type") or data.get("code") or data.get("Code")
            if isinstance(raw, str) and raw:
                code = raw.rsplit("#", 1)[-1].split(":", 1)[0] or None
        message = data.get("message") or data.get("Message")
        if isinstance(message, str):
            detail = message
    return code, " ".join(detail.split())[:200]


def classify(status: int, code: str | None, detail: str = "") -> str:
    """What an SES error means for the message: ``"throttled"``, ``"hold"``, ``"pause"``,
    ``"retry"`` or ``"permanent"``."""
    text = detail.lower()
    if "daily message quota" in text or "sending quota" in text:
        return "hold"
    if "maximum sending rate" in text or code in _THROTTLED or status == 429:
        return "throttled"
    if code in _HOLD:
        return "hold"
    if code in _PAUSE or code in _AUTH or status in (401, 403):
        return "pause"
    if status >= 500 or status == 408 or code in ("InternalFailure", "ServiceUnavailable"):
        return "retry"
    return "permanent"


def scrub(text: str, secrets: Collection[str] = ()) -> str:
    """``text`` without the given secrets, AWS access key ids or e-mail addresses."""
    return _KEY_TEXT.sub("<key>", scrub_text(text, secrets))


# ---------------------------------------------------------------------------------------
# Webhook: Amazon SNS message signatures
# ---------------------------------------------------------------------------------------

# The SNS hosts: sns.<region>.amazonaws.com (and .com.cn in the China regions), whole.
SNS_HOST = re.compile(r"sns\.[a-z]{2}(?:-[a-z]+)+-\d{1,2}\.amazonaws\.com(?:\.cn)?")
_CERT_PATH = re.compile(r"/[A-Za-z0-9._-]+\.pem")
_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?Z")
_NOTIFICATION_FIELDS = ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type")
_CONFIRMATION_FIELDS = (
    "Message",
    "MessageId",
    "SubscribeURL",
    "Timestamp",
    "Token",
    "TopicArn",
    "Type",
)
_CONFIRMATIONS = frozenset({"SubscriptionConfirmation", "UnsubscribeConfirmation"})
_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {"1": hashes.SHA1, "2": hashes.SHA256}
MAX_BODY = 1024 * 1024  # SNS messages are at most 256 KiB; the envelope adds little
MAX_AGE = 3600.0  # seconds a signed post stays acceptable (replay bound)
MAX_SKEW = 300.0  # seconds a Timestamp may be ahead of our clock
MAX_CERT_BYTES = 64 * 1024

CertFetcher = Callable[[str], Awaitable[bytes] | bytes]
WEBHOOK_SCHEME = (
    "Amazon SNS HTTPS subscription (not raw delivery): SignatureVersion 1 (SHA1withRSA) "
    "or 2 (SHA256withRSA) over the documented fields, certificate from "
    "https://sns.<region>.amazonaws.com/*.pem, configured TopicArn only, at most 1 h old"
)


def sns_url_ok(url: object, *, kind: str = "cert") -> bool:
    """True when ``url`` is an https URL on an SNS host: for ``kind="cert"`` a ``.pem``
    path without query; for ``kind="subscribe"`` the ``ConfirmSubscription`` action at
    ``/``. No userinfo, port, fragment, backslash, whitespace or percent-encoded host."""
    if not isinstance(url, str) or not url.isascii() or not url.isprintable():
        return False
    if " " in url or "\\" in url or len(url) > 4096:
        return False
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return False
    if parts.scheme != "https" or port is not None or parts.fragment:
        return False
    if not SNS_HOST.fullmatch(parts.netloc):  # netloc whole: no "user@", no ":port"
        return False
    if kind == "cert":
        return not parts.query and bool(_CERT_PATH.fullmatch(parts.path))
    if kind == "subscribe":
        query = parse_qs(parts.query, strict_parsing=False)
        return parts.path == "/" and query.get("Action") == ["ConfirmSubscription"]
    raise ValueError(f"unknown kind {kind!r}")


def string_to_sign(message: Mapping[str, Any]) -> bytes:
    """The bytes SNS signed: ``name\\nvalue\\n`` per field of the message's type, in the
    documented (byte-sorted) order; ``Subject`` only when present. ``ValueError`` when a
    field is missing or not a string, or the type is unknown."""
    kind = message.get("Type")
    if kind == "Notification":
        fields = _NOTIFICATION_FIELDS
    elif kind in _CONFIRMATIONS:
        fields = _CONFIRMATION_FIELDS
    else:
        raise ValueError("unknown SNS message Type")
    out: list[str] = []
    for name in fields:
        value = message.get(name)
        if name == "Subject" and value is None:
            continue
        if not isinstance(value, str):
            raise ValueError(f"SNS message field {name} missing or not a string")
        out.append(f"{name}\n{value}\n")
    return "".join(out).encode("utf-8")


def sns_timestamp(value: object) -> float:
    """Seconds since the epoch of an SNS/SES ISO 8601 UTC timestamp; ``ValueError``."""
    if not isinstance(value, str) or not _TIMESTAMP.fullmatch(value):
        raise ValueError("timestamp is not ISO 8601 UTC")
    return datetime.fromisoformat(value).replace(tzinfo=UTC).timestamp()


def _envelope(body: bytes) -> dict[str, Any] | None:
    if len(body) > MAX_BODY:
        return None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


async def verify_sns(
    body: bytes,
    headers: Mapping[str, str],
    *,
    allowed_topics: Collection[str],
    fetch_cert: CertFetcher,
    max_age: float = MAX_AGE,
    now: float | None = None,
) -> Signed | None:
    """The signed timestamp and signature when ``body`` is an SNS post SNS signed for one
    of ``allowed_topics``, at most ``max_age`` seconds ago; else None (never raises for
    what a client sends). ``fetch_cert(url)`` gives the PEM certificate at a checked SNS
    URL (``CertCache`` fetches and caches; tests pass their own)."""
    message = _envelope(body)
    if message is None:
        return None
    return await _verified(message, headers, allowed_topics, fetch_cert, max_age, now)


async def _verified(
    message: dict[str, Any],
    headers: Mapping[str, str],
    allowed_topics: Collection[str],
    fetch_cert: CertFetcher,
    max_age: float,
    now: float | None,
) -> Signed | None:
    topic, kind = message.get("TopicArn"), message.get("Type")
    if not isinstance(topic, str) or topic not in allowed_topics:
        return None
    for header, value in (("x-amz-sns-topic-arn", topic), ("x-amz-sns-message-type", kind)):
        given = header_value(headers, header)
        if given is not None and given != value:
            return None
    algorithm = _HASHES.get(str(message.get("SignatureVersion")))
    signature, cert_url = message.get("Signature"), message.get("SigningCertURL")
    if algorithm is None or not isinstance(signature, str) or not sns_url_ok(cert_url):
        return None
    try:
        signed = string_to_sign(message)
        at = sns_timestamp(message.get("Timestamp"))
        raw = base64.b64decode(signature, validate=True)
    except (ValueError, binascii.Error):
        return None
    clock = time() if now is None else now
    if at < clock - max_age or at > clock + MAX_SKEW:
        return None
    key = await _public_key(fetch_cert, str(cert_url), clock)
    if key is None:
        return None
    try:
        key.verify(raw, signed, padding.PKCS1v15(), algorithm())
    except InvalidSignature:
        return None
    return Signed(int(at), signature)


async def _public_key(fetch_cert: CertFetcher, url: str, clock: float) -> rsa.RSAPublicKey | None:
    try:
        pem = fetch_cert(url)
        if inspect.isawaitable(pem):
            pem = await pem
        cert = x509.load_pem_x509_certificate(pem)
    except Exception:  # unreachable, refused or not a certificate: not verified
        return None
    if not cert.not_valid_before_utc.timestamp() <= clock <= cert.not_valid_after_utc.timestamp():
        return None
    key = cert.public_key()
    return key if isinstance(key, rsa.RSAPublicKey) else None


async def subscribe_url(
    body: bytes,
    headers: Mapping[str, str],
    *,
    allowed_topics: Collection[str],
    fetch_cert: CertFetcher,
    max_age: float = MAX_AGE,
    now: float | None = None,
) -> str | None:
    """The ``SubscribeURL`` to GET (the caller does) when ``body`` is a signed
    ``SubscriptionConfirmation`` for an allowed topic and the URL is SNS's own
    ``ConfirmSubscription`` for that topic; else None."""
    message = _envelope(body)
    if message is None or message.get("Type") != "SubscriptionConfirmation":
        return None
    if await _verified(message, headers, allowed_topics, fetch_cert, max_age, now) is None:
        return None
    url = message.get("SubscribeURL")
    if not sns_url_ok(url, kind="subscribe"):
        return None
    topics = parse_qs(urlsplit(str(url)).query).get("TopicArn")
    return str(url) if topics == [message["TopicArn"]] else None


class CertCache:
    """A ``fetch_cert`` for ``verify_sns``: fetches a checked SNS certificate URL over
    HTTPS (TLS verified, no redirects, at most 64 KiB) and keeps the last ``size``
    certificates by URL. SNS rotates certificates under new URLs, so an entry never
    needs refreshing."""

    def __init__(
        self,
        fetch: Callable[[str], Awaitable[bytes]] | None = None,
        *,
        size: int = 32,
    ) -> None:
        self._fetch = fetch or fetch_signing_cert
        self._size = size
        self._pems: OrderedDict[str, bytes] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}

    async def __call__(self, url: str) -> bytes:
        pem = self._pems.get(url)
        if pem is not None:
            self._pems.move_to_end(url)
            return pem
        lock = self._locks.setdefault(url, asyncio.Lock())
        try:
            async with lock:  # one fetch per URL at a time
                pem = self._pems.get(url)
                if pem is None:
                    pem = await self._fetch(url)
                    x509.load_pem_x509_certificate(pem)  # only a certificate is kept
                    self._pems[url] = pem
                    while len(self._pems) > self._size:
                        self._pems.popitem(last=False)
        finally:
            self._locks.pop(url, None)
        return pem


async def fetch_signing_cert(url: str, *, seconds: float = 5.0) -> bytes:
    """The PEM at an SNS certificate URL (checked again here); ``ValueError`` otherwise."""
    if not sns_url_ok(url):
        raise ValueError("not an SNS signing certificate URL")
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=seconds)) as session,
        session.get(url, allow_redirects=False) as resp,
    ):
        if resp.status != 200:
            raise ValueError(f"certificate URL answered HTTP {resp.status}")
        pem = await resp.content.read(MAX_CERT_BYTES + 1)
    if len(pem) > MAX_CERT_BYTES:
        raise ValueError("certificate too large")
    return pem


# ---------------------------------------------------------------------------------------
# Webhook: SES notifications and events carried by SNS
# ---------------------------------------------------------------------------------------

# What each SES event becomes (one WebhookEvent per recipient). A Permanent bounce is a
# hard bounce; a Transient or Undetermined one is "soft_bounced" (SES gave up after its
# retries, but the address may work later: not a reason to suppress it).
SES_EVENTS = {
    "Delivery": "delivered",
    "Complaint": "complained",
    "Send": "sent",
    "Reject": "rejected",
    "Open": "opened",
    "Click": "clicked",
    "DeliveryDelay": "deferred",
}
BOUNCE_EVENTS = {
    "Permanent": "bounced",
    "Transient": "soft_bounced",
    "Undetermined": "soft_bounced",
}
# SES messages on the topic that are about no recipient's mail.
_IGNORED = frozenset({"AmazonSnsSubscriptionSucceeded", "Rendering Failure", "Subscription"})
# Where each event type lists the recipients it is about, and its own timestamp.
_DETAIL = {
    "Bounce": ("bounce", "bouncedRecipients"),
    "Complaint": ("complaint", "complainedRecipients"),
    "Delivery": ("delivery", "recipients"),
    "DeliveryDelay": ("deliveryDelay", "delayedRecipients"),
    "Open": ("open", None),
    "Click": ("click", None),
    "Send": ("send", None),
    "Reject": ("reject", None),
}


def parse_sns(body: bytes) -> list[WebhookEvent]:
    """The events of one SNS post: none for the two confirmations and for SES messages
    about no recipient (``AmazonSnsSubscriptionSucceeded``, ``Rendering Failure``,
    ``Subscription``, event types SES may add later) or about mail without our ref (not
    sent by BatchSender); one per recipient otherwise. ``ValueError`` when malformed."""
    try:
        envelope = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ValueError("SNS body is not valid JSON") from None
    if not isinstance(envelope, dict):
        raise ValueError("SNS body must be a JSON object")
    kind = envelope.get("Type")
    if kind in _CONFIRMATIONS:
        return []
    if kind != "Notification":
        raise ValueError("SNS message Type must be Notification or a confirmation")
    sns_id = envelope.get("MessageId")
    if not isinstance(sns_id, str) or not sns_id:
        raise ValueError("SNS MessageId must be a non-empty string")
    raw = envelope.get("Message")
    if not isinstance(raw, str):
        raise ValueError("SNS Message must be a string")
    try:
        ses = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ValueError("SNS Message is not an SES notification (not JSON)") from None
    if not isinstance(ses, dict):
        raise ValueError("SES notification must be a JSON object")
    return ses_events(ses, sns_id)


def ses_events(ses: Mapping[str, Any], event_key: str) -> list[WebhookEvent]:
    """The events of one SES notification (``notificationType``) or event record
    (``eventType``); ``event_key`` makes the event ids (the SNS MessageId)."""
    kind = ses.get("eventType", ses.get("notificationType"))
    if not isinstance(kind, str) or not kind:
        raise ValueError("SES notification has no eventType or notificationType")
    if kind in _IGNORED or (kind not in _DETAIL and kind != "Bounce"):
        return []
    mail = ses.get("mail")
    if not isinstance(mail, dict):
        raise ValueError("SES notification has no mail object")
    message_id = mail.get("messageId")
    if not isinstance(message_id, str) or not message_id:
        raise ValueError("SES mail.messageId must be a non-empty string")
    section, recipients_key = _DETAIL[kind]
    detail = ses.get(section)
    if detail is None and kind in ("Send", "Reject"):
        detail = {}
    if not isinstance(detail, dict):
        raise ValueError(f"SES {kind} notification has no {section} object")
    if kind == "Bounce":
        event = BOUNCE_EVENTS.get(str(detail.get("bounceType")))
        if event is None:
            raise ValueError("SES bounce has an unknown bounceType")
    else:
        event = SES_EVENTS[kind]
    emails = _recipients(detail, recipients_key, mail)
    timestamp = sns_timestamp(detail.get("timestamp") or mail.get("timestamp"))
    ref = mail_ref(mail)
    if ref is None:
        return []
    return [
        WebhookEvent(ref, event, message_id, email, timestamp, f"{event_key}:{email.lower()}")
        for email in emails
    ]


def _recipients(detail: Mapping[str, Any], key: str | None, mail: Mapping[str, Any]) -> list[str]:
    items = detail.get(key) if key else mail.get("destination")
    if not isinstance(items, list) or not items:
        raise ValueError(f"SES notification lists no recipients ({key or 'mail.destination'})")
    emails = []
    for item in items:
        value = item.get("emailAddress") if isinstance(item, dict) else item
        if not isinstance(value, str) or "@" not in value:
            raise ValueError("SES notification has a recipient that is not an address")
        emails.append(parseaddr(value)[1] or value)
    return emails


def mail_ref(mail: Mapping[str, Any]) -> str | None:
    """Our ref of an SES ``mail`` object: its ``X-BatchSender-Ref`` header, else its
    ``batchsender-ref`` tag; None when it has neither (mail we did not send)."""
    headers = mail.get("headers")
    if isinstance(headers, list):
        wanted = REF_HEADER.lower()
        for header in headers:
            if isinstance(header, dict) and str(header.get("name", "")).lower() == wanted:
                value = header.get("value")
                if isinstance(value, str) and value.strip():
                    return value.strip()
    tags = mail.get("tags")
    if isinstance(tags, dict):
        values = tags.get(REF_TAG)
        if isinstance(values, list) and values and isinstance(values[0], str):
            return ref_from_tag(values[0])
    return None


# The signing certificates of every SNS post this process checks (one fetch per URL).
CERTS = CertCache()


def topics(secret: str) -> list[str]:
    """The TopicArns an SES webhook secret allows (comma-separated)."""
    return [arn.strip() for arn in secret.split(",") if arn.strip()]


async def verify_webhook(body: bytes, headers: Mapping[str, str], secret: str) -> Signed | None:
    """``verify_sns`` for the topics ``secret`` names, certificates through ``CERTS``."""
    return await verify_sns(body, headers, allowed_topics=topics(secret), fetch_cert=CERTS)


async def webhook_subscription(body: bytes, headers: Mapping[str, str], secret: str) -> str | None:
    """``subscribe_url`` for the topics ``secret`` names, certificates through ``CERTS``."""
    return await subscribe_url(body, headers, allowed_topics=topics(secret), fetch_cert=CERTS)


# An account's webhook secret is its allowed TopicArn(s), comma-separated. SNS retries a
# post with the message it signed once (same Timestamp, same Signature), up to MAX_AGE
# later: a repeat is SNS's retry, not a copy to refuse.
WEBHOOK = Webhook(
    verify=verify_webhook,
    parse=parse_sns,
    headers=("x-amz-sns-message-type", "x-amz-sns-topic-arn"),
    scheme=WEBHOOK_SCHEME,
    max_age=MAX_AGE,
    repeat_is_retry=True,
    subscription=webhook_subscription,
)


SPEC = account_only(SesProvider, WEBHOOK)
