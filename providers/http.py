"""What the HTTP provider adapters share: the pooled aiohttp session, the results of a
refused or failed message, error texts fit to record, and the reading of an answer's
rate-limit headers.

An adapter subclasses ``HttpAdapter`` (it owns one ``aiohttp.ClientSession``, opened on
first use and again after ``close``), builds its results with ``failed``, ``paused`` and
``held``, passes every error text through ``scrub`` (no address, no credential) and reads
``Retry-After`` with ``parse_retry_after`` and ``X-RateLimit-Reset`` with
``rate_limit_reset``. ``halves`` is how a request too large for the provider (HTTP 413) is
split to be sent again.

A credentials check (``Provider.check``) is one GET on the same session: the adapter says
which (``check_call``, ``_check_request``) and what its answer means (``_checked``, with
``check_refused`` for the statuses it has no words of its own for); ``HttpAdapter.check``
makes the call, turns a call that got no answer into its reason (``unreachable``) and
passes the detail through the adapter's ``_clean``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from email.utils import parsedate_to_datetime
from time import time
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import orjson

from providers.base import CHECK_TIMEOUT, CheckResult, SendResult, header_safe, unreachable

T = TypeVar("T")

# What a transport failure of a request raises (the request may or may not have arrived).
TRANSPORT_ERRORS = (TimeoutError, aiohttp.ClientError)
MAX_CHECK_ANSWER = 1 << 20  # bytes of a credentials check's answer read at most

_ADDRESS = re.compile(r"[^\s<>()\[\],;:'\"`]+@[^\s<>()\[\],;:'\"`]*[^\s<>()\[\],;:'\"`.]")
_MAILBOX_SPECIALS = re.compile(r'[()<>\[\]:;@\\,."]')


@dataclass(frozen=True, slots=True)
class Answer:
    """A provider's answer to a check's call."""

    status: int
    headers: Mapping[str, str]
    payload: bytes

    def json(self) -> dict[str, Any] | None:
        return json_object(self.payload)


class HttpAdapter:
    """The pooled session of an HTTP adapter: ``_get_session()`` opens it when there is
    none (or it was closed), ``close()`` closes it. ``connector_limit`` bounds the
    connections it keeps open at once; ``resolver`` (``Account.resolver``) resolves the
    provider's host for them. ``_secrets`` are what ``_clean`` keeps out of a text (the
    adapter's credentials)."""

    connector_limit = 64
    check_call = ""  # the credentials check's request, e.g. "GET /v3/scopes"
    _secrets: tuple[str, ...] = ()

    def __init__(self, *, timeout: float, resolver: Any = None) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._resolver = resolver
        self._session: aiohttp.ClientSession | None = None

    async def check(self) -> CheckResult:
        """The credentials check (``providers.base.Provider.check``): one GET of
        ``_check_request()`` on the pooled session, its answer read by ``_checked``."""
        url, headers = self._check_request()
        try:
            async with self._get_session().get(
                url, headers=headers, timeout=aiohttp.ClientTimeout(total=CHECK_TIMEOUT)
            ) as resp:
                payload = await resp.content.read(MAX_CHECK_ANSWER + 1)
                while len(payload) <= MAX_CHECK_ANSWER and not resp.content.at_eof():
                    payload += await resp.content.read(MAX_CHECK_ANSWER + 1 - len(payload))
                answer = Answer(resp.status, resp.headers, payload)
        except TRANSPORT_ERRORS as exc:
            result = CheckResult(False, f"{urlsplit(url).netloc}: {unreachable(exc)}")
        else:
            if len(payload) > MAX_CHECK_ANSWER:
                result = CheckResult(False, f"the answer is larger than {MAX_CHECK_ANSWER} bytes")
            else:
                result = self._checked(answer)
        return replace(result, detail=one_line(self._clean(result.detail)), call=self.check_call)

    def _check_request(self) -> tuple[str, Mapping[str, str]]:
        """The URL and headers of the check's GET."""
        raise NotImplementedError

    def _checked(self, answer: Answer) -> CheckResult:
        """What the check's answer says about the credentials."""
        raise NotImplementedError

    def _clean(self, text: str) -> str:
        """A text as it may be shown or recorded: no credential, no address."""
        return scrub(text, self._secrets)

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.connector_limit, resolver=self._resolver),
                timeout=self._timeout,
            )
        return self._session

    async def close(self) -> None:
        """Close the HTTP session (a later send opens a new one)."""
        if self._session is not None:
            await self._session.close()
            self._session = None


# --- results -------------------------------------------------------------------------------


def failed(
    ref: str,
    error: str,
    *,
    retryable: bool = False,
    throttled: bool = False,
    retry_after: float | None = None,
) -> SendResult:
    """A message not sent: permanent, or ``retryable`` (``throttled`` implies it)."""
    return SendResult(
        ref,
        False,
        error=error,
        retryable=retryable or throttled,
        retry_after=retry_after,
        throttled=throttled,
    )


def paused(ref: str, error: str, reason: str | None = None) -> SendResult:
    """A message not sent because the account cannot send: the batch pauses with
    ``reason`` (the error text when not given)."""
    return SendResult(ref, False, error=error, pause_reason=reason or error)


def held(ref: str, error: str, retry_after: float | None = None) -> SendResult:
    """A message not sent because the account's daily quota is used up: it waits."""
    return SendResult(ref, False, error=error, retry_after=retry_after, hold=True)


def transport_reason(exc: BaseException) -> str:
    """What a transport error says (its type when it says nothing)."""
    return str(exc) or type(exc).__name__


def check_refused(status: int, detail: str = "", *, what: str = "the credentials") -> CheckResult:
    """A check whose call the provider answered with an error status the adapter has no
    words of its own for: what the status means, the provider's own ``detail`` after it."""
    if status == 401:
        why = f"the provider refused {what}"
    elif status == 403:
        why = f"the provider refused access with {what}"
    elif status == 404:
        why = "nothing answers this call at the account's base URL"
    elif status == 429:
        why = "the provider is rate limiting the account; try again in a moment"
    elif status >= 500:
        why = "the provider had an error; try again later"
    else:
        why = "the provider refused the call"
    return CheckResult(False, f"{why} (HTTP {status})" + (f": {detail}" if detail else ""))


# --- error texts ---------------------------------------------------------------------------


def scrub(text: str, secrets: Collection[str] = (), placeholder: str = "<secret>") -> str:
    """``text`` as an error text may hold it: every one of ``secrets`` (credentials)
    replaced by ``placeholder`` and anything that looks like an e-mail address by
    ``<address>``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, placeholder)
    return _ADDRESS.sub("<address>", text)


def one_line(text: str, limit: int = 300) -> str:
    """``text`` with its white space folded to single spaces, at most ``limit``
    characters (cut with "...")."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def loads_webhook(body: bytes) -> Any:
    """A webhook post's body, parsed; ``ValueError`` (naming the JSON error) when it is not
    valid JSON."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"webhook body is not valid JSON: {exc}") from None


def json_object(payload: bytes) -> dict[str, Any] | None:
    """An answer's body when it is a JSON object, else None."""
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def mailbox(name: str | None, address: str) -> str:
    """``"Name" <address>`` (the name made header-safe and quoted when it needs it), or
    the bare address."""
    if not name:
        return address
    name = header_safe(name)
    if _MAILBOX_SPECIALS.search(name):
        name = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{name} <{address}>"


# --- rate limits ---------------------------------------------------------------------------


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP date), else None."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time())
    except (TypeError, ValueError):
        return None


def rate_limit_reset(value: str | None) -> float | None:
    """Seconds until a rate-limit window reopens, from an ``X-RateLimit-Reset``-style
    value: epoch seconds, epoch milliseconds, or (a small number) seconds from now; None
    when there is no number."""
    try:
        reset = float(value or "")
    except ValueError:
        return None
    if not math.isfinite(reset):
        return None
    if reset > 1e12:  # epoch milliseconds
        reset /= 1000
    return max(0.0, reset - time()) if reset > 1e9 else max(0.0, reset)


def retry_after(
    headers: Mapping[str, str], *, reset: str = "X-RateLimit-Reset", reset_first: bool = False
) -> float | None:
    """Seconds to wait after a rate-limited answer: its ``Retry-After`` or its ``reset``
    header (``rate_limit_reset``), ``reset_first`` or not; None when neither says."""
    if reset_first:
        seconds = rate_limit_reset(headers.get(reset))
        return seconds if seconds is not None else parse_retry_after(headers.get("Retry-After"))
    seconds = parse_retry_after(headers.get("Retry-After"))
    return seconds if seconds is not None else rate_limit_reset(headers.get(reset))


# --- requests too large --------------------------------------------------------------------


def halves(items: Sequence[T]) -> tuple[Sequence[T], Sequence[T]]:
    """``items`` in two halves (the second the larger by one when odd): a request the
    provider found too large (HTTP 413) is sent again as two."""
    middle = len(items) // 2
    return items[:middle], items[middle:]
